"""The fused decode step: a whole one-token step of a :class:`pymglu.models.Transformer` in one launch.

:class:`pymglu.models.GraphDecoder` replays a captured step. Its multi-launch step (``decode_step.py``:
about ten kernels per block, cuBLAS products) pays a fixed cost per launch that is as large as the
time its bytes take on an H200 (docs/benchmarks.md). :class:`FusedDecodeStep` replaces the whole step by
one persistent kernel (``decode_fused.cu``): one block per SM, grid barriers after the q k v and attention
phases of each transformer block, flagged packets (each block waits only for the rows it reads) after the
o, up and down phases, every weight read once in FlashMGLU's tile format, each warp loading its weights
ahead of its products across strips.

What it serves (:func:`unsupported_reason` names what rules a model out; the decoder then uses the
multi-launch step): bfloat16 or float16 models with a gated feed-forward (GLU kinds, or MGLU kinds with at
most :data:`MAX_MASKS` masks), heads whose width is a multiple of 16 and at most 256, batches of at most
:data:`MAX_TOKENS` sequences, and shapes whose staged input fits the device's shared memory.

Weight formats (built once per decoder by :func:`pack_layer`, from the model's parameters as they are
then; the decoder rebuilds itself when they change):

* ``q k v``: the stacked ``[W_q; W_k; W_v]`` in the tile format (:func:`pymglu.cuda.flash_mglu.tile_matrix`)
  with the rows of ``W_q`` and ``W_k`` reordered by :func:`qkv_row_order`, so that rows ``r`` and ``r + 8``
  of a 16-row strip are a rotary pair ``(j, j + Dh/2)`` of one head;
* GLU up layer: ``[W_gate; W_value]`` reordered by :func:`glu_row_order`: strip ``s`` holds gate rows
  ``8s .. 8s+7`` then the value rows of the same units;
* MGLU up layer: FlashMGLU's own arrays (:func:`pymglu.cuda.flash_mglu.pack_weights`: the tiles of ``W``
  and the lane-major mask words ``(S, G, 32 n)``), the ones the layer's FlashMGLU path reads, not a copy;
* ``W_o``, ``W_down`` and the output table: the tile format in natural row order.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from pymglu import cuda as _cuda
from pymglu.dtypes import bfloat16, float16

__all__ = ["MAX_TOKENS", "MAX_MASKS", "kernel_names", "warps_per_block", "mask_capacity", "packet_row", "qkv_row_order",
           "glu_row_order", "pack_layer", "choose_teams", "unsupported_reason", "FusedDecodeStep"]

_SOURCE = "decode_fused.cu"

#: most sequences one launch decodes (the mma N = 8 columns).
MAX_TOKENS = 8
#: most masks of an MGLU up layer.
MAX_MASKS = 16
#: compile-time mask capacities (the launch's mask count runs on the smallest one that holds it).
_CAPACITIES = (4, 8, 16)
#: mask capacities that run 16 warps per block, by architecture: those whose instances the compiler fits in
#: 128 registers; every other instance runs 8 (sm_86, sm_89 and sm_120 spilled at 16, and sm_80's 4-mask
#: instance since stop 30's flagged packets; tests/cuda/test_compile_kernels.py).
_SIXTEEN_WARP_CAPACITIES = {"sm_80": (0,), "sm_90": (0, 4)}
#: cached positions per attention work item (decode_fused.cu FUSED_CHUNK; decode_step.ATTENTION_CHUNK).
CHUNK = 32
#: most attention chunks per head that the o product's staging merges itself, every block for itself,
#: instead of the last chunk of each head behind a fence and a counter (0 turns it off). The kernel also
#: falls back to the last-chunk merge when the staging's chunk weights, 3 B H chunks floats, do not fit its
#: reduction area (warps x (mask capacity + 1) x 128 floats). Up to 256 cached positions each block reads
#: at most 8 partials per head (8 d floats). The end-to-end benchmark's positions 16 to 271 (1 to 9
#: chunks) gained 3-4% per token at 8 (docs/decode_e2e_history.md, stop 20); larger values were not measured.
STAGED_MERGE_CHUNKS = 8
#: the largest STAGED_MERGE_CHUNKS the step accepts (the largest measured and tested; the kernel's merge
#: itself takes any count, four chunks' loads at a time).
_MAX_STAGED_CHUNKS = 8
#: largest head width (8 values per lane).
MAX_HEAD_DIM = 256
_DTYPES = (bfloat16, float16)
_LAYER_FIELDS = 9  # pointers per FusedLayer (decode_fused.cu)


def packet_row(n: int) -> int:
    """Flagged packets per token row of ``n`` values (two values each, an even count; fused_context.cuh)."""
    return (-(-n // 2) + 1) // 2 * 2


def mask_capacity(n_masks: int) -> int:
    """The kernel instance's mask capacity for ``n_masks`` masks (0 for GLU)."""
    if n_masks == 0:
        return 0
    for cap in _CAPACITIES:
        if n_masks <= cap:
            return cap
    raise ValueError(f"n_masks: the fused decode step serves at most {MAX_MASKS} masks, got {n_masks}")


#: benchmarks only: force 8 or 16 warps per block (instances outside kernel_names() compile at first use)
WARPS_OVERRIDE: int | None = None
#: benchmarks only: teams per block of some products, e.g. ``{"up": 2}`` (else :func:`choose_teams`)
TEAMS_OVERRIDE: dict[str, int] = {}


def warps_per_block(capacity: int, arch: str) -> int:
    """Warps per block of the instance with mask ``capacity`` on ``arch`` (``"sm_90"``)."""
    if WARPS_OVERRIDE is not None:
        return WARPS_OVERRIDE
    return 16 if capacity in _SIXTEEN_WARP_CAPACITIES.get(arch, ()) else 8


def _kernel_name(dtype: Any, capacity: int, warps: int) -> str:
    return f"pymglu::decode_fused<{_cuda.CUDA_TYPE_NAMES[np.dtype(dtype)]}, {capacity}, {warps}>"


def kernel_names(arch: str) -> list[str]:
    """Every instance of ``decode_fused.cu`` the library can launch on ``arch`` (for compile checks)."""
    return [_kernel_name(dt, cap, warps_per_block(cap, arch)) for dt in _DTYPES for cap in (0, *_CAPACITIES)]


def _device_arch() -> str:
    import cupy as cp

    return f"sm_{cp.cuda.Device().compute_capability}"


def qkv_row_order(d_model: int, head_dim: int) -> np.ndarray:
    """``(3 d,)`` rows of ``[W_q; W_k; W_v]`` in packed order: for ``q`` then ``k``, per head, per block
    of 8 rotary pairs ``j0 .. j0+7``: rows ``j0 .. j0+7`` then ``j0 + Dh/2 ..``; ``v`` in natural order.
    Needs ``head_dim % 16 == 0``."""
    if head_dim % 16 or d_model % head_dim:
        raise ValueError(f"head_dim: the fused step needs heads of a multiple of 16 values, got {head_dim}")
    half, heads = head_dim // 2, d_model // head_dim
    g = np.arange(8)
    order = []
    for section in (0, 1):
        for head in range(heads):
            for j0 in range(0, half, 8):
                base = section * d_model + head * head_dim + j0
                order += [base + g, base + half + g]
    order.append(2 * d_model + np.arange(d_model))
    return np.concatenate(order)


def glu_row_order(d_ff: int) -> np.ndarray:
    """``(16 ceil(h/8),)`` rows of ``[W_gate; W_value]`` in packed order: strip ``s`` is gate rows
    ``8s .. 8s+7`` then value rows ``h + 8s ..``; ``-1`` marks a zero row past ``h``."""
    strips = -(-d_ff // 8)
    unit = np.arange(strips * 8).reshape(strips, 1, 8)
    rows = np.concatenate([unit, unit + d_ff], axis=1)  # (S, 2, 8)
    rows = np.where(np.concatenate([unit, unit], axis=1) < d_ff, rows, -1)
    return rows.reshape(-1)


def _tiles(xp: Any, W: Any, order: np.ndarray | None = None) -> Any:
    from pymglu.cuda.flash_mglu import tile_matrix

    if order is not None:
        rows = xp.zeros((order.size, W.shape[1]), dtype=W.dtype)
        keep = np.flatnonzero(order >= 0)
        rows[xp.asarray(keep)] = W[xp.asarray(order[keep])]
        W = rows
    return tile_matrix(xp, W)


def pack_layer(xp: Any, wq: Any, wk: Any, wv: Any, wo: Any, up: Any, w_down: Any, head_dim: int) -> dict[str, Any]:
    """The tiles of one transformer block: ``{"wqkv", "wo", "wup", "mup", "wdown"}`` (``mup`` ``None``
    for GLU). ``up`` is the block's :class:`pymglu.nn.GLU` or :class:`pymglu.nn.MGLU` layer."""
    from pymglu.nn import MGLU

    d = int(wq.shape[1])
    packed = {
        "wqkv": _tiles(xp, xp.concatenate([wq, wk, wv], axis=0), qkv_row_order(d, head_dim)),
        "wo": _tiles(xp, wo),
        "wdown": _tiles(xp, w_down),
    }
    if isinstance(up, MGLU):
        from pymglu.cuda import flash_mglu

        weights = up._flash_weights(flash_mglu.pack_weights, up._current_packed())
        packed["wup"] = weights.w_tiles
        packed["mup"] = weights.mask_words
    else:
        packed["wup"] = _tiles(xp, xp.concatenate([up.W_gate.data, up.W_value.data], axis=0),
                               glu_row_order(int(up.W_gate.shape[0])))
        packed["mup"] = None
    return packed


def choose_teams(strips: int, grid: int, warps: int) -> int:
    """Teams per block for a product of ``strips`` strips: the count (1, 2 or 4; at least 4 warps per
    team) whose rounds leave the fewest idle teams, the larger count on a tie (more groups per warp)."""
    best, best_eff = 1, -1.0
    for teams in (1, 2, 4):
        if warps // teams < 4:
            break
        slots = grid * teams
        eff = strips / (-(-strips // slots) * slots)
        if eff >= best_eff - 1e-12:
            best, best_eff = teams, eff
    return best


def _smem_layout(batch: int, d: int, h: int, head_dim: int, capacity: int, warps: int,
                 mask_slots: int = 0) -> tuple[int, int, int]:
    """(dynamic shared memory bytes, staged-input row stride in elements, floats of the region shared by
    the staged input and the attention partials) of one launch. Regions: per-warp tiles (warps x
    (mask_slots + 1) x 128 floats: the MGLU reduction stores ``t`` and every ``s_i`` at once; the instance's
    mask capacity, 0 for GLU), 64 floats of scratch, that shared region, the attention merge's chunk weights."""
    stride = 64 * max(-(-d // 64), -(-h // 64)) + 8
    union_floats = max(-(-batch * stride * 2 // 16) * 4, 2 * warps + warps * head_dim)
    red_floats = warps * (mask_slots + 1) * 128
    return (red_floats + 64 + union_floats + -(-capacity // CHUNK)) * 4, stride, union_floats


def unsupported_reason(config: Any, batch: int) -> str | None:
    """Why the fused step cannot decode ``batch`` sequences of a model of ``config`` on the current
    device (a sentence), or ``None`` when it can. The model must already suit
    :func:`pymglu.models.graph_decoder.unsupported_reason`."""
    import cupy as cp

    dt = config.np_dtype
    if dt not in _DTYPES:
        return f"the model's dtype is {config.dtype}, and the fused step serves bfloat16 and float16"
    if batch > MAX_TOKENS:
        return f"it decodes at most {MAX_TOKENS} sequences at once, got a batch of {batch}"
    if config.head_dim % 16 or config.head_dim > MAX_HEAD_DIM:
        return (f"its attention heads must be a multiple of 16 and at most {MAX_HEAD_DIM} values wide, "
                f"got {config.head_dim}")
    n = config.n_masks if config.is_mglu else 0
    if n > MAX_MASKS:
        return f"n_masks = {n} exceeds its maximum of {MAX_MASKS}"
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    warps = warps_per_block(mask_capacity(n), _device_arch())
    smem = _smem_layout(batch, config.d_model, config.d_ff, config.head_dim, config.max_seq_len, warps,
                        mask_capacity(n))[0]
    limit = int(props["sharedMemPerBlockOptin"])
    if smem > limit:
        return f"it needs {smem} bytes of shared memory per block for these widths and batch, the device has {limit}"
    return None


class FusedDecodeStep:
    """The packed weights and launch of the fused step for a :class:`pymglu.models.GraphDecoder`.

    Args:
        decoder: the decoder whose buffers (``x``, ``q``, ``attn``, ``hidden``, ``logits``, the cache,
            ``ids``, ``state``, ``history``, ``attention_workspace``) the step reads and writes.

    Attributes:
        grid: blocks per launch (the SM count: one resident block per SM).
        barriers: phase boundaries per launch (5 per transformer block: after the q k v, attention, o, up
            and down phases).
        grid_barriers: the boundaries that are grid barriers (2 per block: after q k v and attention); at
            the other three the next phase waits only for the flagged packets of the rows it reads.
        trace: ``None``, or a CuPy uint64 array ``(2 + 2 barriers, grid)`` that the next launches fill with
            each block's global timestamps in ns: row 0 its start, ``1 + 2k`` its arrival at boundary ``k``
            (the end of the phase before), ``2 + 2k`` its release (from the grid barrier, or once the next
            phase's input rows were all current), the last row its end (``benchmarks/profile_fused_step.py``).
        x_packets, hidden_packets: CuPy uint64 arrays of the flagged packets that carry the residual stream
            and the hidden activations between blocks (``fused_context.cuh``).
        teams: teams per block of each product (``qkv``, ``o``, ``up``, ``down``, ``logits``).
        staged_merge: the most attention chunks per head that the o product's staging merges itself
            (:data:`STAGED_MERGE_CHUNKS` when the step was built); longer contexts, and batches whose chunk
            weights do not fit the kernel's reduction area, merge in the attention phase.
        weight_bytes: bytes of packed weights and masks one step reads.
    """

    def __init__(self, decoder: Any) -> None:
        import cupy as cp

        model, c, B = decoder.model, decoder.config, decoder.batch
        reason = unsupported_reason(c, B)
        if reason is not None:
            raise ValueError(f"model: the fused decode step cannot serve it: {reason}")
        if not (isinstance(STAGED_MERGE_CHUNKS, int) and 0 <= STAGED_MERGE_CHUNKS <= _MAX_STAGED_CHUNKS):
            raise ValueError(f"STAGED_MERGE_CHUNKS: expected an integer from 0 to {_MAX_STAGED_CHUNKS}, "
                             f"got {STAGED_MERGE_CHUNKS!r}")
        self.decoder = decoder
        d, h, H, Dh, V = c.d_model, c.d_ff, c.n_heads, c.head_dim, c.vocab_size
        self.n_masks = c.n_masks if c.is_mglu else 0
        cap = mask_capacity(self.n_masks)
        self.warps = warps_per_block(cap, _device_arch())
        name = _kernel_name(c.np_dtype, cap, self.warps)
        self.kernel = _cuda.load_module(_SOURCE, (name,)).get_function(name)
        props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
        self.grid = int(props["multiProcessorCount"])
        self.smem, self.xs_stride, self._union_floats = _smem_layout(B, d, h, Dh, c.max_seq_len, self.warps, cap)
        if self.smem > 48 * 1024:
            self.kernel.max_dynamic_shared_size_bytes = self.smem
        regs = int(self.kernel.num_regs)
        if regs * 32 * self.warps > int(props["regsPerMultiprocessor"]):
            raise ValueError(f"model: the fused step's blocks ({regs} registers per thread) do not fit one per SM")

        self._keep: list[Any] = []  # every array the layer table points into
        table = np.zeros((c.n_layers, _LAYER_FIELDS), dtype=np.uint64)
        self.weight_bytes = 0
        for i, block in enumerate(model.layers):
            attn = block.attn
            p = pack_layer(cp, attn.wq.weight.data, attn.wk.weight.data, attn.wv.weight.data, attn.wo.weight.data,
                           block.ffn.up, block.ffn.down.weight.data, Dh)
            arrays = [p["wqkv"], p["wo"], p["wup"], p["mup"], p["wdown"], block.attn_norm.weight.data,
                      block.ffn_norm.weight.data, decoder.cache.keys[i], decoder.cache.values[i]]
            table[i] = [0 if a is None else a.data.ptr for a in arrays]
            self._keep += [a for a in arrays if a is not None]
            self.weight_bytes += sum(int(p[k].nbytes) for k in ("wqkv", "wo", "wup", "wdown"))
            self.weight_bytes += 0 if p["mup"] is None else int(p["mup"].nbytes)
        self.layers = cp.asarray(table)
        head = model.embed.weight.data if c.tie_embeddings else model.head.weight.data
        self.head_tiles = _tiles(cp, head)
        self.weight_bytes += int(self.head_tiles.nbytes)
        self.embed = model.embed.weight.data
        self.final_norm = model.norm.weight.data
        half = Dh // 2
        angles = np.arange(c.max_seq_len, dtype=np.float64)[:, None] * np.power(
            float(c.rope_base), -2.0 * np.arange(half, dtype=np.float64) / Dh)[None, :]
        self.rope = cp.asarray(np.stack([np.cos(angles), np.sin(angles)], axis=-1).astype(np.float32))
        self.head_count = cp.zeros((B * H,), dtype=np.uint32)
        self.sync = cp.zeros((3,), dtype=np.uint32)
        # the flagged packets of x (the embedding rows, then x after each o and down product) and of the
        # hidden activations (one set per layer); flag 0 never marks a launch's packets as current
        self.x_packets = cp.zeros(((2 * c.n_layers + 1) * B * packet_row(d),), dtype=np.uint64)
        self.hidden_packets = cp.zeros((c.n_layers * B * packet_row(h),), dtype=np.uint64)
        up_strips = -(-h // 16) if self.n_masks else -(-h // 8)
        self.teams = {
            "qkv": choose_teams(3 * d // 16, self.grid, self.warps),
            "o": choose_teams(d // 16, self.grid, self.warps),
            "up": choose_teams(up_strips, self.grid, self.warps),
            "down": choose_teams(d // 16, self.grid, self.warps),
            "logits": choose_teams(-(-V // 16), self.grid, self.warps),
        }
        for phase, teams in TEAMS_OVERRIDE.items():
            if phase not in self.teams or teams not in (1, 2, 4) or self.warps // teams < 4:
                raise ValueError(f"TEAMS_OVERRIDE: {phase}={teams} is not a product and team count this step runs")
            self.teams[phase] = teams
        self.staged_merge = STAGED_MERGE_CHUNKS
        self.barriers = 5 * c.n_layers
        self.grid_barriers = 2 * c.n_layers
        self.trace = None
        self._activation = _cuda.ACTIVATION_CODES[model.layers[0].ffn.up.activation]
        self._scale = 1.0 / math.sqrt(Dh)

    def new_trace(self) -> Any:
        """Allocate :attr:`trace` (poisoned with zeros) for the next launches and return it."""
        import cupy as cp

        self.trace = cp.zeros((2 + 2 * self.barriers, self.grid), dtype=np.uint64)
        return self.trace

    def launch(self, greedy: bool) -> None:
        """One decode step on the current stream: the token ``ids`` at position ``state[0]``; the logits
        into ``decoder.logits``; with ``greedy`` the argmax into ``ids`` and the history column
        ``state[1]``; then ``state += 1``."""
        dec, c = self.decoder, self.decoder.config
        part_max, part_sum, part_acc = dec.attention_workspace
        t = self.teams
        teams = t["qkv"] | t["o"] << 3 | t["up"] << 6 | t["down"] << 9 | t["logits"] << 12
        i32 = np.int32
        self.kernel(
            (self.grid,), (32 * self.warps,),
            (self.layers, i32(c.n_layers), self.embed, self.head_tiles, self.final_norm, self.x_packets, dec.q,
             dec.attn, self.hidden_packets, dec.logits, part_max, part_sum, part_acc, self.head_count, self.rope, dec.ids, dec.history,
             i32(dec.history.shape[1]), dec.state, self.sync, i32(self.n_masks), i32(dec.batch), i32(c.d_model),
             i32(c.d_ff), i32(c.n_heads), i32(c.head_dim), i32(c.vocab_size), i32(c.max_seq_len),
             i32(self._activation), i32(teams), i32(self.xs_stride), i32(self._union_floats),
             i32(self.staged_merge),
             np.float32(c.norm_eps), np.float32(self._scale), i32(1 if greedy else 0),
             self.trace if self.trace is not None else np.uintp(0)),
            shared_mem=self.smem)
