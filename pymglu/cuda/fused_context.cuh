// The fused decode step (decode_fused.cu): its limits, the per-layer pointer table, the launch
// context every phase reads, the memory helpers for data other blocks wrote during the launch,
// the flagged packets that carry the residual stream and the hidden activations between blocks, and the
// grid barrier between phases.
#pragma once

#include "common.cuh"

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

// A flagged packet (see "Flagged packets" below).
typedef unsigned long long Packet;

// Device pointers of one transformer block (the host builds a table of n_layers of these).
struct FusedLayer {
  const uint4* wqkv;       // (3 d / 16 strips, d / 64 groups) tiles, rows permuted (rotary pairs)
  const uint4* wo;         // (d / 16, d / 64)
  const uint4* wup;        // MGLU: FlashMGLU tiles of W (ceil(h/16) strips); GLU: gate/value pairs (ceil(h/8))
  const uint32_t* mup;     // MGLU: FlashMGLU's lane-major mask words (strips, groups, 32 n); unused for GLU
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
  float* red;     // shared: (WARPS, N_MASKS + 1, 128) partial sums of 16 x 8 tiles per warp (dense: slot 0)
  float* scratch; // shared: 64 floats
  T* q;           // (B, H, Dh) rotated queries
  T* attn;        // (B, d)
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

// Timestamp slot `event` of this block (thread 0): 0 start, 1 + 2k its arrival at phase boundary k (the end
// of the phase before), 2 + 2k its release (a grid barrier's, or the moment the staged packets were all
// current), 1 + 2K the end (K boundaries, 5 per layer: q k v | attention | o | up | down | next).
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

// Grid barrier over a monotonic arrival counter, in two halves: grid_arrive (thread 0 arrives with
// release semantics: the block's writes, ordered before it by bar.sync, become visible first) and
// grid_wait (thread 0 spins with acquire loads until every block of the grid has arrived). Loads that do
// not depend on the other blocks (the next product's first weights) go between the two: issued before the
// arrival, the release would wait for them to complete. `boundary`: the phase boundary (trace slots).
template <typename T>
__device__ __forceinline__ void grid_arrive(FusedCtx<T>& cx, int boundary) {
  __syncthreads();
  trace_event(cx, 1 + 2 * boundary);
  cx.target += gridDim.x;
  if (threadIdx.x == 0) asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(cx.counter) : "memory");
}

// Traps after 4 s of spinning from `start` (a block never started: the grid is not resident). `rows`: the
// wait was for another block's packets, else for the grid barrier. (Two literal messages with two int
// arguments each keep the printf frame at 8 bytes, the only local memory of the instances.)
__device__ __forceinline__ void spin_timeout(unsigned long long start, bool rows) {
  if (global_ns() - start > 4000000000ull) {
    if (rows)
      printf("pymglu decode_fused: the wait for another block's rows timed out (block %d of %d); the grid must fit "
             "on the GPU at once\n", blockIdx.x, gridDim.x);
    else
      printf("pymglu decode_fused: grid barrier timed out (block %d of %d); the grid must fit on the GPU at once\n",
             blockIdx.x, gridDim.x);
    __trap();
  }
}

template <typename T>
__device__ __forceinline__ void grid_wait(FusedCtx<T>& cx, int boundary) {
  if (threadIdx.x == 0) {
    if (load_acquire(cx.counter) < cx.target) {
      const unsigned long long start = global_ns();
      while (load_acquire(cx.counter) < cx.target) spin_timeout(start, false);
    }
  }
  trace_event(cx, 2 + 2 * boundary);
  __syncthreads();
}

template <typename T>
__device__ __forceinline__ void grid_sync(FusedCtx<T>& cx, int boundary) {
  grid_arrive(cx, boundary);
  grid_wait(cx, boundary);
}

// The end of a phase whose successor waits on flagged packets instead of a grid barrier: the block's
// warps are done with the staged input (the next staging overwrites it).
template <typename T>
__device__ __forceinline__ void phase_end(FusedCtx<T>& cx, int boundary) {
  __syncthreads();
  trace_event(cx, 1 + 2 * boundary);
}

// ---------------------------------------------------------------------------------------------
// Flagged packets. A packet is 8 bytes: two 16-bit values (elements 2j and 2j + 1 of a row, the first in
// the low half) and a 32-bit flag, stored and loaded as one 64-bit access, which is single-copy atomic: a
// reader that sees the flag sees the values written with it. So a phase that only needs the rows another
// phase wrote waits for those rows' flags, not for a grid barrier (the barrier's release, its acquire and
// the reload of the rows are three round trips; the flags are one). Packets of the same row that a
// producer writes are independent, so each is checked.
// ---------------------------------------------------------------------------------------------
// The launch's packet flag: its sequence number (sync[2]) + 1. Each packet set (the embedding rows, x after
// each o and down product, hidden after each up product) is written once per launch, so a packet is
// current when its flag equals this one. In shared memory, not in a register across the phases.
__shared__ unsigned fused_flag;

template <typename T> __device__ __forceinline__ uint32_t bits_of(T v) {
  return (uint32_t)*reinterpret_cast<const unsigned short*>(&v);
}

__device__ __forceinline__ void store_packet(Packet* p, uint32_t values, unsigned flag) {
  asm volatile("st.relaxed.gpu.global.u64 [%0], %1;" ::"l"(p), "l"(((Packet)flag << 32) | values) : "memory");
}

// Packets per token row of n values: ceil(n / 2), rounded up to even.
__host__ __device__ constexpr int packet_row(int n) { return ((n + 1) / 2 + 1) & ~1; }

// Two consecutive packets (16-byte aligned); each 64-bit element is a single-copy atomic access.
__device__ __forceinline__ void load_packets(const Packet* p, Packet& a, Packet& b) {
  asm volatile("ld.relaxed.gpu.global.v2.u64 {%0, %1}, [%2];" : "=l"(a), "=l"(b) : "l"(p) : "memory");
}

__device__ __forceinline__ unsigned packet_flag(Packet v) { return (unsigned)(v >> 32); }

// Value `half` (0: element 2j, 1: element 2j + 1) of a packet (or of its values' half, the low 4 bytes), as a
// float.
template <typename T> __device__ __forceinline__ float packet_value(uint32_t v, int half) {
  const unsigned short u = (unsigned short)(half ? (v >> 16) : v);
  return to_float(*reinterpret_cast<const T*>(&u));
}

}  // namespace pymglu
