// FlashMGLU decode kernels: y = sum_i g(s_i) * (t - s_i), t = x W^T, s_i = x (M_i * W)^T,
// for T <= 16 tokens, reading W and the mask bits once. Layouts are documented in flash_mglu.py
// (pymglu.cuda.flash_mglu.pack_weights builds them); this file only consumes them.
//
// flash_mglu_mma<T, N_MASKS, NT, WARPS>  (T = __nv_bfloat16 or __half)
//   Tensor-core path. One block per 16-row strip of W; its WARPS warps split the strip's K groups
//   (64 columns each) and are reduced through shared memory in a fixed order (deterministic).
//   Per 16x16 tile a lane holds one A fragment of mma.m16n8k16 (four 32-bit registers, loaded as one
//   16-byte word); mask i of that tile is applied by AND-ing each register with a 0x0000/0xFFFF
//   halfword mask made by one `prmt` in sign-replicate mode from the lane's mask word, shifted so that
//   the two bits of the register sit in byte MSBs. One mma per mask plus one for the full product t.
//   NT = 1 covers tokens 0..7 (mma N = 8), NT = 2 covers 0..15.
//
// flash_mglu_simt<T, N_MASKS>  (any T incl. float)
//   CUDA-core path over the canonical bit-planes (n, h, ceil(d/32)): one warp per row, lane L reads
//   element 32j + L and bit L of word j; tokens in chunks of 4; shuffle reductions in a fixed order.

#include "tensor_core.cuh"

namespace pymglu {

// ---------------------------------------------------------------------------------------------
// Tensor-core path
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t pack2(uint16_t lo, uint16_t hi) { return (uint32_t)lo | ((uint32_t)hi << 16); }

// B fragment word for token `tok`, columns k and k + 1 (zero outside [0, d) and for tok >= n_tokens).
// Only the last, partial group and odd d take this path; kept out of line so that its branches do not
// cost the main loop registers (inlined, NVRTC spilled some instances).
template <typename T>
__device__ __noinline__ uint32_t load_x_pair(const T* __restrict__ x, int tok, int n_tokens, int k, int d) {
  if (tok >= n_tokens || k >= d) return 0u;
  const uint16_t* row = reinterpret_cast<const uint16_t*>(x) + (size_t)tok * d;
  if ((d & 1) == 0) return __ldg(reinterpret_cast<const unsigned int*>(row + k));
  uint16_t lo = __ldg(reinterpret_cast<const unsigned short*>(row + k));
  uint16_t hi = (k + 1 < d) ? __ldg(reinterpret_cast<const unsigned short*>(row + k + 1)) : (uint16_t)0;
  return pack2(lo, hi);
}

// Loads group `grp` of a strip: 4 W tiles, the mask words and this lane's x fragments (B operands).
template <typename T, int N_MASKS, int NT>
__device__ __forceinline__ void load_group(const uint4* __restrict__ w_strip, const uint32_t* __restrict__ m_strip,
                                           const T* __restrict__ x, const uint16_t* __restrict__ x16,
                                           const int (&x_offset)[NT], const bool (&tok_ok)[NT], bool even_d,
                                           int n_tokens, int d, int g, int tg, int grp, uint4 (&w_next)[4],
                                           uint32_t (&m_next)[N_MASKS], uint32_t (&b_next)[4][NT][2]) {
#pragma unroll
  for (int q = 0; q < 4; ++q) w_next[q] = load_stream(w_strip + ((size_t)grp * 4 + q) * 32);
#pragma unroll
  for (int i = 0; i < N_MASKS; ++i) m_next[i] = load_stream(m_strip + ((size_t)grp * N_MASKS + i) * 32);
  if (even_d && grp * 64 + 64 <= d) {  // whole group inside x, 4-byte aligned pairs: plain loads
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const unsigned int* p = reinterpret_cast<const unsigned int*>(x16 + x_offset[nt] + grp * 64);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        b_next[q][nt][0] = tok_ok[nt] ? __ldg(p + q * 8) : 0u;
        b_next[q][nt][1] = tok_ok[nt] ? __ldg(p + q * 8 + 4) : 0u;
      }
    }
  } else {
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int k0 = grp * 64 + q * 16 + 2 * tg;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        b_next[q][nt][0] = load_x_pair<T>(x, nt * 8 + g, n_tokens, k0, d);
        b_next[q][nt][1] = load_x_pair<T>(x, nt * 8 + g, n_tokens, k0 + 8, d);
      }
    }
  }
}

// Wp: (strips, groups, 4 tiles, 32 lanes) uint4;  Mp: (strips, groups, N_MASKS, 32 lanes) uint32.
template <typename T, int N_MASKS, int NT, int WARPS>
__global__ void __launch_bounds__(WARPS * 32)
flash_mglu_mma(const uint4* __restrict__ Wp, const uint32_t* __restrict__ Mp, const T* __restrict__ x,
               T* __restrict__ y, int n_tokens, int d, int h, int groups, int act) {
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
  const uint32_t* m_strip = Mp + (size_t)strip * groups * N_MASKS * 32 + lane;

  // Software pipeline: the W tiles, mask words and x fragments of the next group are in flight while
  // the current group is multiplied.
  uint4 w_next[4];
  uint32_t m_next[N_MASKS];
  uint32_t b_next[4][NT][2];
  // Each lane reads x for tokens g and g + 8 only; rows past n_tokens read as zeros.
  const bool even_d = (d & 1) == 0;
  const uint16_t* x16 = reinterpret_cast<const uint16_t*>(x);
  int x_offset[NT];  // element offset of this lane's first x pair; tokens < 16 and d < 2^26 keep it in int
  bool tok_ok[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int tok = nt * 8 + g;
    tok_ok[nt] = tok < n_tokens;
    x_offset[nt] = (tok_ok[nt] ? tok : 0) * d + 2 * tg;
  }
  int grp = warp;
  if (grp < groups)
    load_group<T, N_MASKS, NT>(w_strip, m_strip, x, x16, x_offset, tok_ok, even_d, n_tokens, d, g, tg, grp, w_next, m_next, b_next);
  for (; grp < groups; grp += WARPS) {
    uint4 w[4];
    uint32_t m[N_MASKS];
    uint32_t b[4][NT][2];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      w[q] = w_next[q];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) { b[q][nt][0] = b_next[q][nt][0]; b[q][nt][1] = b_next[q][nt][1]; }
    }
#pragma unroll
    for (int i = 0; i < N_MASKS; ++i) m[i] = m_next[i];
    if (grp + WARPS < groups)
      load_group<T, N_MASKS, NT>(w_strip, m_strip, x, x16, x_offset, tok_ok, even_d, n_tokens, d, g, tg, grp + WARPS,
                                 w_next, m_next, b_next);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) Mma<T>::run(acc_t[nt], w[q].x, w[q].y, w[q].z, w[q].w, b[q][nt][0], b[q][nt][1]);
#pragma unroll
      for (int i = 0; i < N_MASKS; ++i) {
        const uint4 a = masked_fragment(w[q], m[i], q);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) Mma<T>::run(acc_s[i][nt], a.x, a.y, a.z, a.w, b[q][nt][0], b[q][nt][1]);
      }
    }
  }

  // Cross-warp reduction in a fixed order, one product (t, then each s_i) per pass, fused epilogue.
  constexpr int COLS = 8 * NT;
  constexpr int ELEMS = 16 * COLS;
  constexpr int PER_THREAD = (ELEMS + WARPS * 32 - 1) / (WARPS * 32);
  __shared__ float red[WARPS][16][COLS];
  float t_val[PER_THREAD];
  float y_val[PER_THREAD];
#pragma unroll
  for (int e = 0; e < PER_THREAD; ++e) { t_val[e] = 0.0f; y_val[e] = 0.0f; }

#pragma unroll
  for (int p = 0; p <= N_MASKS; ++p) {
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
        const int row = idx / COLS, col = idx % COLS;
        float sum = 0.0f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) sum += red[w][row][col];
        if (p == 0) t_val[e] = sum;
        else y_val[e] += gate_fn(sum, act) * (t_val[e] - sum);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int e = 0; e < PER_THREAD; ++e) {
    const int idx = threadIdx.x + e * WARPS * 32;
    if (idx < ELEMS) {
      const int row = idx / COLS, col = idx % COLS;
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
