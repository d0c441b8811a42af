"""MPI backend (``mpi4py``) for NumPy arrays: CPU data parallelism, started by ``mpiexec -n N``.

Every collective is issued non-blocking (``Iallreduce``, ``Ibcast``, ``Iallgather``) and polled with a
deadline, so a rank that stops taking part makes the others raise
:class:`~pymglu.distributed.comm.DistributedTimeoutError` after ``timeout`` seconds instead of hanging.
A rank that *crashes* (non-zero exit, signal) is handled by the launcher: MPICH's Hydra and Open MPI's
``mpirun`` end the whole job. ``abort`` calls ``MPI_Abort``, which ends every rank.

``mpi4py`` is imported when an :class:`MPICommunicator` is created, not with :mod:`pymglu.distributed`.
"""
from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np

from pymglu.distributed._wait import wait_until
from pymglu.distributed.comm import Communicator

__all__ = ["MPICommunicator", "mpi_available"]

#: default seconds a collective may wait for the other ranks.
DEFAULT_TIMEOUT = 300.0
#: seconds :meth:`MPICommunicator.abort` leaves the launcher to forward the last output.
ABORT_GRACE = 0.5


def mpi_available() -> bool:
    """Whether ``mpi4py`` can be imported (it needs an MPI library, e.g. the ``mpich`` wheel)."""
    try:
        import mpi4py.MPI  # noqa: F401
    except ImportError:
        return False
    return True


class MPICommunicator(Communicator):
    """Collectives over an MPI communicator (default ``MPI.COMM_WORLD``) on host NumPy arrays.

    Args:
        comm: an ``mpi4py.MPI.Comm``; ``None`` for ``COMM_WORLD``.
        timeout: seconds each collective may wait (``None``: forever, then a plain blocking wait).
    """

    def __init__(self, comm: Any = None, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        from mpi4py import MPI

        self._MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.timeout = timeout

    def _check(self, buf: Any, where: str) -> np.ndarray:
        if not isinstance(buf, np.ndarray):
            raise TypeError(f"MPICommunicator.{where}: expected a NumPy array (use NCCLCommunicator for CuPy "
                            f"arrays), got a {type(buf).__name__}")
        if buf.ndim != 1 or not buf.flags.c_contiguous or buf.dtype not in (np.float32, np.float64, np.int64):
            raise ValueError(f"MPICommunicator.{where}: expected a contiguous 1-d float32, float64 or int64 "
                             f"array, got {buf.dtype} of shape {buf.shape}")
        return buf

    def _wait(self, request: Any, what: str) -> None:
        if self.timeout is None:
            request.Wait()
        else:
            wait_until(request.Test, self.timeout, f"rank {self.rank}: MPI {what}")

    def all_reduce_sum_(self, buf: Any) -> Any:
        buf = self._check(buf, "all_reduce_sum_")
        self._wait(self.comm.Iallreduce(self._MPI.IN_PLACE, buf, op=self._MPI.SUM), "all-reduce")
        return buf

    def all_reduce_sum_start(self, buf: Any) -> Any:
        buf = self._check(buf, "all_reduce_sum_start")
        return self.comm.Iallreduce(self._MPI.IN_PLACE, buf, op=self._MPI.SUM)

    def wait(self, handle: Any) -> None:
        if handle is not None:
            self._wait(handle, "all-reduce")

    def broadcast_(self, buf: Any, root: int = 0) -> Any:
        buf = self._check(buf, "broadcast_")
        self._wait(self.comm.Ibcast(buf, root=root), "broadcast")
        return buf

    def allgather_int64(self, values: np.ndarray) -> np.ndarray:
        send = np.ascontiguousarray(values, dtype=np.int64).reshape(-1)
        recv = np.empty((self.size, send.size), dtype=np.int64)
        self._wait(self.comm.Iallgather(send, recv), "all-gather")
        return recv

    def abort(self, code: int = 1) -> None:
        """``MPI_Abort`` after flushing stdout and stderr and waiting ``ABORT_GRACE`` seconds: the launcher
        forwards a rank's output asynchronously, and an immediate abort can tear the job down before the
        error message that explains it has reached the terminal."""
        sys.stdout.flush()
        sys.stderr.flush()
        time.sleep(ABORT_GRACE)
        self.comm.Abort(code)
