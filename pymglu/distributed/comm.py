"""The :class:`Communicator` interface that :mod:`pymglu.distributed` reduces gradients through, and the
one-process :class:`LocalCommunicator`.

A communicator moves contiguous 1-d arrays between the ``size`` processes of a job (ranks ``0 .. size-1``).
Every collective call must be made by every rank, in the same order, with arrays of the same length and
dtype. Backends: :class:`pymglu.distributed.mpi.MPICommunicator` (NumPy arrays, ``mpi4py``) and
:class:`pymglu.distributed.nccl.NCCLCommunicator` (CuPy arrays, ``cupy.cuda.nccl``).
"""
from __future__ import annotations

import abc
from typing import Any, Callable, Sequence

import numpy as np

__all__ = ["DistributedError", "DistributedTimeoutError", "Communicator", "LocalCommunicator"]


class DistributedError(RuntimeError):
    """The ranks of a job disagree (world size, configuration) or a collective failed."""


class DistributedTimeoutError(DistributedError):
    """A collective did not complete within the communicator's timeout: a rank died, hangs, or stopped
    taking part (e.g. it left the training loop early)."""


class Communicator(abc.ABC):
    """Collectives over the ranks of one job.

    Attributes:
        rank: this process's index, ``0 <= rank < size``.
        size: number of processes (the world size).
        timeout: seconds a collective may wait for the other ranks before raising
            :class:`DistributedTimeoutError` (``None``: wait forever); what is bounded depends on the backend.
        capturable: whether the gradient reductions (:meth:`all_reduce_sum_start`, :meth:`wait_all`) may
            be recorded in a CUDA graph and replayed (:class:`pymglu.models.GraphTrainStep`); a replay's
            reductions are then watched through :meth:`watch`.
        confirm_first_step: whether :class:`~pymglu.distributed.DataParallel` must see the reductions of its
            first step complete on the host (bounded by ``timeout``) before that step goes on, and start none
            of them during that step's backward. True for NCCL: a step's kernels are loaded at their first
            launch, and loading a module (``cuModuleLoadData``) waits for the device, so a kernel first
            launched behind a reduction that never ends (a peer that left) would hang the host where no
            poll reaches it. After one complete step every kernel of a step is loaded.
    """

    rank: int
    size: int
    timeout: float | None
    capturable: bool = False
    confirm_first_step: bool = False

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0 (the rank that prints and writes checkpoints)."""
        return self.rank == 0

    @abc.abstractmethod
    def all_reduce_sum_(self, buf: Any) -> Any:
        """Replace the 1-d contiguous ``buf`` (float32 or float64) by the element-wise sum of every rank's
        ``buf``, in place; returns ``buf``."""

    def all_reduce_sum_start(self, buf: Any) -> Any:
        """Start :meth:`all_reduce_sum_` on ``buf`` and return a handle for :meth:`wait`; ``buf`` must not be
        touched until then. Every rank must start its reductions in the same order. The default runs the
        reduction at once (backends override it to return immediately)."""
        self.all_reduce_sum_(buf)
        return None

    def wait(self, handle: Any) -> None:
        """Finish the reduction started with ``handle`` (bounded by ``timeout`` like the blocking calls)."""

    def wait_all(self, handles: Sequence[Any]) -> None:
        """Finish every reduction in ``handles``: afterwards their buffers hold the sums for all later work
        (on a GPU: for later work on the current stream; the host need not block). Default: :meth:`wait`
        on each."""
        for h in handles:
            self.wait(h)

    def check_pending(self, in_flight: int = 0) -> None:
        """Wait on the host, bounded by ``timeout``, for reductions that :meth:`wait_all` left running and
        events handed to :meth:`watch`, all but the ``in_flight`` most recent ones (nothing for backends
        whose ``wait_all`` blocks); raise if one failed or timed out."""

    def watch(self, event: Any) -> None:
        """Have :meth:`check_pending` wait for ``event`` too: a device event recorded after reductions that
        no :meth:`wait_all` of this process handed over (those of a replayed CUDA graph). Default: nothing
        (backends whose reductions block)."""

    def register_graph_release(self, release: Callable[[], None]) -> None:
        """Register ``release()``, which drops a CUDA graph that records this communicator's reductions.
        Backends whose abort waits until such graphs are destroyed (NCCL's ``ncclCommAbort`` does) call it
        first. A bound method is held weakly. Default: nothing (no backend without graphs needs it)."""

    @abc.abstractmethod
    def broadcast_(self, buf: Any, root: int = 0) -> Any:
        """Overwrite the 1-d contiguous ``buf`` on every rank with ``root``'s values, in place; returns it."""

    @abc.abstractmethod
    def allgather_int64(self, values: np.ndarray) -> np.ndarray:
        """Host int64 vector ``(k,)`` of every rank -> ``(size, k)`` int64 array (row ``r`` from rank ``r``);
        ``k`` must be the same on every rank. Used by the startup handshake."""

    @abc.abstractmethod
    def abort(self, code: int = 1) -> None:
        """End every process of the job (this one included) with exit status ``code``; does not return."""


class LocalCommunicator(Communicator):
    """The world of one process: every collective is the identity. Lets the same training code run
    without MPI (and resume a multi-rank checkpoint at world size 1)."""

    capturable = True  # nothing to record

    def __init__(self) -> None:
        self.rank, self.size, self.timeout = 0, 1, None

    def all_reduce_sum_(self, buf: Any) -> Any:
        return buf

    def broadcast_(self, buf: Any, root: int = 0) -> Any:
        if root != 0:
            raise ValueError(f"broadcast_: root {root} is not a rank of a world of size 1")
        return buf

    def allgather_int64(self, values: np.ndarray) -> np.ndarray:
        return np.asarray(values, dtype=np.int64).reshape(1, -1).copy()

    def abort(self, code: int = 1) -> None:
        raise SystemExit(code)
