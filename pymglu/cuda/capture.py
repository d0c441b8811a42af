"""Host-to-device uploads that stay valid inside a captured CUDA graph.

A copy from host memory recorded in a graph is replayed from the same host address every time. CuPy's
``cupy.asarray(numpy_array)`` stages through its pinned-memory pool, which hands that buffer to the next
upload once the copy is done, so a replay would read whatever lies there by then. Code that uploads small
tables during a step (the pointer lists of :mod:`pymglu.cuda.optimizers`) calls :func:`upload`: outside
:func:`keeping_uploads` it is ``cupy.asarray``; inside, the host values go to a pinned buffer of their own
that the block's list keeps alive (for as long as the caller holds the list, i.e. the graph's lifetime).
:func:`record_graph` is the one place that begins and ends a capture.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterator, TypeVar

import numpy as np

__all__ = ["upload", "keeping_uploads", "record_graph"]

R = TypeVar("R")

_local = threading.local()


def upload(host: np.ndarray) -> Any:
    """``host`` (a NumPy array) as a new CuPy array on the current device, copied on the current stream."""
    import cupy as cp

    kept = getattr(_local, "kept", None)
    if kept is None:
        return cp.asarray(host)
    import cupyx

    host = np.ascontiguousarray(host)
    pinned = cupyx.empty_pinned(host.shape, host.dtype)
    pinned[...] = host
    out = cp.empty(host.shape, host.dtype)
    # the runtime call, not ndarray.set: CuPy refuses host-to-device copies on a capturing stream
    cp.cuda.runtime.memcpyAsync(out.data.ptr, pinned.ctypes.data, host.nbytes, cp.cuda.runtime.memcpyHostToDevice,
                                cp.cuda.get_current_stream().ptr)
    kept.append(pinned)
    return out


@contextlib.contextmanager
def keeping_uploads() -> Iterator[list]:
    """Within the block, :func:`upload` copies from pinned buffers that the yielded list keeps alive.

    Hold the list as long as a graph captured in the block may be replayed.
    """
    if getattr(_local, "kept", None) is not None:
        raise RuntimeError("keeping_uploads: already inside a keeping_uploads block on this thread")
    _local.kept = kept = []
    try:
        yield kept
    finally:
        _local.kept = None


def record_graph(stream: Any, body: Callable[[], R], pool: Any = None) -> tuple[Any, R]:
    """``body()`` run once under stream capture on ``stream``: returns ``(graph, body's result)``.

    cuBLAS's handle is pointed at ``stream`` first (:func:`pymglu.cuda.gemm.gemm` cannot set it while a
    capture runs). With ``pool`` (a ``cupy.cuda.MemoryPool``) every allocation of the body comes from it,
    so the graph's buffers stay reserved for its replays. When ``body`` raises, the capture is ended and
    the body's error propagates, not the invalid capture's.
    """
    import cupy as cp
    from cupy_backends.cuda.libs import cublas

    allocating = cp.cuda.using_allocator(pool.malloc) if pool is not None else contextlib.nullcontext()
    with stream, allocating:
        cublas.setStream(cp.cuda.device.get_cublas_handle(), stream.ptr)
        stream.begin_capture()
        try:
            result = body()
        except BaseException:
            with contextlib.suppress(Exception):  # the capture is invalid anyway
                stream.end_capture()
            raise
        return stream.end_capture(), result
