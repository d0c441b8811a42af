// Device helpers shared by the pymglu kernels: fixed-width types, the gating functions and their
// derivatives, and conversions between the storage dtypes and float.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace pymglu {

// NVRTC ships no <stdint.h>; these are the only fixed-width types the kernels need.
typedef unsigned int uint32_t;
typedef unsigned short uint16_t;

enum Activation { ACT_SILU = 0, ACT_GELU = 1, ACT_GELU_TANH = 2, ACT_RELU = 3, ACT_SIGMOID = 4 };

// 1 / (1 + e^-s) with one approximate reciprocal (__fdividef, 2 ulp; 0 once 1 + e^-s passes 2^126, where
// the quotient is below float's normal range anyway) instead of the IEEE division's longer sequence: the
// training epilogues run it on every activation and were bound by it (benchmarks/probe_epilogues.py).
__device__ __forceinline__ float sigmoidf_(float s) { return __fdividef(1.0f, 1.0f + __expf(-s)); }

__device__ __forceinline__ float gate_fn(float s, int act) {
  switch (act) {
    case ACT_SILU: return s * sigmoidf_(s);
    case ACT_GELU: return 0.5f * s * (1.0f + erff(s * 0.70710678118654752f));
    case ACT_GELU_TANH: {
      const float k = 0.79788456080286536f;
      return 0.5f * s * (1.0f + tanhf(k * (s + 0.044715f * s * s * s)));
    }
    case ACT_RELU: return fmaxf(s, 0.0f);
    default: return sigmoidf_(s);
  }
}

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Programmatic dependent launch (pymglu/cuda/launch.py). pdl_launch_dependents lets the next kernel on
// the stream, when launched with PDL, start before this one ends; pdl_wait blocks until the kernels this
// one depends on have finished and their writes are visible. Both do nothing when there is no PDL
// (launched normally, or before sm_90).
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// g(s) and g'(s) together (same formulas as pymglu/activations.py; ReLU' is 0 at s = 0).
__device__ __forceinline__ void gate_and_derivative(float s, int act, float& g, float& dg) {
  switch (act) {
    case ACT_SILU: {
      const float sig = sigmoidf_(s);
      g = s * sig;
      dg = sig * (1.0f + s * (1.0f - sig));
      return;
    }
    case ACT_GELU: {
      const float cdf = 0.5f * (1.0f + erff(s * 0.70710678118654752f));
      g = s * cdf;
      dg = cdf + s * 0.39894228040143268f * __expf(-0.5f * s * s);
      return;
    }
    case ACT_GELU_TANH: {
      const float k = 0.79788456080286536f, c = 0.044715f;
      const float th = tanhf(k * (s + c * s * s * s));
      g = 0.5f * s * (1.0f + th);
      dg = 0.5f * (1.0f + th) + 0.5f * s * (1.0f - th * th) * k * (1.0f + 3.0f * c * s * s);
      return;
    }
    case ACT_RELU:
      g = fmaxf(s, 0.0f);
      dg = s > 0.0f ? 1.0f : 0.0f;
      return;
    default: {
      const float sig = sigmoidf_(s);
      g = sig;
      dg = sig * (1.0f - sig);
      return;
    }
  }
}

}  // namespace pymglu
