"""Row-major matrix products on cuBLAS with a chosen output dtype and optional accumulation.

``cupy.matmul`` writes its result in the input dtype and cannot add into an existing array; the
training path needs both: bfloat16/float16 products accumulated in a float32 buffer (``dx`` over the
``n + 1`` products, ``dW``), or written straight into a slice of a larger array. :func:`gemm` calls
``cublasGemmEx`` with float32 accumulation (``CUBLAS_COMPUTE_32F``; no TF32 for float32 inputs) on
CuPy's current stream, and can be captured in a CUDA graph when the cuBLAS handle's stream was set to
the capturing stream before the capture began.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from typing import Any, Iterator

import numpy as np

from pymglu import _checks
from pymglu.dtypes import bfloat16, float16, float32

__all__ = ["gemm", "gemm_batched"]

_CUDA_R_32F, _CUDA_R_16F, _CUDA_R_16BF = 0, 2, 14
#: alpha and beta, read by cuBLAS from host memory during the call (module constants, never written)
_ONE = np.ones((), dtype=np.float32)
_ZERO = np.zeros((), dtype=np.float32)
_CUBLAS_COMPUTE_32F = 68
_CUBLAS_GEMM_DEFAULT = -1
_CUBLAS_OP_N, _CUBLAS_OP_T = 0, 1
_DATA_TYPES = {np.dtype(float32): _CUDA_R_32F, np.dtype(float16): _CUDA_R_16F, np.dtype(bfloat16): _CUDA_R_16BF}


def _contiguous_2d(name: str, a: Any) -> None:
    _checks.check_ndim(name, a, 2)
    if not a.flags.c_contiguous:
        raise ValueError(f"{name}: expected a C-contiguous matrix, got {_checks.describe(a)} with strides {a.strides}")


def _data_types(a: Any, b: Any, out: Any) -> tuple[int, int]:
    """cuBLAS data types of the operands and of ``out``; checks that ``a`` and ``b`` share a dtype of
    float32, float16 or bfloat16 and that ``out`` has it too or is float32."""
    _checks.check_same_dtype(("a", "b"), a, b)
    in_type = _DATA_TYPES.get(np.dtype(a.dtype))
    out_type = _DATA_TYPES.get(np.dtype(out.dtype))
    if in_type is None:
        raise TypeError(f"a: expected float32, float16 or bfloat16, got {_checks.describe(a)}")
    if out_type is None or (out.dtype != a.dtype and np.dtype(out.dtype) != np.dtype(float32)):
        raise TypeError(f"out: expected {_checks.describe(a)}'s dtype or float32, got {_checks.describe(out)}")
    return in_type, out_type


def gemm(a: Any, b: Any, out: Any, *, trans_a: bool = False, trans_b: bool = False,
         accumulate: bool = False) -> Any:
    """``out = op(a) @ op(b)`` (or ``out += ...`` with ``accumulate``), all row-major CuPy matrices.

    Args:
        a: ``(M, K)``, or ``(K, M)`` with ``trans_a``; C-contiguous; float32, float16 or bfloat16.
        b: ``(K, N)``, or ``(N, K)`` with ``trans_b``; C-contiguous; same dtype as ``a``.
        out: ``(M, N)`` C-contiguous, in ``a``'s dtype or float32 (any view whose rows are contiguous
            and packed, e.g. ``big[i]`` of a 3-d array).
        accumulate: add the product to ``out`` instead of overwriting it.
    Returns:
        ``out``.
    """
    _contiguous_2d("a", a)
    _contiguous_2d("b", b)
    _contiguous_2d("out", out)
    in_type, out_type = _data_types(a, b, out)
    M, K = (a.shape[1], a.shape[0]) if trans_a else a.shape
    K2, N = (b.shape[1], b.shape[0]) if trans_b else b.shape
    if K2 != K:
        raise ValueError(f"b: expected {K} rows in op(b) to match op(a) of shape {(M, K)}, got op(b) of shape {(K2, N)}")
    _checks.check_shape("out", out, (M, N))
    if M == 0 or N == 0:
        return out
    if K == 0:
        if not accumulate:
            out.fill(0)
        return out
    beta = _ONE if accumulate else _ZERO
    with _host_pointer_handle("gemm") as handle:
        # Column-major cuBLAS sees each row-major buffer transposed: out^T = op(b)^T @ op(a)^T.
        status = _cublas_fn("cublasGemmEx")(
            handle,
            _CUBLAS_OP_T if trans_b else _CUBLAS_OP_N,
            _CUBLAS_OP_T if trans_a else _CUBLAS_OP_N,
            N, M, K,
            _ONE.ctypes.data,
            b.data.ptr, in_type, b.shape[1],
            a.data.ptr, in_type, a.shape[1],
            beta.ctypes.data,
            out.data.ptr, out_type, N,
            _CUBLAS_COMPUTE_32F, _CUBLAS_GEMM_DEFAULT,
        )
    if status != 0:
        raise RuntimeError(f"gemm: cublasGemmEx failed with status {status} for op(a) {(M, K)}, op(b) {(K, N)}, "
                           f"{_checks.describe(a)} -> {_checks.describe(out)}")
    return out


def gemm_batched(a: Any, b: Any, out: Any, *, trans_a: bool = False, trans_b: bool = False,
                 accumulate: bool = False) -> Any:
    """``out[i] = op(a[i]) @ op(b[i])`` (or ``out[i] += ...`` with ``accumulate``) for every ``i`` of a
    batch, on cuBLAS (strided batched, float32 accumulation), all C-contiguous CuPy arrays.

    Args:
        a: ``(batch, M, K)``, or ``(batch, K, M)`` with ``trans_a``; float32, float16 or bfloat16.
        b: ``(batch, K, N)``, or ``(batch, N, K)`` with ``trans_b``; or one matrix of 2 dims that every
            product of the batch shares (stride 0); same dtype as ``a``.
        out: ``(batch, M, N)`` C-contiguous, in ``a``'s dtype or float32.
        accumulate: add the products to ``out`` instead of overwriting it.

    Returns:
        ``out``.
    """
    for name, m, dims in (("a", a, 3), ("b", b, (2, 3)), ("out", out, 3)):
        _checks.check_ndim(name, m, dims)
        if not m.flags.c_contiguous:
            raise ValueError(f"{name}: expected a C-contiguous array, got {_checks.describe(m)} with strides {m.strides}")
    in_type, out_type = _data_types(a, b, out)
    batch = a.shape[0]
    shared = b.ndim == 2
    b_rows, b_cols = b.shape[-2:]
    M, K = (a.shape[2], a.shape[1]) if trans_a else a.shape[1:]
    K2, N = (b_cols, b_rows) if trans_b else (b_rows, b_cols)
    if K2 != K or (not shared and b.shape[0] != batch):
        raise ValueError(f"b: expected {batch} matrices (or one shared) with {K} rows in op(b) to match op(a) of "
                         f"shape {(M, K)}, got {_checks.describe(b)} (trans_b={trans_b})")
    _checks.check_shape("out", out, (batch, M, N))
    if batch == 0 or M == 0 or N == 0:
        return out
    if K == 0:
        if not accumulate:
            out.fill(0)
        return out
    beta = _ONE if accumulate else _ZERO
    with _host_pointer_handle("gemm_batched") as handle:
        status = _cublas_fn("cublasGemmStridedBatchedEx")(
            handle,
            _CUBLAS_OP_T if trans_b else _CUBLAS_OP_N,
            _CUBLAS_OP_T if trans_a else _CUBLAS_OP_N,
            N, M, K,
            _ONE.ctypes.data,
            b.data.ptr, in_type, b_cols, 0 if shared else b_rows * b_cols,
            a.data.ptr, in_type, a.shape[2], a.shape[1] * a.shape[2],
            beta.ctypes.data,
            out.data.ptr, out_type, N, M * N,
            batch, _CUBLAS_COMPUTE_32F, _CUBLAS_GEMM_DEFAULT,
        )
    if status != 0:
        raise RuntimeError(f"gemm_batched: cublasGemmStridedBatchedEx failed with status {status} for {batch} x "
                           f"op(a) {(M, K)}, op(b) {(K, N)}, {_checks.describe(a)} -> {_checks.describe(out)}")
    return out


@contextlib.contextmanager
def _host_pointer_handle(caller: str) -> Iterator[int]:
    """CuPy's cuBLAS handle, bound to the current stream, in host pointer mode for the block."""
    import cupy as cp
    from cupy_backends.cuda.libs import cublas

    handle = cp.cuda.device.get_cublas_handle()
    stream = cp.cuda.get_current_stream().ptr
    if cublas.getStream(handle) != stream:
        # CuPy refuses setStream while the stream captures a graph; a capture therefore sets the
        # handle's stream before it begins (see pymglu.models.graph_decoder), and this call skips it.
        try:
            cublas.setStream(handle, stream)
        except NotImplementedError as exc:
            raise RuntimeError(
                f"{caller}: the current stream is capturing a CUDA graph and the cuBLAS handle is bound to another "
                "stream; set it (cublas.setStream) to the capturing stream before the capture begins"
            ) from exc
    mode = cublas.getPointerMode(handle)
    if mode == cublas.CUBLAS_POINTER_MODE_HOST:
        yield handle
        return
    cublas.setPointerMode(handle, cublas.CUBLAS_POINTER_MODE_HOST)
    try:
        yield handle
    finally:
        cublas.setPointerMode(handle, mode)


#: ctypes argument lists of the cuBLAS functions called here (i: int, p: pointer, q: long long)
_SIGNATURES = {"cublasGemmEx": "piiiiippiipiippiiii",
               "cublasGemmStridedBatchedEx": "piiiiippiiqpiiqppiiqiii"}


@functools.lru_cache(maxsize=None)
def _cublas_fn(name: str) -> Any:
    """The function ``name`` of the cuBLAS library CuPy has loaded, called through ctypes.

    CuPy's own wrappers set the handle's stream on every call, which CuPy refuses while a stream captures
    a graph; the C functions themselves are capturable. The library is the one mapped into this process
    (CuPy loaded it for its handle), so both share one cuBLAS.
    """
    path = None
    with open("/proc/self/maps", encoding="utf-8") as maps:
        for line in maps:
            mapped = line.rsplit(maxsplit=1)[-1]
            if os.path.basename(mapped).startswith("libcublas.so"):
                path = mapped
                break
    lib = ctypes.CDLL(path) if path else None
    if lib is None:
        for candidate in ("libcublas.so.13", "libcublas.so.12", "libcublas.so"):
            try:
                lib = ctypes.CDLL(candidate)
                break
            except OSError:
                continue
    if lib is None:
        raise RuntimeError("gemm: cannot find the cuBLAS library CuPy uses (libcublas.so not loaded or found)")
    fn = getattr(lib, name)
    kinds = {"i": ctypes.c_int, "p": ctypes.c_void_p, "q": ctypes.c_longlong}
    fn.argtypes = [kinds[c] for c in _SIGNATURES[name]]
    fn.restype = ctypes.c_int
    return fn
