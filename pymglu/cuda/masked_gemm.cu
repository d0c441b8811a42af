// Masked products on Hopper's tensor cores (sm_90a only), without a masked copy of W. Built by
// pymglu/cuda/masked_gemm.py (NVRTC, -arch=sm_90a); measured in docs/train_layer_history.md, "Stop 32" and "Stop 33";
// benchmarks/probe_masked_gemm.cu, the probe this kernel comes from, is timed against cuBLAS there.
//
//   * masked_gemm_*, the forward's s_i = x (M_i * W)^T of pymglu.cuda.training:
//       C (T, H) = X (T, K) . (M * W)^T, one bit-plane bits (H, ceil(K / 32));
//   * masked_dx_*, the backward's dx, all n + 1 products summed in one accumulator:
//       C (T, D) = B_0 (T, H) . W + sum_{i = 1..n} B_i (T, H) . (M_i * W),
//     with the transposed bit-planes bits_t (n, D, ceil(H / 32)) (transpose_bit_planes below) and B_1..B_n
//     one (n T, H) matrix.
// Both compute C^T a tile at a time with A = (masked) W as wgmma's register operand: rows of A are the rows of
// W (forward) or its columns (dx, loaded with ldmatrix.trans), K runs over the columns of W (forward) or over
// its rows, once per product (dx: "segments" 0..n, segment 0 unmasked).
//
// Operands are row-major 16-bit (bfloat16 or float16), reached through TMA tensor maps passed by value; a
// bit-plane's bit j of word k of row r is M[r, 32 k + j] (pymglu.masks format). Ragged shapes need no special
// case: TMA fills the loads past T, the rows of A or K with zeros and drops the stores past T or the rows of A;
// the mask words past the rows of A or past the row's words are read as zero. (dx's boxes of B_i past T read
// the next product's first rows, which reach only output rows past T, and these are not stored.)
//
// A block of 384 threads takes output tiles of 256 tokens by 128 rows of A, every gridDim.x-th tile of a
// grouped order (8 tiles of one side sweep every tile of the other, so that they stay in L2), K in stages of 64:
//   * warpgroup 0 produces: thread 0 issues the TMA loads (128-byte swizzle) of the A and B tiles of each of
//     4 stages; each of its 128 threads copies its A row's two mask words of the stage into shared memory
//     and arrives on the stage's mbarrier too (129 arrivals: 128 + the expect_tx). It runs ahead into the
//     next tile while the consumers store the last one. Each consumer thread releases a stage on its own.
//   * warpgroups 1 and 2 consume, 64 rows of A each: ldmatrix the A fragments of stage kt + 1, AND them with
//     the mask (two bits per register, spread to 16-bit lanes) and issue their wgmma group (m64n256k16, B =
//     the token tile in shared memory) while stage kt's group runs. Each thread's 128 float accumulators are
//     rounded to packed 16-bit pairs and staged transposed with stmatrix, 32 tokens at a time, in two 8 KB
//     buffers in TMA's swizzled layout; one thread stores each chunk with TMA while the next one is staged.

typedef unsigned int u32;
typedef unsigned long long u64;
typedef unsigned short u16;

#include "hopper.cuh"

namespace pymglu {
namespace masked_gemm {

using namespace hopper;

constexpr int BM = 128, BN = 256, BK = 64, STAGES = 4, GROUP = 8;
constexpr int A_STAGE = BM * BK * 2;     // A (W) tile
constexpr int B_STAGE = BN * BK * 2;     // B (token) tile
constexpr int CHUNK_ROWS = 32;           // tokens per staged chunk of the output
constexpr int C_CHUNK = CHUNK_ROWS * BM * 2;
//: dynamic shared memory the launch must give: stages, output chunks, mask words, 1 KB for alignment
constexpr int SMEM_BYTES = STAGES * (A_STAGE + B_STAGE) + 2 * C_CHUNK + STAGES * BM * 8 + 1024;

// The mask words 2 kt, 2 kt + 1 of row `row` (zero past R rows or KW words).
__device__ __forceinline__ uint2 mask_words(const u32* __restrict__ bits, int row, int R, int KW, int kt) {
  uint2 m = make_uint2(0u, 0u);
  if (row < R) {
    const u32* r = bits + (size_t)row * KW;
    if (2 * kt < KW) m.x = __ldg(r + 2 * kt);
    if (2 * kt + 1 < KW) m.y = __ldg(r + 2 * kt + 1);
  }
  return m;
}

// TRANS_A = false: the forward. A = W (R = H rows, K columns), one segment, masked by the plane `bits`.
// TRANS_A = true: dx. A = W^T (R = D rows: the columns of W; K = H: its rows), `segments` = n + 1 products;
// segment 0 takes B from b0_map and no mask, segment p >= 1 rows (p - 1) T.. of b1_map and plane p - 1 of bits.
template <bool BF16, bool TRANS_A>
__device__ void masked_product(const TensorMap* a_map, const TensorMap* b0_map, const TensorMap* b1_map,
                               const TensorMap* c_map, const u32* __restrict__ bits, int T, int R, int K, int KW,
                               int segments) {
  extern __shared__ unsigned char smem_raw[];
  __shared__ __align__(8) u64 full[STAGES], empty[STAGES];
  const u32 base = (smem_addr(smem_raw) + 1023u) & ~1023u;  // 128-byte swizzle needs 1 KB alignment
  const u32 sA = base, sB = sA + STAGES * A_STAGE, sC = sB + STAGES * B_STAGE, sM = sC + 2 * C_CHUNK;
  const int tid = threadIdx.x, wg = tid >> 7;
  const int r_tiles = (R + BM - 1) / BM, t_tiles = (T + BN - 1) / BN, tiles = r_tiles * t_tiles;
  const int KT = (K + BK - 1) / BK, G = segments * KT;  // stages per tile
  const int first_masked = TRANS_A ? 1 : 0;
  // the forward groups tiles of W (8 sweep every token tile), dx tiles of tokens (its B rows are n + 1 times
  // longer than its A rows)
  auto origin = [&](int tile, int& r0, int& t0) {
    const int major_tiles = TRANS_A ? t_tiles : r_tiles, minor_tiles = TRANS_A ? r_tiles : t_tiles;
    const int group = tile / (GROUP * minor_tiles), first = group * GROUP;
    const int in_group = min(major_tiles - first, GROUP), local = tile % (GROUP * minor_tiles);
    const int major = first + local % in_group, minor = local / in_group;
    r0 = (TRANS_A ? minor : major) * BM;
    t0 = (TRANS_A ? major : minor) * BN;
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
      int r0, t0;
      origin(tile, r0, t0);
      // the mask words of stage g of this tile: all ones for an unmasked segment, zero past the last stage
      auto words = [&](int g) {
        if (g >= G) return make_uint2(0u, 0u);
        const int p = g / KT;
        if (p < first_masked) return make_uint2(~0u, ~0u);
        return mask_words(bits + (size_t)(p - first_masked) * R * KW, r0 + tid, R, KW, g - p * KT);
      };
      // the words of the next two stages are in flight while a stage waits for its slot
      uint2 mw0 = words(0), mw1 = words(1);
      for (int g = 0; g < G; ++g, ++it) {
        const int s = it % STAGES, p = g / KT, k0 = (g - p * KT) * BK;
        if (it >= STAGES) mbar_wait(smem_addr(&empty[s]), ((it / STAGES) - 1) & 1);
        const u32 fb = smem_addr(&full[s]);
        if (tid == 0) {
          mbar_expect_tx(fb, A_STAGE + B_STAGE);  // the whole boxes, zero-filled past the tensor
          if constexpr (TRANS_A) {  // two boxes of 64 rows of W (K) by 64 of its columns (rows of A)
            tma_load_2d(sA + s * A_STAGE, a_map, r0, k0, fb);
            tma_load_2d(sA + s * A_STAGE + A_STAGE / 2, a_map, r0 + 64, k0, fb);
          } else {
            tma_load_2d(sA + s * A_STAGE, a_map, k0, r0, fb);
          }
          if (p == 0) tma_load_2d(sB + s * B_STAGE, b0_map, k0, t0, fb);
          else tma_load_2d(sB + s * B_STAGE, b1_map, k0, (p - 1) * T + t0, fb);
        }
        asm volatile("st.shared.v2.b32 [%0], {%1, %2};\n" ::"r"(sM + s * (BM * 8) + tid * 8), "r"(mw0.x), "r"(mw0.y)
                     : "memory");
        mbar_arrive(fb);
        mw0 = mw1;
        mw1 = words(g + 2);
      }
    }
    return;
  }
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");

  const int ct = tid - 128, cwg = wg - 1, warp = (ct >> 5) & 3, lane = ct & 31;
  // this lane's ldmatrix address: matrices 0..3 = (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15),
  // (rows 8-15, k 8-15) of the warp's 16 rows of A. Forward: A row lrow, 16-byte chunk (k) lhalf of each k16
  // step. dx: the row of W (k) trow of each k16 step, in the 16-byte chunk (rows of A) tchunk of box cwg.
  const int lrow = cwg * 64 + warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
  const int lhalf = lane >> 4;
  const int trow = ((lane >> 4) & 1) * 8 + (lane & 7), tchunk = 2 * warp + ((lane >> 3) & 1);
  // the mask words of this lane's two fragment rows (r0 = lane / 4, r0 + 8), two per 64-column stage
  const int frow = cwg * 64 + warp * 16 + (lane >> 2);
  const int q2 = 2 * (lane & 3);
  // the rows stmatrix stores for this lane: matrix m = lane / 8 holds tokens 8 (j + m / 2) .. + 7 and the
  // 16-byte chunk 2 warp + m % 2 of this warpgroup's 64 rows of A
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
      if constexpr (TRANS_A) ldmatrix_x4_trans(a_tile + cwg * (A_STAGE / 2) + swizzled(16 * kk + trow, tchunk), a[kk]);
      else ldmatrix_x4(a_tile + swizzled(lrow, 2 * kk + lhalf), a[kk]);
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
    int r0, t0;
    origin(tile, r0, t0);
    // Two wgmma groups in flight: the fragments of stage kt + 1 are loaded (and masked) and their group
    // issued while stage kt's runs; waiting for all but the newest group then frees stage kt, and the
    // fragment buffer of stage kt is reused for stage kt + 2.
    u32 a0[4][4], a1[4][4];
    load_a(0, a0);
    mma(0, a0);
    int kt = 0;
    for (; kt + 2 < G; kt += 2) {
      load_a(kt + 1, a1);
      mma(kt + 1, a1);
      wgmma_wait<1>();
      release(kt);
      load_a(kt + 2, a0);
      mma(kt + 2, a0);
      wgmma_wait<1>();
      release(kt + 1);
    }
    if (kt + 1 < G) {
      load_a(kt + 1, a1);
      mma(kt + 1, a1);
      wgmma_wait<1>();
      release(kt);
      kt += 1;
    }
    wgmma_wait<0>();
    release(kt);
    it += G;

    // d: rows of A frow, frow + 8; tokens 8 j + q2 (+1). Chunk c holds tokens 32 c .. 32 c + 31 (j = 4 c ..
    // 4 c + 3) as two boxes of 32 tokens by 64 rows of A, one per warpgroup.
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
        tma_store_2d(c_map, buf, r0, t0 + CHUNK_ROWS * c);
        tma_store_2d(c_map, buf + CHUNK_ROWS * 128, r0 + 64, t0 + CHUNK_ROWS * c);
        asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
      }
    }
  }
  if (ct == 0) asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");  // shared memory outlives the stores
}

// The 32 x 32 bit matrix held one row per lane (bit j of lane i's word = element (i, j)) transposed in place
// across the warp: five exchanges of blocks of 16, 8, 4, 2 and 1 bits with the lane s apart.
__device__ __forceinline__ u32 transpose_32x32(u32 word, int lane) {
  constexpr u32 low[5] = {0x0000FFFFu, 0x00FF00FFu, 0x0F0F0F0Fu, 0x33333333u, 0x55555555u};
#pragma unroll
  for (int k = 0, s = 16; k < 5; ++k, s >>= 1) {
    const u32 other = __shfl_xor_sync(0xFFFFFFFFu, word, s);
    word = (lane & s) ? (word & ~low[k]) | ((other >> s) & low[k]) : (word & low[k]) | ((other << s) & ~low[k]);
  }
  return word;
}

// bits (planes, R, ceil(C / 32)) -> bits_t (planes, C, ceil(R / 32)): bit r % 32 of word r / 32 of row c of
// bits_t is bit c % 32 of word c / 32 of row r of bits. A block of 256 threads transposes 256 rows by 256
// columns: coalesced loads of 8 words per row into shared memory, one 32 x 32 transpose per warp and word,
// coalesced stores of 8 words per row of bits_t.
__device__ void transpose_planes(const u32* __restrict__ bits, u32* __restrict__ bits_t, int R, int C) {
  __shared__ u32 in[256][9], out[256][9];
  const int CW = (C + 31) / 32, RW = (R + 31) / 32, tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int cw0 = blockIdx.x * 8, rw0 = blockIdx.y * 8;
  const size_t plane = blockIdx.z;
  bits += plane * R * CW;
  bits_t += plane * C * RW;
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    const int idx = k * 256 + tid, r = rw0 * 32 + idx / 8, w = cw0 + idx % 8;
    in[idx / 8][idx % 8] = (r < R && w < CW) ? __ldg(bits + (size_t)r * CW + w) : 0u;
  }
  __syncthreads();
  // warp w: rows 32 w .. 32 w + 31 of the block, each of its 8 words in turn
#pragma unroll
  for (int cw = 0; cw < 8; ++cw) {
    out[32 * cw + lane][warp] = transpose_32x32(in[32 * warp + lane][cw], lane);
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    const int idx = k * 256 + tid, c = cw0 * 32 + idx / 8, w = rw0 + idx % 8;
    if (c < C && w < RW) bits_t[(size_t)c * RW + w] = out[idx / 8][idx % 8];
  }
}

}  // namespace masked_gemm
}  // namespace pymglu

#define PYMGLU_MASKED_ENTRIES(SUFFIX, BF16)                                                                     \
  extern "C" __global__ void __launch_bounds__(384, 1)                                                          \
      masked_gemm_##SUFFIX(const __grid_constant__ pymglu::hopper::TensorMap w_map,                            \
                           const __grid_constant__ pymglu::hopper::TensorMap x_map,                            \
                           const __grid_constant__ pymglu::hopper::TensorMap c_map, const u32* bits, int T,    \
                           int H, int K, int KW) {                                                             \
    pymglu::masked_gemm::masked_product<BF16, false>(&w_map, &x_map, &x_map, &c_map, bits, T, H, K, KW, 1);    \
  }                                                                                                             \
  extern "C" __global__ void __launch_bounds__(384, 1)                                                          \
      masked_dx_##SUFFIX(const __grid_constant__ pymglu::hopper::TensorMap w_map,                              \
                         const __grid_constant__ pymglu::hopper::TensorMap b0_map,                             \
                         const __grid_constant__ pymglu::hopper::TensorMap b1_map,                             \
                         const __grid_constant__ pymglu::hopper::TensorMap c_map, const u32* bits_t, int T,    \
                         int D, int H, int HW, int n) {                                                        \
    pymglu::masked_gemm::masked_product<BF16, true>(&w_map, &b0_map, &b1_map, &c_map, bits_t, T, D, H, HW,     \
                                                    n + 1);                                                    \
  }
PYMGLU_MASKED_ENTRIES(bf16, true)
PYMGLU_MASKED_ENTRIES(f16, false)
#undef PYMGLU_MASKED_ENTRIES

extern "C" __global__ void __launch_bounds__(256) transpose_bit_planes(const u32* bits, u32* bits_t, int R, int C) {
  pymglu::masked_gemm::transpose_planes(bits, bits_t, R, C);
}
