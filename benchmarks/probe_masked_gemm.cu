// A masked product on Hopper's tensor cores, the probe of benchmarks/probe_masked_gemm.py (issue 4: the
// mask applied inside the GEMM instead of building M * W for cuBLAS). sm_90a only; not part of the package.
//
// C (T, H) = X (T, K) . (M * W)^T with W (H, K), X (T, K) bfloat16 row-major and the mask as bit-planes
// bits (H, K / 32) uint32 (pymglu.masks format). The tile computes C^T: 128 rows of W by 256 rows of X,
// K in stages of 64, with W as wgmma's A operand *from registers* (the "RS" form), so that the mask is an
// AND on the A fragments and never touches shared memory:
//   * warpgroup 0 produces: thread 0 issues TMA loads (128-byte swizzle) of the W and X tiles of each of
//     STAGES stages; with a mask, each of its 128 threads copies its W row's two mask words of the stage
//     into shared memory and arrives on the stage's mbarrier too;
//   * warpgroups 1 and 2 consume, 64 rows of W each: ldmatrix the A fragments of stage kt + 1, AND them
//     with the mask (two bits per register, spread to 16-bit lanes) and issue their wgmma group
//     (m64n256k16, B = the X tile from shared memory) while the group of stage kt still runs; the
//     accumulators (128 floats per thread) are staged transposed in shared memory and stored as rows of
//     C, by the consumers or by TMA (EPI, at the template below).
// MODE: 0 dense (no mask), 1 masked, 2 the masking arithmetic on fixed words (no mask loads), 3 the mask
// loads without the arithmetic; 2 and 3 compute nothing meaningful and exist to time the two halves.
// Requires T % 256 == 0, H % 128 == 0, K % 64 == 0 (the probe's shapes). Grid: one block per tile,
// (H / 128) (T / 256) blocks, or fewer (persistent: each block then takes every grid-th tile).
#include <cuda_bf16.h>

#include "hopper.cuh"  // pymglu/cuda: mbarriers, TMA, swizzle, ldmatrix / stmatrix, wgmma

typedef unsigned int u32;
typedef unsigned long long u64;

namespace probe_masked_gemm {

using namespace pymglu::hopper;

constexpr int BM = 128, BN = 256, BK = 64;
constexpr int A_STAGE = BM * BK * 2;  // W tile
constexpr int B_STAGE = BN * BK * 2;  // X tile

// the same load delivered to both blocks of a 2-block cluster, at dst and the mbarrier bar of each
__device__ __forceinline__ void tma_load_2d_both(u32 dst, const void* tmap, int c0, int c1, u32 bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
      " [%0], [%1, {%2, %3}], [%4], %5;\n"
      ::"r"(dst), "l"(tmap), "r"(c0), "r"(c1), "r"(bar), "h"((unsigned short)3) : "memory");
}
__device__ __forceinline__ void mbar_wait_cluster(u32 bar, u32 parity) {
  asm volatile(
      "{\n.reg .pred done;\nWAIT_%=:\n"
      "mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=;\n}\n" ::"r"(bar), "r"(parity) : "memory");
}
// arrive on the mbarrier at the same shared-memory offset as bar in block `rank` of the cluster
// (release and acquire at cluster scope, here and in mbar_wait_cluster: stop 34 found these fences to be what
// made the pairs slow; with CTA-scope semantics the package's paired kernels, commit 4b2ea24, ran as fast
// as the blocks alone, docs/train_layer_history.md "Stop 34")
__device__ __forceinline__ void mbar_arrive_in(u32 bar, u32 rank) {
  u32 remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(bar), "r"(rank));
  asm volatile("mbarrier.arrive.release.cluster.shared::cluster.b64 _, [%0];\n" ::"r"(remote) : "memory");
}
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;\n" ::: "memory");
}
__device__ __forceinline__ u32 cluster_rank() {
  u32 r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return r;
}

// tmaps: [W map (box 64 x 128), X map (box 64 x 256), C map (box 64 x 256), X map (box 64 x 128), C map (box
// 64 x 32)]; W (H, K),
// X (T, K), bits (H, K / 32); C (T, H).
// MODE 0 dense, 1 masked, 2 masking arithmetic on fixed words (no mask loads), 3 mask loads only.
// EPI 0: 4 stages; the tile is staged in shared memory a quarter at a time and stored by the consumers.
// EPI 1: 3 stages; the whole tile is staged (stmatrix, 128-byte swizzle) and one thread stores it with TMA,
// which the consumers do not wait for: they start the next tile, and only its store waits for this one's reads.
// EPI 2: 4 stages, nothing stored (to time the main loop alone).
// EPI 3: 4 stages; each thread stores its accumulators straight to C (2-byte stores, no staging).
// EPI 4: 4 stages; the tile is staged (stmatrix) 32 rows of X at a time in two 8 KB buffers (128-byte swizzle) and
// stored with TMA, so that a chunk's store runs while the next chunk is staged (C map box 64 x 32).
// Persistent when the grid is smaller than the tile count: block b takes tiles b, b + grid, ... in the
// grouped order, and the producer loads the next tile's stages while the consumers store the last one.
// CL 2: clusters of two blocks on W tiles h0, h0 + 128 of the same X tile; each block loads half of the X
// tile and TMA multicasts it to both, so that each reads 32 KB per stage from L2 instead of 48. A stage is
// refilled only once the consumers of both blocks released it. Needs H % 256 == 0 and an even grid.
template <int MODE, int EPI, int CL>
__device__ void gemm(const void* tmaps, const u32* __restrict__ bits, __nv_bfloat16* __restrict__ C, int T, int H,
                     int K) {
  constexpr bool MASKED = MODE != 0;
  constexpr int STAGES = EPI == 1 ? 3 : 4;
  extern __shared__ unsigned char smem_raw[];
  __shared__ __align__(8) u64 full[STAGES], empty[STAGES];
  const u32 base = (smem_addr(smem_raw) + 1023u) & ~1023u;
  // sM: 8 bytes per W row and stage; sC: the output staging, its own area so that the stages stay in use
  const u32 sA = base, sB = base + STAGES * A_STAGE, sC_addr = sB + STAGES * B_STAGE;  // sC 1024-aligned
  const u32 sM = sC_addr + (EPI == 1 ? BN * BM * 2 : EPI == 4 ? 2 * 32 * BM * 2 : (BN / 4) * (BM + 8) * 2);
  const int tid = threadIdx.x, wg = tid >> 7;
  const int rank = CL == 2 ? (int)cluster_rank() : 0;
  // a unit is CL W tiles (one per block of the cluster) of one X tile
  const int h_units = H / (BM * CL), t_tiles = T / BN, tiles = h_units * t_tiles;
  const int first_unit = blockIdx.x / CL, unit_stride = gridDim.x / CL;
  const int KT = K / BK;
  // grouped raster order: GROUP W tiles at a time sweep every X tile, so that the group's W rows stay in
  // L2 while X streams, and X is read once per group instead of once per W tile
  constexpr int GROUP = 8 / CL;
  auto origin = [&](int tile, int& h0, int& t0) {
    const int group = tile / (GROUP * t_tiles), first = group * GROUP;
    const int in_group = min(h_units - first, GROUP), local = tile % (GROUP * t_tiles);
    h0 = ((first + local % in_group) * CL + rank) * BM;
    t0 = (local / in_group) * BN;
  };
  const unsigned char* tm = static_cast<const unsigned char*>(tmaps);
  if (tid == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(smem_addr(&full[s]), MASKED ? 129 : 1);
      mbar_init(smem_addr(&empty[s]), 2 * CL);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  if constexpr (CL == 2) cluster_sync();  // the peer's barriers are set up before any multicast or arrival
  else __syncthreads();

  if (wg == 0) {
    // thread 0 issues the TMA loads; with a mask, each of the 128 threads also copies its W row's two mask
    // words of the stage into sM and arrives on full[s] (129 arrivals: 128 + the expect_tx). The words of
    // the next two stages are in flight while a stage waits for its slot.
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
    int it = 0;  // stages produced so far, over all of this block's tiles
    for (int tile = first_unit; tile < tiles && (MASKED || tid == 0); tile += unit_stride) {
      int h0, t0;
      origin(tile, h0, t0);
      const uint2* mrow = reinterpret_cast<const uint2*>(bits + (size_t)(h0 + tid) * (K / 32));
      uint2 mw0 = make_uint2(0u, 0u), mw1 = mw0;
      if constexpr (MASKED) {
        mw0 = __ldg(mrow);
        if (KT > 1) mw1 = __ldg(mrow + 1);
      }
      for (int kt = 0; kt < KT; ++kt, ++it) {
        const int s = it % STAGES;
        if (it >= STAGES) {
          if constexpr (CL == 2) mbar_wait_cluster(smem_addr(&empty[s]), ((it / STAGES) - 1) & 1);
          else mbar_wait(smem_addr(&empty[s]), ((it / STAGES) - 1) & 1);
        }
        const u32 fb = smem_addr(&full[s]);
        if (tid == 0) {
          mbar_expect_tx(fb, A_STAGE + B_STAGE);  // the bytes landing in this block, both halves of X
          tma_load_2d(sA + s * A_STAGE, tm, kt * BK, h0, fb);
          if constexpr (CL == 2)
            tma_load_2d_both(sB + s * B_STAGE + rank * (B_STAGE / 2), tm + 384, kt * BK, t0 + rank * (BN / 2), fb);
          else
            tma_load_2d(sB + s * B_STAGE, tm + 128, kt * BK, t0, fb);
        }
        if constexpr (MASKED) {
          const uint2 mw = MODE == 2 ? make_uint2(0x5A5A5A5Au ^ tid, 0xA5A5A5A5u) : mw0;
          asm volatile("st.shared.v2.b32 [%0], {%1, %2};\n" ::"r"(sM + s * (BM * 8) + tid * 8), "r"(mw.x), "r"(mw.y)
                       : "memory");
          mbar_arrive(fb);
          mw0 = mw1;
          if (kt + 2 < KT) mw1 = __ldg(mrow + kt + 2);
        }
      }
    }
    if constexpr (CL == 2) cluster_sync();  // neither block leaves while the other may still write to it
    return;
  }
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");

  const int ct = tid - 128, cwg = wg - 1, warp = (ct >> 5) & 3, lane = ct & 31;
  // this lane's ldmatrix row and chunk: matrices 0..3 = (rows 0-7, k 0-7), (rows 8-15, k 0-7),
  // (rows 0-7, k 8-15), (rows 8-15, k 8-15) of the warp's 16 rows
  const int lrow = cwg * 64 + warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
  const int lhalf = lane >> 4;
  // the mask words of this lane's two fragment rows (r0 = lane / 4, r0 + 8), two per 64-column stage
  const int frow = cwg * 64 + warp * 16 + (lane >> 2);
  const int q2 = 2 * (lane & 3);
  float d[128];
  uint2 mk0 = make_uint2(0xFFFFFFFFu, 0xFFFFFFFFu), mk1 = mk0;
  int it = 0;  // stages consumed before the current tile
  // A fragments of stage kt (ldmatrix, then ANDed with the mask), loaded while the wgmma of kt - 1 runs
  auto load_a = [&](int kt, u32 (&a)[4][4]) {
    const int s = (it + kt) % STAGES;
    mbar_wait(smem_addr(&full[s]), ((it + kt) / STAGES) & 1);
    if constexpr (MASKED) {
      const u32 m = sM + s * (BM * 8) + frow * 8;
      asm volatile("ld.shared.v2.b32 {%0, %1}, [%2];\n" : "=r"(mk0.x), "=r"(mk0.y) : "r"(m));
      asm volatile("ld.shared.v2.b32 {%0, %1}, [%2];\n" : "=r"(mk1.x), "=r"(mk1.y) : "r"(m + 64));
    }
    const u32 a_tile = sA + s * A_STAGE;
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      ldmatrix_x4(a_tile + swizzled(lrow, 2 * kk + lhalf), a[kk]);
      if constexpr (MODE == 3) {
        a[kk][0] |= mk0.x & 0x10001u;  // keep the loads alive, almost no arithmetic
        a[kk][1] |= mk1.y & 0x10001u;
      } else if constexpr (MASKED) {
        const u32 w0 = ((kk < 2) ? mk0.x : mk0.y) >> q2, w1 = ((kk < 2) ? mk1.x : mk1.y) >> q2;
        const int b = 16 * (kk & 1);
        a[kk][0] &= spread_pair(w0, b);
        a[kk][1] &= spread_pair(w1, b);
        a[kk][2] &= spread_pair(w0, b + 8);
        a[kk][3] &= spread_pair(w1, b + 8);
      }
      // pin the masking here, before the wait on the running group (the compiler would sink it to its use)
      asm volatile("" : "+r"(a[kk][0]), "+r"(a[kk][1]), "+r"(a[kk][2]), "+r"(a[kk][3]));
    }
  };
  auto mma = [&](int kt, const u32 (&a)[4][4]) {
    const u32 b_tile = sB + ((it + kt) % STAGES) * B_STAGE;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) wgmma_rs_256<true>(d, a[kk], descriptor(b_tile + kk * 32), (kt | kk) != 0);
    wgmma_commit();
  };
  auto release = [&](int kt) {
    if ((ct & 127) == 0) {
      const u32 e = smem_addr(&empty[(it + kt) % STAGES]);
      mbar_arrive(e);
      if constexpr (CL == 2) mbar_arrive_in(e, rank ^ 1);  // the peer's producer multicasts into this stage
    }
  };
  constexpr int SROW = BM + 8;  // bf16 per staged row (padding against bank conflicts)
  __nv_bfloat16* sC = reinterpret_cast<__nv_bfloat16*>(smem_raw + (sC_addr - smem_addr(smem_raw)));
  for (int tile = first_unit; tile < tiles; tile += unit_stride) {
    int h0, t0;
    origin(tile, h0, t0);
    // Two wgmma groups in flight: the fragments of stage kt + 1 are loaded (and masked) and their group
    // issued while stage kt's runs; waiting for all but the newest group then frees stage kt, and the
    // fragment buffer of stage kt is reused for stage kt + 2.
    u32 a0[4][4], a1[4][4];
    load_a(0, a0);
    mma(0, a0);
    int kt = 0;
    for (; kt + 2 < KT; kt += 2) {
      load_a(kt + 1, a1);
      mma(kt + 1, a1);
      wgmma_wait<1>();
      release(kt);
      load_a(kt + 2, a0);
      mma(kt + 2, a0);
      wgmma_wait<1>();
      release(kt + 1);
    }
    if (kt + 1 < KT) {
      load_a(kt + 1, a1);
      mma(kt + 1, a1);
      wgmma_wait<1>();
      release(kt);
      kt += 1;
    }
    wgmma_wait<0>();
    release(kt);
    it += KT;

    // d: rows (of W) frow, frow + 8; columns (rows of X) 8 j + q2 (+1).
    if constexpr (EPI == 1) {
      // staged transposed as two 128-byte-swizzled boxes of 256 rows of X by 64 rows of W (TMA's layout)
      if (ct == 0) asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");  // the last tile's store
      asm volatile("bar.sync 1, 256;\n" ::: "memory");
      // with stmatrix: lanes 8m .. 8m + 7 address rows (tokens) of matrix m = (j + m / 2, W rows + 8 (m % 2))
      const u32 box = sC_addr + cwg * (BN * 128);
      const int mchunk = 2 * warp + ((lane >> 3) & 1), mrow = 8 * (lane >> 4) + (lane & 7);
#pragma unroll
      for (int j = 0; j < 32; j += 2) {
        const int tok = 8 * j + mrow;
        stmatrix_x4_trans(box + tok * 128 + ((mchunk ^ (tok & 7)) << 4), pack_pair<true>(d[4 * j], d[4 * j + 1]),
                          pack_pair<true>(d[4 * j + 2], d[4 * j + 3]), pack_pair<true>(d[4 * j + 4], d[4 * j + 5]),
                          pack_pair<true>(d[4 * j + 6], d[4 * j + 7]));
      }
      asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // the stores above, seen by TMA
      asm volatile("bar.sync 1, 256;\n" ::: "memory");
      if (ct == 0) {
        tma_store_2d(tm + 256, sC_addr, h0, t0);
        tma_store_2d(tm + 256, sC_addr + BN * 128, h0 + 64, t0);
        asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
      }
      continue;
    }
    if constexpr (EPI == 3) {
      __nv_bfloat16* c0 = C + (size_t)(t0 + q2) * H + h0 + frow;
#pragma unroll
      for (int j = 0; j < 32; ++j) {
        __nv_bfloat16* c = c0 + (size_t)(8 * j) * H;
        c[0] = __float2bfloat16_rn(d[4 * j]);
        c[H] = __float2bfloat16_rn(d[4 * j + 1]);
        c[8] = __float2bfloat16_rn(d[4 * j + 2]);
        c[H + 8] = __float2bfloat16_rn(d[4 * j + 3]);
      }
      continue;
    }
    if constexpr (EPI == 4) {
      const int mchunk = 2 * warp + ((lane >> 3) & 1), mrow = 8 * (lane >> 4) + (lane & 7);
#pragma unroll
      for (int c = 0; c < 8; ++c) {  // rows 32 c .. 32 c + 31 of the X tile: j = 4 c .. 4 c + 3
        const u32 buf = sC_addr + (c & 1) * (32 * BM * 2), box = buf + cwg * (32 * 128);
        if (ct == 0) asm volatile("cp.async.bulk.wait_group.read 1;\n" ::: "memory");  // chunk c - 2's store
        asm volatile("bar.sync 1, 256;\n" ::: "memory");
#pragma unroll
        for (int j = 4 * c; j < 4 * c + 4; j += 2) {
          const int tok = 8 * (j - 4 * c) + mrow;
          stmatrix_x4_trans(box + tok * 128 + ((mchunk ^ (tok & 7)) << 4), pack_pair<true>(d[4 * j], d[4 * j + 1]),
                            pack_pair<true>(d[4 * j + 2], d[4 * j + 3]), pack_pair<true>(d[4 * j + 4], d[4 * j + 5]),
                            pack_pair<true>(d[4 * j + 6], d[4 * j + 7]));
        }
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        asm volatile("bar.sync 1, 256;\n" ::: "memory");
        if (ct == 0) {
          tma_store_2d(tm + 512, buf, h0, t0 + 32 * c);
          tma_store_2d(tm + 512, buf + 32 * 128, h0 + 64, t0 + 32 * c);
          asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
        }
      }
      continue;
    }
    if constexpr (EPI == 2) {  // a store the compiler cannot rule out keeps the accumulators alive
      if (T < 0) {
        float sum = 0.0f;
#pragma unroll
        for (int i = 0; i < 128; ++i) sum += d[i];
        C[ct] = __float2bfloat16_rn(sum);
      }
      continue;
    }
    // Staged transposed in shared memory a quarter of the tile (64 rows of X) at a time, then written as
    // 16-byte rows of C (T, H).
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      asm volatile("bar.sync 1, 256;\n" ::: "memory");  // the staging area is free
#pragma unroll
      for (int j = 8 * c; j < 8 * c + 8; ++j) {
        const int tc = 8 * (j - 8 * c) + q2;
        sC[tc * SROW + frow] = __float2bfloat16_rn(d[4 * j]);
        sC[(tc + 1) * SROW + frow] = __float2bfloat16_rn(d[4 * j + 1]);
        sC[tc * SROW + frow + 8] = __float2bfloat16_rn(d[4 * j + 2]);
        sC[(tc + 1) * SROW + frow + 8] = __float2bfloat16_rn(d[4 * j + 3]);
      }
      asm volatile("bar.sync 1, 256;\n" ::: "memory");
#pragma unroll
      for (int i = ct; i < (BN / 4) * (BM / 8); i += 256) {
        const int tr = i / (BM / 8), ch = i % (BM / 8);
        *reinterpret_cast<uint4*>(C + (size_t)(t0 + c * (BN / 4) + tr) * H + h0 + ch * 8) =
            *reinterpret_cast<const uint4*>(sC + tr * SROW + ch * 8);
      }
    }
  }
  if constexpr (EPI == 1 || EPI == 4) {
    if (ct == 0) asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");  // shared memory outlives the store
  }
  if constexpr (CL == 2) cluster_sync();
}

}  // namespace probe_masked_gemm

#define PROBE_ENTRY(NAME, MODE, EPI, CL, ATTR)                                                               \
  extern "C" __global__ void __launch_bounds__(384, 1) ATTR                                                \
  NAME(const void* tmaps, const u32* bits, __nv_bfloat16* C, int T, int H, int K) {                        \
    probe_masked_gemm::gemm<MODE, EPI, CL>(tmaps, bits, C, T, H, K);                                       \
  }
#define ONE_BLOCK
#define TWO_BLOCKS __cluster_dims__(2, 1, 1)
PROBE_ENTRY(rs_dense, 0, 0, 1, ONE_BLOCK)
PROBE_ENTRY(rs_masked, 1, 0, 1, ONE_BLOCK)
PROBE_ENTRY(rs_alu_only, 2, 0, 1, ONE_BLOCK)
PROBE_ENTRY(rs_loads_only, 3, 0, 1, ONE_BLOCK)
PROBE_ENTRY(rs_dense_tma_store, 0, 1, 1, ONE_BLOCK)
PROBE_ENTRY(rs_masked_tma_store, 1, 1, 1, ONE_BLOCK)
PROBE_ENTRY(rs_dense_no_store, 0, 2, 1, ONE_BLOCK)
PROBE_ENTRY(rs_dense_direct_store, 0, 3, 1, ONE_BLOCK)
PROBE_ENTRY(rs_masked_direct_store, 1, 3, 1, ONE_BLOCK)
PROBE_ENTRY(rs_dense_chunk_store, 0, 4, 1, ONE_BLOCK)
PROBE_ENTRY(rs_masked_chunk_store, 1, 4, 1, ONE_BLOCK)
PROBE_ENTRY(rs_dense_pair, 0, 0, 2, TWO_BLOCKS)
PROBE_ENTRY(rs_masked_pair, 1, 0, 2, TWO_BLOCKS)
PROBE_ENTRY(rs_dense_pair_no_store, 0, 2, 2, TWO_BLOCKS)
