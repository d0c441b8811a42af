// Kernels of one captured decode step of pymglu.models.Transformer (pymglu/cuda/decode_step.py).
//
// Every kernel reads the step's position from device memory (state[0]), never from a launch argument,
// so that one captured CUDA graph serves every position: replaying it decodes the next token.
// Arithmetic follows the reference ops (pymglu/autograd/ops): float32 inside, one rounding to the
// storage dtype T on the way out, the rotary angles formed in double.
#include "common.cuh"
#include "block_reduce.cuh"

namespace pymglu {

constexpr int DECODE_THREADS = 256;
// NVRTC has no <math.h> macros.
__device__ __forceinline__ float neg_inf() { return -__int_as_float(0x7f800000); }

// out[b, :] = table[ids[b], :]. Grid: B blocks.
template <typename T>
__global__ void decode_embed(const int* __restrict__ ids, const T* __restrict__ table, T* __restrict__ out,
                             int d) {
  const long long row = ids[blockIdx.x];
  for (int j = threadIdx.x; j < d; j += blockDim.x) out[(long long)blockIdx.x * d + j] = table[row * d + j];
}

// out[b, :] = x[b, :] / sqrt(mean(x[b, :]^2) + eps) * weight. Grid: B blocks of DECODE_THREADS.
template <typename T>
__global__ void decode_rms_norm(const T* __restrict__ x, const T* __restrict__ weight, T* __restrict__ out,
                                int d, float eps) {
  __shared__ float scratch[32];
  const T* row = x + (long long)blockIdx.x * d;
  float ss = 0.0f;
  for (int j = threadIdx.x; j < d; j += blockDim.x) {
    const float v = to_float(row[j]);
    ss += v * v;
  }
  const float r = 1.0f / sqrtf(block_sum(ss, scratch) / (float)d + eps);
  for (int j = threadIdx.x; j < d; j += blockDim.x)
    out[(long long)blockIdx.x * d + j] = from_float<T>(to_float(row[j]) * r * to_float(weight[j]));
}

// Rotary embedding of the new token's query and key, and the key/value store into the cache at the
// position state[0]. qkv: (B, 3 * H * Dh) rows [q | k | v]; q_out: (B, H, Dh);
// k_cache, v_cache: (B, H, capacity, Dh). Pairs (j, j + Dh/2) rotate by pos * base^(-2j/Dh).
// Grid: B * H blocks.
template <typename T>
__global__ void decode_rope_store(const T* __restrict__ qkv, T* __restrict__ q_out, T* __restrict__ k_cache,
                                  T* __restrict__ v_cache, const int* __restrict__ state, int H, int Dh,
                                  int capacity, double base) {
  const int b = blockIdx.x / H, head = blockIdx.x % H, half = Dh / 2, D = H * Dh;
  const long long pos = state[0];
  const T* q = qkv + (long long)b * 3 * D + head * Dh;
  const T* k = q + D;
  const T* v = k + D;
  T* qo = q_out + ((long long)b * H + head) * Dh;
  const long long slot = (((long long)b * H + head) * capacity + pos) * Dh;
  for (int j = threadIdx.x; j < half; j += blockDim.x) {
    const double angle = (double)pos * pow(base, -2.0 * j / Dh);
    const float c = (float)cos(angle), s = (float)sin(angle);
    const float qa = to_float(q[j]), qb = to_float(q[j + half]);
    const float ka = to_float(k[j]), kb = to_float(k[j + half]);
    qo[j] = from_float<T>(qa * c - qb * s);
    qo[j + half] = from_float<T>(qa * s + qb * c);
    k_cache[slot + j] = from_float<T>(ka * c - kb * s);
    k_cache[slot + j + half] = from_float<T>(ka * s + kb * c);
  }
  for (int j = threadIdx.x; j < Dh; j += blockDim.x) v_cache[slot + j] = v[j];
}

// Attention of the new token over the cached positions 0 .. state[0], split over the positions
// (flash-decoding): block (bh, c) covers positions [c * chunk, (c + 1) * chunk), each of its warps an
// interleaved share of them with an online softmax (running max m, sum l, and sum of p * v), so K and V
// are read once; the warps' results are merged in shared memory into the block's partial
// (part_max, part_sum, part_acc). decode_attention_combine merges the partials of the chunks in use.
// q: (B, H, Dh); caches: (B, H, capacity, Dh); part_max, part_sum: (B * H, chunks);
// part_acc: (B * H, chunks, Dh) float32. Grid: (B * H, chunks) blocks of ATTENTION_WARPS warps.
constexpr int ATTENTION_WARPS = 4;
constexpr int ATTENTION_MAX_LANE_ELEMS = 8;  // head_dim <= 256

template <typename T>
__global__ void decode_attention_partial(const T* __restrict__ q, const T* __restrict__ k_cache,
                                         const T* __restrict__ v_cache, float* __restrict__ part_max,
                                         float* __restrict__ part_sum, float* __restrict__ part_acc,
                                         const int* __restrict__ state, int Dh, int capacity, int chunk,
                                         float scale) {
  __shared__ float warp_m[ATTENTION_WARPS], warp_l[ATTENTION_WARPS];
  __shared__ float warp_acc[ATTENTION_WARPS][32 * ATTENTION_MAX_LANE_ELEMS];
  const int bh = blockIdx.x, c = blockIdx.y, chunks = gridDim.y;
  const int length = state[0] + 1;
  const int first = c * chunk, last = min(first + chunk, length);
  const long long part = (long long)bh * chunks + c;
  if (first >= length) {  // a chunk past the filled positions: an empty partial
    if (threadIdx.x == 0) { part_max[part] = neg_inf(); part_sum[part] = 0.0f; }
    for (int j = threadIdx.x; j < Dh; j += blockDim.x) part_acc[part * Dh + j] = 0.0f;
    return;
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const long long base = (long long)bh * capacity * Dh;
  float qv[ATTENTION_MAX_LANE_ELEMS], acc[ATTENTION_MAX_LANE_ELEMS];
#pragma unroll
  for (int i = 0; i < ATTENTION_MAX_LANE_ELEMS; ++i) {
    const int j = lane + 32 * i;
    qv[i] = j < Dh ? to_float(q[(long long)bh * Dh + j]) : 0.0f;
    acc[i] = 0.0f;
  }
  float m = neg_inf(), l = 0.0f;
  for (int t = first + warp; t < last; t += ATTENTION_WARPS) {
    const T* kt = k_cache + base + (long long)t * Dh;
    const T* vt = v_cache + base + (long long)t * Dh;
    float kv[ATTENTION_MAX_LANE_ELEMS], vv[ATTENTION_MAX_LANE_ELEMS];
#pragma unroll
    for (int i = 0; i < ATTENTION_MAX_LANE_ELEMS; ++i) {
      const int j = lane + 32 * i;
      kv[i] = j < Dh ? to_float(kt[j]) : 0.0f;
      vv[i] = j < Dh ? to_float(vt[j]) : 0.0f;
    }
    float dot = 0.0f;
#pragma unroll
    for (int i = 0; i < ATTENTION_MAX_LANE_ELEMS; ++i) dot += qv[i] * kv[i];
    for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
    const float s = dot * scale;
    const float m_new = fmaxf(m, s);
    const float correction = expf(m - m_new), p = expf(s - m_new);
    l = l * correction + p;
#pragma unroll
    for (int i = 0; i < ATTENTION_MAX_LANE_ELEMS; ++i) acc[i] = acc[i] * correction + p * vv[i];
    m = m_new;
  }
  if (lane == 0) { warp_m[warp] = m; warp_l[warp] = l; }
#pragma unroll
  for (int i = 0; i < ATTENTION_MAX_LANE_ELEMS; ++i) warp_acc[warp][lane + 32 * i] = acc[i];
  __syncthreads();
  float M = neg_inf();
  for (int w = 0; w < ATTENTION_WARPS; ++w) M = fmaxf(M, warp_m[w]);  // finite: the chunk has a position
  float weight[ATTENTION_WARPS];
  float L = 0.0f;
  for (int w = 0; w < ATTENTION_WARPS; ++w) {
    weight[w] = expf(warp_m[w] - M);  // 0 for a warp that had no position (m = -inf)
    L += warp_l[w] * weight[w];
  }
  if (threadIdx.x == 0) { part_max[part] = M; part_sum[part] = L; }
  for (int j = threadIdx.x; j < Dh; j += blockDim.x) {
    float a = 0.0f;
    for (int w = 0; w < ATTENTION_WARPS; ++w) a += warp_acc[w][j] * weight[w];
    part_acc[part * Dh + j] = a;
  }
}

// out[b, head * Dh + j] = (sum_c e^(m_c - M) acc_c[j]) / (sum_c e^(m_c - M) l_c) over the chunks in use.
// Grid: B * H blocks.
template <typename T>
__global__ void decode_attention_combine(const float* __restrict__ part_max, const float* __restrict__ part_sum,
                                         const float* __restrict__ part_acc, T* __restrict__ out,
                                         const int* __restrict__ state, int Dh, int chunks, int chunk) {
  const int bh = blockIdx.x;
  const int used = min(chunks, (state[0] + chunk) / chunk);  // ceil((state[0] + 1) / chunk)
  const float* pm = part_max + (long long)bh * chunks;
  const float* ps = part_sum + (long long)bh * chunks;
  float M = neg_inf();
  for (int c = 0; c < used; ++c) M = fmaxf(M, pm[c]);
  float L = 0.0f;
  for (int c = 0; c < used; ++c) L += ps[c] * expf(pm[c] - M);
  const float inv = 1.0f / L;
  for (int j = threadIdx.x; j < Dh; j += blockDim.x) {
    float a = 0.0f;
    for (int c = 0; c < used; ++c) a += part_acc[((long long)bh * chunks + c) * Dh + j] * expf(pm[c] - M);
    out[(long long)bh * Dh + j] = from_float<T>(a * inv);
  }
}

// out[b, i] = g(gv[b, i]) * gv[b, h + i] for rows gv[b] = [gate | value] (the stacked GLU product).
// Grid: (ceil(h / DECODE_THREADS), B).
template <typename T>
__global__ void decode_glu(const T* __restrict__ gv, T* __restrict__ out, int h, int act) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= h) return;
  const T* row = gv + (long long)blockIdx.y * 2 * h;
  out[(long long)blockIdx.y * h + i] = from_float<T>(gate_fn(to_float(row[i]), act) * to_float(row[h + i]));
}

// Greedy choice: next_ids[b] = argmax(logits[b, :]) (the lowest index among equal maxima, as NumPy),
// also written to history[b, state[1]]. Grid: B blocks of DECODE_THREADS.
template <typename T>
__global__ void decode_argmax(const T* __restrict__ logits, int vocab, int* __restrict__ next_ids,
                              int* __restrict__ history, int history_stride, const int* __restrict__ state) {
  __shared__ float best_v[DECODE_THREADS];
  __shared__ int best_i[DECODE_THREADS];
  const T* row = logits + (long long)blockIdx.x * vocab;
  float bv = neg_inf();
  int bi = vocab;
  for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
    const float v = to_float(row[j]);
    if (v > bv || bi == vocab) { bv = v; bi = j; }
  }
  best_v[threadIdx.x] = bv;
  best_i[threadIdx.x] = bi;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) {
      const float ov = best_v[threadIdx.x + stride];
      const int oi = best_i[threadIdx.x + stride];
      if (ov > best_v[threadIdx.x] || (ov == best_v[threadIdx.x] && oi < best_i[threadIdx.x])) {
        best_v[threadIdx.x] = ov;
        best_i[threadIdx.x] = oi;
      }
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    next_ids[blockIdx.x] = best_i[0];
    history[(long long)blockIdx.x * history_stride + state[1]] = best_i[0];
  }
}

// The step is over: the next token sits one position further, and writes the next history column.
__global__ void decode_advance(int* state) {
  state[0] += 1;
  state[1] += 1;
}

}  // namespace pymglu
