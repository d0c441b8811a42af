// Fused kernels of tape ops (pymglu/cuda/tape_ops.py launches them for the ops of pymglu.autograd.ops):
//
//   rms_norm_fwd<T>     y = x r * w per row, r = 1 / sqrt(mean(x^2) + eps) (stored for the backward)
//   rms_norm_bwd<T>     dx = r (g w - xhat mean(g w xhat)), and each block's partial sum of g xhat
//   rope<T>             rotate the pairs (j, j + Dh/2) of every row by +-position * inv_freq[j]
//   causal_softmax<T>   P = softmax(mask(S * scale)) per row of S, rows of T_k scores
//   causal_softmax_bwd<T> dS = P (dP - rowsum(dP P)) * scale
//
// T is the storage dtype (__nv_bfloat16, __half or float); all arithmetic is float32 (the angles of
// rope float64, as the op's reference path forms them). Row kernels: one block per row, grid-stride over
// rows; sums in a fixed order, no atomics, so results are deterministic.

#include "common.cuh"
#include "block_reduce.cuh"

namespace pymglu {

// x, y: (rows, D); w: (D,); r: (rows,) float.
template <typename T>
__global__ void rms_norm_fwd(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y,
                             float* __restrict__ r_out, long long rows, int D, float eps) {
  __shared__ float scratch[32];
  for (long long row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * D;
    float ss = 0.0f;
    for (int c = threadIdx.x; c < D; c += blockDim.x) {
      const float v = to_float<T>(xr[c]);
      ss += v * v;
    }
    ss = block_sum(ss, scratch);
    const float r = 1.0f / sqrtf(ss / (float)D + eps);
    if (threadIdx.x == 0) r_out[row] = r;
    for (int c = threadIdx.x; c < D; c += blockDim.x)
      y[row * D + c] = from_float<T>(to_float<T>(xr[c]) * r * to_float<T>(w[c]));
  }
}

// g, dx: (rows, D) (dx may be null: only the weight gradient); dw_partial: (gridDim.x, D) float, the sum
// of g * xhat over the rows of each block. Dynamic shared memory: D floats.
template <typename T>
__global__ void rms_norm_bwd(const T* __restrict__ x, const T* __restrict__ w, const float* __restrict__ r,
                             const T* __restrict__ g, T* __restrict__ dx, float* __restrict__ dw_partial,
                             long long rows, int D) {
  __shared__ float scratch[32];
  extern __shared__ float dw_acc[];
  for (int c = threadIdx.x; c < D; c += blockDim.x) dw_acc[c] = 0.0f;
  for (long long row = blockIdx.x; row < rows; row += gridDim.x) {
    const long long base = row * D;
    const float rr = r[row];
    float dot = 0.0f;
    for (int c = threadIdx.x; c < D; c += blockDim.x) {
      const float xhat = to_float<T>(x[base + c]) * rr;
      const float gv = to_float<T>(g[base + c]);
      dot += gv * to_float<T>(w[c]) * xhat;
      dw_acc[c] += gv * xhat;  // column c belongs to this thread alone
    }
    if (dx != nullptr) {
      dot = block_sum(dot, scratch) / (float)D;
      for (int c = threadIdx.x; c < D; c += blockDim.x) {
        const float xhat = to_float<T>(x[base + c]) * rr;
        const float gx = to_float<T>(g[base + c]) * to_float<T>(w[c]);
        dx[base + c] = from_float<T>(rr * (gx - xhat * dot));
      }
    }
  }
  for (int c = threadIdx.x; c < D; c += blockDim.x) dw_partial[(long long)blockIdx.x * D + c] = dw_acc[c];
}

// x, out: (outer, T, Dh) with Dh = 2 half; pos: (T,) int64; inv_freq: (half,) double.
// out[j] = a cos - b sin, out[j + half] = a sin + b cos with sin negated when inverse != 0.
template <typename T>
__global__ void rope(const T* __restrict__ x, T* __restrict__ out, const long long* __restrict__ pos,
                     const double* __restrict__ inv_freq, long long pairs, int T_len, int half, int inverse) {
  for (long long p = blockIdx.x * (long long)blockDim.x + threadIdx.x; p < pairs; p += (long long)gridDim.x * blockDim.x) {
    const long long row = p / half;
    const int j = (int)(p - row * half);
    const int t = (int)(row % T_len);
    const double angle = (double)pos[t] * inv_freq[j];
    const float c = (float)cos(angle);
    const float s = inverse ? -(float)sin(angle) : (float)sin(angle);
    const long long base = row * 2 * half;
    const float a = to_float<T>(x[base + j]);
    const float b = to_float<T>(x[base + j + half]);
    out[base + j] = from_float<T>(__fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s)));
    out[base + j + half] = from_float<T>(__fadd_rn(__fmul_rn(a, s), __fmul_rn(b, c)));
  }
}

// s: (rows, Tk) float scores of (batch, head, query) rows, Tq queries per head; query i of a head sits
// at position Tk - Tq + i and sees keys 0 .. Tk - Tq + i. p: (rows, Tk) in T.
template <typename T>
__global__ void causal_softmax(const float* __restrict__ s, T* __restrict__ p, long long rows, int Tq, int Tk,
                               float scale) {
  __shared__ float scratch[32];
  for (long long row = blockIdx.x; row < rows; row += gridDim.x) {
    const int last = Tk - Tq + (int)(row % Tq);  // last visible key
    const float* sr = s + row * Tk;
    float m = -__int_as_float(0x7f800000);
    for (int c = threadIdx.x; c <= last; c += blockDim.x) m = fmaxf(m, sr[c] * scale);
    m = block_max(m, scratch);
    float sum = 0.0f;
    for (int c = threadIdx.x; c <= last; c += blockDim.x) sum += __expf(sr[c] * scale - m);
    sum = block_sum(sum, scratch);
    const float inv = 1.0f / sum;
    for (int c = threadIdx.x; c < Tk; c += blockDim.x)
      p[row * Tk + c] = from_float<T>(c <= last ? __expf(sr[c] * scale - m) * inv : 0.0f);
  }
}

// p: (rows, Tk) in T; dp: (rows, Tk) float (= dO V^T); ds: (rows, Tk) in T,
// ds = p (dp - sum_c dp p) * scale.
template <typename T>
__global__ void causal_softmax_bwd(const T* __restrict__ p, const float* __restrict__ dp, T* __restrict__ ds,
                                   long long rows, int Tk, float scale) {
  __shared__ float scratch[32];
  for (long long row = blockIdx.x; row < rows; row += gridDim.x) {
    const long long base = row * Tk;
    float dot = 0.0f;
    for (int c = threadIdx.x; c < Tk; c += blockDim.x) dot += dp[base + c] * to_float<T>(p[base + c]);
    dot = block_sum(dot, scratch);
    for (int c = threadIdx.x; c < Tk; c += blockDim.x)
      ds[base + c] = from_float<T>(to_float<T>(p[base + c]) * (dp[base + c] - dot) * scale);
  }
}

}  // namespace pymglu
