// The fused decode step (decode_fused.cu): attention of the new token over the cached positions.
#pragma once

#include "block_reduce.cuh"
#include "fused_context.cuh"

namespace pymglu {

// Attention of the new token of every sequence over positions 0 .. pos: work items (sequence-head,
// chunk of FUSED_CHUNK positions); the block's warps share a chunk's positions (online softmax), merge
// in shared memory, and store the chunk's partial. With merge_last, the last chunk of a head to finish
// merges them all into attn; otherwise the o product's staging merges them (stage_attention).
// Two packed 16-bit values (the lower address first) as floats.
template <typename T> __device__ __forceinline__ float2 pair_to_float2(unsigned u);
template <> __device__ __forceinline__ float2 pair_to_float2<__nv_bfloat16>(unsigned u) {
  return make_float2(__uint_as_float(u << 16), __uint_as_float(u & 0xffff0000u));
}
template <> __device__ __forceinline__ float2 pair_to_float2<__half>(unsigned u) {
  return __half22float2(*reinterpret_cast<const __half2*>(&u));
}

template <typename T>
__device__ void attention_phase(FusedCtx<T>& cx, const FusedLayer& L, float* smem, bool merge_last) {
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
    // lane L holds the element pairs (j, j + 1), j = 2 L + 64 p: keys and values load as packed pairs
    constexpr int PAIRS = FUSED_MAX_LANE_ELEMS / 2;
    float qv[FUSED_MAX_LANE_ELEMS], acc[FUSED_MAX_LANE_ELEMS];
#pragma unroll
    for (int p = 0; p < PAIRS; ++p) {
      const int j = 2 * lane + 64 * p;
      const float2 qj = j < Dh ? pair_to_float2<T>(__ldcg(reinterpret_cast<const unsigned*>(cx.q + (size_t)bh * Dh + j)))
                               : make_float2(0.0f, 0.0f);
      qv[2 * p] = qj.x;
      qv[2 * p + 1] = qj.y;
      acc[2 * p] = acc[2 * p + 1] = 0.0f;
    }
    float m = -__int_as_float(0x7f800000), l = 0.0f;
    for (int t = first + warp; t < last; t += warps) {
      unsigned kp[PAIRS], vp[PAIRS];
#pragma unroll
      for (int p = 0; p < PAIRS; ++p) {
        const int j = 2 * lane + 64 * p;
        kp[p] = j < Dh ? __ldcg(reinterpret_cast<const unsigned*>(kc + base + (size_t)t * Dh + j)) : 0u;
        vp[p] = j < Dh ? __ldcg(reinterpret_cast<const unsigned*>(vc + base + (size_t)t * Dh + j)) : 0u;
      }
      float dot = 0.0f;
#pragma unroll
      for (int p = 0; p < PAIRS; ++p) {
        const float2 k2 = pair_to_float2<T>(kp[p]);
        dot += qv[2 * p] * k2.x + qv[2 * p + 1] * k2.y;
      }
      for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
      const float s = dot * cx.scale, m_new = fmaxf(m, s);
      const float correction = expf(m - m_new), pr = expf(s - m_new);
      l = l * correction + pr;
#pragma unroll
      for (int p = 0; p < PAIRS; ++p) {
        const float2 v2 = pair_to_float2<T>(vp[p]);
        acc[2 * p] = acc[2 * p] * correction + pr * v2.x;
        acc[2 * p + 1] = acc[2 * p + 1] * correction + pr * v2.y;
      }
      m = m_new;
    }
    if (lane == 0) { warp_m[warp] = m; warp_l[warp] = l; }
#pragma unroll
    for (int p = 0; p < PAIRS; ++p) {
      const int j = 2 * lane + 64 * p;
      if (j < Dh) {
        warp_acc[warp * Dh + j] = acc[2 * p];
        warp_acc[warp * Dh + j + 1] = acc[2 * p + 1];
      }
    }
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
    if (!merge_last) {
      __syncthreads();  // shared scratch is reused by the next item
      continue;
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

// The o product's input merged straight from the attention partials, when each head has at most
// staged_merge chunks in use: every block merges every head's `used` chunks itself (the formula of
// attention_phase's last-chunk merge: weights exp(m_c - max m), weighted values over the weighted sums),
// so that the attention phase ends without the cross-block merge behind a fence and a counter. xs[b, k]
// for k < d, 0 up to KP. The partials were written by other blocks before the grid barrier: read from L2.
// Shared: 3 B H used floats at cx.red (the caller checks that they fit).
template <typename T>
__device__ void stage_attention(FusedCtx<T>& cx, int used, int KP) {
  const int Dh = cx.Dh, d = cx.d, chunks = (cx.capacity + FUSED_CHUNK - 1) / FUSED_CHUNK;
  const int n = cx.B * cx.H * used;
  float* m_s = cx.red;      // (B H, used) chunk maxima
  float* w_s = m_s + n;     // chunk weights exp(m_c - M)
  float* l_s = w_s + n;     // weighted chunk sums l_c exp(m_c - M)
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const size_t part = (size_t)(i / used) * chunks + i % used;
    m_s[i] = __ldcg(cx.part_max + part);
    l_s[i] = __ldcg(cx.part_sum + part);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const float* mh = m_s + (i / used) * used;
    float M = -__int_as_float(0x7f800000);
    for (int c = 0; c < used; ++c) M = fmaxf(M, mh[c]);  // finite: every chunk in use has a position
    w_s[i] = expf(m_s[i] - M);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < n; i += blockDim.x) l_s[i] *= w_s[i];
  __syncthreads();
  for (int b = 0; b < cx.B; ++b) {
    T* out = cx.xs + (size_t)b * cx.xs_stride;
    for (int j = 4 * threadIdx.x; j < d; j += 4 * blockDim.x) {  // 4 values of one head (Dh % 16 == 0)
      const int bh = b * cx.H + j / Dh;
      const float4* pa = reinterpret_cast<const float4*>(cx.part_acc + (size_t)bh * chunks * Dh + j % Dh);
      const float* w = w_s + bh * used;
      const float* l = l_s + bh * used;
      float total = 0.0f;
      float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      // four chunks' loads in flight at a time: all eight made the 16-warp instances spill
#pragma unroll 1
      for (int c0 = 0; c0 < used; c0 += 4) {
#pragma unroll
        for (int c = c0; c < c0 + 4; ++c) {
          if (c < used) {
            const float4 a = __ldcg(pa + (size_t)c * (Dh / 4));
            total += l[c];
            acc.x += a.x * w[c];
            acc.y += a.y * w[c];
            acc.z += a.z * w[c];
            acc.w += a.w * w[c];
          }
        }
      }
      const float inv = 1.0f / total;
      out[j] = from_float<T>(acc.x * inv);
      out[j + 1] = from_float<T>(acc.y * inv);
      out[j + 2] = from_float<T>(acc.z * inv);
      out[j + 3] = from_float<T>(acc.w * inv);
    }
    for (int k = d + threadIdx.x; k < KP; k += blockDim.x) out[k] = from_float<T>(0.0f);
  }
  __syncthreads();
}

}  // namespace pymglu
