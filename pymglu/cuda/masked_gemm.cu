// One masked product on Hopper's tensor cores (sm_90a only): C (T, H) = X (T, K) . (M * W)^T, the forward's
// s_i = x (M_i * W)^T of pymglu.cuda.training without a masked copy of W. Built by pymglu/cuda/masked_gemm.py
// (NVRTC, -arch=sm_90a); measured in docs/benchmarks.md, "Stop 32", where benchmarks/probe_masked_gemm.cu,
// the probe this kernel comes from, is timed against cuBLAS.
//
// X (T, K), W (H, K) and C (T, H) are row-major 16-bit (bfloat16 or float16) and reached through TMA tensor
// maps passed by value; the mask is one bit-plane bits (H, KW = ceil(K / 32)) uint32 (pymglu.masks format).
// Ragged shapes need no special case: TMA fills the loads past T, H or K with zeros and drops the stores
// past T or H; the mask words past H or KW are read as zero.
//
// A block of 384 threads takes output tiles of 256 rows of X by 128 rows of W, every gridDim.x-th tile of a
// grouped order (8 W tiles sweep every X tile, so that they stay in L2), K in stages of 64:
//   * warpgroup 0 produces: thread 0 issues the TMA loads (128-byte swizzle) of the W and X tiles of each of
//     4 stages; each of its 128 threads copies its W row's two mask words of the stage into shared memory
//     and arrives on the stage's mbarrier too (129 arrivals: 128 + the expect_tx). It runs ahead into the
//     next tile while the consumers store the last one. Each consumer thread releases a stage on its own.
//   * warpgroups 1 and 2 consume, 64 rows of W each, with W as wgmma's register operand: ldmatrix the A
//     fragments of stage kt + 1, AND them with the mask (two bits per register, spread to 16-bit lanes) and
//     issue their wgmma group (m64n256k16, B = the X tile in shared memory) while stage kt's group runs.
//     Each thread's 128 float accumulators are rounded to packed 16-bit pairs and staged transposed with
//     stmatrix, 32 rows of X at a time, in two 8 KB buffers in TMA's swizzled layout; one thread stores each
//     chunk with TMA while the next one is staged.

typedef unsigned int u32;
typedef unsigned long long u64;
typedef unsigned short u16;

#include "hopper.cuh"

namespace pymglu {
namespace masked_gemm {

using namespace hopper;

constexpr int BM = 128, BN = 256, BK = 64, STAGES = 4, GROUP = 8;
constexpr int A_STAGE = BM * BK * 2;     // W tile
constexpr int B_STAGE = BN * BK * 2;     // X tile
constexpr int CHUNK_ROWS = 32;           // rows of X per staged chunk of the output
constexpr int C_CHUNK = CHUNK_ROWS * BM * 2;
//: dynamic shared memory the launch must give: stages, output chunks, mask words, 1 KB for alignment
constexpr int SMEM_BYTES = STAGES * (A_STAGE + B_STAGE) + 2 * C_CHUNK + STAGES * BM * 8 + 1024;

// The mask words 2 kt, 2 kt + 1 of row `row` (zero past H rows or KW words).
__device__ __forceinline__ uint2 mask_words(const u32* __restrict__ bits, int row, int H, int KW, int kt) {
  uint2 m = make_uint2(0u, 0u);
  if (row < H) {
    const u32* r = bits + (size_t)row * KW;
    if (2 * kt < KW) m.x = __ldg(r + 2 * kt);
    if (2 * kt + 1 < KW) m.y = __ldg(r + 2 * kt + 1);
  }
  return m;
}

template <bool BF16>
__device__ void masked_product(const TensorMap* w_map, const TensorMap* x_map, const TensorMap* c_map,
                               const u32* __restrict__ bits, int T, int H, int K, int KW) {
  extern __shared__ unsigned char smem_raw[];
  __shared__ __align__(8) u64 full[STAGES], empty[STAGES];
  const u32 base = (smem_addr(smem_raw) + 1023u) & ~1023u;  // 128-byte swizzle needs 1 KB alignment
  const u32 sA = base, sB = sA + STAGES * A_STAGE, sC = sB + STAGES * B_STAGE, sM = sC + 2 * C_CHUNK;
  const int tid = threadIdx.x, wg = tid >> 7;
  const int h_tiles = (H + BM - 1) / BM, t_tiles = (T + BN - 1) / BN, tiles = h_tiles * t_tiles;
  const int KT = (K + BK - 1) / BK;
  auto origin = [&](int tile, int& h0, int& t0) {
    const int group = tile / (GROUP * t_tiles), first = group * GROUP;
    const int in_group = min(h_tiles - first, GROUP), local = tile % (GROUP * t_tiles);
    h0 = (first + local % in_group) * BM;
    t0 = (local / in_group) * BN;
  };
  if (tid == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(smem_addr(&full[s]), 129);
      mbar_init(smem_addr(&empty[s]), 256);  // one arrival per consumer thread
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  if (wg == 0) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
    int it = 0;  // stages produced so far, over all of this block's tiles
    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
      int h0, t0;
      origin(tile, h0, t0);
      // the words of the next two stages are in flight while a stage waits for its slot
      uint2 mw0 = mask_words(bits, h0 + tid, H, KW, 0), mw1 = mask_words(bits, h0 + tid, H, KW, 1);
      for (int kt = 0; kt < KT; ++kt, ++it) {
        const int s = it % STAGES;
        if (it >= STAGES) mbar_wait(smem_addr(&empty[s]), ((it / STAGES) - 1) & 1);
        const u32 fb = smem_addr(&full[s]);
        if (tid == 0) {
          mbar_expect_tx(fb, A_STAGE + B_STAGE);  // the whole boxes, zero-filled past the tensor
          tma_load_2d(sA + s * A_STAGE, w_map, kt * BK, h0, fb);
          tma_load_2d(sB + s * B_STAGE, x_map, kt * BK, t0, fb);
        }
        asm volatile("st.shared.v2.b32 [%0], {%1, %2};\n" ::"r"(sM + s * (BM * 8) + tid * 8), "r"(mw0.x), "r"(mw0.y)
                     : "memory");
        mbar_arrive(fb);
        mw0 = mw1;
        mw1 = mask_words(bits, h0 + tid, H, KW, kt + 2);
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
  // the rows stmatrix stores for this lane: matrix m = lane / 8 holds X rows 8 (j + m / 2) .. + 7 and the
  // 16-byte chunk 2 warp + m % 2 of this warpgroup's 64 W rows
  const int st_chunk = 2 * warp + ((lane >> 3) & 1), st_row = 8 * (lane >> 4) + (lane & 7);
  float d[128];
  int it = 0;  // stages consumed before the current tile
  auto load_a = [&](int kt, u32 (&a)[4][4]) {
    const int s = (it + kt) % STAGES;
    mbar_wait(smem_addr(&full[s]), ((it + kt) / STAGES) & 1);
    uint2 mk0, mk1;
    const u32 m = sM + s * (BM * 8) + frow * 8;
    asm volatile("ld.shared.v2.b32 {%0, %1}, [%2];\n" : "=r"(mk0.x), "=r"(mk0.y) : "r"(m));
    asm volatile("ld.shared.v2.b32 {%0, %1}, [%2];\n" : "=r"(mk1.x), "=r"(mk1.y) : "r"(m + 64));
    const u32 a_tile = sA + s * A_STAGE;
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      ldmatrix_x4(a_tile + swizzled(lrow, 2 * kk + lhalf), a[kk]);
      const u32 w0 = ((kk < 2) ? mk0.x : mk0.y) >> q2, w1 = ((kk < 2) ? mk1.x : mk1.y) >> q2;
      const int b = 16 * (kk & 1);
      a[kk][0] &= spread_pair(w0, b);
      a[kk][1] &= spread_pair(w1, b);
      a[kk][2] &= spread_pair(w0, b + 8);
      a[kk][3] &= spread_pair(w1, b + 8);
      // pin the masking here, before the wait on the running group (the compiler would sink it to its use)
      asm volatile("" : "+r"(a[kk][0]), "+r"(a[kk][1]), "+r"(a[kk][2]), "+r"(a[kk][3]));
    }
  };
  auto mma = [&](int kt, const u32 (&a)[4][4]) {
    const u32 b_tile = sB + ((it + kt) % STAGES) * B_STAGE;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) wgmma_rs_256<BF16>(d, a[kk], descriptor(b_tile + kk * 32), (kt | kk) != 0);
    wgmma_commit();
  };
  // Every thread releases the stage after its own reads of the stage's mask words (an arrival releases
  // them, the producer's wait acquires them). One arrival per warp after __syncwarp() orders them as well
  // under the PTX memory model, but compute-sanitizer's racecheck does not follow that chain and reports
  // the slot's reuse (benchmarks/probe_racecheck_mbarrier.py shows it on a minimal ping-pong).
  auto release = [&](int kt) { mbar_arrive(smem_addr(&empty[(it + kt) % STAGES])); };
  for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
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

    // d: W rows frow, frow + 8; X rows 8 j + q2 (+1). Chunk c holds X rows 32 c .. 32 c + 31 (j = 4 c ..
    // 4 c + 3) as two boxes of 32 X rows by 64 W rows, one per warpgroup.
#pragma unroll
    for (int c = 0; c < BN / CHUNK_ROWS; ++c) {
      const u32 buf = sC + (c & 1) * C_CHUNK, box = buf + cwg * (CHUNK_ROWS * 128);
      if (ct == 0) asm volatile("cp.async.bulk.wait_group.read 1;\n" ::: "memory");  // chunk c - 2 was read
      asm volatile("bar.sync 1, 256;\n" ::: "memory");
#pragma unroll
      for (int j = 4 * c; j < 4 * c + 4; j += 2) {
        const int row = 8 * (j - 4 * c) + st_row;
        stmatrix_x4_trans(box + swizzled(row, st_chunk), pack_pair<BF16>(d[4 * j], d[4 * j + 1]),
                          pack_pair<BF16>(d[4 * j + 2], d[4 * j + 3]), pack_pair<BF16>(d[4 * j + 4], d[4 * j + 5]),
                          pack_pair<BF16>(d[4 * j + 6], d[4 * j + 7]));
      }
      asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // the stores above, seen by TMA
      asm volatile("bar.sync 1, 256;\n" ::: "memory");
      if (ct == 0) {
        tma_store_2d(c_map, buf, h0, t0 + CHUNK_ROWS * c);
        tma_store_2d(c_map, buf + CHUNK_ROWS * 128, h0 + 64, t0 + CHUNK_ROWS * c);
        asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
      }
    }
  }
  if (ct == 0) asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");  // shared memory outlives the stores
}

}  // namespace masked_gemm
}  // namespace pymglu

extern "C" __global__ void __launch_bounds__(384, 1)
masked_gemm_bf16(const __grid_constant__ pymglu::hopper::TensorMap w_map,
                 const __grid_constant__ pymglu::hopper::TensorMap x_map,
                 const __grid_constant__ pymglu::hopper::TensorMap c_map, const u32* bits, int T, int H, int K,
                 int KW) {
  pymglu::masked_gemm::masked_product<true>(&w_map, &x_map, &c_map, bits, T, H, K, KW);
}
extern "C" __global__ void __launch_bounds__(384, 1)
masked_gemm_f16(const __grid_constant__ pymglu::hopper::TensorMap w_map,
                const __grid_constant__ pymglu::hopper::TensorMap x_map,
                const __grid_constant__ pymglu::hopper::TensorMap c_map, const u32* bits, int T, int H, int K,
                int KW) {
  pymglu::masked_gemm::masked_product<false>(&w_map, &x_map, &c_map, bits, T, H, K, KW);
}
