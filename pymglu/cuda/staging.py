"""Uploads of a replayed step's inputs that never make the host wait for the device.

A copy from pageable host memory can block the host until the stream reaches it, so a host that queues
step ``k + 1`` behind a replay that never ends (a data-parallel peer that left) would hang there, beyond
any poll. :class:`AlternatingUploads` copies each step's inputs into pinned host buffers and uploads them
asynchronously on the caller's stream. Two sets of buffers take turns; before a set is written again, the
host waits for the event recorded after its last uploads, two steps back. A caller that has already seen
that step complete (the data-parallel poll, which leaves at most one replay in flight) never waits there;
one that has not (a single process) is held at most two steps ahead of the device.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

__all__ = ["AlternatingUploads"]


class _BufferSet:
    def __init__(self) -> None:
        self.buffers: dict[int, np.ndarray] = {}  # by destination pointer
        self.event: Any = None  # recorded after this set's last uploads

    def holding(self, dst: Any, src: np.ndarray) -> np.ndarray:
        """A pinned host array shaped and typed like ``dst`` ((shape), dtype), holding ``src``."""
        import cupy as cp

        buf = self.buffers.get(dst.data.ptr)
        if buf is None or buf.shape != dst.shape or buf.dtype != dst.dtype:
            memory = cp.cuda.alloc_pinned_memory(max(dst.nbytes, 1))
            buf = np.frombuffer(memory, dtype=dst.dtype, count=dst.size).reshape(dst.shape)
            self.buffers[dst.data.ptr] = buf
        src = np.asarray(src)
        if src.shape != dst.shape:
            raise ValueError(f"upload: expected host values of shape {dst.shape}, got {src.shape}")
        np.copyto(buf, src)
        return buf


class AlternatingUploads:
    """Host values into device arrays through two alternating sets of pinned buffers (module docstring)."""

    def __init__(self) -> None:
        self._sets = (_BufferSet(), _BufferSet())
        self._turn = 0

    def upload(self, pairs: Sequence[tuple[Any, np.ndarray]], stream: Any) -> None:
        """``dst[...] = src`` for each ``(dst, src)`` (a CuPy array and host values of its shape), queued on
        ``stream``; returns without waiting for the copies."""
        chosen = self._sets[self._turn % 2]
        self._turn += 1
        if chosen.event is not None:
            chosen.event.synchronize()  # its buffers were last read by the uploads two calls back
        for dst, src in pairs:
            dst.set(chosen.holding(dst, src), stream=stream)
        chosen.event = stream.record()
