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
//     accumulators (128 floats per thread) are staged transposed in shared memory and written as 16-byte
//     rows of C.
// MODE: 0 dense (no mask), 1 masked, 2 the masking arithmetic on fixed words (no mask loads), 3 the mask
// loads without the arithmetic; 2 and 3 compute nothing meaningful and exist to time the two halves.
// Requires T % 256 == 0, H % 128 == 0, K % 64 == 0 (the probe's shapes). Grid: (H / 128) (T / 256) blocks.
#include <cuda_bf16.h>

typedef unsigned int u32;
typedef unsigned long long u64;

namespace probe_masked_gemm {

constexpr int BM = 128, BN = 256, BK = 64, STAGES = 4;
constexpr int A_STAGE = BM * BK * 2;  // W tile
constexpr int B_STAGE = BN * BK * 2;  // X tile

__device__ __forceinline__ u32 smem_addr(const void* p) { return (u32)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(u32 bar, u32 bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(u32 bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
  asm volatile(
      "{\n.reg .pred done;\nWAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=;\n}\n" ::"r"(bar), "r"(parity) : "memory");
}
__device__ __forceinline__ void tma_load_2d(u32 dst, const void* tmap, int c0, int c1, u32 bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n"
      ::"r"(dst), "l"(tmap), "r"(c0), "r"(c1), "r"(bar) : "memory");
}
__device__ __forceinline__ u32 swz(int r, int c) { return (u32)(r * 128 + ((c ^ (r & 7)) << 4)); }
__device__ __forceinline__ u64 desc(u32 addr) {
  return (u64)((addr & 0x3FFFF) >> 4) | ((u64)1 << 16) | ((u64)(1024 >> 4) << 32) | ((u64)1 << 62);
}
__device__ __forceinline__ void ldmatrix_x4(u32 addr, u32 (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

// bits b, b + 1 of w (b a compile-time constant) as 16-bit masks: x * 0x8001 puts bit 1 at bit 16
__device__ __forceinline__ u32 spread_pair(u32 w, int b) {
  return (((w >> b) & 3u) * 0x8001u & 0x10001u) * 0xFFFFu;
}

#define R8(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), "+f"(d[i + 7])
__device__ __forceinline__ void wgmma_rs_256(float (&d)[128], const u32 (&a)[4], u64 db, int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
      "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
      "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
      "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "
      "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "
      "{%128, %129, %130, %131}, %132, p, 1, 1, 0;\n}\n"
      : R8(0), R8(8), R8(16), R8(24), R8(32), R8(40), R8(48), R8(56), R8(64), R8(72), R8(80), R8(88), R8(96),
        R8(104), R8(112), R8(120)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(scale_d));
}
#undef R8

// tmaps: [W map (box 64 x 128), X map (box 64 x 256)]; W (H, K), X (T, K), bits (H, K / 32); C (T, H).
// MODE 0 dense, 1 masked, 2 masking arithmetic on fixed words (no mask loads), 3 mask loads only
template <int MODE>
__device__ void gemm(const void* tmaps, const u32* __restrict__ bits, __nv_bfloat16* __restrict__ C, int T, int H,
                     int K) {
  constexpr bool MASKED = MODE != 0;
  extern __shared__ unsigned char smem_raw[];
  __shared__ __align__(8) u64 full[STAGES], empty[STAGES];
  const u32 base = (smem_addr(smem_raw) + 1023u) & ~1023u;
  const u32 sA = base, sB = base + STAGES * A_STAGE, sM = sB + STAGES * B_STAGE;  // sM: 8 bytes per W row and stage
  const int tid = threadIdx.x, wg = tid >> 7;
  // grouped raster order (1-d grid): GROUP W tiles at a time sweep every X tile, so that the group's W
  // rows stay in L2 while X streams, and X is read once per group instead of once per W tile
  constexpr int GROUP = 8;
  const int h_tiles = H / BM, t_tiles = T / BN;
  const int group = blockIdx.x / (GROUP * t_tiles), first = group * GROUP;
  const int in_group = min(h_tiles - first, GROUP), local = blockIdx.x % (GROUP * t_tiles);
  const int h0 = (first + local % in_group) * BM, t0 = (local / in_group) * BN;
  const int KT = K / BK;
  const unsigned char* tm = static_cast<const unsigned char*>(tmaps);
  if (tid == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(smem_addr(&full[s]), MASKED ? 129 : 1);
      mbar_init(smem_addr(&empty[s]), 2);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  if (wg == 0) {
    // thread 0 issues the TMA loads; with a mask, each of the 128 threads also copies its W row's two mask
    // words of the stage into sM and arrives on full[s] (129 arrivals: 128 + the expect_tx)
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
    const u32* mrow = bits + (size_t)(h0 + tid) * (K / 32);
    uint2 mw = make_uint2(0u, 0u);
    if constexpr (MASKED) mw = __ldg(reinterpret_cast<const uint2*>(mrow));
    for (int kt = 0; kt < KT; ++kt) {
      const int s = kt % STAGES;
      if (!MASKED && tid != 0) break;
      if (kt >= STAGES) mbar_wait(smem_addr(&empty[s]), ((kt / STAGES) - 1) & 1);
      const u32 fb = smem_addr(&full[s]);
      if (tid == 0) {
        mbar_expect_tx(fb, A_STAGE + B_STAGE);
        tma_load_2d(sA + s * A_STAGE, tm, kt * BK, h0, fb);
        tma_load_2d(sB + s * B_STAGE, tm + 128, kt * BK, t0, fb);
      }
      if constexpr (MASKED) {
        if (MODE == 2) mw = make_uint2(0x5A5A5A5Au ^ tid, 0xA5A5A5A5u);
        asm volatile("st.shared.v2.b32 [%0], {%1, %2};\n" ::"r"(sM + s * (BM * 8) + tid * 8), "r"(mw.x), "r"(mw.y)
                     : "memory");
        mbar_arrive(fb);
        if (kt + 1 < KT) mw = __ldg(reinterpret_cast<const uint2*>(mrow + (kt + 1) * 2));
      }
    }
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
#pragma unroll
  for (int i = 0; i < 128; ++i) d[i] = 0.0f;
  uint2 mk0 = make_uint2(0xFFFFFFFFu, 0xFFFFFFFFu), mk1 = mk0;
  // A fragments of stage kt (ldmatrix, then ANDed with the mask), loaded while the wgmma of kt - 1 runs
  auto load_a = [&](int kt, u32 (&a)[4][4]) {
    const int s = kt % STAGES;
    mbar_wait(smem_addr(&full[s]), (kt / STAGES) & 1);
    if constexpr (MASKED) {
      const u32 m = sM + s * (BM * 8) + frow * 8;
      asm volatile("ld.shared.v2.b32 {%0, %1}, [%2];\n" : "=r"(mk0.x), "=r"(mk0.y) : "r"(m));
      asm volatile("ld.shared.v2.b32 {%0, %1}, [%2];\n" : "=r"(mk1.x), "=r"(mk1.y) : "r"(m + 64));
    }
    const u32 a_tile = sA + s * A_STAGE;
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      ldmatrix_x4(a_tile + swz(lrow, 2 * kk + lhalf), a[kk]);
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
    const u32 b_tile = sB + (kt % STAGES) * B_STAGE;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) wgmma_rs_256(d, a[kk], desc(b_tile + kk * 32), (kt | kk) != 0);
    wgmma_commit();
  };
  auto release = [&](int kt) {
    if ((ct & 127) == 0) mbar_arrive(smem_addr(&empty[kt % STAGES]));
  };
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

  // d: rows (of W) frow, frow + 8; columns (rows of X) 8 j + q2 (+1). Staged transposed in shared memory
  // (the stage buffers are free: every load has been consumed), then written as 16-byte rows of C (T, H).
  constexpr int SROW = BM + 8;  // bf16 per staged row (padding against bank conflicts)
  __nv_bfloat16* sC = reinterpret_cast<__nv_bfloat16*>(smem_raw + (base - smem_addr(smem_raw)));
  asm volatile("bar.sync 1, 256;\n" ::: "memory");
#pragma unroll
  for (int j = 0; j < 32; ++j) {
    const int tc = 8 * j + q2;
    sC[tc * SROW + frow] = __float2bfloat16_rn(d[4 * j]);
    sC[(tc + 1) * SROW + frow] = __float2bfloat16_rn(d[4 * j + 1]);
    sC[tc * SROW + frow + 8] = __float2bfloat16_rn(d[4 * j + 2]);
    sC[(tc + 1) * SROW + frow + 8] = __float2bfloat16_rn(d[4 * j + 3]);
  }
  asm volatile("bar.sync 1, 256;\n" ::: "memory");
#pragma unroll 4
  for (int i = ct; i < BN * (BM / 8); i += 256) {
    const int tr = i / (BM / 8), ch = i % (BM / 8);
    *reinterpret_cast<uint4*>(C + (size_t)(t0 + tr) * H + h0 + ch * 8) =
        *reinterpret_cast<const uint4*>(sC + tr * SROW + ch * 8);
  }
}

}  // namespace probe_masked_gemm

extern "C" __global__ void __launch_bounds__(384, 1)
rs_dense(const void* tmaps, const u32* bits, __nv_bfloat16* C, int T, int H, int K) {
  probe_masked_gemm::gemm<0>(tmaps, bits, C, T, H, K);
}
extern "C" __global__ void __launch_bounds__(384, 1)
rs_masked(const void* tmaps, const u32* bits, __nv_bfloat16* C, int T, int H, int K) {
  probe_masked_gemm::gemm<1>(tmaps, bits, C, T, H, K);
}
extern "C" __global__ void __launch_bounds__(384, 1)
rs_alu_only(const void* tmaps, const u32* bits, __nv_bfloat16* C, int T, int H, int K) {
  probe_masked_gemm::gemm<2>(tmaps, bits, C, T, H, K);
}
extern "C" __global__ void __launch_bounds__(384, 1)
rs_loads_only(const void* tmaps, const u32* bits, __nv_bfloat16* C, int T, int H, int K) {
  probe_masked_gemm::gemm<3>(tmaps, bits, C, T, H, K);
}
