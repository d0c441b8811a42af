"""Masked products in one Hopper kernel (``masked_gemm.cu``), without a masked copy of ``W``.

:mod:`pymglu.cuda.training` builds each masked weight ``M_i * W`` with ``apply_mask`` and hands it to cuBLAS.
On an sm_90 GPU (H100, H200) two of its product sets can instead run in ``masked_gemm.cu``, a persistent,
warp-specialised TMA + ``wgmma`` kernel that takes ``W`` as wgmma's register operand and ANDs the mask bits
into its fragments. It reads ``W`` and the bit-planes once per tile, writes no masked copy, and holds none in
memory:

* the forward's masked products ``s_i = x (M_i W)^T`` (:func:`masked_product`);
* the backward's ``dx = dv W + sum_i e_i (M_i W)``, all ``n + 1`` products summed in one float32 accumulator
  and rounded once (:func:`masked_dx`). It reads the bit-planes transposed, ``(n, d, ceil(h / 32))``
  (:func:`transpose_bits`), so that the bits of ``W^T``'s fragments lie along K as in the forward.

Where they are used is set by :func:`usable` and :func:`usable_dx`; everywhere else the training path keeps
``apply_mask`` + cuBLAS.

The kernels use sm_90a instructions (``wgmma``, ``setmaxnreg``), which CuPy's ``RawModule`` does not target
(it compiles for ``sm_90``). This module therefore compiles the source with NVRTC itself, for ``sm_90a``,
and loads the binary with CuPy. The TMA tensor maps are encoded by the driver (``cuTensorMapEncodeTiled``)
and passed by value, so that the launches can be captured in a CUDA graph.

Shapes: forward, ``x`` ``(T, K)``, ``W`` ``(H, K)``, one bit-plane ``bits`` ``(H, ceil(K / 32))`` uint32,
``out`` ``(T, H)``; ``dx``, ``dv`` ``(T, h)``, ``e`` ``(n, T, h)``, ``W`` ``(h, d)``, ``bits``
``(n, h, ceil(d / 32))``, ``out`` ``(T, d)``. The 16-bit operands are bfloat16 or float16, one dtype.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import sys
import threading
from typing import Any

import numpy as np

from pymglu import _checks
from pymglu import cuda as _cuda
from pymglu.backend import cupy_or_none, is_cupy_array
from pymglu.dtypes import bfloat16, float16

__all__ = ["ENABLED", "DX_ENABLED", "MAX_TOKENS", "disabled", "dx_kernel", "supports", "usable",
           "masked_product", "launch_unchecked", "supports_dx", "usable_dx", "masked_dx", "launch_dx_unchecked",
           "transpose_bits"]

#: Whether :mod:`pymglu.cuda.training` may use these kernels at all (see :func:`usable`, :func:`usable_dx`).
ENABLED = True
#: Whether the training backward may use :func:`masked_dx` (see :func:`usable_dx`). Off: on the H200 the
#: kernel took 3.19 ms in place at T = d = 4096, h = 14336, n = 4 against 3.17 ms for the five cuBLAS products,
#: two ``apply_mask`` calls and the rounding it replaces, and the replayed step was 2% slower with it
#: (docs/train_layer_history.md, "Stop 33"). :func:`dx_kernel` switches it on.
DX_ENABLED = False

#: The training path uses the kernel only for products of at most this many tokens (``T <= MAX_TOKENS``).
#: ``apply_mask`` costs the same for any ``T`` (it writes ``M * W`` once per call), while the kernel's main
#: loop runs some percent slower than cuBLAS's on a built ``M * W`` for every token, so the kernel pays off
#: only up to some token count. Replayed n = 4 steps on the H200 at stop 37, kernel against ``apply_mask`` +
#: cuBLAS (docs/benchmarks.md, "Stop 37"; one path timed twice in a run differs by up to 1.3%):
#: d = 2048: +3.9%, +2.6%, +0.8%, level at T = 1024, 2048, 3072, 4096; d = 4096: +1.5%, +2.2%, -1.9%,
#: -1.3 to -1.4%, -3.7% at T = 1024, 2048, 3072, 4096, 8192. (Until stop 37 the bound was ``T <= 2 d``.)
MAX_TOKENS = 2048

_SOURCE = "masked_gemm.cu"
_ENTRIES = {np.dtype(bfloat16): "masked_gemm_bf16", np.dtype(float16): "masked_gemm_f16"}
_DX_ENTRIES = {np.dtype(bfloat16): "masked_dx_bf16", np.dtype(float16): "masked_dx_f16"}
_TRANSPOSE = "transpose_bit_planes"
_KERNELS = (*_ENTRIES.values(), *_DX_ENTRIES.values(), _TRANSPOSE)
_THREADS = 384
#: dynamic shared memory of a block: 4 stages of a 128 x 64 W tile and a 256 x 64 x tile, two 8 KB output
#: chunks, the mask words of the stages, 1 KB for alignment (``SMEM_BYTES`` in the source)
SMEM_BYTES = 4 * (128 * 64 * 2 + 256 * 64 * 2) + 2 * 32 * 128 * 2 + 4 * 128 * 8 + 1024
# TMA boxes: 64 columns by these rows (W as the forward's A operand, W as dx's transposed one, the token
# operands, the output chunks)
_BOX_ROWS = {"W": 128, "W^T": 64, "tokens": 256, "out": 32}

_functions: dict[tuple[int, str], Any] = {}
_lock = threading.Lock()


def disabled() -> contextlib.AbstractContextManager:
    """Within the block, :func:`usable` and :func:`usable_dx` are False: the training path builds ``M * W``
    for cuBLAS."""
    return _cuda.switched_off(sys.modules[__name__])


def dx_kernel(on: bool = True) -> contextlib.AbstractContextManager:
    """Within the block, :data:`DX_ENABLED` is ``on``: the training backward's ``dx`` runs in :func:`masked_dx`
    (where :func:`usable_dx` allows) or on ``apply_mask`` + cuBLAS; the previous value comes back afterwards."""
    return _cuda.switched(sys.modules[__name__], "DX_ENABLED", bool(on))


def supports(x: Any, W: Any, bits: Any, out: Any) -> bool:
    """True when the kernel can serve these arrays: CuPy arrays on a device of compute capability 9.0,
    ``x``, ``W``, ``out`` of one dtype, bfloat16 or float16, C-contiguous, 16-byte aligned, with ``K`` and
    ``H`` multiples of 8 (TMA's 16-byte row strides); ``bits`` uint32 and C-contiguous."""
    if not all(is_cupy_array(a) for a in (x, W, bits, out)):
        return False
    if np.dtype(x.dtype) not in _ENTRIES or not (x.dtype == W.dtype == out.dtype) or bits.dtype != np.uint32:
        return False
    if x.ndim != 2 or W.ndim != 2 or out.ndim != 2 or bits.ndim != 2:
        return False
    if not all(a.flags.c_contiguous for a in (x, W, bits, out)) or any(a.data.ptr % 16 for a in (x, W, out)):
        return False
    if W.shape[1] % 8 or W.shape[0] % 8:
        return False
    return _compute_capability() == "90"


def usable(x: Any, W: Any, bits: Any, out: Any) -> bool:
    """Whether the training path runs this product here: :data:`ENABLED`, :func:`supports`, and at most
    :data:`MAX_TOKENS` tokens (rows of ``x``)."""
    return ENABLED and x.shape[0] <= MAX_TOKENS and supports(x, W, bits, out)


def masked_product(x: Any, W: Any, bits: Any, out: Any) -> Any:
    """``out = x (M * W)^T`` with ``M`` the bit-plane ``bits``, float32 accumulation, rounded once to
    ``out``'s dtype.

    Args:
        x: ``(T, K)`` bfloat16 or float16 CuPy array.
        W: ``(H, K)``, ``x``'s dtype.
        bits: ``(H, ceil(K / 32))`` uint32, bit ``j`` of word ``k`` of row ``r`` = ``M[r, 32 k + j]``.
        out: ``(T, H)``, ``x``'s dtype; written, never read.
    Returns:
        ``out``.
    Raises:
        ValueError, TypeError: shapes or dtypes that do not match, naming the argument, before any launch;
        RuntimeError: arrays this kernel cannot serve (:func:`supports`), saying why.
    """
    _checks.check_ndim("x", x, 2)
    _checks.check_ndim("W", W, 2)
    T, K = x.shape
    H = W.shape[0]
    _checks.check_shape("W", W, (None, K))
    _checks.check_shape("bits", bits, (H, -(-K // 32)))
    _checks.check_shape("out", out, (T, H))
    _checks.check_dtype("x", x, tuple(_ENTRIES))
    _checks.check_same_dtype(("x", "W"), x, W)
    _checks.check_same_dtype(("x", "out"), x, out)
    _checks.check_dtype("bits", bits, (np.uint32,))
    if not supports(x, W, bits, out):
        raise RuntimeError(
            "masked_product: needs CuPy arrays on a compute-capability-9.0 device, C-contiguous and 16-byte "
            f"aligned, with K and H multiples of 8; got x {_checks.describe(x)}, W {_checks.describe(W)}, "
            f"out {_checks.describe(out)} on compute capability {_compute_capability()}")
    return launch_unchecked(x, W, bits, out)


def launch_unchecked(x: Any, W: Any, bits: Any, out: Any) -> Any:
    """:func:`masked_product` without its checks, for callers that checked :func:`usable` or
    :func:`supports` and the shapes (the training path)."""
    T, K = x.shape
    H = W.shape[0]
    if T == 0 or H == 0:
        return out
    from cupy.cuda.function import CPointer

    maps = [_tensor_map(a, _BOX_ROWS[name]) for name, a in (("W", W), ("tokens", x), ("out", out))]
    tiles = -(-H // 128) * -(-T // 256)
    blocks = min(tiles, _cuda.multiprocessor_count())
    # each map goes by value: the launch copies its 128 bytes from the host buffer
    args = (*(CPointer(m.ctypes.data) for m in maps), bits, np.int32(T), np.int32(H), np.int32(K),
            np.int32(bits.shape[1]))
    _function(_ENTRIES[np.dtype(x.dtype)])((blocks,), (_THREADS,), args, shared_mem=SMEM_BYTES)
    return out


def supports_dx(dv: Any, e: Any, W: Any) -> bool:
    """True when :func:`launch_dx_unchecked` can serve these operands (with a C-contiguous uint32 ``bits_t``
    and a C-contiguous, 16-byte aligned ``out`` of their dtype): CuPy arrays on a device of compute
    capability 9.0; ``dv`` 2-d, ``e`` 3-d, ``W`` 2-d, of one dtype, bfloat16 or float16, C-contiguous,
    16-byte aligned, with ``h`` and ``d`` multiples of 8."""
    arrays = (dv, e, W)
    if not all(is_cupy_array(a) for a in arrays):
        return False
    if np.dtype(W.dtype) not in _DX_ENTRIES or not (dv.dtype == e.dtype == W.dtype):
        return False
    if (dv.ndim, e.ndim, W.ndim) != (2, 3, 2):
        return False
    if not all(a.flags.c_contiguous for a in arrays) or any(a.data.ptr % 16 for a in arrays):
        return False
    if W.shape[0] % 8 or W.shape[1] % 8:
        return False
    return _compute_capability() == "90"


def usable_dx(dv: Any, e: Any, W: Any) -> bool:
    """Whether the training backward runs its ``dx`` products here: :data:`ENABLED`, :data:`DX_ENABLED`
    and :func:`supports_dx`."""
    return ENABLED and DX_ENABLED and supports_dx(dv, e, W)


def masked_dx(dv: Any, e: Any, W: Any, bits: Any, out: Any) -> Any:
    """``out = dv W + sum_i e_i (M_i * W)`` with ``M_i`` the bit-planes ``bits``: the ``n + 1`` products
    summed in float32 and rounded once to ``out``'s dtype (the backward's ``dx`` of an MGLU layer).

    Args:
        dv: ``(T, h)`` bfloat16 or float16 CuPy array.
        e: ``(n, T, h)``, ``dv``'s dtype.
        W: ``(h, d)``, ``dv``'s dtype.
        bits: ``(n, h, ceil(d / 32))`` uint32 bit-planes (transposed here by :func:`transpose_bits`).
        out: ``(T, d)``, ``dv``'s dtype; written, never read.
    Returns:
        ``out``.
    Raises:
        ValueError, TypeError: shapes or dtypes that do not match, naming the argument, before any launch;
        RuntimeError: arrays this kernel cannot serve (:func:`supports_dx`), saying why.
    """
    _checks.check_ndim("dv", dv, 2)
    _checks.check_ndim("W", W, 2)
    T, h = dv.shape
    d = W.shape[1]
    _checks.check_shape("W", W, (h, None))
    _checks.check_ndim("e", e, 3)
    n = e.shape[0]
    _checks.check_shape("e", e, (n, T, h))
    _checks.check_shape("bits", bits, (n, h, -(-d // 32)))
    _checks.check_shape("out", out, (T, d))
    _checks.check_dtype("dv", dv, tuple(_DX_ENTRIES))
    for name, a in (("e", e), ("W", W), ("out", out)):
        _checks.check_same_dtype(("dv", name), dv, a)
    _checks.check_dtype("bits", bits, (np.uint32,))
    if not (supports_dx(dv, e, W) and all(is_cupy_array(a) and a.flags.c_contiguous for a in (bits, out))
            and out.data.ptr % 16 == 0):
        raise RuntimeError(
            "masked_dx: needs CuPy arrays on a compute-capability-9.0 device, C-contiguous and 16-byte "
            f"aligned, with h and d multiples of 8; got dv {_checks.describe(dv)}, e {_checks.describe(e)}, "
            f"W {_checks.describe(W)}, out {_checks.describe(out)}, bits {_checks.describe(bits)} on compute "
            f"capability {_compute_capability()}")
    bits_t = transpose_bits(bits, cupy_or_none().empty((n, d, -(-h // 32)), dtype=np.uint32))
    return launch_dx_unchecked(dv, e, W, bits_t, out)


def launch_dx_unchecked(dv: Any, e: Any, W: Any, bits_t: Any, out: Any) -> Any:
    """:func:`masked_dx` without its checks, on bit-planes already transposed (``bits_t`` ``(n, d,
    ceil(h / 32))``, :func:`transpose_bits`), for callers that checked :func:`usable_dx` and the shapes."""
    T, h = dv.shape
    d = W.shape[1]
    n = e.shape[0]
    if T == 0 or d == 0:
        return out
    from cupy.cuda.function import CPointer

    e2 = e.reshape(n * T, h)  # B_1..B_n: one matrix, product i from row (i - 1) T
    maps = [_tensor_map(W, _BOX_ROWS["W^T"]), _tensor_map(dv, _BOX_ROWS["tokens"]),
            _tensor_map(e2, _BOX_ROWS["tokens"]) if n else _tensor_map(dv, _BOX_ROWS["tokens"]),
            _tensor_map(out, _BOX_ROWS["out"])]
    tiles = -(-d // 128) * -(-T // 256)
    blocks = min(tiles, _cuda.multiprocessor_count())
    args = (*(CPointer(m.ctypes.data) for m in maps), bits_t, np.int32(T), np.int32(d), np.int32(h),
            np.int32(bits_t.shape[-1]), np.int32(n))
    _function(_DX_ENTRIES[np.dtype(W.dtype)])((blocks,), (_THREADS,), args, shared_mem=SMEM_BYTES)
    return out


def transpose_bits(bits: Any, out: Any = None) -> Any:
    """The bit-planes ``bits`` ``(n, R, ceil(C / 32))`` uint32 transposed: ``out`` ``(n, C, ceil(R / 32))``,
    bit ``r % 32`` of word ``r // 32`` of row ``c`` = bit ``c % 32`` of word ``c // 32`` of row ``r``, that
    is the masks of ``W^T`` (``C`` is taken as ``32 ceil(C / 32)`` when ``out`` is not given). One kernel
    launch on an sm_90 device; bits past ``R`` are zero.

    Raises:
        ValueError, TypeError: a ``bits`` or ``out`` that is not a C-contiguous 3-d uint32 CuPy array, or
        shapes that do not match, naming the argument; RuntimeError on another device.
    """
    _checks.check_ndim("bits", bits, 3)
    _checks.check_dtype("bits", bits, (np.uint32,))
    n, R, CW = bits.shape
    if out is not None:
        _checks.check_ndim("out", out, 3)
        _checks.check_dtype("out", out, (np.uint32,))
        C = out.shape[1]
        _checks.check_shape("out", out, (n, C, -(-R // 32)))
        if -(-C // 32) != CW:
            raise ValueError(f"transpose_bits: out has {C} rows, which need {-(-C // 32)} words per row of bits; "
                             f"bits has {CW}")
    given = (bits,) if out is None else (bits, out)
    if not (all(is_cupy_array(a) and a.flags.c_contiguous for a in given) and _compute_capability() == "90"):
        raise RuntimeError("transpose_bits: needs C-contiguous CuPy arrays on a compute-capability-9.0 device; "
                           f"got bits {_checks.describe(bits)}"
                           + ("" if out is None else f", out {_checks.describe(out)}"))
    if out is None:
        out = cupy_or_none().empty((n, 32 * CW, -(-R // 32)), dtype=np.uint32)
    C = out.shape[1]
    if n and R and C:
        row_words = -(-R // 32)
        grid = (-(-CW // 8), -(-row_words // 8), n)  # a block: 8 words (256 columns) of 256 rows
        _function(_TRANSPOSE)(grid, (256,), (bits, out, np.int32(R), np.int32(C)))
    return out


def _compute_capability() -> str:
    cp = cupy_or_none()
    return "" if cp is None else str(cp.cuda.Device().compute_capability)


def _function(name: str) -> Any:
    """The kernel ``name`` of the module on the current device, compiled for sm_90a on first use."""
    cp = cupy_or_none()
    key = (cp.cuda.Device().id, name)
    fn = _functions.get(key)
    if fn is None:
        with _lock:
            fn = _functions.get(key)
            if fn is None:
                module = cp.cuda.function.Module()
                module.load(_compile_sm90a(_cuda.read_source(_SOURCE)))
                for kernel in _KERNELS:
                    f = module.get_function(kernel)
                    if kernel != _TRANSPOSE:
                        _set_max_dynamic_shared(f.ptr, SMEM_BYTES)
                    _functions[(key[0], kernel)] = f
                fn = _functions[key]
    return fn


def _compile_sm90a(source: str) -> bytes:
    """``source`` compiled by NVRTC (CuPy's binding) for sm_90a, with ``pymglu/cuda`` on the include path
    (``hopper.cuh``): the cubin."""
    from cupy_backends.cuda.libs import nvrtc

    prog = nvrtc.createProgram(source, _SOURCE, (), ())
    try:
        try:
            nvrtc.compileProgram(prog, ("-arch=sm_90a", "-std=c++17", f"-I{_cuda.source_dir()}"))
        except nvrtc.NVRTCError as e:
            raise RuntimeError(f"{_SOURCE}: NVRTC failed for sm_90a: {e}\n{nvrtc.getProgramLog(prog)}") from e
        return nvrtc.getCUBIN(prog)
    finally:
        nvrtc.destroyProgram(prog)


_CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8


def _set_max_dynamic_shared(function_ptr: int, nbytes: int) -> None:
    from cupy_backends.cuda.api import driver

    driver.funcSetAttribute(function_ptr, _CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, nbytes)


_TENSOR_MAP_TYPES = {np.dtype(bfloat16): 9, np.dtype(float16): 6}  # CU_TENSOR_MAP_DATA_TYPE_*
_SWIZZLE_128B, _L2_PROMOTION_256B, _INTERLEAVE_NONE, _OOB_FILL_ZERO = 3, 3, 0, 0


def _tensor_map(a: Any, box_rows: int) -> np.ndarray:
    """The 128-byte ``CUtensorMap`` of a row-major 16-bit ``(rows, cols)`` CuPy matrix, boxes of 64 columns
    by ``box_rows`` rows, 128-byte swizzle, zeros loaded past its edges."""
    return _encoded(int(a.data.ptr), a.shape[0], a.shape[1], _TENSOR_MAP_TYPES[np.dtype(a.dtype)], box_rows)


@functools.lru_cache(maxsize=256)
def _encoded(ptr: int, rows: int, cols: int, data_type: int, box_rows: int) -> np.ndarray:
    """The map of :func:`_tensor_map`, kept per address and shape: the memory pool hands the same
    addresses back step after step, and the map depends on nothing else. Read-only."""
    buf = np.zeros(192, dtype=np.uint8)
    off = (-buf.ctypes.data) % 64  # CUtensorMap is 64-byte aligned
    status = _encode_tiled()(
        ctypes.c_void_p(buf.ctypes.data + off), data_type, 2, ctypes.c_void_p(ptr),
        (ctypes.c_uint64 * 2)(cols, rows), (ctypes.c_uint64 * 1)(cols * 2),
        (ctypes.c_uint32 * 2)(64, box_rows), (ctypes.c_uint32 * 2)(1, 1),
        _INTERLEAVE_NONE, _SWIZZLE_128B, _L2_PROMOTION_256B, _OOB_FILL_ZERO)
    if status != 0:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed with status {status} for a ({rows}, {cols}) matrix "
                           f"of 16-bit values at {ptr:#x}")
    m = buf[off:off + 128].copy()
    m.flags.writeable = False
    return m


_encode: Any = None


def _encode_tiled() -> Any:
    global _encode
    if _encode is None:
        fn = ctypes.CDLL("libcuda.so.1").cuTensorMapEncodeTiled
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p,
                       ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint64),
                       ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint32),
                       ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
        _encode = fn
    return _encode
