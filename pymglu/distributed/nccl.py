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
do not block the host: each reduction is enqueued on the communicator's own stream after the current
stream's work (so it runs while backward goes on), and ``wait_all`` only makes the current stream wait
for it and remembers its event. :meth:`~NCCLCommunicator.check_pending` polls the remembered events on
the host (and NCCL's async error), bounded by ``timeout``, then aborts and raises as above;
:class:`~pymglu.distributed.DataParallel` calls it at the start of the next step
(:meth:`~pymglu.distributed.DataParallel.shard_batch`) and before a host read of results
(:meth:`~pymglu.distributed.DataParallel.synchronize`), i.e. before anything that could wait on a stream
held up by a reduction that never ends. (A watchdog thread cannot do this job: a main thread blocked in a
CUDA call keeps the interpreter lock.) NCCL errors raised while enqueueing (e.g.
``NCCL_ERROR_REMOTE_ERROR`` when a peer process has exited) become
:class:`~pymglu.distributed.comm.DistributedError`.
"""
from __future__ import annotations

import gc
import os
import threading
import time
import weakref
from typing import Any, Callable, Sequence

import numpy as np

from pymglu.distributed._wait import wait_until
from pymglu.distributed.comm import Communicator, DistributedError
from pymglu.distributed.mpi import DEFAULT_TIMEOUT, MPICommunicator

__all__ = ["NCCLCommunicator"]

#: how long an abort waits for ncclCommAbort once the graphs are dropped (it returns when they are destroyed).
_ABORT_JOIN_SECONDS = 30.0


class NCCLCommunicator(Communicator):
    """Collectives over NCCL on CuPy arrays (see the module docstring). Its gradient reductions can be
    recorded in a CUDA graph (``capturable``): NCCL kernels enqueued on a capturing stream become graph
    nodes, and every rank replays them in the same order.

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
        # NCCL >= 2.22 connects the peers of an algorithm at its first collective, inside the host call,
        # with no timeout: a peer that is alive but never reduces would hang that call beyond the
        # watchdog's reach. Connect everything during the (collective) init instead.
        os.environ.setdefault("NCCL_RUNTIME_CONNECT", "0")
        uid = nccl.get_unique_id() if self.rank == 0 else None
        uid = self.bootstrap.comm.bcast(uid, root=0)
        self.comm = nccl.NcclCommunicator(self.size, uid, self.rank)
        self._dtypes = {np.dtype(np.float32): nccl.NCCL_FLOAT32, np.dtype(np.float64): nccl.NCCL_FLOAT64,
                        np.dtype(np.int64): nccl.NCCL_INT64}
        self._stream: Any = None
        self._aborted = False
        self._error: DistributedError | None = None  # raised again by every later call
        self._watched: list[Any] = []  # events of reductions the host has not seen complete
        self.capturable = True
        self.confirm_first_step = True  # see Communicator: a first kernel load behind a stuck reduction hangs
        self._graph_releases: list[Callable[[], Any]] = []  # each returns the release callable or None
        # one reduction while every rank is known to be here, so that whatever NCCL still sets up lazily
        # (older versions connect at the first collective) happens now, under the watchdog
        self.all_reduce_sum_(cupy.ones(1 << 20, dtype=np.float32))

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
        """Order the current stream after every reduction in ``handles`` without blocking the host; their
        events are checked by :meth:`check_pending`."""
        self._raise_if_failed()
        stream = self._cp.cuda.get_current_stream()
        # events of a recording are not watched: its replays are (watch()). The legacy default stream never
        # captures, and is not asked: cudaStreamIsCapturing on it fails while another stream captures.
        capturing = stream.ptr != 0 and stream.is_capturing()
        for h in handles:
            if h is not None:
                stream.wait_event(h)
                if not capturing:
                    self._watched.append(h)

    def watch(self, event: Any) -> None:
        """Have :meth:`check_pending` poll ``event`` (recorded after a replayed graph's reductions)."""
        self._raise_if_failed()
        self._watched.append(event)

    def check_pending(self, in_flight: int = 0) -> None:
        """Wait on the host for the reductions handed to :meth:`wait_all` and the events handed to
        :meth:`watch`, all but the ``in_flight`` most recent ones (polled, bounded by ``timeout``, NCCL's
        async error checked); on a timeout or an error abort the communicator and raise."""
        self._raise_if_failed()
        try:
            while len(self._watched) > in_flight:
                wait_until(lambda: self._done(self._watched[0]), self.timeout,
                           f"rank {self.rank}: NCCL all-reduce")
                self._watched.pop(0)
        except DistributedError as e:
            self._error = e
            self._abort_nccl()
            raise

    def broadcast_(self, buf: Any, root: int = 0) -> Any:
        dtype = self._check(buf, "broadcast_")
        stream = self._cp.cuda.get_current_stream()
        self._enqueue("broadcast", lambda: self.comm.bcast(buf.data.ptr, buf.size, dtype, root, stream.ptr))
        self._wait(stream, "broadcast")
        return buf

    def allgather_int64(self, values: np.ndarray) -> np.ndarray:
        self._raise_if_failed()
        return self.bootstrap.allgather_int64(values)

    def register_graph_release(self, release: Callable[[], None]) -> None:
        """Register ``release()``, which drops a CUDA graph that recorded this communicator's reductions
        (a bound method is held weakly). :meth:`_abort_nccl` calls every one first: ``ncclCommAbort`` polls
        until every graph holding its kernels is destroyed, so it would never return while one exists."""
        if hasattr(release, "__self__"):
            self._graph_releases.append(weakref.WeakMethod(release))  # type: ignore[arg-type]
        else:
            self._graph_releases.append(lambda: release)

    def _abort_nccl(self) -> None:
        """``ncclCommAbort`` once (it ends kernels stuck waiting for a peer); later calls do nothing.

        With graphs registered (:meth:`register_graph_release`) the order matters. ``ncclCommAbort`` first
        raises NCCL's abort flag, which ends the stuck kernels, and then polls until every graph holding its
        kernels is destroyed; destroying a graph whose launch still runs waits for that launch to end. So
        the abort runs on a thread (CuPy releases the interpreter lock inside it), and the graphs are
        dropped here once it has begun."""
        if self._aborted:
            return
        self._aborted = True
        releases = [r for r in (ref() for ref in self._graph_releases) if r is not None]
        self._graph_releases = []
        if not releases:
            self.comm.abort()
            return
        begun = threading.Event()

        def abort() -> None:
            begun.set()
            self.comm.abort()

        worker = threading.Thread(target=abort, name="pymglu-nccl-abort", daemon=True)
        worker.start()
        begun.wait()
        time.sleep(0.1)  # let the thread enter ncclCommAbort, which raises the flag before it waits
        for release in releases:
            release()
        gc.collect()  # a graph held in a reference cycle must be gone too
        worker.join(_ABORT_JOIN_SECONDS)

    def abort(self, code: int = 1) -> None:
        self._abort_nccl()
        self.bootstrap.abort(code)
