"""Does compute-sanitizer's racecheck see mbarrier ordering between plain shared-memory stores and loads?

A minimal producer/consumer ping-pong with the protocol of pymglu/cuda/masked_gemm.cu's mask words: warp 0
stores a slot with st.shared and arrives on ``full``; warp 1 waits on ``full``, reads the slot, and releases
it on ``empty`` (every lane, or lane 0 after ``__syncwarp``); the producer waits on ``empty`` before it
stores the slot again. The program is race-free under the PTX memory model (mbarrier.arrive releases,
try_wait acquires). Run it under ``compute-sanitizer --tool racecheck``: any hazard it reports is the tool
not modelling this ordering. The result is checked, so a broken protocol fails here too.

Usage (sm_90): ``compute-sanitizer --tool racecheck python benchmarks/probe_racecheck_mbarrier.py [0|1]``
(1: one arrival per consumer warp, after ``__syncwarp``; 0: every lane arrives; both when not given).
"""
import sys

import numpy as np
import cupy as cp

SOURCE = r"""
__device__ __forceinline__ unsigned addr(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void arrive(unsigned bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void wait(unsigned bar, unsigned parity) {
  asm volatile("{\n.reg .pred done;\nW_%=:\nmbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
               "@!done bra W_%=;\n}\n" ::"r"(bar), "r"(parity) : "memory");
}
extern "C" __global__ void ping_pong(float* out, int rounds, int one_arrival_per_warp) {
  __shared__ __align__(8) unsigned long long full, empty;
  __shared__ float slot[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (threadIdx.x == 0) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(addr(&full)), "r"(32) : "memory");
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(addr(&empty)), "r"(one_arrival_per_warp ? 1 : 32)
                 : "memory");
  }
  __syncthreads();
  float acc = 0.f;
  for (int r = 0; r < rounds; ++r) {
    if (warp == 0) {
      if (r > 0) wait(addr(&empty), (r - 1) & 1);
      slot[lane] = (float)(r + lane);
      arrive(addr(&full));
    } else {
      wait(addr(&full), r & 1);
      acc += slot[(lane + 1) & 31];
      if (one_arrival_per_warp) {
        __syncwarp();
        if (lane == 0) arrive(addr(&empty));
      } else {
        arrive(addr(&empty));
      }
    }
  }
  if (warp == 1) out[lane] = acc;
}
"""

kernel = cp.RawModule(code=SOURCE, options=("-std=c++17",)).get_function("ping_pong")
rounds = 8
for per_warp in [int(a) for a in sys.argv[1:]] or (0, 1):
    out = cp.full(32, np.nan, dtype=np.float32)
    kernel((1,), (64,), (out, np.int32(rounds), np.int32(per_warp)))
    lanes = (np.arange(32) + 1) % 32
    want = sum(r + lanes for r in range(rounds)).astype(np.float32)
    np.testing.assert_array_equal(cp.asnumpy(out), want)
    print(f"ping_pong one_arrival_per_warp={per_warp}: results correct")
