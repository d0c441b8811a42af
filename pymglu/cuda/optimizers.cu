// One-pass optimizer updates (pymglu/cuda/optimizers.py launches them from pymglu.optim):
//
//   adamw_step<P, G, BITS>   AdamW with decoupled weight decay, bias-corrected moments
//   sgd_step<P, G, BITS>     SGD with L2 weight decay, optional (Nesterov) momentum
//   sum_squares<G>           per-block partial sums of g^2 over a list of gradients (gradient clipping)
//   scaled_copies<G>         out_i = g_i * min(1, max_norm / (sqrt(total) + eps)) over a list of gradients
//   adamw_device_rows        the step scalars of adamw_step computed on the device from device step counts
//   sgd_device_rows          the same for sgd_step
//   loss_scale_update        a dynamic loss scale's back-off / growth after a step, on the device
//
// P is the parameter's storage dtype (float, __half or __nv_bfloat16), G the gradient's (P or float).
// The state (moments, momentum buffer, fp32 master of a 16-bit parameter) is float32. Each element is
// read and written once, where the array-expression path of pymglu.optim runs a dozen passes.
//
// Every operation is rounded on its own (__fmul_rn, __fadd_rn, ...), in the order of that path, so
// that no multiply-add is contracted: a float32 parameter gets the same bits either way.
//
// With BITS, the parameter is a stack of rows of row_len elements (mask logits (n, h, d): rows n * h,
// row_len d) and the kernel also writes the sign bit-planes of the new values, words = ceil(d / 32)
// uint32 per row, bit j of word w set when element 32 w + j is > 0 (the layout of pymglu.masks):
// each warp handles the 32 elements of one word and votes.

#include "common.cuh"
#include "block_reduce.cuh"

namespace pymglu {

// Runs update(i) -> the stored new value (as float) for every element; with BITS also writes the
// bit-planes. The warp-uniform trip count of the BITS loop (slots is a multiple of 32 and so is the
// stride) keeps every lane of a warp in the ballot.
template <bool BITS, typename Update>
__device__ __forceinline__ void for_each_element(long long size, int row_len, int words, uint32_t* bits,
                                                 Update update) {
  const long long stride = (long long)gridDim.x * blockDim.x;
  const long long first = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  if constexpr (BITS) {
    const long long padded = (long long)words * 32;
    const long long slots = (size / row_len) * padded;
    for (long long s = first; s < slots; s += stride) {
      const long long row = s / padded;
      const int col = (int)(s - row * padded);
      bool positive = false;
      if (col < row_len) positive = update(row * row_len + col) > 0.0f;
      const uint32_t word = __ballot_sync(0xffffffffu, positive);
      if ((threadIdx.x & 31) == 0) bits[row * words + (col >> 5)] = word;
    }
  } else {
    for (long long i = first; i < size; i += stride) update(i);
  }
}

// param (size) P; master (size) float or nullptr (then the parameter itself is the value updated);
// m, v (size) float; grad (size) G.
//   value *= decay_factor (when apply_decay); m = b1 m + one_minus_b1 g; v = b2 v + one_minus_b2 g^2;
//   value -= step_size * (m / (sqrt(v / bias_correction2) + eps)); param = round(value).
// step_scalars: nullptr, or 4 floats {step_size, bias_correction2, decay_factor, skip} read instead of the
// arguments of those names (they change every step: a captured CUDA graph reads them from memory); a
// nonzero skip leaves everything as it is (a step the loss scaler skips on the device).
template <typename P, typename G, bool BITS>
__global__ void adamw_step(P* __restrict__ param, float* __restrict__ master, float* __restrict__ m,
                           float* __restrict__ v, const G* __restrict__ grad, uint32_t* __restrict__ bits,
                           long long size, int row_len, int words, float beta1, float one_minus_beta1,
                           float beta2, float one_minus_beta2, float bias_correction2, float eps,
                           float step_size, float decay_factor, int apply_decay,
                           const float* __restrict__ step_scalars) {
  if (step_scalars != nullptr) {
    if (step_scalars[3] != 0.0f) return;
    step_size = step_scalars[0];
    bias_correction2 = step_scalars[1];
    decay_factor = step_scalars[2];
  }
  for_each_element<BITS>(size, row_len, words, bits, [&](long long i) {
    const float g = to_float<G>(grad[i]);
    const float mi = __fadd_rn(__fmul_rn(m[i], beta1), __fmul_rn(one_minus_beta1, g));
    const float vi = __fadd_rn(__fmul_rn(v[i], beta2), __fmul_rn(one_minus_beta2, __fmul_rn(g, g)));
    m[i] = mi;
    v[i] = vi;
    const float denom = __fadd_rn(__fsqrt_rn(__fdiv_rn(vi, bias_correction2)), eps);
    float value = master != nullptr ? master[i] : to_float<P>(param[i]);
    if (apply_decay) value = __fmul_rn(value, decay_factor);
    value = __fsub_rn(value, __fmul_rn(step_size, __fdiv_rn(mi, denom)));
    if (master != nullptr) master[i] = value;
    const P stored = from_float<P>(value);
    param[i] = stored;
    return to_float<P>(stored);
  });
}

// param (size) P; master (size) float or nullptr; buf (size) float or nullptr (no momentum); grad G.
//   g += weight_decay * value (when apply_decay); buf = g on the first step, else momentum buf + g;
//   g = g + momentum buf (nesterov) or buf; value -= lr g; param = round(value).
// step_scalars: nullptr, or 3 floats {lr, skip, first_step} read instead of the arguments (as in adamw_step).
template <typename P, typename G, bool BITS>
__global__ void sgd_step(P* __restrict__ param, float* __restrict__ master, float* __restrict__ buf,
                         const G* __restrict__ grad, uint32_t* __restrict__ bits, long long size, int row_len,
                         int words, float lr, float momentum, float weight_decay, int apply_decay,
                         int first_step, int nesterov, const float* __restrict__ step_scalars) {
  if (step_scalars != nullptr) {
    if (step_scalars[1] != 0.0f) return;
    lr = step_scalars[0];
    first_step = step_scalars[2] != 0.0f;
  }
  for_each_element<BITS>(size, row_len, words, bits, [&](long long i) {
    float value = master != nullptr ? master[i] : to_float<P>(param[i]);
    float g = to_float<G>(grad[i]);
    if (apply_decay) g = __fadd_rn(g, __fmul_rn(weight_decay, value));
    if (buf != nullptr) {
      const float b = first_step ? g : __fadd_rn(__fmul_rn(buf[i], momentum), g);
      buf[i] = b;
      g = nesterov ? __fadd_rn(g, __fmul_rn(momentum, b)) : b;
    }
    value = __fsub_rn(value, __fmul_rn(lr, g));
    if (master != nullptr) master[i] = value;
    const P stored = from_float<P>(value);
    param[i] = stored;
    return to_float<P>(stored);
  });
}

// Gradient clipping over `count` gradients of one dtype in one launch each: ptrs / sizes list them;
// blockIdx.y picks the gradient, blockIdx.x with a stride of gridDim.x walks it. partial:
// (count, gridDim.x) float, each block's sum of squares (then summed by the caller, in a fixed order).
template <typename G>
__global__ void sum_squares(const unsigned long long* __restrict__ ptrs, const long long* __restrict__ sizes,
                            float* __restrict__ partial) {
  __shared__ float scratch[32];
  const G* g = reinterpret_cast<const G*>(ptrs[blockIdx.y]);
  const long long size = sizes[blockIdx.y];
  float acc = 0.0f;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < size; i += (long long)gridDim.x * blockDim.x) {
    const float v = to_float<G>(g[i]);
    acc += v * v;
  }
  acc = block_sum(acc, scratch);
  if (threadIdx.x == 0) partial[(long long)blockIdx.y * gridDim.x + blockIdx.x] = acc;
}

// out_i = g_i * scale with scale = min(1, max_norm / (sqrt(*total_sq) + eps)), computed by every block
// from the device scalar (no host read).
template <typename G>
__global__ void scaled_copies(const unsigned long long* __restrict__ src, const unsigned long long* __restrict__ dst,
                              const long long* __restrict__ sizes, const float* __restrict__ total_sq,
                              float max_norm, float eps) {
  const G* g = reinterpret_cast<const G*>(src[blockIdx.y]);
  G* out = reinterpret_cast<G*>(dst[blockIdx.y]);
  const long long size = sizes[blockIdx.y];
  const float scale = fminf(1.0f, max_norm / (sqrtf(*total_sq) + eps));
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < size; i += (long long)gridDim.x * blockDim.x)
    out[i] = from_float<G>(to_float<G>(g[i]) * scale);
}

// Step scalars on the device, for updates whose skip is decided there (a float16 step under a loss
// scaler kept on the device): for each of `count` parameters j, unless *found is nonzero, the step count
// steps[j] goes up by one; then row j is written as the host's adamw_scalars / sgd_scalars would write it
// for that count, with the skip flag *found != 0. hyper: (count, 4) double {lr, beta1, beta2,
// weight_decay} for AdamW, (count, 1) {lr} for SGD; rows: (count, 4) / (count, 3) float. Double arithmetic,
// rounded once to float, as on the host.
__global__ void adamw_device_rows(const double* __restrict__ hyper, long long* __restrict__ steps,
                                  const int* __restrict__ found, float* __restrict__ rows, int count) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= count) return;
  const bool skip = *found != 0;
  const long long t = steps[j] + (skip ? 0 : 1);
  steps[j] = t;
  const double lr = hyper[4 * j], beta1 = hyper[4 * j + 1], beta2 = hyper[4 * j + 2], wd = hyper[4 * j + 3];
  const double td = (double)(t > 0 ? t : 1);  // a skipped row is not read: keep it finite
  rows[4 * j] = (float)(lr / (1.0 - pow(beta1, td)));
  rows[4 * j + 1] = (float)(1.0 - pow(beta2, td));
  rows[4 * j + 2] = (float)(1.0 - lr * wd);
  rows[4 * j + 3] = skip ? 1.0f : 0.0f;
}

__global__ void sgd_device_rows(const double* __restrict__ hyper, long long* __restrict__ steps,
                                const int* __restrict__ found, float* __restrict__ rows, int count) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= count) return;
  const bool skip = *found != 0;
  const long long before = steps[j];
  steps[j] = before + (skip ? 0 : 1);
  rows[3 * j] = (float)hyper[j];
  rows[3 * j + 1] = skip ? 1.0f : 0.0f;
  rows[3 * j + 2] = (!skip && before == 0) ? 1.0f : 0.0f;  // the momentum buffer's first write
}

// After a step: with *found nonzero, scale = max(scale * backoff, lo) and tracker = 0; else tracker += 1
// and, when it reaches `interval`, scale = min(scale * growth, hi) and tracker = 0. One thread; the
// DynamicLossScaler.update rule of pymglu/amp.py in the same double arithmetic.
__global__ void loss_scale_update(const int* __restrict__ found, double* __restrict__ scale,
                                  long long* __restrict__ tracker, double growth, double backoff,
                                  long long interval, double lo, double hi) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  if (*found != 0) {
    *scale = fmax(*scale * backoff, lo);
    *tracker = 0;
    return;
  }
  *tracker += 1;
  if (*tracker >= interval) {
    *scale = fmin(*scale * growth, hi);
    *tracker = 0;
  }
}

}  // namespace pymglu
