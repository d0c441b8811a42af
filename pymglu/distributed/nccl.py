"""NCCL backend (``cupy.cuda.nccl``) for CuPy arrays: one process per GPU, started by ``mpiexec``.

Uses CuPy's ``cupy.cuda.nccl`` (``get_unique_id``, ``NcclCommunicator(ndev, commId, rank)``,
``allReduce``, ``bcast``, ``abort``, ``check_async_error``); tested on two H200s
(``tests/distributed/test_nccl_gpu.py``). It is imported only when an :class:`NCCLCommunicator` is created.

Bootstrap: rank 0 makes the NCCL unique id and sends it to the other ranks over MPI, so the job is
started by ``mpiexec -n <GPUs>`` exactly like the CPU backend; rank ``r`` uses GPU ``r %
cupy.cuda.runtime.getDeviceCount()`` unless a device is given. The host-side handshake
(:meth:`allgather_int64`) goes over MPI as well.

Gradient buckets use :meth:`NCCLCommunicator.all_reduce_sum_start`: the reduction is enqueued on a
stream of its own, after the current stream's work, so that it runs while the backward pass goes on.

Timeouts: NCCL collectives are enqueued on a CUDA stream and return at once. Each call records an event
after its collective and polls it (and ``check_async_error``) until ``timeout`` seconds have passed; then
the NCCL communicator is aborted (``ncclCommAbort``, which ends the stuck kernels) and
:class:`~pymglu.distributed.comm.DistributedTimeoutError` is raised. Waiting on the event makes each call
synchronous with the host, which is also what a bucket-by-bucket reduction after backward needs.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from pymglu.distributed._wait import wait_until
from pymglu.distributed.comm import Communicator, DistributedError
from pymglu.distributed.mpi import DEFAULT_TIMEOUT, MPICommunicator

__all__ = ["NCCLCommunicator"]


class NCCLCommunicator(Communicator):
    """Collectives over NCCL on CuPy arrays (see the module docstring).

    Args:
        bootstrap: the :class:`MPICommunicator` whose ranks form the NCCL communicator (``None``: a new one
            over ``COMM_WORLD``); it carries the unique id and the handshake.
        device: the CUDA device of this rank (``None``: ``rank % device count``).
        timeout: seconds each collective may wait (``None``: forever).
    """

    def __init__(self, bootstrap: MPICommunicator | None = None, device: int | None = None,
                 timeout: float | None = DEFAULT_TIMEOUT) -> None:
        import cupy
        from cupy.cuda import nccl

        self._cp, self._nccl = cupy, nccl
        self.bootstrap = bootstrap if bootstrap is not None else MPICommunicator(timeout=timeout)
        self.rank, self.size, self.timeout = self.bootstrap.rank, self.bootstrap.size, timeout
        self.device = self.rank % cupy.cuda.runtime.getDeviceCount() if device is None else device
        cupy.cuda.Device(self.device).use()
        uid = nccl.get_unique_id() if self.rank == 0 else None
        uid = self.bootstrap.comm.bcast(uid, root=0)
        self.comm = nccl.NcclCommunicator(self.size, uid, self.rank)
        self._dtypes = {np.dtype(np.float32): nccl.NCCL_FLOAT32, np.dtype(np.float64): nccl.NCCL_FLOAT64,
                        np.dtype(np.int64): nccl.NCCL_INT64}

    def _check(self, buf: Any, where: str) -> int:
        if not isinstance(buf, self._cp.ndarray):
            raise TypeError(f"NCCLCommunicator.{where}: expected a CuPy array, got a {type(buf).__name__}")
        if buf.ndim != 1 or not buf.flags.c_contiguous or np.dtype(buf.dtype) not in self._dtypes:
            raise ValueError(f"NCCLCommunicator.{where}: expected a contiguous 1-d float32, float64 or int64 "
                             f"array, got {buf.dtype} of shape {buf.shape}")
        if buf.device.id != self.device:
            raise ValueError(f"NCCLCommunicator.{where}: array on GPU {buf.device.id}, this rank uses GPU "
                             f"{self.device}")
        return self._dtypes[np.dtype(buf.dtype)]

    def _wait(self, stream: Any, what: str) -> None:
        event = stream.record()

        def done() -> bool:
            self.comm.check_async_error()
            return event.done

        try:
            wait_until(done, self.timeout, f"rank {self.rank}: NCCL {what}")
        except DistributedError:
            self._abort_nccl()
            raise

    def all_reduce_sum_(self, buf: Any) -> Any:
        dtype = self._check(buf, "all_reduce_sum_")
        stream = self._cp.cuda.get_current_stream()
        self.comm.allReduce(buf.data.ptr, buf.data.ptr, buf.size, dtype, self._nccl.NCCL_SUM, stream.ptr)
        self._wait(stream, "all-reduce")
        return buf

    def all_reduce_sum_start(self, buf: Any) -> Any:
        """Enqueue the all-reduce on this communicator's own stream, after the work queued so far on the
        current stream (which fills ``buf``); returns an event recorded after it. The host does not wait."""
        dtype = self._check(buf, "all_reduce_sum_start")
        cp = self._cp
        if getattr(self, "_stream", None) is None:
            self._stream = cp.cuda.Stream(non_blocking=True)
        self._stream.wait_event(cp.cuda.get_current_stream().record())
        self.comm.allReduce(buf.data.ptr, buf.data.ptr, buf.size, dtype, self._nccl.NCCL_SUM, self._stream.ptr)
        return self._stream.record()

    def wait(self, handle: Any) -> None:
        """Order the current stream after the reduction of ``handle``; without blocking the host unless a
        timeout is set, in which case the host polls the event (and NCCL's async error) until it is done."""
        if handle is None:
            return
        if self.timeout is not None:
            def done() -> bool:
                self.comm.check_async_error()
                return handle.done

            try:
                wait_until(done, self.timeout, f"rank {self.rank}: NCCL all-reduce")
            except DistributedError:
                self._abort_nccl()
                raise
        self._cp.cuda.get_current_stream().wait_event(handle)

    def broadcast_(self, buf: Any, root: int = 0) -> Any:
        dtype = self._check(buf, "broadcast_")
        stream = self._cp.cuda.get_current_stream()
        self.comm.bcast(buf.data.ptr, buf.size, dtype, root, stream.ptr)
        self._wait(stream, "broadcast")
        return buf

    def allgather_int64(self, values: np.ndarray) -> np.ndarray:
        return self.bootstrap.allgather_int64(values)

    def _abort_nccl(self) -> None:
        """``ncclCommAbort`` once (it ends kernels stuck waiting for a peer); later calls do nothing."""
        if not getattr(self, "_aborted", False):
            self._aborted = True
            self.comm.abort()

    def abort(self, code: int = 1) -> None:
        self._abort_nccl()
        self.bootstrap.abort(code)
