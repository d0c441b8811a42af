// Elementwise kernels of the GPU training path (pymglu/cuda/training.py launches them between the
// cuBLAS products of the n + 1 scheme, DESIGN.md section 2):
//
//   apply_mask<T, VEC>          out_p = M_p * W for one or more bit-planes (the masked weights, built on the fly)
//   apply_mask_flat<T, VEC, COUNT>  the same for d % 32 == 0 and 1 or 2 planes, without a division per chunk
//   mglu_epilogue_fwd<T, VEC>   y = sum_i g(s_i) * (t - s_i)
//   mglu_epilogue_bwd<T, VEC>   e_i = dy * (t - s_i) * g'(s_i) - dy * g(s_i) and sum_i dy * g(s_i)
//   mglu_weight_grads<T, TG, VEC>  dW = dW_acc + sum_i M_i * G_i and G_i <- W * G_i  (G_i = e_i^T x, float32 or T)
//   narrow_float32<T, VEC>      dst = src rounded to T (dx's float32 accumulator, once per backward)
//   glu_epilogue_fwd<T, VEC>    y = g(gate) * value
//   glu_epilogue_bwd<T, VEC>    d_gate = dy * value * g'(gate), d_value = dy * g(gate)
//
// T is the storage dtype (__nv_bfloat16, __half or float); all arithmetic is float32. VEC elements per
// thread and iteration: 16 bytes of T when the caller has checked that sizes and offsets allow it
// (every plane length a multiple of VEC), else 1. The activation is a runtime argument on which each
// epilogue branches once, into a loop compiled for that activation. Grid-stride loops; no atomics, so
// results are deterministic.

#include "common.cuh"

namespace pymglu {

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* p, float (&f)[VEC]) {
  const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int j = 0; j < VEC; ++j) f[j] = to_float<T>(pk.v[j]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* p, const float (&f)[VEC]) {
  Pack<T, VEC> pk;
#pragma unroll
  for (int j = 0; j < VEC; ++j) pk.v[j] = from_float<T>(f[j]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = pk;
}

#define PYMGLU_GRID_STRIDE(idx, count) \
  for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < (count); idx += (long long)gridDim.x * blockDim.x)

// W: (h, d) row-major; bits: `count` bit-planes of (h, words); out: `count` planes of (h, d). Each element
// of W is read once for all the planes. VEC divides d and 32.
template <typename T, int VEC>
__global__ void apply_mask(const T* __restrict__ W, const uint32_t* __restrict__ bits, T* __restrict__ out,
                           int count, int h, int d, int words) {
  const long long chunks = d / VEC;
  const long long hd = (long long)h * d, hw = (long long)h * words;
  PYMGLU_GRID_STRIDE(idx, (long long)h * chunks) {
    const long long r = idx / chunks;
    const int c0 = (int)(idx - r * chunks) * VEC;
    const Pack<T, VEC> w = *reinterpret_cast<const Pack<T, VEC>*>(W + r * d + c0);
    for (int p = 0; p < count; ++p) {
      const uint32_t word = bits[p * hw + r * words + (c0 >> 5)] >> (c0 & 31);
      Pack<T, VEC> pk = w;
#pragma unroll
      for (int j = 0; j < VEC; ++j)
        if (!((word >> j) & 1u)) pk.v[j] = from_float<T>(0.0f);
      *reinterpret_cast<Pack<T, VEC>*>(out + p * hd + r * d + c0) = pk;
    }
  }
}

// apply_mask for d % 32 == 0 and COUNT (1 or 2) planes known at compile time: rows are then whole mask
// words, so element f of the flat (h, d) plane is bit f % 32 of word f / 32 of the plane's bits (no
// division per chunk), and every plane's word is loaded before the first store. VEC divides 32.
// (The general kernel's 64-bit division per chunk and its loop over a runtime plane count, one word load
// after each store, cost it 12-22% against the same loop without the mask: docs/benchmarks.md, "Stop 38".)
template <typename T, int VEC, int COUNT>
__global__ void apply_mask_flat(const T* __restrict__ W, const uint32_t* __restrict__ bits, T* __restrict__ out,
                                long long hd) {
  const long long hw = hd >> 5;
  PYMGLU_GRID_STRIDE(idx, hd / VEC) {
    const long long f = idx * VEC;
    const Pack<T, VEC> w = *reinterpret_cast<const Pack<T, VEC>*>(W + f);
    uint32_t word[COUNT];
#pragma unroll
    for (int p = 0; p < COUNT; ++p) word[p] = bits[p * hw + (f >> 5)] >> (f & 31);
#pragma unroll
    for (int p = 0; p < COUNT; ++p) {
      Pack<T, VEC> pk = w;
#pragma unroll
      for (int j = 0; j < VEC; ++j)
        if (!((word[p] >> j) & 1u)) pk.v[j] = from_float<T>(0.0f);
      *reinterpret_cast<Pack<T, VEC>*>(out + p * hd + f) = pk;
    }
  }
}

// The epilogues run the activation's formula with the activation a compile-time constant: the kernel
// branches once on `act` to the loop of that activation (the same arithmetic as gate_fn(s, act), so the
// same bits), instead of once per element.
#define PYMGLU_FOR_ACTIVATION(act, BODY)          \
  switch (act) {                                  \
    case ACT_SILU: BODY(ACT_SILU); break;         \
    case ACT_GELU: BODY(ACT_GELU); break;         \
    case ACT_GELU_TANH: BODY(ACT_GELU_TANH); break; \
    case ACT_RELU: BODY(ACT_RELU); break;         \
    default: BODY(ACT_SIGMOID); break;            \
  }

template <typename T, int VEC, int ACT>
__device__ __forceinline__ void mglu_epilogue_fwd_loop(const T* __restrict__ t, const T* __restrict__ s,
                                                       T* __restrict__ y, int n, long long nh) {
  PYMGLU_GRID_STRIDE(idx, nh / VEC) {
    const long long k = idx * VEC;
    float tv[VEC], acc[VEC];
    load_vec<T, VEC>(t + k, tv);
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc[j] = 0.0f;
    for (int i = 0; i < n; ++i) {
      float sv[VEC];
      load_vec<T, VEC>(s + i * nh + k, sv);
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc[j] += gate_fn(sv[j], ACT) * (tv[j] - sv[j]);
    }
    store_vec<T, VEC>(y + k, acc);
  }
}

// t, y: (N*h); s: n planes of N*h. VEC divides N*h.
template <typename T, int VEC>
__global__ void mglu_epilogue_fwd(const T* __restrict__ t, const T* __restrict__ s, T* __restrict__ y,
                                  int n, long long nh, int act) {
#define PYMGLU_BODY(A) mglu_epilogue_fwd_loop<T, VEC, A>(t, s, y, n, nh)
  PYMGLU_FOR_ACTIVATION(act, PYMGLU_BODY)
#undef PYMGLU_BODY
}

template <typename T, int VEC, int ACT>
__device__ __forceinline__ void mglu_epilogue_bwd_loop(const T* __restrict__ dy, const T* t, const T* s, T* e,
                                                       T* dv_sum, int n, long long nh) {
  PYMGLU_GRID_STRIDE(idx, nh / VEC) {
    const long long k = idx * VEC;
    float dyv[VEC], tv[VEC], dvs[VEC];
    load_vec<T, VEC>(dy + k, dyv);
    load_vec<T, VEC>(t + k, tv);
#pragma unroll
    for (int j = 0; j < VEC; ++j) dvs[j] = 0.0f;
    for (int i = 0; i < n; ++i) {
      float sv[VEC], ev[VEC];
      load_vec<T, VEC>(s + i * nh + k, sv);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        float g, dg;
        gate_and_derivative(sv[j], ACT, g, dg);
        const float dv = dyv[j] * g;
        ev[j] = dyv[j] * (tv[j] - sv[j]) * dg - dv;
        dvs[j] += dv;
      }
      store_vec<T, VEC>(e + i * nh + k, ev);
    }
    store_vec<T, VEC>(dv_sum + k, dvs);
  }
}

// e may alias s and dv_sum may alias t (each element is read before the same element is written).
template <typename T, int VEC>
__global__ void mglu_epilogue_bwd(const T* __restrict__ dy, const T* t, const T* s, T* e, T* dv_sum, int n,
                                  long long nh, int act) {
#define PYMGLU_BODY(A) mglu_epilogue_bwd_loop<T, VEC, A>(dy, t, s, e, dv_sum, n, nh)
  PYMGLU_FOR_ACTIVATION(act, PYMGLU_BODY)
#undef PYMGLU_BODY
}

// After the products G_i = e_i^T x (written into the n planes of G) and dW_acc = (sum_i dv_i)^T x (float32):
//   dW_out = dW_acc + sum_i M_i * G_i   (rounded once to T; dW_out may alias dW_acc when T is float)
//   G_i    = W * G_i                    (the mask-logit gradients, in place)
// G: n planes of (h, d) of TG, float32 or T (the logit gradients in the compute dtype: half the bytes);
// W, dW_out: (h, d) T; bits: n planes of (h, words). VEC divides d and 32.
template <typename T, typename TG, int VEC>
__global__ void mglu_weight_grads(TG* __restrict__ G, const T* __restrict__ W, const uint32_t* __restrict__ bits,
                                  const float* dW_acc, T* dW_out, int n, int h, int d, int words) {
  const long long chunks = d / VEC;
  const long long hd = (long long)h * d;
  const long long hw = (long long)h * words;
  PYMGLU_GRID_STRIDE(idx, (long long)h * chunks) {
    const long long r = idx / chunks;
    const int c0 = (int)(idx - r * chunks) * VEC;
    const long long k = r * d + c0;
    const long long wk = r * words + (c0 >> 5);
    float w[VEC], acc[VEC];
    load_vec<T, VEC>(W + k, w);
    load_vec<float, VEC>(dW_acc + k, acc);
    for (int i = 0; i < n; ++i) {
      const uint32_t word = bits[i * hw + wk] >> (c0 & 31);
      float g[VEC];
      load_vec<TG, VEC>(G + i * hd + k, g);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        if ((word >> j) & 1u) acc[j] += g[j];
        g[j] *= w[j];
      }
      store_vec<TG, VEC>(G + i * hd + k, g);
    }
    store_vec<T, VEC>(dW_out + k, acc);
  }
}

// dst = src rounded to T (the float32 dx accumulator into the input dtype). VEC divides count.
template <typename T, int VEC>
__global__ void narrow_float32(const float* __restrict__ src, T* __restrict__ dst, long long count) {
  PYMGLU_GRID_STRIDE(idx, count / VEC) {
    float v[VEC];
    load_vec<float, VEC>(src + idx * VEC, v);
    store_vec<T, VEC>(dst + idx * VEC, v);
  }
}

template <typename T, int VEC, int ACT>
__device__ __forceinline__ void glu_epilogue_fwd_loop(const T* __restrict__ gate, const T* __restrict__ value,
                                                      T* __restrict__ y, long long nh) {
  PYMGLU_GRID_STRIDE(idx, nh / VEC) {
    const long long k = idx * VEC;
    float gv[VEC], vv[VEC];
    load_vec<T, VEC>(gate + k, gv);
    load_vec<T, VEC>(value + k, vv);
#pragma unroll
    for (int j = 0; j < VEC; ++j) gv[j] = gate_fn(gv[j], ACT) * vv[j];
    store_vec<T, VEC>(y + k, gv);
  }
}

template <typename T, int VEC>
__global__ void glu_epilogue_fwd(const T* __restrict__ gate, const T* __restrict__ value, T* __restrict__ y,
                                 long long nh, int act) {
#define PYMGLU_BODY(A) glu_epilogue_fwd_loop<T, VEC, A>(gate, value, y, nh)
  PYMGLU_FOR_ACTIVATION(act, PYMGLU_BODY)
#undef PYMGLU_BODY
}

template <typename T, int VEC, int ACT>
__device__ __forceinline__ void glu_epilogue_bwd_loop(const T* __restrict__ dy, const T* gate, const T* value,
                                                      T* d_gate, T* d_value, long long nh) {
  PYMGLU_GRID_STRIDE(idx, nh / VEC) {
    const long long k = idx * VEC;
    float dyv[VEC], gv[VEC], vv[VEC];
    load_vec<T, VEC>(dy + k, dyv);
    load_vec<T, VEC>(gate + k, gv);
    load_vec<T, VEC>(value + k, vv);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      float g, dg;
      gate_and_derivative(gv[j], ACT, g, dg);
      gv[j] = dyv[j] * vv[j] * dg;
      vv[j] = dyv[j] * g;
    }
    store_vec<T, VEC>(d_gate + k, gv);
    store_vec<T, VEC>(d_value + k, vv);
  }
}

// d_gate may alias gate and d_value may alias value.
template <typename T, int VEC>
__global__ void glu_epilogue_bwd(const T* __restrict__ dy, const T* gate, const T* value, T* d_gate, T* d_value,
                                 long long nh, int act) {
#define PYMGLU_BODY(A) glu_epilogue_bwd_loop<T, VEC, A>(dy, gate, value, d_gate, d_value, nh)
  PYMGLU_FOR_ACTIVATION(act, PYMGLU_BODY)
#undef PYMGLU_BODY
}

#undef PYMGLU_FOR_ACTIVATION
#undef PYMGLU_GRID_STRIDE

}  // namespace pymglu
