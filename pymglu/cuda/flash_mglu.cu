// FlashMGLU decode kernels: y = sum_i g(s_i) * (t - s_i), t = x W^T, s_i = x (M_i * W)^T,
// for T <= 16 tokens, reading W and the mask bits once. Layouts are documented in flash_mglu.py
// (pymglu.cuda.flash_mglu.pack_weights builds them); this file only consumes them.
//
// flash_mglu_mma<T, N_MASKS, TOKENS, WARPS, AHEAD>  (T = __nv_bfloat16 or __half)
//   Tensor-core path. One block per 16-row strip of W; its WARPS warps split the strip's K groups
//   (64 columns each) and are reduced through shared memory in a fixed order (deterministic).
//   Per 16x16 tile a lane holds one A fragment (four 32-bit registers, loaded as one 16-byte word).
//   The masks are applied by the sparse tensor cores (tensor_core.cuh): mma.sp m16n8k32 with the tile
//   as its compressed A, x at every other position of B, and the mask bits as the metadata that picks
//   x or zero for each weight; two logic operations per tile and mask make the metadata from the
//   lane's mask word. TOKENS (the largest token count of the instance) sets the B columns:
//   - 8 or 16: column j is token j; one mma.sp for the full product t and one per mask, per 8 tokens;
//   - 4 (paired columns): columns 0..3 are tokens 0..3 with x at the odd positions of every chunk and
//     columns 4..7 the same tokens with x at the even ones, so that one mma.sp per mask gives s_i in
//     columns 0..3 and t - s_i (the elements the mask leaves off) in columns 4..7: n products per
//     tile instead of n + 1, and no accumulator for t.
//
// flash_mglu_simt<T, N_MASKS>  (any T incl. float)
//   CUDA-core path over the canonical bit-planes (n, h, ceil(d/32)): one warp per row, lane L reads
//   element 32j + L and bit L of word j; tokens in chunks of 4; shuffle reductions in a fixed order.

#include "tensor_core.cuh"

namespace pymglu {

// ---------------------------------------------------------------------------------------------
// Tensor-core path
// ---------------------------------------------------------------------------------------------

// The lane's four x values x[tok, k .. k + 3] (the B fragment source of one tile; zero outside [0, d)
// and for tok >= n_tokens), low element first. Only the last, partial group and d not a multiple of 4
// take this path.
template <typename T>
__device__ __forceinline__ uint2 load_x_quad(const T* __restrict__ x, int tok, int n_tokens, int k, int d) {
  uint32_t v[4] = {0u, 0u, 0u, 0u};
  if (tok < n_tokens) {
    const unsigned short* row = reinterpret_cast<const unsigned short*>(x) + (size_t)tok * d;
#pragma unroll
    for (int j = 0; j < 4; ++j)
      if (k + j < d) v[j] = __ldg(row + k + j);
  }
  return make_uint2(v[0] | (v[1] << 16), v[2] | (v[3] << 16));
}

// Loads group `grp` of a strip from HBM: its 4 W tiles and the lane's mask words, four masks at a time
// with one 16-byte load, then one 4-byte load for each of the last n % 4, which keep the stop-18 order
// (flash_mglu.py, lane_major_words; n <= 3 reads exactly as before). A version with one 8-byte load for
// a leftover pair was tried first; its register counts were within a few of these, and this is the
// version the H200 tests and timings ran.
template <int N_MASKS>
__device__ __forceinline__ void load_weights(const uint4* __restrict__ w_strip, const uint32_t* __restrict__ m_strip,
                                             int grp, int lane, uint4 (&w)[4], uint32_t (&m)[N_MASKS]) {
#pragma unroll
  for (int q = 0; q < 4; ++q) w[q] = load_stream(w_strip + ((size_t)grp * 4 + q) * 32);
  const uint32_t* words = m_strip + (size_t)grp * N_MASKS * 32;
  constexpr int FOURS = N_MASKS / 4;
#pragma unroll
  for (int j = 0; j < FOURS; ++j) {
    const uint4 v = load_stream(reinterpret_cast<const uint4*>(words + 128 * j) + lane);
    m[4 * j] = v.x;
    m[4 * j + 1] = v.y;
    m[4 * j + 2] = v.z;
    m[4 * j + 3] = v.w;
  }
#pragma unroll
  for (int i = 4 * FOURS; i < N_MASKS; ++i) m[i] = load_stream(words + 32 * i + lane);
}

// Loads this lane's x values of group `grp` (the sources of its B fragments; from L1/L2).
template <typename T, int NT>
__device__ __forceinline__ void load_x(const T* __restrict__ x, const uint16_t* __restrict__ x16,
                                       const int (&x_offset)[NT], const bool (&tok_ok)[NT], const int (&tok)[NT],
                                       bool d_quads, int n_tokens, int d, int tg, int grp, uint2 (&b)[4][NT]) {
  if (d_quads && grp * 64 + 64 <= d) {  // whole group inside x, 8-byte aligned quads: plain loads
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const uint2* p = reinterpret_cast<const uint2*>(x16 + x_offset[nt] + grp * 64);
#pragma unroll
      for (int q = 0; q < 4; ++q) b[q][nt] = tok_ok[nt] ? __ldg(p + q * 4) : make_uint2(0u, 0u);
    }
  } else {
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int k0 = grp * 64 + q * 16 + 4 * tg;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) b[q][nt] = load_x_quad<T>(x, tok[nt], n_tokens, k0, d);
    }
  }
}

// Blocks per SM the compiler must leave room for (__launch_bounds__' second argument; 0: no bound, the
// same code as leaving it out; 1 is not, and made one instance 25% slower on the H200). Instances of 5
// to 8 masks sit near 128 registers, and their loads need the 16 warps per SM that 128 registers allow.
// Measured on the H200 (docs/flash_mglu.md, "Paired columns"), the bound is kept where it helped:
// - the paired instances: without it the H200 machine's NVRTC gave the paired n = 8 instance 142
//   registers, three blocks per SM instead of four, and 17% more time;
// - the eight-warp instances (one-column n = 8 at 8192 x 28672: 1-2% faster with it).
// Elsewhere it cost 0.1-1.2 us (the compiler schedules the loop differently under a bound), and the
// 16-token instances would spill under it. The 16-token n = 7 one sits near 168 registers, three
// blocks of four warps: with the 16-byte mask loads (stop 19) it went from 166 to 184 registers (two
// blocks) without a bound of 3, and the first version of that change ran 18% slower there on the H200. (-DPYMGLU_MMA_NO_MIN_BLOCKS drops the bounds: flash_mglu.py,
// MIN_BLOCKS_BOUND, for benchmarks.)
template <int N_MASKS, int TOKENS, int WARPS>
struct MmaMinBlocks {
#ifdef PYMGLU_MMA_NO_MIN_BLOCKS
  static constexpr int value = 0;
#else
  static constexpr bool near_128 = N_MASKS >= 5 && N_MASKS <= 8 && TOKENS <= 8;
  static constexpr bool near_168 = N_MASKS == 7 && TOKENS == 16 && WARPS == 4;
  static constexpr int value = near_128 && (TOKENS == 4 || WARPS == 8) ? 16 / WARPS : (near_168 ? 3 : 0);
#endif
};

// Wp: (strips, groups, 4 tiles, 32 lanes) uint4;  Mp: (strips, groups, 32 N_MASKS) uint32, lane-major chunks.
// AHEAD: groups of W tiles and mask words each warp keeps in flight beyond the one it multiplies
// (flash_mglu.py, mma_config).
template <typename T, int N_MASKS, int TOKENS, int WARPS, int AHEAD>
__global__ void __launch_bounds__(WARPS * 32, (MmaMinBlocks<N_MASKS, TOKENS, WARPS>::value))
flash_mglu_mma(const uint4* __restrict__ Wp, const uint32_t* __restrict__ Mp, const T* __restrict__ x,
               T* __restrict__ y, int n_tokens, int d, int h, int groups, int act) {
  static_assert(TOKENS == 4 || TOKENS == 8 || TOKENS == 16, "TOKENS: 4 (paired columns), 8 or 16");
  constexpr int NT = TOKENS == 16 ? 2 : 1;  // mma products per tile and mask (8 columns each)
  constexpr bool PAIRED = TOKENS == 4;
  const int strip = blockIdx.x;
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int g = lane >> 2;
  const int tg = lane & 3;

  float acc_t[NT][4];
  float acc_s[N_MASKS][NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      acc_t[nt][c] = 0.0f;
#pragma unroll
      for (int i = 0; i < N_MASKS; ++i) acc_s[i][nt][c] = 0.0f;
    }

  const uint4* w_strip = Wp + (size_t)strip * groups * 4 * 32 + lane;
  const uint32_t* m_strip = Mp + (size_t)strip * groups * N_MASKS * 32;

  // Software pipeline: the W tiles and mask words of the next AHEAD groups of the warp are in flight
  // while the current group is multiplied, and so are the x values of the next group, except in the
  // largest instances, where the registers are needed for the accumulators (they then load at the
  // start of the group, from L1/L2).
  static_assert(AHEAD >= 1 && AHEAD <= 3, "AHEAD: 1 to 3 groups");
  constexpr bool X_AHEAD = N_MASKS * NT < 32;
  uint4 w_ahead[AHEAD][4];
  uint32_t m_ahead[AHEAD][N_MASKS];
  uint2 b_next[4][NT];
  // Each lane reads x for tokens g and g + 8 only; rows past n_tokens read as zeros.
  const bool d_quads = (d & 3) == 0;
  const uint16_t* x16 = reinterpret_cast<const uint16_t*>(x);
  int x_offset[NT];  // element offset of this lane's first x quad; tokens < 16 and d < 2^26 keep it in int
  bool tok_ok[NT];
  int tok[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    tok[nt] = PAIRED ? (g & 3) : nt * 8 + g;
    tok_ok[nt] = tok[nt] < n_tokens;
    x_offset[nt] = (tok_ok[nt] ? tok[nt] : 0) * d + 4 * tg;
  }
  // Byte selectors of sparse_b_fragment: x in the high halves (odd chunk positions), or, for the
  // complement columns of a paired instance, in the low halves (even positions).
  const bool complement = PAIRED && g >= 4;
  const uint32_t sel_even = complement ? B_LOW_EVEN : B_HIGH_EVEN;
  const uint32_t sel_odd = complement ? B_LOW_ODD : B_HIGH_ODD;
  // With PDL (flash_mglu.py, pdl=True) the next kernel may start once every block has passed
  // pdl_launch_dependents (here, or after its last loads with PYMGLU_PDL_TRIGGER_AT_END); this one's
  // first weight loads go out before it waits for the kernel before it: only x and y are shared with
  // other kernels.
#ifndef PYMGLU_PDL_TRIGGER_AT_END
  pdl_launch_dependents();
#endif
  int grp = warp;
#pragma unroll
  for (int a = 0; a < AHEAD; ++a)
    if (grp + a * WARPS < groups) load_weights<N_MASKS>(w_strip, m_strip, grp + a * WARPS, lane, w_ahead[a], m_ahead[a]);
  pdl_wait();
  if (X_AHEAD && grp < groups) load_x<T, NT>(x, x16, x_offset, tok_ok, tok, d_quads, n_tokens, d, tg, grp, b_next);
  for (; grp < groups; grp += WARPS) {
    uint4 w[4];
    uint32_t m[N_MASKS];
    uint2 b[4][NT];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      w[q] = w_ahead[0][q];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
        if (X_AHEAD) b[q][nt] = b_next[q][nt];
    }
#pragma unroll
    for (int i = 0; i < N_MASKS; ++i) m[i] = m_ahead[0][i];
#pragma unroll
    for (int a = 0; a + 1 < AHEAD; ++a) {
#pragma unroll
      for (int q = 0; q < 4; ++q) w_ahead[a][q] = w_ahead[a + 1][q];
#pragma unroll
      for (int i = 0; i < N_MASKS; ++i) m_ahead[a][i] = m_ahead[a + 1][i];
    }
    if (grp + AHEAD * WARPS < groups)
      load_weights<N_MASKS>(w_strip, m_strip, grp + AHEAD * WARPS, lane, w_ahead[AHEAD - 1], m_ahead[AHEAD - 1]);
    if (X_AHEAD && grp + WARPS < groups)
      load_x<T, NT>(x, x16, x_offset, tok_ok, tok, d_quads, n_tokens, d, tg, grp + WARPS, b_next);
    if (!X_AHEAD) load_x<T, NT>(x, x16, x_offset, tok_ok, tok, d_quads, n_tokens, d, tg, grp, b);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {  // token block outermost: one expanded B fragment live at a time
        const uint4 bq = sparse_b_fragment(b[q][nt], sel_even, sel_odd);
        if (!PAIRED) masked_mma_metadata<T>(acc_t[nt], w[q], bq, ALL_ON_METADATA, q);
#pragma unroll
        for (int i = 0; i < N_MASKS; ++i) masked_mma<T>(acc_s[i][nt], w[q], bq, m[i], q);
      }
    }
  }

#ifdef PYMGLU_PDL_TRIGGER_AT_END
  pdl_launch_dependents();
#endif
  // Cross-warp reduction in a fixed order, one product (t, then each s_i; paired: each s_i with its
  // complement) per pass, fused epilogue.
  constexpr int COLS = 8 * NT;
  constexpr int OUT_COLS = PAIRED ? 4 : COLS;  // tokens per row of the output tile
  constexpr int ELEMS = 16 * OUT_COLS;
  constexpr int PER_THREAD = (ELEMS + WARPS * 32 - 1) / (WARPS * 32);
  __shared__ float red[WARPS][16][COLS];
  float t_val[PER_THREAD];
  float y_val[PER_THREAD];
#pragma unroll
  for (int e = 0; e < PER_THREAD; ++e) { t_val[e] = 0.0f; y_val[e] = 0.0f; }

#pragma unroll
  for (int p = PAIRED ? 1 : 0; p <= N_MASKS; ++p) {  // p = 0: t; p = i + 1: s_i
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      float v[4];
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        float a = acc_t[nt][c];
#pragma unroll
        for (int i = 0; i < N_MASKS; ++i)
          if (p == i + 1) a = acc_s[i][nt][c];
        v[c] = a;
      }
      red[warp][g][nt * 8 + 2 * tg] = v[0];
      red[warp][g][nt * 8 + 2 * tg + 1] = v[1];
      red[warp][g + 8][nt * 8 + 2 * tg] = v[2];
      red[warp][g + 8][nt * 8 + 2 * tg + 1] = v[3];
    }
    __syncthreads();
#pragma unroll
    for (int e = 0; e < PER_THREAD; ++e) {
      const int idx = threadIdx.x + e * WARPS * 32;
      if (idx < ELEMS) {
        const int row = idx / OUT_COLS, col = idx % OUT_COLS;
        float sum = 0.0f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) sum += red[w][row][col];
        if (PAIRED) {
          float off = 0.0f;  // t - s_i: the elements mask i leaves off
#pragma unroll
          for (int w = 0; w < WARPS; ++w) off += red[w][row][col + 4];
          y_val[e] += gate_fn(sum, act) * off;
        } else if (p == 0) {
          t_val[e] = sum;
        } else {
          y_val[e] += gate_fn(sum, act) * (t_val[e] - sum);
        }
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int e = 0; e < PER_THREAD; ++e) {
    const int idx = threadIdx.x + e * WARPS * 32;
    if (idx < ELEMS) {
      const int row = idx / OUT_COLS, col = idx % OUT_COLS;
      const int out_row = strip * 16 + row;
      if (col < n_tokens && out_row < h) y[(size_t)col * h + out_row] = from_float<T>(y_val[e]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// CUDA-core path over canonical bit-planes
// ---------------------------------------------------------------------------------------------

template <typename T, int N_MASKS>
__global__ void __launch_bounds__(128)
flash_mglu_simt(const T* __restrict__ W, const uint32_t* __restrict__ planes, const T* __restrict__ x,
                T* __restrict__ y, int n_tokens, int d, int h, int act) {
  constexpr int SIMT_TOKENS = 4;
  const int row = blockIdx.x * 4 + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  pdl_launch_dependents();
  pdl_wait();  // PDL: nothing is read before the kernel before this one has finished
  if (row >= h) return;
  const int words = (d + 31) >> 5;
  const T* w_row = W + (size_t)row * d;
  for (int tok0 = 0; tok0 < n_tokens; tok0 += SIMT_TOKENS) {
    float acc_t[SIMT_TOKENS];
    float acc_s[N_MASKS][SIMT_TOKENS];
#pragma unroll
    for (int j = 0; j < SIMT_TOKENS; ++j) {
      acc_t[j] = 0.0f;
#pragma unroll
      for (int i = 0; i < N_MASKS; ++i) acc_s[i][j] = 0.0f;
    }
    for (int wi = 0; wi < words; ++wi) {
      const int k = wi * 32 + lane;
      if (k >= d) break;
      const float wv = to_float<T>(w_row[k]);
      uint32_t bits[N_MASKS];
#pragma unroll
      for (int i = 0; i < N_MASKS; ++i) bits[i] = (planes[((size_t)i * h + row) * words + wi] >> lane) & 1u;
#pragma unroll
      for (int j = 0; j < SIMT_TOKENS; ++j) {
        const int tok = tok0 + j;
        const float p = tok < n_tokens ? wv * to_float<T>(x[(size_t)tok * d + k]) : 0.0f;
        acc_t[j] += p;
#pragma unroll
        for (int i = 0; i < N_MASKS; ++i) acc_s[i][j] += bits[i] ? p : 0.0f;
      }
    }
#pragma unroll
    for (int j = 0; j < SIMT_TOKENS; ++j) {
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) {
        acc_t[j] += __shfl_xor_sync(0xffffffffu, acc_t[j], off);
#pragma unroll
        for (int i = 0; i < N_MASKS; ++i) acc_s[i][j] += __shfl_xor_sync(0xffffffffu, acc_s[i][j], off);
      }
    }
    if (lane == 0) {
#pragma unroll
      for (int j = 0; j < SIMT_TOKENS; ++j) {
        const int tok = tok0 + j;
        if (tok < n_tokens) {
          float out = 0.0f;
#pragma unroll
          for (int i = 0; i < N_MASKS; ++i) out += gate_fn(acc_s[i][j], act) * (acc_t[j] - acc_s[i][j]);
          y[(size_t)tok * h + row] = from_float<T>(out);
        }
      }
    }
  }
}

}  // namespace pymglu
