"""FlashMGLU: MGLU decode (1 to 16 tokens) in one pass over ``W`` and the mask bits, on CuPy arrays.

``y = sum_i g(s_i) * (t - s_i)`` with ``t = x W^T``, ``s_i = x (M_i * W)^T``; ``x`` ``(T, d)`` or
``(..., d)`` with at most 16 tokens, ``W`` ``(h, d)``, masks as canonical bit-planes
``(n, h, ceil(d/32))`` uint32 (:mod:`pymglu.masks`), ``n`` from 1 to :data:`MAX_MASKS`.

Two kernels (``flash_mglu.cu``), chosen by the dtype of ``W``:

* bfloat16 / float16: the tensor-core kernel. It reads ``W`` and the masks in its own *inference
  format*, built once by :func:`pack_weights` (a :class:`FlashMGLUWeights`). The masks become the
  metadata of the sparse tensor cores' ``mma.sp`` (tensor_core.cuh): each 16x16 tile is the compressed
  A operand of an ``m16n8k32`` product whose B holds x at two positions of every 4-wide chunk and zeros
  at the other two, and each mask bit picks x or zero for its weight. With ``perm(c, e) = 8 (c & 1) +
  4 e + (c >> 1)`` (``c`` in 0..7, ``e`` in 0..1), the column order within a tile that lets each lane
  read its x values as one 8-byte load:

  - ``w_tiles`` ``(S, G, 4, 32, 8)`` (``S = ceil(h/16)`` row strips, ``G = ceil(d/64)`` column groups,
    4 tiles of 16x16 per group, 32 lanes, 8 elements): the tile format of :func:`tile_matrix` applied
    to ``W`` with the columns of every tile reordered, stored column ``2c + e`` = original column
    ``perm(c, e)`` (zero-padded past ``h`` and ``d``);
  - ``mask_words`` ``(S, G, 32 n)`` uint32, the lane's words of a group in chunks (:func:`lane_major_words`
    of the ``(S, G, n, 32)`` words below): the masks are split into chunks of 4 (then one chunk per
    remaining mask, :func:`mask_chunks`), and a chunk of ``c`` masks is ``32 c`` words, lane ``L``'s ``c``
    words next to each other, so that a lane loads its words of a chunk with one 16- or 4-byte load and a
    warp's load is contiguous. Word ``(s, G, i, L)`` (lane ``L = 4 g + tg``) holds mask ``i`` for 16
    elements of each of two tiles, ``q = 2 (tg >> 1) + o`` for ``o`` in 0..1: bit ``4 j + o + 2 e`` (``j``
    in 0..7) is the mask of ``W[16 s + g + 8 (j >> 2), k0 + perm(c, e)]`` with ``c = 4 (tg & 1) + (j & 3)``
    and ``k0 = 64 G + 16 q`` (the metadata layout of ``mma.sp`` as measured by
    ``benchmarks/probe_sparse_mma.py``).

  Bytes read per call: ``2 h d + n h d / 8`` (plus padding to multiples of 16 rows and 64 columns).
* float32: a CUDA-core kernel over ``W`` and the canonical bit-planes as they are (no packing);
  correct, not tuned.

Accumulation is float32, the output is in the input dtype, and the default path uses no float
atomics: the same inputs give the same bits. The kernels run on CuPy's current stream.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from pymglu import _checks, activations
from pymglu import cuda as _cuda
from pymglu import masks as _masks
from pymglu.backend import cupy_or_none, is_cupy_array, unwrap
from pymglu.cuda import launch as _launching
from pymglu.dtypes import bfloat16, float16, float32

__all__ = ["MAX_MASKS", "MAX_TOKENS", "mma_config", "TILE_COLUMN_ORDER", "FlashMGLUWeights",
           "pack_weights", "tile_matrix", "sparse_tiles", "mask_words", "mask_chunks", "lane_major_words",
           "warp_major_words", "flash_mglu", "kernel_names",
           "compile_options", "PDL_TRIGGER", "PAIRED_COLUMNS", "MIN_BLOCKS_BOUND", "token_block"]

MAX_MASKS = 16
MAX_TOKENS = 16
#: warps per block of the tensor-core kernel (they split the 64-column groups of a 16-row strip);
#: ``None`` picks them with :func:`mma_config`. Benchmarks set an int to sweep.
MMA_WARPS: int | None = None
#: groups of W tiles and mask words each warp keeps in flight beyond the one it multiplies (1 to 3);
#: ``None`` picks them with :func:`mma_config`. Benchmarks set an int to sweep.
MMA_AHEAD: int | None = None
#: where the tensor-core kernel lets the next kernel start when launched with ``pdl=True``: ``"start"``
#: (every block at its start) or ``"end"`` (every block after its last loads). Benchmarks set it to sweep.
PDL_TRIGGER = "end"
#: serve 1 to 4 tokens with the paired-column instance (:func:`token_block`); benchmarks set it to
#: ``False`` to time the one-column-per-token instance against it.
PAIRED_COLUMNS = True
#: build the paired and the eight-warp tensor-core instances of 5 to 8 masks for 16 resident warps per SM
#: (at most 128 registers; flash_mglu.cu, ``MmaMinBlocks``); benchmarks set it to ``False`` to time
#: without the bound.
MIN_BLOCKS_BOUND = True
SIMT_ROWS_PER_BLOCK = 4

_SOURCE = "flash_mglu.cu"
_ACTIVATION_CODES = _cuda.ACTIVATION_CODES
_CUDA_TYPES = _cuda.CUDA_TYPE_NAMES


def _mma_name(dtype: np.dtype, n: int, tokens: int, warps: int, ahead: int) -> str:
    return f"pymglu::flash_mglu_mma<{_CUDA_TYPES[np.dtype(dtype)]}, {n}, {tokens}, {warps}, {ahead}>"


def token_block(n_tokens: int) -> int:
    """The ``TOKENS`` template argument (4, 8 or 16) of the tensor-core instance serving ``n_tokens``:

    * 4 (1 to 4 tokens, when :data:`PAIRED_COLUMNS` is on): the mma's eight columns hold each token
      twice, once for the elements a mask keeps and once for those it leaves off, so one ``mma.sp`` per
      mask and tile gives both ``s_i`` and ``t - s_i`` (``n`` products per tile instead of ``n + 1``);
    * 8 (up to 8 tokens): one column per token, one ``mma.sp`` for ``t`` and one per mask;
    * 16 (9 to 16 tokens): the same with two ``mma.sp`` per product.
    """
    if n_tokens <= 4 and PAIRED_COLUMNS:
        return 4
    return 8 if n_tokens <= 8 else 16


def _simt_name(dtype: np.dtype, n: int) -> str:
    return f"pymglu::flash_mglu_simt<{_CUDA_TYPES[np.dtype(dtype)]}, {n}>"


def mma_config(n_masks: int, d: int, n_tokens: int = 1) -> tuple[int, int]:
    """``(warps per 16-row strip, groups each warp keeps in flight)`` of the tensor-core instance the
    library launches for ``n_tokens`` tokens, from the H200 sweeps of docs/flash_mglu.md ("Launch
    configuration"):

    * one or two masks on inputs up to 4096 wide: four warps, two groups in flight (little mask
      arithmetic per byte, so the loads set the pace);
    * four to eight masks on wider inputs, up to 8 tokens: eight warps, one group (the long strips
      have groups enough for eight warps, which overlap the ``n + 1`` products of each tile);
    * otherwise four warps, one group (more registers per thread would leave fewer blocks resident).
    """
    if n_masks <= 2 and d <= 4096:
        return 4, 2
    if 4 <= n_masks <= 8 and d > 4096 and n_tokens <= 8:
        return 8, 1
    return 4, 1


def compile_options() -> tuple[str, ...]:
    """NVRTC options the tensor-core instances are built with: ``-DPYMGLU_PDL_TRIGGER_AT_END`` for
    ``PDL_TRIGGER = "end"`` (the default), none for ``"start"``; ``-DPYMGLU_MMA_NO_MIN_BLOCKS`` when
    :data:`MIN_BLOCKS_BOUND` is off."""
    if PDL_TRIGGER not in ("start", "end"):
        raise ValueError(f"PDL_TRIGGER: expected 'start' or 'end', got {PDL_TRIGGER!r}")
    options = ("-DPYMGLU_PDL_TRIGGER_AT_END",) if PDL_TRIGGER == "end" else ()
    return options if MIN_BLOCKS_BOUND else options + ("-DPYMGLU_MMA_NO_MIN_BLOCKS",)


def kernel_names() -> list[str]:
    """Every template instance the library can launch (for compile checks): name expressions."""
    configs = {(n, tokens): sorted({mma_config(n, d, tokens) for d in (64, 1 << 20)})
               for n in range(1, MAX_MASKS + 1) for tokens in (4, 8, 16)}
    names = [_mma_name(dt, n, tokens, warps, ahead) for dt in (bfloat16, float16)
             for (n, tokens), pairs in configs.items() for warps, ahead in pairs]
    names += [_simt_name(float32, n) for n in range(1, MAX_MASKS + 1)]
    return names


@dataclasses.dataclass(frozen=True)
class FlashMGLUWeights:
    """``W`` and its masks in the layout the FlashMGLU kernel for their dtype reads (module docstring).

    For bfloat16/float16, ``w_tiles`` and ``mask_words`` hold the tensor-core format; for float32
    ``w_tiles`` is ``W`` itself and ``mask_words`` the canonical bit-planes.
    """

    w_tiles: Any
    mask_words: Any
    h: int
    d: int
    n_masks: int
    dtype: np.dtype

    @property
    def uses_tensor_cores(self) -> bool:
        return self.dtype != float32

    @property
    def nbytes(self) -> int:
        """Bytes the kernel reads per call for the weights and masks (padding included)."""
        return int(self.w_tiles.nbytes + self.mask_words.nbytes)


def _require_device_array(name: str, a: Any) -> None:
    if not is_cupy_array(a):
        raise TypeError(
            f"{name}: FlashMGLU needs a CuPy array on the GPU, got {_checks.describe(a)}; "
            "use pymglu.functional.mglu for NumPy arrays"
        )


def pack_weights(W: Any, packed_masks: Any) -> FlashMGLUWeights:
    """Build the kernel's inference format from ``W`` ``(h, d)`` and bit-planes ``(n, h, ceil(d/32))``.

    Args:
        W: CuPy array, bfloat16, float16 or float32.
        packed_masks: CuPy uint32 bit-planes on the same device, ``1 <= n <= MAX_MASKS``.
    Returns:
        A :class:`FlashMGLUWeights`; build it once per layer and reuse it for every call.
    """
    W, packed_masks = unwrap(W), unwrap(packed_masks)
    _require_device_array("W", W)
    _require_device_array("packed_masks", packed_masks)
    _checks.check_ndim("W", W, 2)
    _checks.check_dtype("W", W, tuple(_CUDA_TYPES))
    h, d = (int(s) for s in W.shape)
    _masks.check_packed(packed_masks, None, h, d)
    if W.device.id != packed_masks.device.id:
        raise ValueError(
            f"W and packed_masks must be on one device, got {_checks.describe(W)} and {_checks.describe(packed_masks)}"
        )
    n = int(packed_masks.shape[0])
    if n > MAX_MASKS:
        raise ValueError(f"packed_masks: FlashMGLU supports 1 to {MAX_MASKS} masks, got n = {n}")
    cp = cupy_or_none()
    dtype = np.dtype(W.dtype)
    with cp.cuda.Device(W.device.id):
        if dtype == float32:
            return FlashMGLUWeights(cp.ascontiguousarray(W), cp.ascontiguousarray(packed_masks), h, d, n, dtype)
        w_tiles = sparse_tiles(cp, W)
        words = cp.stack([mask_words(cp, _masks.unpack_masks(packed_masks[i], d)) for i in range(n)], axis=2)
        words = lane_major_words(cp, words)
    return FlashMGLUWeights(w_tiles, words, h, d, n, dtype)


def tile_matrix(xp: Any, W: Any) -> Any:
    """``W`` ``(R, K)`` (16-bit floats, NumPy or CuPy) as the tensor-core tile format ``(ceil(R/16),
    ceil(K/64), 4, 32, 8)`` of the module docstring, zero-padded past ``R`` and ``K``; same dtype."""
    R, K = (int(s) for s in W.shape)
    strips, groups = -(-R // 16), -(-K // 64)
    w16 = xp.zeros((strips * 16, groups * 64), dtype=xp.uint16)
    w16[:R, :K] = xp.ascontiguousarray(W).view(xp.uint16)
    # (S, rh, g, G, q, ch, c, e) -> (S, G, q, g, c, ch, rh, e): row = 8 rh + g, col = 16 q + 8 ch + 2 c + e
    tiles = w16.reshape(strips, 2, 8, groups, 4, 2, 4, 2).transpose(0, 3, 4, 2, 6, 5, 1, 7)
    return xp.ascontiguousarray(tiles).reshape(strips, groups, 4, 32, 8).view(W.dtype)


#: ``TILE_COLUMN_ORDER[2 c + e] = perm(c, e)``: the original column of each stored column of a tile.
TILE_COLUMN_ORDER = np.array([8 * (c & 1) + 4 * e + (c >> 1) for c in range(8) for e in range(2)])


def _reorder_columns(xp: Any, a: Any, fill_dtype: Any) -> Any:
    """``a`` ``(R, K)`` zero-padded to ``(16 ceil(R/16), 64 ceil(K/64))`` with every 16-column tile's
    columns in :data:`TILE_COLUMN_ORDER`."""
    R, K = (int(s) for s in a.shape)
    padded = xp.zeros((-(-R // 16) * 16, -(-K // 64) * 64), dtype=fill_dtype)
    padded[:R, :K] = a
    source = (np.arange(padded.shape[1] // 16)[:, None] * 16 + TILE_COLUMN_ORDER[None, :]).ravel()
    return padded[:, xp.asarray(source)]


def sparse_tiles(xp: Any, W: Any) -> Any:
    """``W`` ``(h, d)`` (16-bit floats, NumPy or CuPy) as the ``w_tiles`` of the MGLU format (module
    docstring): :func:`tile_matrix` of ``W`` with each tile's columns in :data:`TILE_COLUMN_ORDER`."""
    reordered = _reorder_columns(xp, xp.ascontiguousarray(W).view(xp.uint16), xp.uint16)
    return tile_matrix(xp, reordered.view(W.dtype))


def _word_sources() -> tuple[np.ndarray, np.ndarray]:
    """(row in the strip, column in the reordered group) of bit ``b`` of lane ``L``'s word, ``(32, 32)`` each."""
    rows = np.zeros((32, 32), np.int64)
    cols = np.zeros((32, 32), np.int64)
    for lane in range(32):
        g, tg = divmod(lane, 4)
        for j in range(8):
            for o in range(2):
                for e in range(2):
                    c = 4 * (tg & 1) + (j & 3)
                    rows[lane, 4 * j + o + 2 * e] = g + 8 * (j >> 2)
                    cols[lane, 4 * j + o + 2 * e] = 16 * (2 * (tg >> 1) + o) + 2 * c + e
    return rows, cols


def mask_words(xp: Any, mask: Any) -> Any:
    """One mask ``(h, d)`` (bool or 0/1, NumPy or CuPy) as its ``mask_words`` ``(S, G, 32)`` uint32 plane
    of the MGLU format (module docstring)."""
    bits = _reorder_columns(xp, mask, xp.uint8)
    strips, groups = bits.shape[0] // 16, bits.shape[1] // 64
    by_group = bits.reshape(strips, 16, groups, 64).transpose(0, 2, 1, 3)  # (S, G, row, col)
    rows, cols = (xp.asarray(a) for a in _word_sources())
    words = xp.zeros((strips, groups, 32), dtype=xp.uint32)
    for b in range(32):
        words |= by_group[:, :, rows[:, b], cols[:, b]].astype(xp.uint32) << xp.uint32(b)
    return words


def mask_chunks(n: int) -> tuple[int, ...]:
    """The chunks in which the kernel loads a lane's ``n`` mask words of a group: 4 masks per chunk (one
    16-byte load), then one chunk per remaining mask (a 4-byte load, the stop-18 order, so that n <= 3
    is read as before); e.g. 7 -> (4, 1, 1, 1)."""
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n: expected a mask count >= 1, got {n!r}")
    return (4,) * (n // 4) + (1,) * (n % 4)


def lane_major_words(xp: Any, words: Any) -> Any:
    """Mask words ``(S, G, n, 32)`` (mask-major: :func:`mask_words` planes stacked on axis 2) as the
    kernel's ``mask_words`` ``(S, G, 32 n)``: per group, the chunks of :func:`mask_chunks` in mask order,
    chunk ``(i0, c)`` holding word ``(i0 + k, L)`` at ``32 i0 + c L + k``."""
    strips, groups, n, lanes = (int(v) for v in words.shape)
    if lanes != 32:
        raise ValueError(f"words: expected shape (S, G, n, 32), got {tuple(words.shape)}")
    parts, i0 = [], 0
    for c in mask_chunks(n):
        parts.append(words[:, :, i0:i0 + c, :].transpose(0, 1, 3, 2).reshape(strips, groups, 32 * c))
        i0 += c
    return xp.ascontiguousarray(xp.concatenate(parts, axis=2))


def warp_major_words(xp: Any, words: Any, n: int) -> Any:
    """The inverse of :func:`lane_major_words`: ``(S, G, 32 n)`` -> ``(S, G, n, 32)`` (the mask-major layout
    the kernels read before the chunks of four; ``benchmarks/probe_flash_stages.py`` times it)."""
    strips, groups, total = (int(v) for v in words.shape)
    if total != 32 * n:
        raise ValueError(f"words: expected shape (S, G, {32 * n}) for n = {n}, got {tuple(words.shape)}")
    parts, i0 = [], 0
    for c in mask_chunks(n):
        parts.append(words[:, :, 32 * i0:32 * (i0 + c)].reshape(strips, groups, 32, c).transpose(0, 1, 3, 2))
        i0 += c
    return xp.ascontiguousarray(xp.concatenate(parts, axis=2))


def flash_mglu(
    x: Any,
    W: Any,
    packed_masks: Any = None,
    activation: str = "silu",
    out: Any = None,
    pdl: bool = False,
) -> Any:
    """MGLU decode on the GPU for 1 to 16 tokens.

    Args:
        x: CuPy array ``(..., d)`` with at most 16 tokens (product of the leading dims), dtype of ``W``.
            A non-contiguous ``x``, or one not 8-byte aligned, is copied to a contiguous array first.
        W: a :class:`FlashMGLUWeights` from :func:`pack_weights` (fast: pack once, call many times),
            or a CuPy ``(h, d)`` array together with ``packed_masks``; then the weights are packed on
            every call, one extra pass over ``W``.
        packed_masks: ``(n, h, ceil(d/32))`` uint32 bit-planes when ``W`` is an array, else ``None``.
        activation: ``"silu"``, ``"gelu"``, ``"gelu_tanh"``, ``"relu"`` or ``"sigmoid"``.
        out: optional C-contiguous CuPy array ``(..., h)`` of ``x``'s dtype to write into; with it the
            call allocates nothing (for a contiguous aligned ``x``) and can be captured in a CUDA graph.
        pdl: launch with programmatic dependent launch (:mod:`pymglu.cuda.launch`): the kernel may start
            while the kernel before it on the stream finishes, and issues its first loads of ``W`` and
            the masks before it waits for that kernel (``x`` and ``out`` only after). Correct only
            while no kernel still in flight on the stream writes ``W`` or the masks, as in decoding with
            fixed weights; in particular not right after :func:`pack_weights` on the same stream
            without a synchronisation in between. On a GPU of compute capability below 9.0, which has
            no PDL, the call launches normally.
    Returns:
        ``y`` ``(..., h)`` in ``x``'s dtype (``out`` when given).
    """
    activations.check_activation(activation)
    if not isinstance(pdl, (bool, np.bool_)):
        raise TypeError(f"pdl: expected a bool, got {type(pdl).__name__}")
    x = unwrap(x)
    _require_device_array("x", x)
    _checks.check_min_ndim("x", x, 1)
    if isinstance(W, FlashMGLUWeights):
        if packed_masks is not None:
            raise ValueError("packed_masks: must be None when W is a FlashMGLUWeights (it holds the masks)")
        weights = W
    else:
        if packed_masks is None:
            raise ValueError("packed_masks: required when W is an array (or pass W = pack_weights(W, packed_masks))")
        weights = pack_weights(W, packed_masks)
    if np.dtype(x.dtype) != weights.dtype:
        raise TypeError(f"x: expected dtype {weights.dtype.name} (the dtype of W), got {_checks.describe(x)}")
    if x.shape[-1] != weights.d:
        raise ValueError(f"x: expected last dim d = {weights.d}, got {_checks.describe(x)}")
    if x.device.id != weights.w_tiles.device.id:
        raise ValueError(
            f"x: expected an array on cuda:{weights.w_tiles.device.id} (where W is), got {_checks.describe(x)}"
        )
    n_tokens = int(np.prod(x.shape[:-1], dtype=np.int64))
    if n_tokens > MAX_TOKENS:
        raise ValueError(
            f"x: FlashMGLU serves 1 to {MAX_TOKENS} tokens, got {n_tokens} ({_checks.describe(x)}); "
            "use pymglu.functional.mglu (cuBLAS products) for larger batches"
        )
    out_shape = tuple(x.shape[:-1]) + (weights.h,)
    cp = cupy_or_none()
    if out is None:
        out = cp.empty(out_shape, dtype=x.dtype)
    else:
        out = unwrap(out)
        _require_device_array("out", out)
        _checks.check_shape("out", out, out_shape)
        if np.dtype(out.dtype) != weights.dtype or not out.flags.c_contiguous or out.device.id != x.device.id:
            raise ValueError(
                f"out: expected a C-contiguous {weights.dtype.name} array of shape {out_shape} on "
                f"cuda:{x.device.id}, got {_checks.describe(out)} (contiguous={out.flags.c_contiguous})"
            )
    if n_tokens == 0:
        return out
    if not x.flags.c_contiguous or x.data.ptr % 8:
        x = x.copy()  # documented rule: non-contiguous or not 8-byte aligned inputs are copied
    _launch(cp, weights, x, out, n_tokens, _ACTIVATION_CODES[activation], bool(pdl))
    return out


def _launch(cp: Any, wts: FlashMGLUWeights, x: Any, out: Any, n_tokens: int, act: int, pdl: bool) -> None:
    i32 = np.int32
    if wts.uses_tensor_cores:
        lib_warps, lib_ahead = mma_config(wts.n_masks, wts.d, n_tokens)
        warps = MMA_WARPS or lib_warps
        name = _mma_name(wts.dtype, wts.n_masks, token_block(n_tokens), warps, MMA_AHEAD or lib_ahead)
        strips, groups = wts.w_tiles.shape[:2]
        grid, block = (strips,), (warps * 32,)
        args = (wts.w_tiles, wts.mask_words, x, out, i32(n_tokens), i32(wts.d), i32(wts.h), i32(groups), i32(act))
    else:
        name = _simt_name(wts.dtype, wts.n_masks)
        grid, block = (-(-wts.h // SIMT_ROWS_PER_BLOCK),), (SIMT_ROWS_PER_BLOCK * 32,)
        args = (wts.w_tiles, wts.mask_words, x, out, i32(n_tokens), i32(wts.d), i32(wts.h), i32(act))
    options = compile_options() if wts.uses_tensor_cores else ()
    with cp.cuda.Device(x.device.id):
        function = _cuda.load_module(_SOURCE, (name,), options).get_function(name)
        if pdl and _launching.pdl_supported(x.device.id):
            _launching.launch(function, grid, block, args)
        else:
            function(grid, block, args)
