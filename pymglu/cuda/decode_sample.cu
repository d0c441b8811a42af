// Temperature and top-k sampling of the next token on the device (pymglu/cuda/decode_sample.py), so that
// a captured decode step can sample without a host round trip per token.
//
// Row b of the logits gets the same choice as pymglu.models.generation.choose_next with the uniform draw
// r = uniforms[column * B + b] (column = state[1] - after_advance): keep the logits >= the top_k-th largest
// (ties at that value all kept; every logit when top_k >= V), p_j = exp((l_j - max) / temperature), and
// the token is the first j whose running sum of p exceeds r * sum(p). The sums are float32 here and float64
// there, so a draw within float32 rounding of a boundary between two tokens may fall on either side.
#include "common.cuh"

namespace pymglu {

constexpr int SAMPLE_THREADS = 256;

// Order-preserving key of a float: a > b as floats iff key(a) > key(b) as unsigned (no NaNs).
__device__ __forceinline__ unsigned order_key(float f) {
  const unsigned u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The top_k-th largest key of the row (1 <= top_k <= V), by four passes of an 8-bit radix select from the
// top digit. Every thread gets it.
template <typename T>
__device__ unsigned kth_largest_key(const T* row, int V, int top_k, unsigned* hist, unsigned* shared_prefix,
                                    int* shared_k) {
  unsigned prefix = 0u, prefix_mask = 0u;
  int k = top_k;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0u;
    __syncthreads();
    for (int j = threadIdx.x; j < V; j += blockDim.x) {
      const unsigned key = order_key(to_float(row[j]));
      if ((key & prefix_mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
    }
    __syncthreads();
    if (threadIdx.x < 32) {
      // lane L owns digits 255 - 8L .. 248 - 8L (from the top); counts above a digit come from a warp scan
      const int lane = threadIdx.x;
      unsigned mine = 0u;
      for (int i = 0; i < 8; ++i) mine += hist[255 - 8 * lane - i];
      unsigned above = mine;
      for (int o = 1; o < 32; o <<= 1) {
        const unsigned v = __shfl_up_sync(0xffffffffu, above, o);
        if (lane >= o) above += v;
      }
      above -= mine;  // keys with a larger digit than this lane's eight
      if (above < (unsigned)k && above + mine >= (unsigned)k) {
        unsigned seen = above;
        for (int i = 0; i < 8; ++i) {
          const int digit = 255 - 8 * lane - i;
          if (seen + hist[digit] >= (unsigned)k) {
            *shared_prefix = prefix | ((unsigned)digit << shift);
            *shared_k = k - (int)seen;
            break;
          }
          seen += hist[digit];
        }
      }
    }
    __syncthreads();
    prefix = *shared_prefix;
    k = *shared_k;
    prefix_mask |= 255u << shift;
    __syncthreads();
  }
  return prefix;
}

// One block of SAMPLE_THREADS per row b. logits (B, V); uniforms (columns, B) float32 in [0, 1);
// inv_temperature[0] = 1 / temperature (> 0); top_k[0] >= 1; writes next_ids[b] and history[b, column].
template <typename T>
__global__ void decode_sample(const T* __restrict__ logits, int V, const float* __restrict__ uniforms,
                              const float* __restrict__ inv_temperature, const int* __restrict__ top_k,
                              int* __restrict__ next_ids, int* __restrict__ history, int history_stride,
                              const int* __restrict__ state, int after_advance) {
  __shared__ unsigned hist[256];
  __shared__ unsigned shared_prefix;
  __shared__ int shared_k;
  __shared__ float scratch[32];
  __shared__ float warp_excl[33];
  __shared__ int chosen, last_any;
  const int b = blockIdx.x, B = gridDim.x;
  const T* row = logits + (long long)b * V;
  const int k = top_k[0];
  const unsigned cut = k < V ? kth_largest_key<T>(row, V, k, hist, &shared_prefix, &shared_k) : 0u;

  float m = -__int_as_float(0x7f800000);
  for (int j = threadIdx.x; j < V; j += blockDim.x) m = fmaxf(m, to_float(row[j]));
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = m;
  __syncthreads();
  m = scratch[0];
  for (int w = 1; w < (int)(blockDim.x >> 5); ++w) m = fmaxf(m, scratch[w]);

  // thread t sums the weights of its own run of positions; a block scan over the runs places them
  const float inv_t = inv_temperature[0];
  const int run = (V + blockDim.x - 1) / blockDim.x, lo = min(V, (int)threadIdx.x * run), hi = min(V, lo + run);
  float s = 0.0f;
  int last_kept = -1;
  for (int j = lo; j < hi; ++j) {
    const float l = to_float(row[j]);
    if (order_key(l) >= cut) { s += expf((l - m) * inv_t); last_kept = j; }
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  float incl = s;
  for (int o = 1; o < 32; o <<= 1) {
    const float v = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += v;
  }
  if (threadIdx.x == 0) { chosen = V; last_any = -1; }
  __syncthreads();  // every thread has read scratch (the maximum) before it is reused
  if (lane == 31) scratch[warp] = incl;
  if (last_kept >= 0) atomicMax(&last_any, last_kept);
  __syncthreads();
  if (warp == 0) {
    const float mine = lane < warps ? scratch[lane] : 0.0f;
    float w_incl = mine;
    for (int o = 1; o < 32; o <<= 1) {
      const float v = __shfl_up_sync(0xffffffffu, w_incl, o);
      if (lane >= o) w_incl += v;
    }
    if (lane < warps) warp_excl[lane] = w_incl - mine;
    if (lane == warps - 1) warp_excl[32] = w_incl;  // the total
  }
  __syncthreads();
  const int column = state[1] - after_advance;
  const float target = uniforms[(long long)column * B + b] * warp_excl[32];
  float c = warp_excl[warp] + (incl - s);
  for (int j = lo; j < hi; ++j) {
    const float l = to_float(row[j]);
    if (order_key(l) < cut) continue;
    c += expf((l - m) * inv_t);
    if (c > target) { atomicMin(&chosen, j); break; }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    const int token = chosen < V ? chosen : last_any;  // no crossing (a draw rounded up to 1): the last kept
    next_ids[b] = token;
    history[(long long)b * history_stride + column] = token;
  }
}

}  // namespace pymglu
