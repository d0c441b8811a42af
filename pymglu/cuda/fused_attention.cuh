// The fused decode step (decode_fused.cu): attention of the new token over the cached positions.
#pragma once

#include "block_reduce.cuh"
#include "fused_context.cuh"

namespace pymglu {

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

}  // namespace pymglu
