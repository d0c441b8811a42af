// The whole one-token decode step of pymglu.models.Transformer in one persistent launch
// (pymglu/cuda/decode_fused.py builds its inputs; pymglu.models.GraphDecoder launches it).
//
// decode_fused<T, N_MASKS, WARPS>  (T = __nv_bfloat16 or __half; N_MASKS = 0 for the GLU kinds, else the
//   capacity of the mask arrays: the launch's n_masks masks, 1 <= n_masks <= N_MASKS)
//   One block per SM, all resident at once (the launcher sizes the grid so), WARPS warps each. The step
//   is a sequence of phases; per transformer block:
//     1. q k v:    RMSNorm of x into shared memory, the stacked q/k/v product, rotary embedding of q and
//                  k, the new key and value stored in the cache at position state[0];
//     2. attention over positions 0 .. state[0], split into chunks of FUSED_CHUNK positions; the last
//                  chunk of a head to finish merges the head's chunks (a per-head arrival counter), or,
//                  when a head has at most staged_merge chunks, phase 3's staging does;
//     3. o:        x += attn W_o^T;
//     4. up:       RMSNorm of x, then the MGLU epilogue sum_i g(s_i) (t - s_i) (FlashMGLU's strip
//                  computation) or, for GLU, g(gate) * value;
//     5. down:     x += hidden W_down^T;
//   then the final RMSNorm and the logits, and in the last block to finish the greedy argmax and the
//   position update. Every product reads its weight in FlashMGLU's tile format (16-row strips of
//   64-column groups, mma.m16n8k16 A fragments; flash_mglu.py; the MGLU up layer in its masked form,
//   multiplied by mma.sp with the masks as metadata), with the input vector (up to
//   FUSED_MAX_TOKENS tokens, the mma N = 8 columns) staged in shared memory. A block splits into
//   `teams` of WARPS / teams warps (chosen per phase by the launcher); a team takes one strip at a time
//   and its warps split the strip's groups, reduced through shared memory in a fixed order.
//
//   Rows are permuted at packing time so that every epilogue pairs rows (r, r + 8) of one strip: rotary
//   pairs (j, j + Dh/2) of q and k, gate and value rows of GLU.
//
//   Phases 1 -> 2 and 2 -> 3 are separated by grid barriers. Phases 4, 5 and the next block's 1 read only
//   the rows of x or hidden that the phase before wrote, and those travel as flagged packets (8-byte
//   stores of two values and the launch's flag, fused_context.cuh): each block waits for the packets it
//   reads instead of for every block, and the wait is the read itself.
//
//   Memory: data written during the launch by other blocks is read with ld.global.cg (L2, never a
//   stale L1 line), after a barrier (release on the arrival, acquire on the counter), or as packets with
//   relaxed gpu-scope loads that check each packet's flag. Each warp loads its
//   groups of tiles one or more groups ahead of its products along the whole phase, across strips. What a
//   chain of dependent round trips would wait for is fetched early: the o and down epilogues' residual
//   values when their strip starts, the RMSNorm weights (into L1) while the staging waits for its rows.
//   Arithmetic: float32 accumulation, one rounding to T per stored value, as the
//   multi-launch step (decode_step.cu) and the eager model; no float atomics (same inputs, same bits).
//
// Files: fused_context.cuh (limits, the layer table, the launch context, the grid barrier, the flagged
// packets), fused_products.cuh (input staging, the products and their epilogues), fused_attention.cuh (the
// attention phase); this file holds the argmax and the kernel that sequences the phases.

#include "block_reduce.cuh"
#include "fused_attention.cuh"
#include "fused_context.cuh"
#include "fused_products.cuh"
#include "tensor_core.cuh"

namespace pymglu {

// Greedy choice of the last block: ids[b] = history[b, state[1]] = argmax(logits[b]) (lowest index
// among equal maxima).
template <typename T>
__device__ void argmax_rows(FusedCtx<T>& cx, int* ids, int* history, int history_stride, int column) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (warp >= cx.B) return;
  const T* row = cx.logits + (size_t)warp * cx.V;
  float bv = -__int_as_float(0x7f800000);
  int bi = cx.V;
  for (int j = lane; j < cx.V; j += 32) {
    const float v = to_float(load_cg(row + j));
    if (v > bv || bi == cx.V) { bv = v; bi = j; }
  }
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
    const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
  }
  if (lane == 0) {
    ids[warp] = bi;
    history[(size_t)warp * history_stride + column] = bi;
  }
}

// n_masks: masks of the MGLU kinds, 1 <= n_masks <= N_MASKS (0 with N_MASKS = 0: GLU).
// teams: 3 bits per phase, q k v | o << 3 | up << 6 | down << 9 | logits << 12.
// sync: [0] grid barrier arrivals, [1] blocks done, both 0 between launches; [2] launches so far (the
// packets' flags).
// x_sets: (2 n_layers + 1, B, packet_row(d)) packets, h_sets: (n_layers, B, packet_row(h)) packets
// (fused_context.cuh), zeroed once before the first launch.
// staged_merge: the most attention chunks per head that the o product's staging merges itself (0: the
// last chunk of each head always merges them; decode_fused.py bounds it, the merge takes any count).
template <typename T, int N_MASKS, int WARPS>
__global__ void __launch_bounds__(WARPS * 32, 1)
decode_fused(const FusedLayer* __restrict__ layers, int n_layers, const T* __restrict__ embed,
             const uint4* __restrict__ head_tiles, const T* __restrict__ final_norm, Packet* x_sets, T* q, T* attn,
             Packet* h_sets,
             T* logits, float* part_max, float* part_sum, float* part_acc, unsigned* head_count,
             const float2* __restrict__ rope, int* ids, int* history, int history_stride, int* state, unsigned* sync,
             int n_masks, int B, int d, int h, int H, int Dh, int V, int capacity, int act, int teams, int xs_stride,
             int union_floats, int staged_merge,
             float eps, float scale, int greedy, unsigned long long* trace) {
  extern __shared__ float4 fused_smem[];
  FusedCtx<T> cx;
  cx.B = B; cx.d = d; cx.h = h; cx.H = H; cx.Dh = Dh; cx.V = V; cx.capacity = capacity; cx.act = act;
  cx.pos = state[0];
  cx.eps = eps; cx.scale = scale; cx.xs_stride = xs_stride;
  cx.red = reinterpret_cast<float*>(fused_smem);
  cx.scratch = cx.red + WARPS * (N_MASKS + 1) * 128;
  float* union_area = cx.scratch + 64;  // staged input, or the attention's per-warp partials
  cx.xs = reinterpret_cast<T*>(union_area);
  cx.q = q; cx.attn = attn; cx.logits = logits;
  if (threadIdx.x == 0) fused_flag = __ldcg(sync + 2) + 1u;  // read after the __syncthreads below
  cx.part_max = part_max; cx.part_sum = part_sum; cx.part_acc = part_acc; cx.head_count = head_count;
  __shared__ float2 rope_row[FUSED_MAX_LANE_ELEMS * 16];
  for (int j = threadIdx.x; j < Dh / 2; j += blockDim.x) rope_row[j] = rope[(size_t)cx.pos * (Dh / 2) + j];
  cx.rope_row = rope_row;
  cx.counter = sync; cx.target = 0; cx.trace = trace;
  cx.chunk_w = union_area + union_floats;
  trace_event(cx, 0);

  const int gd = (d + 63) / 64, gh = (h + 63) / 64;
  const int t_qkv = teams & 7, t_o = (teams >> 3) & 7, t_up = (teams >> 6) & 7, t_down = (teams >> 9) & 7,
            t_head = (teams >> 12) & 7;
  const int up_strips = N_MASKS > 0 ? (h + 15) / 16 : (h + 7) / 8;
  __shared__ int token_rows[FUSED_MAX_TOKENS];
  if (threadIdx.x < B) token_rows[threadIdx.x] = ids[threadIdx.x];
  // The attention chunks in use per head when the o product's staging merges them, else 0 (the same for
  // every block). Kept in shared memory and read where it is needed: held in a register across the
  // phases, it made the 16-warp MGLU instance spill.
  __shared__ int staged_chunks;
  if (threadIdx.x == 0) {
    const int used = (cx.pos + FUSED_CHUNK) / FUSED_CHUNK;
    staged_chunks = used <= staged_merge && 3 * B * H * used <= WARPS * (N_MASKS + 1) * 128 ? used : 0;
  }
  __syncthreads();

  // The first weight loads of a product are issued before the wait for its input and before its staging:
  // the weights do not depend on them. o: between the arrival and the wait of the grid barrier; up, down
  // and the q k v of every layer after the first: before the staging that waits for the packets
  // (fused_products.cuh, prefetch_phase; fused_context.cuh, grid_arrive).
  constexpr int AD = Ahead<WARPS, N_MASKS>::dense, AM = Ahead<WARPS, N_MASKS>::mglu;
  PhaseLoads<0, AD> pd;  // the dense products, one after another
  const int KD = gd * 64;
  // packet set v of x and set l of hidden (computed where used: the launch's parameters stay in constant
  // memory, where a value held across the phases would take registers the 16-warp MGLU instance lacks)
  auto x_set = [&](int v) { return x_sets + (size_t)v * B * packet_row(d); };
  auto h_set = [&](int l) { return h_sets + (size_t)l * B * packet_row(h); };
  // Phase boundaries (trace slots) 5 l + 0 .. 4 of layer l: after q k v, attention, o, up, down. Only the
  // first two are grid barriers; the phases after o, up and down wait for the packets of x or hidden
  // that they read (stage_packets).
  for (int l = 0; l < n_layers; ++l) {
    const FusedLayer L = layers[l];
    // 1. q k v (block 0 of the grid also stores the embedding rows as x's first packet set, the residual
    // of the first o product, read after two grid barriers)
    if (l == 0) {
      stage_input<T>(cx, embed, token_rows, static_cast<const T*>(L.attn_norm), d, KD);
      if (blockIdx.x == 0)
        for (int i = threadIdx.x; i < B * (d / 2); i += blockDim.x) {
          const int b = i / (d / 2), j = i % (d / 2);
          const T* e = embed + (size_t)token_rows[b] * d + 2 * j;
          store_packet(x_sets + (size_t)b * packet_row(d) + j, bits_of(e[0]) | bits_of(e[1]) << 16, fused_flag);
        }
    } else {
      prefetch_phase(pd, L.wqkv, nullptr, 0, 3 * d / 16, gd, t_qkv);
      stage_packets<T>(cx, x_set(2 * l), packet_row(d), static_cast<const T*>(L.attn_norm), d, KD, 5 * l - 1);
    }
    if (l == 0) prefetch_phase(pd, L.wqkv, nullptr, 0, 3 * d / 16, gd, t_qkv);
    product_phase<T, 0, EPI_QKV, AD>(cx, L, L.wqkv, nullptr, 0, 3 * d / 16, gd, t_qkv, pd);
    grid_sync(cx, 5 * l);
    // 2. attention (merged by the last chunk of each head, or, with at most staged_merge chunks per head,
    // by every block in the o product's staging)
    attention_phase<T>(cx, L, union_area, *static_cast<volatile int*>(&staged_chunks) == 0);
    grid_arrive(cx, 5 * l + 1);
    if (*static_cast<volatile int*>(&staged_chunks) == 0) prefetch_phase(pd, L.wo, nullptr, 0, d / 16, gd, t_o);
    grid_wait(cx, 5 * l + 1);
    // 3. o (the staged merge leaves no registers for the first loads across it: they follow it)
    if (const int staged = *static_cast<volatile int*>(&staged_chunks)) {
      stage_attention<T>(cx, staged, KD);
      prefetch_phase(pd, L.wo, nullptr, 0, d / 16, gd, t_o);
    } else {
      stage_input<T>(cx, attn, nullptr, nullptr, d, KD);
    }
    product_phase<T, 0, EPI_RESIDUAL, AD>(cx, L, L.wo, nullptr, 0, d / 16, gd, t_o, pd, x_sets, 2 * l, x_sets,
                                          2 * l + 1);
    phase_end(cx, 5 * l + 2);
    if constexpr (N_MASKS > 0) {
      PhaseLoads<N_MASKS, AM> pu;  // the MGLU up product's loads
      prefetch_phase(pu, L.wup, L.mup, n_masks, up_strips, gd, t_up);
      // 4. up
      stage_packets<T>(cx, x_set(2 * l + 1), packet_row(d), static_cast<const T*>(L.ffn_norm), d, KD,
                       5 * l + 2);
      product_phase<T, N_MASKS, EPI_GLU, AM>(cx, L, L.wup, L.mup, n_masks, up_strips, gd, t_up, pu, nullptr, 0,
                                             h_sets, l);
    } else {
      prefetch_phase(pd, L.wup, nullptr, 0, up_strips, gd, t_up);
      // 4. up
      stage_packets<T>(cx, x_set(2 * l + 1), packet_row(d), static_cast<const T*>(L.ffn_norm), d, KD,
                       5 * l + 2);
      product_phase<T, 0, EPI_GLU, AD>(cx, L, L.wup, nullptr, 0, up_strips, gd, t_up, pd, nullptr, 0, h_sets, l);
    }
    phase_end(cx, 5 * l + 3);
    prefetch_phase(pd, L.wdown, nullptr, 0, d / 16, gh, t_down);
    // 5. down
    stage_packets<T>(cx, h_set(l), packet_row(h), nullptr, h, gh * 64, 5 * l + 3);
    product_phase<T, 0, EPI_RESIDUAL, AD>(cx, L, L.wdown, nullptr, 0, d / 16, gh, t_down, pd, x_sets, 2 * l + 1,
                                          x_sets, 2 * l + 2);
    phase_end(cx, 5 * l + 4);
  }
  // final norm and logits
  stage_packets<T>(cx, x_set(2 * n_layers), packet_row(d), final_norm, d, KD, 5 * n_layers - 1);
  const FusedLayer none = {};
  prefetch_phase(pd, head_tiles, nullptr, 0, (V + 15) / 16, gd, t_head);
  product_phase<T, 0, EPI_LOGITS, AD>(cx, none, head_tiles, nullptr, 0, (V + 15) / 16, gd, t_head, pd);
  // the last block to finish chooses the tokens and moves the position on
  __syncthreads();
  trace_event(cx, 1 + 2 * 5 * n_layers);
  __shared__ unsigned last_block;
  if (threadIdx.x == 0) {
    __threadfence();
    last_block = atomicAdd(sync + 1, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last_block) return;
  __threadfence();
  if (greedy) argmax_rows<T>(cx, ids, history, history_stride, state[1]);
  __syncthreads();
  if (threadIdx.x == 0) {
    state[0] += 1;
    state[1] += 1;
    sync[0] = 0u;  // every block has passed its last barrier: the counters start from 0 next launch
    sync[1] = 0u;
    sync[2] = fused_flag;  // the next launch's packets carry a new flag
    __threadfence();
  }
}

}  // namespace pymglu
