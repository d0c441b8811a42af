// The whole one-token decode step of pymglu.models.Transformer in one persistent launch
// (pymglu/cuda/decode_fused.py builds its inputs; pymglu.models.GraphDecoder launches it).
//
// decode_fused<T, N_MASKS, WARPS>  (T = __nv_bfloat16 or __half; N_MASKS = 0 for the GLU kinds, else the
//   capacity of the mask arrays: the launch's n_masks masks, 1 <= n_masks <= N_MASKS)
//   One block per SM, all resident at once (the launcher sizes the grid so), WARPS warps each. The step
//   is a sequence of phases separated by grid barriers; per transformer block:
//     1. q k v:    RMSNorm of x into shared memory, the stacked q/k/v product, rotary embedding of q and
//                  k, the new key and value stored in the cache at position state[0];
//     2. attention over positions 0 .. state[0], split into chunks of FUSED_CHUNK positions; the last
//                  chunk of a head to finish merges the head's chunks (a per-head arrival counter);
//     3. o:        x += attn W_o^T;
//     4. up:       RMSNorm of x, then the MGLU epilogue sum_i g(s_i) (t - s_i) (FlashMGLU's strip
//                  computation) or, for GLU, g(gate) * value;
//     5. down:     x += hidden W_down^T;
//   then the final RMSNorm and the logits, and in the last block to finish the greedy argmax and the
//   position update. Every product reads its weight in FlashMGLU's tile format (16-row strips of
//   64-column groups, mma.m16n8k16 A fragments; flash_mglu.py; the MGLU up layer in its masked form,
//   multiplied by mma.sp with the masks as metadata), with the input vector (up to
//   FUSED_MAX_TOKENS tokens, the mma N = 8 columns) staged in shared memory. A block splits into
//   `teams` of WARPS / teams warps (chosen per phase by the launcher); a team takes one strip at a time
//   and its warps split the strip's groups, reduced through shared memory in a fixed order.
//
//   Rows are permuted at packing time so that every epilogue pairs rows (r, r + 8) of one strip: rotary
//   pairs (j, j + Dh/2) of q and k, gate and value rows of GLU.
//
//   Memory: data written during the launch by other blocks is read with ld.global.cg (L2, never a
//   stale L1 line), after a barrier (release on the arrival, acquire on the counter). Each warp loads its
//   groups of tiles one or more groups ahead of its products along the whole phase, across strips.
//   Arithmetic: float32 accumulation, one rounding to T per stored value, as the
//   multi-launch step (decode_step.cu) and the eager model; no float atomics (same inputs, same bits).

#include "block_reduce.cuh"
#include "tensor_core.cuh"

namespace pymglu {

constexpr int FUSED_MAX_TOKENS = 8;
constexpr int FUSED_CHUNK = 32;
constexpr int FUSED_MAX_LANE_ELEMS = 8;  // head_dim <= 256
// Groups each warp loads ahead of its products (dense products, MGLU products), by warps per block:
// fewer warps, more registers per thread, deeper lookahead.
// (sm_100+: one group, the deeper lookahead spilled on sm_120.)
template <int WARPS, int NM> struct Ahead {
#if __CUDA_ARCH__ >= 1000
  static constexpr int dense = 1, mglu = 1;
#elif __CUDA_ARCH__ == 860 || __CUDA_ARCH__ == 870 || __CUDA_ARCH__ == 890
  static constexpr int dense = NM <= 8 ? 4 : 2, mglu = NM <= 8 ? 2 : 1;  // 3 spilled at NM = 4 (CI's NVRTC)
#else
  static constexpr int dense = NM <= 8 ? 4 : 2, mglu = NM <= 4 ? 3 : NM <= 8 ? 2 : 1;
#endif
};
template <int NM> struct Ahead<16, NM> { static constexpr int dense = 1, mglu = 1; };

// Device pointers of one transformer block (the host builds a table of n_layers of these).
struct FusedLayer {
  const uint4* wqkv;       // (3 d / 16 strips, d / 64 groups) tiles, rows permuted (rotary pairs)
  const uint4* wo;         // (d / 16, d / 64)
  const uint4* wup;        // MGLU: FlashMGLU tiles of W (ceil(h/16) strips); GLU: gate/value pairs (ceil(h/8))
  const uint32_t* mup;     // MGLU mask words (strips, groups, N_MASKS, 32); unused for GLU
  const uint4* wdown;      // (d / 16, ceil(h / 64))
  const void* attn_norm;   // (d,) T
  const void* ffn_norm;    // (d,) T
  void* k_cache;           // (B, H, capacity, Dh) T
  void* v_cache;
};

enum FusedEpilogue { EPI_QKV = 0, EPI_RESIDUAL = 1, EPI_GLU = 2, EPI_LOGITS = 3 };

template <typename T>
struct FusedCtx {
  int B, d, h, H, Dh, V, capacity, act, pos;
  float eps, scale;
  int xs_stride;
  T* xs;          // shared: (B, xs_stride) staged input of the current product
  float* red;     // shared: (WARPS, 128) partial sums of one 16 x 8 tile per warp
  float* scratch; // shared: 64 floats
  T* x;           // (B, d) residual stream
  T* q;           // (B, H, Dh) rotated queries
  T* attn;        // (B, d)
  T* hidden;      // (B, h)
  T* logits;      // (B, V)
  float* part_max;
  float* part_sum;
  float* part_acc;
  unsigned* head_count;  // (B * H) arrivals of the chunks of each head
  const float2* rope_row;  // shared: (Dh / 2) (cos, sin) of the position
  unsigned* counter;     // grid barrier arrivals
  unsigned target;       // arrivals that end the next barrier
  float* chunk_w;        // shared: (chunks) weights of the attention merge
  unsigned long long* trace;  // optional (2 + 2 barriers, grid) global timestamps (ns), else nullptr
};

// Timestamp slot `event` of this block (thread 0): 0 start, 1 + 2k arrival at barrier k, 2 + 2k its
// release, 1 + 2K the end (K barriers).
template <typename T>
__device__ __forceinline__ void trace_event(FusedCtx<T>& cx, int event);

template <typename T> __device__ __forceinline__ T load_cg(const T* p);
template <> __device__ __forceinline__ __nv_bfloat16 load_cg(const __nv_bfloat16* p) {
  return __ushort_as_bfloat16(__ldcg(reinterpret_cast<const unsigned short*>(p)));
}
template <> __device__ __forceinline__ __half load_cg(const __half* p) {
  return __ushort_as_half(__ldcg(reinterpret_cast<const unsigned short*>(p)));
}

__device__ __forceinline__ float round_to(float v, const __nv_bfloat16*) { return __bfloat162float(__float2bfloat16_rn(v)); }
__device__ __forceinline__ float round_to(float v, const __half*) { return __half2float(__float2half_rn(v)); }

__device__ __forceinline__ unsigned load_acquire(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ unsigned long long global_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
  return t;
}

template <typename T>
__device__ __forceinline__ void trace_event(FusedCtx<T>& cx, int event) {
  if (cx.trace != nullptr && threadIdx.x == 0) cx.trace[(size_t)event * gridDim.x + blockIdx.x] = global_ns();
}

// Grid barrier over a monotonic arrival counter: thread 0 arrives with release semantics (the block's
// writes, ordered before it by bar.sync, become visible first) and spins with acquire loads until every
// block of the grid has arrived.
template <typename T>
__device__ __forceinline__ void grid_sync(FusedCtx<T>& cx) {
  __syncthreads();
  trace_event(cx, 1 + 2 * (cx.target / gridDim.x));
  cx.target += gridDim.x;
  if (threadIdx.x == 0) {
    asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(cx.counter) : "memory");
    if (load_acquire(cx.counter) < cx.target) {
      const unsigned long long start = global_ns();
      while (load_acquire(cx.counter) < cx.target) {
        if (global_ns() - start > 4000000000ull) {  // 4 s: a block never started (the grid is not resident)
          printf("pymglu decode_fused: grid barrier timed out (block %d of %d); the grid must fit on the GPU at once\n",
                 blockIdx.x, gridDim.x);
          __trap();
        }
      }
    }
  }
  trace_event(cx, 2 * (cx.target / gridDim.x));
  __syncthreads();
}

// xs[b, k] = src[b, k] (norm == nullptr) or src[b, k] / sqrt(mean(src[b]^2) + eps) * norm[k], rounded
// to T, for k < K, and 0 for K <= k < KP (the padding of the last 64-column group). src rows come from
// `rows[b]` (the embedding rows of block 0) or src + b * K.
// One pass over L2: the rows are copied into shared memory (16-byte loads when K is a multiple of 8) while
// the sums of squares accumulate; the normalisation then rescales the copy in place.
template <typename T>
__device__ void stage_input(FusedCtx<T>& cx, const T* src, const int* rows, const T* norm, int K, int KP) {
  const bool vec = (K & 7) == 0;  // rows and the staged copy are then 16-byte aligned
  float* inv_rms = cx.scratch + 40;  // (FUSED_MAX_TOKENS)
  for (int b = 0; b < cx.B; ++b) {
    const T* row = rows ? src + (size_t)rows[b] * K : src + (size_t)b * K;
    T* out = cx.xs + (size_t)b * cx.xs_stride;
    float acc = 0.0f;
    if (vec) {
      for (int k8 = threadIdx.x; k8 < K / 8; k8 += blockDim.x) {
        const uint4 v = __ldcg(reinterpret_cast<const uint4*>(row) + k8);
        reinterpret_cast<uint4*>(out)[k8] = v;
        const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc += to_float(e[i]) * to_float(e[i]);
      }
    } else {
      for (int k = threadIdx.x; k < K; k += blockDim.x) {
        const T v = load_cg(row + k);
        out[k] = v;
        acc += to_float(v) * to_float(v);
      }
    }
    for (int k = K + threadIdx.x; k < KP; k += blockDim.x) out[k] = from_float<T>(0.0f);
    if (norm) {
      const float total = block_sum(acc, cx.scratch);
      if (threadIdx.x == 0) inv_rms[b] = 1.0f / sqrtf(total / (float)K + cx.eps);
    }
  }
  __syncthreads();
  if (norm == nullptr) return;
  for (int b = 0; b < cx.B; ++b) {
    const float r = inv_rms[b];
    T* out = cx.xs + (size_t)b * cx.xs_stride;
    for (int k = threadIdx.x; k < K; k += blockDim.x) out[k] = from_float<T>(to_float(out[k]) * r * to_float(norm[k]));
  }
  __syncthreads();
}

__device__ __forceinline__ void team_sync(int team, int team_threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(team + 1), "r"(team_threads) : "memory");
}

// The warp's 16 x 8 accumulator tile into red[warp] (element r * 8 + c: row r of the strip, token c).
__device__ __forceinline__ void store_tile(float* red, const float (&acc)[4]) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tg = lane & 3;
  float* r = red + warp * 128;
  r[g * 8 + 2 * tg] = acc[0];
  r[g * 8 + 2 * tg + 1] = acc[1];
  r[(g + 8) * 8 + 2 * tg] = acc[2];
  r[(g + 8) * 8 + 2 * tg + 1] = acc[3];
}

__device__ __forceinline__ float team_total(const float* red, int first_warp, int team_warps, int e) {
  float s = 0.0f;
  for (int w = 0; w < team_warps; ++w) s += red[(first_warp + w) * 128 + e];
  return s;
}

// Epilogue of a dense product for rows (p, p + 8) of strip `strip`, token b: values a and c (float32 sums).
template <typename T, int EPI>
__device__ __forceinline__ void dense_epilogue(FusedCtx<T>& cx, const FusedLayer& L, int strip, int p, int b,
                                               float a, float c) {
  const T* tag = nullptr;
  if (EPI == EPI_QKV) {
    const int per_section = cx.d / 16, section = strip / per_section, local = strip % per_section;
    if (section < 2) {
      const int half = cx.Dh / 2, strips_per_head = cx.Dh / 16;
      const int head = local / strips_per_head, j = (local % strips_per_head) * 8 + p;
      const float qa = round_to(a, tag), qb = round_to(c, tag);  // the product's output, as stored by cuBLAS
      const float2 cs = cx.rope_row[j];
      const T ra = from_float<T>(qa * cs.x - qb * cs.y), rb = from_float<T>(qa * cs.y + qb * cs.x);
      if (section == 0) {
        T* qo = cx.q + ((size_t)b * cx.H + head) * cx.Dh;
        qo[j] = ra;
        qo[j + half] = rb;
      } else {
        T* ko = static_cast<T*>(L.k_cache) + (((size_t)b * cx.H + head) * cx.capacity + cx.pos) * cx.Dh;
        ko[j] = ra;
        ko[j + half] = rb;
      }
    } else {
      for (int r = 0; r < 2; ++r) {
        const int row = local * 16 + p + 8 * r, head = row / cx.Dh, j = row % cx.Dh;
        static_cast<T*>(L.v_cache)[(((size_t)b * cx.H + head) * cx.capacity + cx.pos) * cx.Dh + j] =
            from_float<T>(r ? c : a);
      }
    }
  } else if (EPI == EPI_RESIDUAL) {
    for (int r = 0; r < 2; ++r) {
      const int row = strip * 16 + p + 8 * r;
      if (row < cx.d) {
        T* xr = cx.x + (size_t)b * cx.d + row;
        *xr = from_float<T>(to_float(load_cg(xr)) + (r ? c : a));
      }
    }
  } else if (EPI == EPI_GLU) {
    const int row = strip * 8 + p;
    if (row < cx.h)
      cx.hidden[(size_t)b * cx.h + row] = from_float<T>(gate_fn(round_to(a, tag), cx.act) * round_to(c, tag));
  } else {
    for (int r = 0; r < 2; ++r) {
      const int row = strip * 16 + p + 8 * r;
      if (row < cx.V) cx.logits[(size_t)b * cx.V + row] = from_float<T>(r ? c : a);
    }
  }
}

// One product of the staged input (xs) with `strips` strips of `groups` 64-column groups, and its epilogue.
// Team `team` of this block takes strips first, first + stride, ... (stride = grid * teams); warp twarp of
// the team takes groups twarp, twarp + team_warps, ... of each. The warp's loads run AHEAD groups ahead
// of its products along that whole sequence, across strip boundaries, so that the strip reductions do
// not drain them. NM = 0: dense (epilogue EPI on row pairs); NM > 0: MGLU with n <= NM masks.
template <typename T, int NM, int EPI, int AHEAD>
__device__ void product_phase(FusedCtx<T>& cx, const FusedLayer& L, const uint4* __restrict__ tiles,
                              const uint32_t* __restrict__ masks, int n, int strips, int groups, int teams) {
  constexpr int NMS = NM > 0 ? NM : 1;
  const int warps = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int team_warps = warps / teams, team = warp / team_warps, twarp = warp % team_warps;
  const int tt = threadIdx.x - team * team_warps * 32;
  const int per_strip = twarp < groups ? (groups - twarp + team_warps - 1) / team_warps : 0;
  const int stride = gridDim.x * teams, first = blockIdx.x * teams + team;
  const int g = lane >> 2, tg = lane & 3;
  const bool tok_ok = g < cx.B;
  const uint32_t* xrow = reinterpret_cast<const uint32_t*>(cx.xs + (tok_ok ? g : 0) * cx.xs_stride) + tg;
  // MGLU: the lane's x quads (elements 4 tg .. 4 tg + 3 of each tile; rows are 8-byte aligned)
  const T* xquad = cx.xs + (tok_ok ? g : 0) * cx.xs_stride + 4 * tg;

  uint4 wq[AHEAD][4];
  uint32_t mq[AHEAD][NMS];
  int ld_strip = first, ld_i = 0;
  auto load_next = [&](uint4 (&w)[4], uint32_t (&m)[NMS]) {
    if (per_strip == 0 || ld_strip >= strips) return;
    const size_t tile = (size_t)ld_strip * groups + twarp + ld_i * team_warps;
    const uint4* wp = tiles + tile * 128 + lane;
#pragma unroll
    for (int q = 0; q < 4; ++q) w[q] = load_stream(wp + q * 32);
    if (NM > 0) {
      const uint32_t* mp = masks + tile * n * 32 + lane;
#pragma unroll
      for (int i = 0; i < NMS; ++i) m[i] = i < n ? load_stream(mp + i * 32) : 0u;  // 0: every element off
    }
    if (++ld_i == per_strip) { ld_i = 0; ld_strip += stride; }
  };
#pragma unroll
  for (int a = 0; a < AHEAD; ++a) load_next(wq[a], mq[a]);

  for (int strip = first; strip < strips; strip += stride) {
    float acc_t[4], acc_s[NMS][4];
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      acc_t[c] = 0.0f;
#pragma unroll
      for (int i = 0; i < NMS; ++i) acc_s[i][c] = 0.0f;
    }
    for (int gi = 0; gi < per_strip; ++gi) {
      const int grp = twarp + gi * team_warps;
      uint4 w[4];
      uint32_t m[NMS];
#pragma unroll
      for (int q = 0; q < 4; ++q) w[q] = wq[0][q];
#pragma unroll
      for (int i = 0; i < NMS; ++i) m[i] = mq[0][i];
#pragma unroll
      for (int a = 0; a + 1 < AHEAD; ++a) {
#pragma unroll
        for (int q = 0; q < 4; ++q) wq[a][q] = wq[a + 1][q];
#pragma unroll
        for (int i = 0; i < NMS; ++i) mq[a][i] = mq[a + 1][i];
      }
      load_next(wq[AHEAD - 1], mq[AHEAD - 1]);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        if constexpr (NM == 0) {
          const int kp = grp * 32 + q * 8;  // the element pair k0 = 64 grp + 16 q, in 32-bit words
          const uint32_t b0 = tok_ok ? xrow[kp] : 0u;
          const uint32_t b1 = tok_ok ? xrow[kp + 4] : 0u;
          Mma<T>::run(acc_t, w[q].x, w[q].y, w[q].z, w[q].w, b0, b1);
        } else {  // FlashMGLU's format: sparse mma with the masks as metadata (tensor_core.cuh)
          const uint2 v = tok_ok ? *reinterpret_cast<const uint2*>(xquad + grp * 64 + q * 16) : make_uint2(0u, 0u);
          const uint4 bq = sparse_b_fragment(v);
          masked_mma_metadata<T>(acc_t, w[q], bq, ALL_ON_METADATA, q);
          // Up to 4 masks (16 warps at 128 registers) every slot is multiplied, those past n with zero
          // words; a guard per mask costs the registers that keep that instance from spilling.
#pragma unroll
          for (int i = 0; i < NM; ++i)
            if (NM <= 4 || i < n) masked_mma<T>(acc_s[i], w[q], bq, m[i], q);
        }
      }
    }
    if (NM == 0) {
      store_tile(cx.red, acc_t);
      team_sync(team, team_warps * 32);
      if (tt < 64) {
        const int p = tt >> 3, b = tt & 7;
        if (b < cx.B) {
          const float a = team_total(cx.red, team * team_warps, team_warps, p * 8 + b);
          const float c = team_total(cx.red, team * team_warps, team_warps, (p + 8) * 8 + b);
          dense_epilogue<T, EPI>(cx, L, strip, p, b, a, c);
        }
      }
      team_sync(team, team_warps * 32);
    } else {
      float t_val = 0.0f, y_val = 0.0f;
#pragma unroll
      for (int pass = 0; pass <= NM; ++pass) {
        if (pass > n) break;
        float v[4];
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          v[c] = acc_t[c];
#pragma unroll
          for (int i = 0; i < NM; ++i)
            if (pass == i + 1) v[c] = acc_s[i][c];
        }
        store_tile(cx.red, v);
        team_sync(team, team_warps * 32);
        if (tt < 128) {
          const float s = team_total(cx.red, team * team_warps, team_warps, tt);
          if (pass == 0) t_val = s;
          else y_val += gate_fn(s, cx.act) * (t_val - s);
        }
        team_sync(team, team_warps * 32);
      }
      const int row = strip * 16 + (tt >> 3), b = tt & 7;
      if (tt < 128 && b < cx.B && row < cx.h) cx.hidden[(size_t)b * cx.h + row] = from_float<T>(y_val);
    }
  }
}

// Attention of the new token of every sequence over positions 0 .. pos: work items (sequence-head,
// chunk of FUSED_CHUNK positions); the block's warps share a chunk's positions (online softmax), merge
// in shared memory, and store the chunk's partial; the last chunk of a head to finish merges them all.
template <typename T>
__device__ void attention_phase(FusedCtx<T>& cx, const FusedLayer& L, float* smem) {
  const int warps = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int length = cx.pos + 1, used = (length + FUSED_CHUNK - 1) / FUSED_CHUNK;
  const int chunks = (cx.capacity + FUSED_CHUNK - 1) / FUSED_CHUNK, Dh = cx.Dh;
  float* warp_m = smem;                 // (warps)
  float* warp_l = warp_m + warps;       // (warps)
  float* warp_acc = warp_l + warps;     // (warps, Dh)
  unsigned* is_last = reinterpret_cast<unsigned*>(cx.scratch + 32);
  const T* kc = static_cast<const T*>(L.k_cache);
  const T* vc = static_cast<const T*>(L.v_cache);
  for (int item = blockIdx.x; item < cx.B * cx.H * used; item += gridDim.x) {
    const int bh = item / used, c = item % used;
    const int first = c * FUSED_CHUNK, last = min(first + FUSED_CHUNK, length);
    const size_t base = (size_t)bh * cx.capacity * Dh;
    float qv[FUSED_MAX_LANE_ELEMS], acc[FUSED_MAX_LANE_ELEMS];
#pragma unroll
    for (int i = 0; i < FUSED_MAX_LANE_ELEMS; ++i) {
      const int j = lane + 32 * i;
      qv[i] = j < Dh ? to_float(load_cg(cx.q + (size_t)bh * Dh + j)) : 0.0f;
      acc[i] = 0.0f;
    }
    float m = -__int_as_float(0x7f800000), l = 0.0f;
    for (int t = first + warp; t < last; t += warps) {
      float kv[FUSED_MAX_LANE_ELEMS], vv[FUSED_MAX_LANE_ELEMS];
#pragma unroll
      for (int i = 0; i < FUSED_MAX_LANE_ELEMS; ++i) {
        const int j = lane + 32 * i;
        kv[i] = j < Dh ? to_float(load_cg(kc + base + (size_t)t * Dh + j)) : 0.0f;
        vv[i] = j < Dh ? to_float(load_cg(vc + base + (size_t)t * Dh + j)) : 0.0f;
      }
      float dot = 0.0f;
#pragma unroll
      for (int i = 0; i < FUSED_MAX_LANE_ELEMS; ++i) dot += qv[i] * kv[i];
      for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
      const float s = dot * cx.scale, m_new = fmaxf(m, s);
      const float correction = expf(m - m_new), p = expf(s - m_new);
      l = l * correction + p;
#pragma unroll
      for (int i = 0; i < FUSED_MAX_LANE_ELEMS; ++i) acc[i] = acc[i] * correction + p * vv[i];
      m = m_new;
    }
    if (lane == 0) { warp_m[warp] = m; warp_l[warp] = l; }
#pragma unroll
    for (int i = 0; i < FUSED_MAX_LANE_ELEMS; ++i)
      if (lane + 32 * i < Dh) warp_acc[warp * Dh + lane + 32 * i] = acc[i];
    __syncthreads();
    float M = -__int_as_float(0x7f800000);
    for (int w = 0; w < warps; ++w) M = fmaxf(M, warp_m[w]);  // finite: the chunk has a position
    float Lsum = 0.0f;
    for (int w = 0; w < warps; ++w) Lsum += warp_l[w] * expf(warp_m[w] - M);
    const size_t part = (size_t)bh * chunks + c;
    if (threadIdx.x == 0) { cx.part_max[part] = M; cx.part_sum[part] = Lsum; }
    for (int j = threadIdx.x; j < Dh; j += blockDim.x) {
      float a = 0.0f;
      for (int w = 0; w < warps; ++w) a += warp_acc[w * Dh + j] * expf(warp_m[w] - M);
      cx.part_acc[part * Dh + j] = a;
    }
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
      const unsigned before = atomicAdd(cx.head_count + bh, 1u);
      *is_last = before == (unsigned)(used - 1);
      if (*is_last) cx.head_count[bh] = 0u;  // every chunk of this head has arrived
    }
    __syncthreads();
    if (*is_last) {  // block-uniform
      __threadfence();
      const float* pm = cx.part_max + (size_t)bh * chunks;
      const float* ps = cx.part_sum + (size_t)bh * chunks;
      float mine = -__int_as_float(0x7f800000);
      for (int cc = threadIdx.x; cc < used; cc += blockDim.x) {
        cx.chunk_w[cc] = __ldcg(pm + cc);
        mine = fmaxf(mine, cx.chunk_w[cc]);
      }
      const float Mh = block_max(mine, cx.scratch);  // finite: every chunk in use has a position
      float part = 0.0f;
      for (int cc = threadIdx.x; cc < used; cc += blockDim.x) {
        cx.chunk_w[cc] = expf(cx.chunk_w[cc] - Mh);
        part += __ldcg(ps + cc) * cx.chunk_w[cc];
      }
      const float inv = 1.0f / block_sum(part, cx.scratch);  // also publishes chunk_w to the block
      const int b = bh / cx.H, head = bh % cx.H;
      for (int j = threadIdx.x; j < Dh; j += blockDim.x) {
        const float* acc_j = cx.part_acc + (size_t)bh * chunks * Dh + j;
        float a = 0.0f;
#pragma unroll 8
        for (int cc = 0; cc < used; ++cc) a += __ldcg(acc_j + (size_t)cc * Dh) * cx.chunk_w[cc];
        cx.attn[(size_t)b * cx.d + head * Dh + j] = from_float<T>(a * inv);
      }
    }
    __syncthreads();  // shared scratch is reused by the next item
  }
}

// Greedy choice of the last block: ids[b] = history[b, state[1]] = argmax(logits[b]) (lowest index
// among equal maxima).
template <typename T>
__device__ void argmax_rows(FusedCtx<T>& cx, int* ids, int* history, int history_stride, int column) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (warp >= cx.B) return;
  const T* row = cx.logits + (size_t)warp * cx.V;
  float bv = -__int_as_float(0x7f800000);
  int bi = cx.V;
  for (int j = lane; j < cx.V; j += 32) {
    const float v = to_float(load_cg(row + j));
    if (v > bv || bi == cx.V) { bv = v; bi = j; }
  }
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
    const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
  }
  if (lane == 0) {
    ids[warp] = bi;
    history[(size_t)warp * history_stride + column] = bi;
  }
}

// n_masks: masks of the MGLU kinds, 1 <= n_masks <= N_MASKS (0 with N_MASKS = 0: GLU).
// teams: 3 bits per phase, q k v | o << 3 | up << 6 | down << 9 | logits << 12.
// sync: [0] grid barrier arrivals, [1] blocks done; both 0 between launches.
template <typename T, int N_MASKS, int WARPS>
__global__ void __launch_bounds__(WARPS * 32, 1)
decode_fused(const FusedLayer* __restrict__ layers, int n_layers, const T* __restrict__ embed,
             const uint4* __restrict__ head_tiles, const T* __restrict__ final_norm, T* x, T* q, T* attn, T* hidden,
             T* logits, float* part_max, float* part_sum, float* part_acc, unsigned* head_count,
             const float2* __restrict__ rope, int* ids, int* history, int history_stride, int* state, unsigned* sync,
             int n_masks, int B, int d, int h, int H, int Dh, int V, int capacity, int act, int teams, int xs_stride,
             int union_floats,
             float eps, float scale, int greedy, unsigned long long* trace) {
  extern __shared__ float4 fused_smem[];
  FusedCtx<T> cx;
  cx.B = B; cx.d = d; cx.h = h; cx.H = H; cx.Dh = Dh; cx.V = V; cx.capacity = capacity; cx.act = act;
  cx.pos = state[0];
  cx.eps = eps; cx.scale = scale; cx.xs_stride = xs_stride;
  cx.red = reinterpret_cast<float*>(fused_smem);
  cx.scratch = cx.red + WARPS * 128;
  float* union_area = cx.scratch + 64;  // staged input, or the attention's per-warp partials
  cx.xs = reinterpret_cast<T*>(union_area);
  cx.x = x; cx.q = q; cx.attn = attn; cx.hidden = hidden; cx.logits = logits;
  cx.part_max = part_max; cx.part_sum = part_sum; cx.part_acc = part_acc; cx.head_count = head_count;
  __shared__ float2 rope_row[FUSED_MAX_LANE_ELEMS * 16];
  for (int j = threadIdx.x; j < Dh / 2; j += blockDim.x) rope_row[j] = rope[(size_t)cx.pos * (Dh / 2) + j];
  cx.rope_row = rope_row;
  cx.counter = sync; cx.target = 0; cx.trace = trace;
  cx.chunk_w = union_area + union_floats;
  trace_event(cx, 0);

  const int gd = (d + 63) / 64, gh = (h + 63) / 64;
  const int t_qkv = teams & 7, t_o = (teams >> 3) & 7, t_up = (teams >> 6) & 7, t_down = (teams >> 9) & 7,
            t_head = (teams >> 12) & 7;
  const int up_strips = N_MASKS > 0 ? (h + 15) / 16 : (h + 7) / 8;
  __shared__ int token_rows[FUSED_MAX_TOKENS];
  if (threadIdx.x < B) token_rows[threadIdx.x] = ids[threadIdx.x];
  __syncthreads();

  for (int l = 0; l < n_layers; ++l) {
    const FusedLayer L = layers[l];
    // 1. q k v (block 0 reads its input from the embedding rows, and block 0 of the grid stores them in x)
    if (l == 0) {
      stage_input<T>(cx, embed, token_rows, static_cast<const T*>(L.attn_norm), d, gd * 64);
      if (blockIdx.x == 0)
        for (int i = threadIdx.x; i < B * d; i += blockDim.x) x[i] = embed[(size_t)token_rows[i / d] * d + i % d];
    } else {
      stage_input<T>(cx, x, nullptr, static_cast<const T*>(L.attn_norm), d, gd * 64);
    }
    product_phase<T, 0, EPI_QKV, Ahead<WARPS, N_MASKS>::dense>(cx, L, L.wqkv, nullptr, 0, 3 * d / 16, gd, t_qkv);
    grid_sync(cx);
    // 2. attention
    attention_phase<T>(cx, L, union_area);
    grid_sync(cx);
    // 3. o
    stage_input<T>(cx, attn, nullptr, nullptr, d, gd * 64);
    product_phase<T, 0, EPI_RESIDUAL, Ahead<WARPS, N_MASKS>::dense>(cx, L, L.wo, nullptr, 0, d / 16, gd, t_o);
    grid_sync(cx);
    // 4. up
    stage_input<T>(cx, x, nullptr, static_cast<const T*>(L.ffn_norm), d, gd * 64);
    if constexpr (N_MASKS > 0) product_phase<T, N_MASKS, EPI_GLU, Ahead<WARPS, N_MASKS>::mglu>(cx, L, L.wup, L.mup, n_masks, up_strips, gd, t_up);
    else product_phase<T, 0, EPI_GLU, Ahead<WARPS, N_MASKS>::dense>(cx, L, L.wup, nullptr, 0, up_strips, gd, t_up);
    grid_sync(cx);
    // 5. down
    stage_input<T>(cx, hidden, nullptr, nullptr, h, gh * 64);
    product_phase<T, 0, EPI_RESIDUAL, Ahead<WARPS, N_MASKS>::dense>(cx, L, L.wdown, nullptr, 0, d / 16, gh, t_down);
    grid_sync(cx);
  }
  // final norm and logits
  stage_input<T>(cx, x, nullptr, final_norm, d, gd * 64);
  const FusedLayer none = {};
  product_phase<T, 0, EPI_LOGITS, Ahead<WARPS, N_MASKS>::dense>(cx, none, head_tiles, nullptr, 0, (V + 15) / 16, gd, t_head);
  // the last block to finish chooses the tokens and moves the position on
  __syncthreads();
  trace_event(cx, 1 + 2 * (cx.target / gridDim.x));
  __shared__ unsigned last_block;
  if (threadIdx.x == 0) {
    __threadfence();
    last_block = atomicAdd(sync + 1, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last_block) return;
  __threadfence();
  if (greedy) argmax_rows<T>(cx, ids, history, history_stride, state[1]);
  __syncthreads();
  if (threadIdx.x == 0) {
    state[0] += 1;
    state[1] += 1;
    sync[0] = 0u;  // every block has passed its last barrier: the counters start from 0 next launch
    sync[1] = 0u;
    __threadfence();
  }
}

}  // namespace pymglu
