// The fused decode step (decode_fused.cu): staging of a phase's input into shared memory (with
// RMSNorm), from plain rows or from flagged packets, and the products over FlashMGLU's tile format with
// their epilogues.
#pragma once

#include "block_reduce.cuh"
#include "fused_context.cuh"
#include "tensor_core.cuh"

namespace pymglu {

// The RMSNorm of the staged rows, in place: xs[b, k] = xs[b, k] / sqrt(mean(xs[b, :K]^2) + eps) * norm[k],
// rounded to T (nothing when norm == nullptr). The staged rows must be complete (after a __syncthreads);
// ends with one. The norm weights should already be on their way into L1 (prefetch_norm).
template <typename T>
__device__ void normalize_staged(FusedCtx<T>& cx, const T* norm, int K) {
  if (norm == nullptr) return;
  const bool vec = (K & 7) == 0;  // staged rows are 16-byte aligned
  float* inv_rms = cx.scratch + 40;  // (FUSED_MAX_TOKENS)
  for (int b = 0; b < cx.B; ++b) {
    const T* row = cx.xs + (size_t)b * cx.xs_stride;
    float acc = 0.0f;
    if (vec) {
      for (int k8 = threadIdx.x; k8 < K / 8; k8 += blockDim.x) {
        const uint4 v = reinterpret_cast<const uint4*>(row)[k8];
        const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc += to_float(e[i]) * to_float(e[i]);
      }
    } else {
      for (int k = threadIdx.x; k < K; k += blockDim.x) acc += to_float(row[k]) * to_float(row[k]);
    }
    const float total = block_sum(acc, cx.scratch);
    if (threadIdx.x == 0) inv_rms[b] = 1.0f / sqrtf(total / (float)K + cx.eps);
  }
  __syncthreads();
  const bool vec_norm = vec && (reinterpret_cast<size_t>(norm) & 15) == 0;
  for (int b = 0; b < cx.B; ++b) {
    const float r = inv_rms[b];
    T* out = cx.xs + (size_t)b * cx.xs_stride;
    if (vec_norm) {
      for (int k8 = threadIdx.x; k8 < K / 8; k8 += blockDim.x) {
        uint4 v = reinterpret_cast<const uint4*>(out)[k8];
        const uint4 g = reinterpret_cast<const uint4*>(norm)[k8];
        T* e = reinterpret_cast<T*>(&v);
        const T* ge = reinterpret_cast<const T*>(&g);
#pragma unroll
        for (int i = 0; i < 8; ++i) e[i] = from_float<T>(to_float(e[i]) * r * to_float(ge[i]));
        reinterpret_cast<uint4*>(out)[k8] = v;
      }
    } else {
      for (int k = threadIdx.x; k < K; k += blockDim.x) out[k] = from_float<T>(to_float(out[k]) * r * to_float(norm[k]));
    }
  }
  __syncthreads();
}

// Asks L1 for the K norm weights (their latency passes while the staging waits for its rows).
template <typename T>
__device__ __forceinline__ void prefetch_norm(const T* norm, int K) {
  if (norm == nullptr) return;
  for (int k = 64 * threadIdx.x; k < K; k += 64 * blockDim.x) asm volatile("prefetch.global.L1 [%0];" ::"l"(norm + k));
}

// xs[b, k] = src[b, k] for k < K, 0 for K <= k < KP (the padding of the last 64-column group), then the
// RMSNorm (normalize_staged) when norm != nullptr. src rows come from `rows[b]` (the embedding rows of
// block 0) or src + b * K; they were written before the launch or before a grid barrier.
template <typename T>
__device__ void stage_input(FusedCtx<T>& cx, const T* src, const int* rows, const T* norm, int K, int KP) {
  const bool vec = (K & 7) == 0;  // rows and the staged copy are then 16-byte aligned
  prefetch_norm(norm, K);
  for (int b = 0; b < cx.B; ++b) {
    const T* row = rows ? src + (size_t)rows[b] * K : src + (size_t)b * K;
    T* out = cx.xs + (size_t)b * cx.xs_stride;
    if (vec) {
      for (int k8 = threadIdx.x; k8 < K / 8; k8 += blockDim.x)
        reinterpret_cast<uint4*>(out)[k8] = __ldcg(reinterpret_cast<const uint4*>(row) + k8);
    } else {
      for (int k = threadIdx.x; k < K; k += blockDim.x) out[k] = load_cg(row + k);
    }
    for (int k = K + threadIdx.x; k < KP; k += blockDim.x) out[k] = from_float<T>(0.0f);
  }
  __syncthreads();
  normalize_staged(cx, norm, K);
}

// Stores elements 2j .. 2j + 3 of token b's staged row from packets j, j + 1 (p0, p1), zero from K on.
template <typename T>
__device__ __forceinline__ void stage_packet_pair(FusedCtx<T>& cx, int b, int j, int K, Packet p0, Packet p1) {
  const uint32_t lo = 2 * j + 1 < K ? (uint32_t)p0 : 2 * j < K ? (uint32_t)p0 & 0xFFFFu : 0u;
  const uint32_t hi = 2 * j + 3 < K ? (uint32_t)p1 : 2 * j + 2 < K ? (uint32_t)p1 & 0xFFFFu : 0u;
  *reinterpret_cast<uint2*>(cx.xs + (size_t)b * cx.xs_stride + 2 * j) = make_uint2(lo, hi);
}

// Whether packets j, j + 1 of a row are current (those past the `written` ones that producers store are
// padding, never written).
__device__ __forceinline__ bool pair_current(Packet p0, Packet p1, int j, int written) {
  return (packet_flag(p0) == fused_flag || j >= written) && (packet_flag(p1) == fused_flag || j + 1 >= written);
}

// xs[b, k] = element k of token b's row of flagged packets `set` (row_packets packets per token, even;
// the producers write the first ceil(K / 2)), 0 for K <= k < KP, then the RMSNorm when norm != nullptr.
// Each thread reads its packets two at a time (a 16-byte relaxed gpu-scope load: each 8-byte packet is
// read whole), one pair in flight, and sweeps its pairs in turn, reading each stale one again on the next
// sweep until all are current: the wait for the producing phase and the read of its rows are the same
// loads, and a pair that a late block still owes does not hold up the reads of the thread's other pairs.
// (Measured on the H200, docs/decode_e2e_history.md, stop 30, and docs/benchmarks.md, stop 31: the sweep
// shortened the wait after the MGLU up phase, whose blocks all end at once, by about 0.2 us against waiting
// on each stale pair before reading the next. More pairs in flight gained nothing for GLU at 4 pairs, nor
// for either model at 2, and spill the 16-warp MGLU instance at 4; cp.async copies into shared memory, all
// of a block's pairs in flight at once, made both models 2.7-4.8% slower, and for hidden alone MGLU 3%; a
// __nanosleep before each re-read made both slower.)
// `boundary`: the phase boundary whose release the trace records once every row is in.
template <typename T>
__device__ void stage_packets(FusedCtx<T>& cx, const Packet* set, int row_packets, const T* norm, int K, int KP,
                              int boundary) {
  prefetch_norm(norm, K);
  const int pairs = row_packets / 2, total = cx.B * pairs, written = (K + 1) / 2;
  for (int first = threadIdx.x; first < total; first += 32 * blockDim.x) {
    // the thread's pairs first + f * blockDim.x, f < 32 (bit f of `stale`), swept in turn until all are in
    const int count = min(32, (total - first + (int)blockDim.x - 1) / (int)blockDim.x);
    unsigned stale = count == 32 ? 0xffffffffu : (1u << count) - 1u;
    const unsigned long long start = global_ns();
    for (bool again = false; stale; again = true) {
      if (again) spin_timeout(start, true);
      for (unsigned rest = stale; rest; rest &= rest - 1u) {
        const int f = __ffs(rest) - 1, i = first + f * blockDim.x;
        const int b = i / pairs, j = 2 * (i % pairs);  // packets j, j + 1 of token b
        Packet p0, p1;
        load_packets(set + 2 * (size_t)i, p0, p1);
        if (pair_current(p0, p1, j, written)) {
          stage_packet_pair(cx, b, j, K, p0, p1);
          stale &= ~(1u << f);
        }
      }
    }
  }
  for (int b = 0; b < cx.B; ++b)
    for (int k = 2 * row_packets + threadIdx.x; k < KP; k += blockDim.x)
      cx.xs[(size_t)b * cx.xs_stride + k] = from_float<T>(0.0f);
  __syncthreads();
  trace_event(cx, 2 + 2 * boundary);
  normalize_staged(cx, norm, K);
}

__device__ __forceinline__ void team_sync(int team, int team_threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(team + 1), "r"(team_threads) : "memory");
}

// The warp's 16 x 8 accumulator tile into the 128 floats at r (element r * 8 + c: row r of the strip,
// token c).
__device__ __forceinline__ void store_tile_at(float* r, const float (&acc)[4]) {
  const int lane = threadIdx.x & 31, g = lane >> 2, tg = lane & 3;
  r[g * 8 + 2 * tg] = acc[0];
  r[g * 8 + 2 * tg + 1] = acc[1];
  r[(g + 8) * 8 + 2 * tg] = acc[2];
  r[(g + 8) * 8 + 2 * tg + 1] = acc[3];
}

// The warp's tile into red[warp] (dense products: one slot of 128 floats per warp).
__device__ __forceinline__ void store_tile(float* red, const float (&acc)[4]) {
  store_tile_at(red + (threadIdx.x >> 5) * 128, acc);
}

__device__ __forceinline__ float team_total(const float* red, int first_warp, int team_warps, int e) {
  float s = 0.0f;
  for (int w = 0; w < team_warps; ++w) s += red[(first_warp + w) * 128 + e];
  return s;
}

// Epilogue of a dense product that stores plain values (EPI_QKV, EPI_LOGITS) for rows (p, p + 8) of strip
// `strip`, token b: values a and c (float32 sums). EPI_RESIDUAL and EPI_GLU write packets (packet_epilogue).
template <typename T, int EPI>
__device__ __forceinline__ void dense_epilogue(FusedCtx<T>& cx, const FusedLayer& L, int strip, int p, int b,
                                               float a, float c) {
  const T* tag = nullptr;
  if (EPI == EPI_QKV) {
    const int per_section = cx.d / 16, section = strip / per_section, local = strip % per_section;
    if (section < 2) {
      const int half = cx.Dh / 2, strips_per_head = cx.Dh / 16;
      const int head = local / strips_per_head, j = (local % strips_per_head) * 8 + p;
      const float qa = round_to(a, tag), qb = round_to(c, tag);  // the product's output, as stored by cuBLAS
      const float2 cs = cx.rope_row[j];
      const T ra = from_float<T>(qa * cs.x - qb * cs.y), rb = from_float<T>(qa * cs.y + qb * cs.x);
      if (section == 0) {
        T* qo = cx.q + ((size_t)b * cx.H + head) * cx.Dh;
        qo[j] = ra;
        qo[j + half] = rb;
      } else {
        T* ko = static_cast<T*>(L.k_cache) + (((size_t)b * cx.H + head) * cx.capacity + cx.pos) * cx.Dh;
        ko[j] = ra;
        ko[j + half] = rb;
      }
    } else {
      for (int r = 0; r < 2; ++r) {
        const int row = local * 16 + p + 8 * r, head = row / cx.Dh, j = row % cx.Dh;
        static_cast<T*>(L.v_cache)[(((size_t)b * cx.H + head) * cx.capacity + cx.pos) * cx.Dh + j] =
            from_float<T>(r ? c : a);
      }
    }
  } else {
    for (int r = 0; r < 2; ++r) {
      const int row = strip * 16 + p + 8 * r;
      if (row < cx.V) cx.logits[(size_t)b * cx.V + row] = from_float<T>(r ? c : a);
    }
  }
}

// The residual x[b, strip rows (p, p + 8)] that thread tt (< 64: p = tt / 8, b = tt % 8) of a team adds its
// sums to, as floats (0 past the tokens), from x's packet set res_set of `res_sets`. The block has already seen every
// packet of that set current (its staging of the q k v or up product read them all), so the loads need no
// flag check; they are issued when the strip starts and their latency passes during the products instead
// of after the strip's reduction.
template <typename T>
__device__ __forceinline__ void residual_pair(const FusedCtx<T>& cx, const Packet* res_sets, int res_set, int strip,
                                              int tt, float& res0, float& res1) {
  res0 = res1 = 0.0f;
  const int p = tt >> 3, b = tt & 7, row = strip * 16 + p;  // d % 16 == 0: every row of the strip exists
  if (tt >= 64 || b >= cx.B) return;
  // the values' half of each packet (its low 4 bytes)
  const unsigned* xr = reinterpret_cast<const unsigned*>(res_sets + ((size_t)res_set * cx.B + b) * packet_row(cx.d));
  res0 = packet_value<T>(__ldcg(xr + 2 * (row >> 1)), row & 1);
  res1 = packet_value<T>(__ldcg(xr + 2 * ((row + 8) >> 1)), (row + 8) & 1);
}

// Hidden row `row` of token b (value y) into packet set out_set of `out_sets`, rows (2j, 2j + 1) paired in
// one packet (the GLU and MGLU up epilogues). Called by every thread of a warp; lane L holds token L % 8,
// and lane L ^ 8 holds the same token's partner row, row ^ 1. The thread of the even row stores (tokens
// b < B, rows < h).
template <typename T>
__device__ __forceinline__ void store_hidden_pair(FusedCtx<T>& cx, Packet* out_sets, int out_set, int row, int b,
                                                  float y) {
  const uint32_t mine = bits_of(from_float<T>(y));
  const uint32_t other = __shfl_xor_sync(0xffffffffu, mine, 8);
  if (!(row & 1) && b < cx.B && row < cx.h)
    store_packet(out_sets + ((size_t)out_set * cx.B + b) * packet_row(cx.h) + row / 2,
                 mine | (row + 1 < cx.h ? other : 0u) << 16, fused_flag);
}

// The epilogues that write flagged packets, for rows (p, p + 8) of strip `strip` (EPI_RESIDUAL: x rows
// 16 strip + p, + 8; EPI_GLU: hidden row 8 strip + p from the gate row p and value row p + 8), token b,
// float32 sums a and c, into packet set out_set of `out_sets`. Called by all 64 threads tt < 64 of a team
// (two whole warps: the packets pair rows through a shuffle with the thread of p ^ 1); only tokens b < B
// store.
template <typename T, int EPI>
__device__ __forceinline__ void packet_epilogue(FusedCtx<T>& cx, Packet* out_sets, int out_set, int strip, int p,
                                                int b, float a, float c, float res0, float res1) {
  const T* tag = nullptr;
  if (EPI == EPI_RESIDUAL) {
    // the thread of even p stores rows (p, p + 1), the thread of odd p rows (p + 7, p + 8)
    const uint32_t lo = bits_of(from_float<T>(res0 + a)), hi = bits_of(from_float<T>(res1 + c));
    const uint32_t other = __shfl_xor_sync(0xffffffffu, (p & 1) ? lo : hi, 8);
    if (b < cx.B) {
      const int first = strip * 16 + ((p & 1) ? p + 7 : p);
      store_packet(out_sets + ((size_t)out_set * cx.B + b) * packet_row(cx.d) + first / 2,
                   (p & 1) ? other | hi << 16 : lo | other << 16, fused_flag);
    }
  } else {
    store_hidden_pair(cx, out_sets, out_set, strip * 8 + p, b, gate_fn(round_to(a, tag), cx.act) * round_to(c, tag));
  }
}

// A warp's place in a product phase of `groups` 64-column groups per strip and `teams` teams per block:
// team `team` of this block takes strips first, first + stride, ... (stride = grid * teams); warp twarp
// of the team takes groups twarp, twarp + team_warps, ... of each (per_strip of them).
struct PhaseShape {
  int team_warps, team, twarp, tt, per_strip, stride, first;
};

__device__ __forceinline__ PhaseShape phase_shape(int groups, int teams) {
  PhaseShape ps;
  const int warps = blockDim.x >> 5, warp = threadIdx.x >> 5;
  ps.team_warps = warps / teams;
  ps.team = warp / ps.team_warps;
  ps.twarp = warp % ps.team_warps;
  ps.tt = threadIdx.x - ps.team * ps.team_warps * 32;
  ps.per_strip = ps.twarp < groups ? (groups - ps.twarp + ps.team_warps - 1) / ps.team_warps : 0;
  ps.stride = gridDim.x * teams;
  ps.first = blockIdx.x * teams + ps.team;
  return ps;
}

// The weight loads of a product phase: a ring of AHEAD + 1 register buffers, each the W tiles and mask
// words of one 64-column group, and where the next load goes (strip, index among the warp's groups of that
// strip). The warp's groups run through the ring in order (group j of its sequence in buffer j % (AHEAD + 1)):
// while it multiplies one buffer, the next AHEAD groups are in flight in the others. The buffer indices are
// compile-time constants (product_phase unrolls its steps over the ring), so no buffer is ever copied: a
// copy of a buffer whose load is pending waits for that load. (Until stop 38 the buffers were a shift
// register, wq[a] = wq[a + 1] per group, and the copy of the newest buffer waited for the load issued one
// group before: one group in flight per warp whatever AHEAD was.)
template <int NM, int AHEAD>
struct PhaseLoads {
  static constexpr int NMS = NM > 0 ? NM : 1, RING = AHEAD + 1;
  uint4 wq[RING][4];
  uint32_t mq[RING][NMS];
  int ld_strip, ld_i;
};

// Loads the warp's next group of the phase into w, m (nothing past the last strip) and moves on.
template <int NM, int AHEAD>
__device__ __forceinline__ void load_next_group(PhaseLoads<NM, AHEAD>& pl, const PhaseShape& ps,
                                                const uint4* __restrict__ tiles, const uint32_t* __restrict__ masks,
                                                int n, int strips, int groups, uint4 (&w)[4],
                                                uint32_t (&m)[PhaseLoads<NM, AHEAD>::NMS]) {
  if (ps.per_strip == 0 || pl.ld_strip >= strips) return;
  const int lane = threadIdx.x & 31;
  const size_t tile = (size_t)pl.ld_strip * groups + ps.twarp + pl.ld_i * ps.team_warps;
  const uint4* wp = tiles + tile * 128 + lane;
#pragma unroll
  for (int q = 0; q < 4; ++q) w[q] = load_stream(wp + q * 32);
  if (NM > 0) {
    // FlashMGLU's lane-major words (flash_mglu.py): masks 4j .. 4j + 3 of lane L at word 128 j + 4 L, one
    // 16-byte load; each leftover mask i (past the last whole chunk of four) at word 32 i + L
    const uint32_t* mp = masks + tile * n * 32;
#pragma unroll
    for (int j = 0; j < NM / 4; ++j) {
      if (4 * j + 4 <= n) {
        const uint4 v = load_stream(reinterpret_cast<const uint4*>(mp + 128 * j) + lane);
        m[4 * j] = v.x;
        m[4 * j + 1] = v.y;
        m[4 * j + 2] = v.z;
        m[4 * j + 3] = v.w;
      } else {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = 4 * j + e;
          m[i] = i < n ? load_stream(mp + 32 * i + lane) : 0u;  // 0: every element off
        }
      }
    }
  }
  if (++pl.ld_i == ps.per_strip) {
    pl.ld_i = 0;
    pl.ld_strip += ps.stride;
  }
}

// Issues the warp's first AHEAD groups of loads of a product phase, into buffers 0 .. AHEAD - 1 of the ring.
// The weights do not depend on the phases before, so the decode step calls this before the wait for the
// phase's input (between the arrival and the wait of the grid barrier before the o product; before the
// packet staging of the up and down products and of the q k v products after the first layer's), and the
// loads' latency passes while the block waits. The first layer's q k v and the logits load after their
// staging. (Before stop 30 the q k v loads, held across the RMSNorm of stage_input, made the 16-warp MGLU
// instance spill; with the packet staging they do not.)
template <int NM, int AHEAD>
__device__ __forceinline__ void prefetch_phase(PhaseLoads<NM, AHEAD>& pl, const uint4* __restrict__ tiles,
                                               const uint32_t* __restrict__ masks, int n, int strips, int groups,
                                               int teams) {
  const PhaseShape ps = phase_shape(groups, teams);
  pl.ld_strip = ps.first;
  pl.ld_i = 0;
  // Every slot is written here, loaded or not, so that nothing of the previous phase stays live (the last
  // buffer of the ring is written by product_phase, after the staging).
#pragma unroll
  for (int a = 0; a < AHEAD; ++a) {
#pragma unroll
    for (int q = 0; q < 4; ++q) pl.wq[a][q] = make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
    for (int i = 0; i < PhaseLoads<NM, AHEAD>::NMS; ++i) pl.mq[a][i] = 0u;
  }
#pragma unroll
  for (int a = 0; a < AHEAD; ++a) load_next_group(pl, ps, tiles, masks, n, strips, groups, pl.wq[a], pl.mq[a]);
}

// acc_t (and acc_s[i] for MGLU) += the warp's group grp of the strip, from the W tiles w and mask words m.
template <typename T, int NM, int NMS>
__device__ __forceinline__ void multiply_group(const FusedCtx<T>& cx, int n, int grp, const uint4 (&w)[4],
                                               const uint32_t (&m)[NMS], float (&acc_t)[4],
                                               float (&acc_s)[NMS][4]) {
  const int lane = threadIdx.x & 31, g = lane >> 2, tg = lane & 3;
  const bool tok_ok = g < cx.B;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    if constexpr (NM == 0) {
      const uint32_t* xrow = reinterpret_cast<const uint32_t*>(cx.xs + (tok_ok ? g : 0) * cx.xs_stride) + tg;
      const int kp = grp * 32 + q * 8;  // the element pair k0 = 64 grp + 16 q, in 32-bit words
      const uint32_t b0 = tok_ok ? xrow[kp] : 0u;
      const uint32_t b1 = tok_ok ? xrow[kp + 4] : 0u;
      Mma<T>::run(acc_t, w[q].x, w[q].y, w[q].z, w[q].w, b0, b1);
    } else {  // FlashMGLU's format: sparse mma with the masks as metadata (tensor_core.cuh)
      // the lane's x quads (elements 4 tg .. 4 tg + 3 of each tile; rows are 8-byte aligned)
      const T* xquad = cx.xs + (tok_ok ? g : 0) * cx.xs_stride + 4 * tg;
      const uint2 v = tok_ok ? *reinterpret_cast<const uint2*>(xquad + grp * 64 + q * 16) : make_uint2(0u, 0u);
      const uint4 bq = sparse_b_fragment(v);
      masked_mma_metadata<T>(acc_t, w[q], bq, ALL_ON_METADATA, q);
      // Up to 4 masks (16 warps at 128 registers) every slot is multiplied, those past n with zero
      // words; a guard per mask costs the registers that keep that instance from spilling.
#pragma unroll
      for (int i = 0; i < NM; ++i)
        if (NM <= 4 || i < n) masked_mma<T>(acc_s[i], w[q], bq, m[i], q);
    }
  }
}

// The strip's reduction over the team's warps and its epilogue (the accumulators are then zeroed).
template <typename T, int NM, int EPI, int NMS>
__device__ __forceinline__ void finish_strip(FusedCtx<T>& cx, const FusedLayer& L, const PhaseShape& ps, int n,
                                             int strip, float (&acc_t)[4], float (&acc_s)[NMS][4], float res0,
                                             float res1, Packet* out_sets, int out_set) {
  const int warp = threadIdx.x >> 5;
  const int team_warps = ps.team_warps, team = ps.team, tt = ps.tt;
  if (NM == 0) {
    store_tile(cx.red, acc_t);
    team_sync(team, team_warps * 32);
    if (tt < 64) {
      const int p = tt >> 3, b = tt & 7;
      const float a = team_total(cx.red, team * team_warps, team_warps, p * 8 + b);
      const float c = team_total(cx.red, team * team_warps, team_warps, (p + 8) * 8 + b);
      if constexpr (EPI == EPI_RESIDUAL || EPI == EPI_GLU)  // every thread: the packets pair rows
        packet_epilogue<T, EPI>(cx, out_sets, out_set, strip, p, b, a, c, res0, res1);
      else if (b < cx.B)
        dense_epilogue<T, EPI>(cx, L, strip, p, b, a, c);
    }
    team_sync(team, team_warps * 32);
  } else {
    // Every product's tile at once (red holds NM + 1 slots per warp), so that a strip costs one pair of
    // team barriers instead of n + 1; the sums run over the warps in the same fixed order as before.
    constexpr int SLOTS = NM + 1;
    float* mine = cx.red + warp * SLOTS * 128;
    store_tile_at(mine, acc_t);
#pragma unroll
    for (int i = 0; i < NM; ++i)
      if (i < n) store_tile_at(mine + (i + 1) * 128, acc_s[i]);
    team_sync(team, team_warps * 32);
    float y_val = 0.0f;
    if (tt < 128) {
      const float* first = cx.red + team * team_warps * SLOTS * 128 + tt;
      float t_val = 0.0f;
      for (int w = 0; w < team_warps; ++w) t_val += first[w * SLOTS * 128];
#pragma unroll
      for (int i = 0; i < NM; ++i) {
        if (i < n) {
          float s = 0.0f;
          for (int w = 0; w < team_warps; ++w) s += first[w * SLOTS * 128 + (i + 1) * 128];
          y_val += gate_fn(s, cx.act) * (t_val - s);
        }
      }
    }
    team_sync(team, team_warps * 32);
    if (tt < 128) store_hidden_pair(cx, out_sets, out_set, strip * 16 + (tt >> 3), tt & 7, y_val);  // four whole warps
  }
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    acc_t[c] = 0.0f;
#pragma unroll
    for (int i = 0; i < NMS; ++i) acc_s[i][c] = 0.0f;
  }
}

// One product of the staged input (xs) with `strips` strips of `groups` 64-column groups, and its epilogue,
// with the warp's first loads already issued by prefetch_phase into `pl` (same arguments). The warp's
// loads run AHEAD groups ahead of its products along its whole sequence of groups (phase_shape), across
// strip boundaries, so that the strip reductions do not drain them. NM = 0: dense (epilogue EPI on row
// pairs); NM > 0: MGLU with n <= NM masks. EPI_RESIDUAL reads its residual from x's packet set res_set
// of `res_sets` and writes set out_set of `out_sets`; EPI_GLU and the MGLU epilogue write hidden's set
// out_set of `out_sets`. (Sets are passed as the kernel's arrays and an index, not as pointers held
// across the phase: the 16-warp MGLU instance has no registers to spare.)
template <typename T, int NM, int EPI, int AHEAD>
__device__ __forceinline__ void product_phase(FusedCtx<T>& cx, const FusedLayer& L, const uint4* __restrict__ tiles,
                                              const uint32_t* __restrict__ masks, int n, int strips, int groups,
                                              int teams, PhaseLoads<NM, AHEAD>& pl, const Packet* res_sets = nullptr,
                                              int res_set = 0, Packet* out_sets = nullptr, int out_set = 0) {
  constexpr int NMS = PhaseLoads<NM, AHEAD>::NMS, RING = PhaseLoads<NM, AHEAD>::RING;
  const PhaseShape ps = phase_shape(groups, teams);
  // the ring's last buffer, which prefetch_phase leaves empty: zeroed so that nothing of the previous phase
  // stays live in it
#pragma unroll
  for (int q = 0; q < 4; ++q) pl.wq[AHEAD][q] = make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
  for (int i = 0; i < NMS; ++i) pl.mq[AHEAD][i] = 0u;
  float acc_t[4], acc_s[NMS][4];
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    acc_t[c] = 0.0f;
#pragma unroll
    for (int i = 0; i < NMS; ++i) acc_s[i][c] = 0.0f;
  }
  int next = 0;  // the ring buffer that holds the warp's next group
  for (int strip = ps.first; strip < strips; strip += ps.stride) {
    float res0 = 0.0f, res1 = 0.0f;
    if constexpr (NM == 0 && EPI == EPI_RESIDUAL) residual_pair(cx, res_sets, res_set, strip, ps.tt, res0, res1);
    for (int gi = 0; gi < ps.per_strip;) {
      // One pass over the ring from buffer `next`: each step issues the load into the buffer that the step
      // before emptied, then multiplies its own; the pass stops early at the strip's end, and the next
      // strip goes on from the buffer where it stopped.
#pragma unroll
      for (int r = 0; r < RING; ++r) {
        if (r >= next && gi < ps.per_strip) {
          // buffer (r + AHEAD) % RING is the one multiplied one step before
          load_next_group(pl, ps, tiles, masks, n, strips, groups, pl.wq[(r + AHEAD) % RING],
                          pl.mq[(r + AHEAD) % RING]);
          multiply_group<T, NM, NMS>(cx, n, ps.twarp + gi * ps.team_warps, pl.wq[r], pl.mq[r], acc_t, acc_s);
          ++gi;
          next = r + 1;
        }
      }
      if (next == RING) next = 0;
    }
    finish_strip<T, NM, EPI, NMS>(cx, L, ps, n, strip, acc_t, acc_s, res0, res1, out_sets, out_set);
  }
}

}  // namespace pymglu
