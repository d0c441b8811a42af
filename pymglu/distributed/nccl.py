"""NCCL backend (``cupy.cuda.nccl``) for CuPy arrays: one process per GPU, started by ``mpiexec``.

Uses CuPy's ``cupy.cuda.nccl`` (``get_unique_id``, ``NcclCommunicator(ndev, commId, rank)``,
``allReduce``, ``bcast``, ``abort``, ``check_async_error``); tested on two H200s
(``tests/distributed/test_nccl_gpu.py``). It is imported only when an :class:`NCCLCommunicator` is created.

Bootstrap: rank 0 makes the NCCL unique id and sends it to the other ranks over MPI, so the job is
started by ``mpiexec -n <GPUs>`` exactly like the CPU backend; rank ``r`` uses GPU ``r %
cupy.cuda.runtime.getDeviceCount()`` unless a device is given. The host-side handshake
(:meth:`allgather_int64`) goes over MPI as well.

Blocking calls (:meth:`~NCCLCommunicator.all_reduce_sum_`, :meth:`~NCCLCommunicator.broadcast_`): the
collective is enqueued on the current CuPy stream, an event is recorded after it, and the host polls the
event (and ``ncclCommGetAsyncError``) until ``timeout`` seconds have passed; then the NCCL communicator is
aborted (``ncclCommAbort`` ends the stuck kernels) and
:class:`~pymglu.distributed.comm.DistributedTimeoutError` is raised.

Gradient buckets (:meth:`~NCCLCommunicator.all_reduce_sum_start`, :meth:`~NCCLCommunicator.wait_all`)
never block the host: each reduction is enqueued on the communicator's own stream after the current
stream's work (so it runs while backward goes on), and ``wait_all`` only makes the current stream wait
for it. A watchdog thread polls those events and NCCL's async error; when one is not done ``timeout``
seconds after ``wait_all``, or NCCL reports an error, the watchdog aborts the communicator (which frees
any host call stuck behind the reduction) and the next call of this communicator on the main thread
raises the error. NCCL errors raised while enqueueing (e.g. ``NCCL_ERROR_REMOTE_ERROR`` when a peer
process has exited) become :class:`~pymglu.distributed.comm.DistributedError`.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Sequence

import numpy as np

from pymglu.distributed._wait import wait_until
from pymglu.distributed.comm import Communicator, DistributedError, DistributedTimeoutError
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
        self._stream: Any = None
        self._aborted = False
        self._error: DistributedError | None = None  # set by the watchdog, raised on the main thread
        self._watched: list[tuple[Any, float]] = []  # (event, host time wait_all returned)
        self._lock = threading.Lock()
        self._watchdog: threading.Thread | None = None

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

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _enqueue(self, what: str, call: Callable[[], None]) -> None:
        """Run an NCCL enqueue call; an NCCL error aborts the communicator and becomes a DistributedError."""
        self._raise_if_failed()
        try:
            call()
        except self._nccl.NcclError as e:
            self._abort_nccl()
            raise DistributedError(f"rank {self.rank}: NCCL {what} failed ({e}): a rank died, left the training "
                                   "loop or cannot be reached; stopping") from e

    def _done(self, event: Any) -> bool:
        """Whether ``event`` has completed; raises the watchdog's error, or NCCL's async error (aborting)."""
        self._raise_if_failed()
        try:
            self.comm.check_async_error()
        except self._nccl.NcclError as e:
            self._abort_nccl()
            raise DistributedError(f"rank {self.rank}: NCCL reported an error ({e}): a rank died or cannot "
                                   "be reached; stopping") from e
        return event.done

    def _wait(self, stream: Any, what: str) -> None:
        event = stream.record()

        def done() -> bool:
            return self._done(event)

        try:
            wait_until(done, self.timeout, f"rank {self.rank}: NCCL {what}")
        except DistributedError:
            self._abort_nccl()
            raise

    def all_reduce_sum_(self, buf: Any) -> Any:
        dtype = self._check(buf, "all_reduce_sum_")
        stream = self._cp.cuda.get_current_stream()
        self._enqueue("all-reduce", lambda: self.comm.allReduce(buf.data.ptr, buf.data.ptr, buf.size, dtype,
                                                                 self._nccl.NCCL_SUM, stream.ptr))
        self._wait(stream, "all-reduce")
        return buf

    def all_reduce_sum_start(self, buf: Any) -> Any:
        """Enqueue the all-reduce on this communicator's own stream, after the work queued so far on the
        current stream (which fills ``buf``); returns an event recorded after it. The host does not wait."""
        dtype = self._check(buf, "all_reduce_sum_start")
        cp = self._cp
        if self._stream is None:
            self._stream = cp.cuda.Stream(non_blocking=True)
        self._stream.wait_event(cp.cuda.get_current_stream().record())
        self._enqueue("all-reduce", lambda: self.comm.allReduce(buf.data.ptr, buf.data.ptr, buf.size, dtype,
                                                                 self._nccl.NCCL_SUM, self._stream.ptr))
        return self._stream.record()

    def wait(self, handle: Any) -> None:
        """Order the current stream after the reduction of ``handle`` and wait on the host for it (polled,
        bounded by ``timeout``)."""
        self._raise_if_failed()
        if handle is None:
            return
        try:
            wait_until(lambda: self._done(handle), self.timeout, f"rank {self.rank}: NCCL all-reduce")
        except DistributedError:
            self._abort_nccl()
            raise
        self._cp.cuda.get_current_stream().wait_event(handle)

    def wait_all(self, handles: Sequence[Any]) -> None:
        """Order the current stream after every reduction in ``handles`` without blocking the host; the
        watchdog bounds how long they may take (module docstring)."""
        self._raise_if_failed()
        stream = self._cp.cuda.get_current_stream()
        now = time.monotonic()
        with self._lock:
            for h in handles:
                if h is not None:
                    stream.wait_event(h)
                    self._watched.append((h, now))
        if self._watchdog is None:
            self._watchdog = threading.Thread(target=self._watch, name=f"pymglu-nccl-watchdog-{self.rank}",
                                              daemon=True)
            self._watchdog.start()

    def _watch(self) -> None:
        """Watchdog thread: drop finished events; on NCCL's async error or a timeout, abort and record."""
        self._cp.cuda.Device(self.device).use()
        while self._error is None and not self._aborted:
            try:
                self.comm.check_async_error()
            except self._nccl.NcclError as e:
                self._fail(DistributedError(f"rank {self.rank}: NCCL reported an error ({e}) during a gradient "
                                            "all-reduce: a rank died or cannot be reached; stopping"))
                return
            now = time.monotonic()
            with self._lock:
                self._watched = [(ev, t0) for ev, t0 in self._watched if not ev.done]
                late = self.timeout is not None and any(now - t0 > self.timeout for _, t0 in self._watched)
            if late:
                self._fail(DistributedTimeoutError(
                    f"rank {self.rank}: NCCL all-reduce: no answer from the other ranks after {self.timeout:g} s "
                    "(a rank died, hangs, or left the training loop early); stopping instead of waiting forever"))
                return
            time.sleep(0.001 if self._watched else 0.01)

    def _fail(self, error: DistributedError) -> None:
        self._error = error
        self._abort_nccl()

    def broadcast_(self, buf: Any, root: int = 0) -> Any:
        dtype = self._check(buf, "broadcast_")
        stream = self._cp.cuda.get_current_stream()
        self._enqueue("broadcast", lambda: self.comm.bcast(buf.data.ptr, buf.size, dtype, root, stream.ptr))
        self._wait(stream, "broadcast")
        return buf

    def allgather_int64(self, values: np.ndarray) -> np.ndarray:
        self._raise_if_failed()
        return self.bootstrap.allgather_int64(values)

    def _abort_nccl(self) -> None:
        """``ncclCommAbort`` once (it ends kernels stuck waiting for a peer); later calls do nothing."""
        with self._lock:
            if self._aborted:
                return
            self._aborted = True
        self.comm.abort()

    def abort(self, code: int = 1) -> None:
        self._abort_nccl()
        self.bootstrap.abort(code)
