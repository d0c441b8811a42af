// Probe for issue 4 (benchmarks/probe_sparse_wgmma.py): does Hopper's 2:4-sparse wgmma, fed the way the
// "2:4-sparse route" of docs/training.md would feed it, keep the tensor cores as busy as the dense wgmma of
// masked_gemm.cu? Timing only: the operands are whatever the buffers hold, nothing is checked or stored
// except a sum of the accumulators (so that the compiler keeps the work).
//
// The route computes s_i = x (M_i * W)^T with A = W's tile as stored (128 rows by 64 columns of K per
// stage, wgmma's register operand, as in masked_gemm.cu) and the mask as the metadata of a 2:4-sparse A
// of twice the K, against a B that holds each token's x with a zero after every value. So per stage the
// sparse form runs four m64nNk32 (K = 32 "virtual" columns, 16 real ones) where the dense form runs four
// m64nNk16, with the same useful products, the same A bytes, twice the B bytes (in shared memory and
// through the loads) and 2 bits of metadata per value of A, loaded with the stage.
//
// A block of 384 threads: warpgroup 0 produces (thread 0 issues one bulk copy each of the stage's A, B and
// metadata bytes from a small global buffer that stays in L2, when LOADS; else it only arrives),
// warpgroups 1 and 2 consume 64 rows of A each: ldmatrix their fragments (and read their metadata words),
// issue the stage's four wgmma while the previous stage's group runs, release the stage after it, as
// masked_gemm.cu does. Each block runs
// `stages` stages of the same tile and adds its accumulators into out[blockIdx.x].

typedef unsigned int u32;
typedef unsigned long long u64;

#include "hopper.cuh"

using namespace pymglu::hopper;

#define F8(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), "+f"(d[i + 7])
#define ACC64 F8(0), F8(8), F8(16), F8(24), F8(32), F8(40), F8(48), F8(56)
#define ACC128 ACC64, F8(64), F8(72), F8(80), F8(88), F8(96), F8(104), F8(112), F8(120)
#define D64                                                                                                    \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, " \
  "%23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, "   \
  "%44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define D128                                                                                                   \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, " \
  "%23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, "   \
  "%44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, "   \
  "%65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, "   \
  "%86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, "  \
  "%106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, "      \
  "%123, %124, %125, %126, %127}"
#define AREGS "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3])

// d += A (64 x 16 registers) . B (16 x N), bfloat16, dense
template <int N> __device__ __forceinline__ void mma_dense(float* d, const u32 (&a)[4], u64 db, int scale_d);
template <> __device__ __forceinline__ void mma_dense<128>(float* d, const u32 (&a)[4], u64 db, int scale_d) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
               "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " D64
               ", {%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n"
               : ACC64 : AREGS, "l"(db), "r"(scale_d));
}
template <> __device__ __forceinline__ void mma_dense<256>(float* d, const u32 (&a)[4], u64 db, int scale_d) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n"
               "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 " D128
               ", {%128, %129, %130, %131}, %132, p, 1, 1, 0;\n}\n"
               : ACC128 : AREGS, "l"(db), "r"(scale_d));
}
// d += A (64 x 32, 2:4-sparse: 64 x 16 values in registers and the metadata e) . B (32 x N), bfloat16
template <int N> __device__ __forceinline__ void mma_sparse(float* d, const u32 (&a)[4], u64 db, u32 e, int scale_d);
template <> __device__ __forceinline__ void mma_sparse<128>(float* d, const u32 (&a)[4], u64 db, u32 e, int scale_d) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %70, 0;\n"
               "wgmma.mma_async.sp.sync.aligned.m64n128k32.f32.bf16.bf16 " D64
               ", {%64, %65, %66, %67}, %68, %69, 0, p, 1, 1, 0;\n}\n"
               : ACC64 : AREGS, "l"(db), "r"(e), "r"(scale_d));
}
template <> __device__ __forceinline__ void mma_sparse<256>(float* d, const u32 (&a)[4], u64 db, u32 e, int scale_d) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %134, 0;\n"
               "wgmma.mma_async.sp.sync.aligned.m64n256k32.f32.bf16.bf16 " D128
               ", {%128, %129, %130, %131}, %132, %133, 0, p, 1, 1, 0;\n}\n"
               : ACC128 : AREGS, "l"(db), "r"(e), "r"(scale_d));
}

constexpr int BM = 128, BK = 64;  // rows of A per block, real K per stage

template <bool SPARSE, int BN, int STAGES, bool LOADS>
__device__ void run(const unsigned char* __restrict__ src, float* __restrict__ out, int stages) {
  constexpr int A_STAGE = BM * BK * 2;
  constexpr int B_STAGE = BN * BK * 2 * (SPARSE ? 2 : 1);  // sparse: x with a zero after every value
  constexpr int E_STAGE = SPARSE ? BM * BK / 4 : 0;        // sparse: 2 bits of metadata per value of A
  constexpr int STAGE = A_STAGE + B_STAGE + E_STAGE;
  extern __shared__ unsigned char smem_raw[];
  __shared__ __align__(8) u64 full[STAGES], empty[STAGES];
  const u32 base = (smem_addr(smem_raw) + 1023u) & ~1023u;
  const u32 sA = base, sB = sA + STAGES * A_STAGE, sE = sB + STAGES * B_STAGE;
  const int tid = threadIdx.x, wg = tid >> 7;
  if (tid == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(smem_addr(&full[s]), 1);
      mbar_init(smem_addr(&empty[s]), 256);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  if constexpr (SPARSE && !LOADS) {  // valid metadata (values at positions 0 and 2 of every group of four)
    for (int i = tid; i < STAGES * E_STAGE / 4; i += blockDim.x)
      asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(sE + 4 * i), "r"(0x88888888u) : "memory");
  }
  __syncthreads();

  if (wg == 0) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
    if (tid != 0) return;
    // eight stage-sized source regions, picked by block, so that the loads come from L2 but not one line
    const unsigned char* a_src = src + (size_t)(blockIdx.x % 8) * STAGE;
    for (int g = 0; g < stages; ++g) {
      const int s = g % STAGES;
      if (g >= STAGES) mbar_wait(smem_addr(&empty[s]), ((g / STAGES) - 1) & 1);
      const u32 fb = smem_addr(&full[s]);
      if constexpr (LOADS) {
        mbar_expect_tx(fb, STAGE);
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
                     ::"r"(sA + s * A_STAGE), "l"(a_src), "n"(A_STAGE), "r"(fb) : "memory");
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
                     ::"r"(sB + s * B_STAGE), "l"(a_src + A_STAGE), "n"(B_STAGE), "r"(fb) : "memory");
        if constexpr (SPARSE)
          asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
                       ::"r"(sE + s * E_STAGE), "l"(a_src + A_STAGE + B_STAGE), "n"(E_STAGE), "r"(fb) : "memory");
      } else {
        mbar_arrive(fb);
      }
    }
    return;
  }
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
  const int ct = tid - 128, cwg = wg - 1, warp = (ct >> 5) & 3, lane = ct & 31;
  const int lrow = cwg * 64 + warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, lhalf = lane >> 4;
  float d[BN / 2];
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) d[i] = 0.f;
  // a[kk]: the A fragment of k step kk; a[4][kk]: its metadata word (sparse), read from the stage like the
  // fragments (a metadata register that stays the same for every stage makes ptxas serialise the wgmma)
  auto load_a = [&](int g, u32 (&a)[5][4]) {
    const int s = g % STAGES;
    mbar_wait(smem_addr(&full[s]), (g / STAGES) & 1);
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) ldmatrix_x4(sA + s * A_STAGE + swizzled(lrow, 2 * kk + lhalf), a[kk]);
    if constexpr (SPARSE) {
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
        asm volatile("ld.shared.b32 %0, [%1];\n" : "=r"(a[4][kk]) : "r"(sE + s * E_STAGE + kk * 512 + (ct & 127) * 4));
    }
  };
  auto mma = [&](int g, const u32 (&a)[5][4]) {
    const u32 b_tile = sB + (g % STAGES) * B_STAGE;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      if constexpr (SPARSE)  // 32 virtual columns = 64 bytes of a 128-byte-swizzled row; two BN-row boxes per stage
        mma_sparse<BN>(d, a[kk], descriptor(b_tile + (kk >> 1) * (BN * 128) + (kk & 1) * 64), a[4][kk], 1);
      else
        mma_dense<BN>(d, a[kk], descriptor(b_tile + kk * 32), 1);
    }
    wgmma_commit();
  };
  auto release = [&](int g) { mbar_arrive(smem_addr(&empty[g % STAGES])); };
  u32 a0[5][4], a1[5][4];
  load_a(0, a0);
  mma(0, a0);
  int g = 0;
  for (; g + 2 < stages; g += 2) {
    load_a(g + 1, a1);
    mma(g + 1, a1);
    wgmma_wait<1>();
    release(g);
    load_a(g + 2, a0);
    mma(g + 2, a0);
    wgmma_wait<1>();
    release(g + 1);
  }
  if (g + 1 < stages) {
    load_a(g + 1, a1);
    mma(g + 1, a1);
    wgmma_wait<1>();
    release(g);
    g += 1;
  }
  wgmma_wait<0>();
  release(g);
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) sum += d[i];
  atomicAdd(out + blockIdx.x, sum);
}

#define PROBE(NAME, SPARSE, BN, STAGES, LOADS)                                                               \
  extern "C" __global__ void __launch_bounds__(384, 1) NAME(const unsigned char* src, float* out, int stages) { \
    run<SPARSE, BN, STAGES, LOADS>(src, out, stages);                                                          \
  }
PROBE(dense_n256_smem, false, 256, 4, false)
PROBE(sparse_n256_smem, true, 256, 2, false)
PROBE(dense_n256_loads, false, 256, 4, true)
PROBE(sparse_n256_loads, true, 256, 2, true)
PROBE(dense_n128_loads, false, 128, 4, true)
PROBE(sparse_n128_loads, true, 128, 4, true)
