"""Data-parallel training: gradients averaged over processes through MPI (CPU, ``mpi4py``) or NCCL (GPU,
``cupy.cuda.nccl``). See docs/distributed.md.

Neither ``mpi4py`` nor CuPy is imported until a communicator of that backend is created.

    from pymglu.distributed import DataParallel, init_communicator
    comm = init_communicator("mpi")              # under mpiexec -n 2
    dp = DataParallel(model, comm)
    dp.handshake(config_text)                    # same configuration on every rank, else DistributedError
    dp.broadcast_parameters()                    # rank 0's initial weights everywhere
    ...; loss.backward(); dp.reduce_gradients(); optimizer.step()
"""
from __future__ import annotations

from pymglu.distributed.comm import Communicator, DistributedError, DistributedTimeoutError, LocalCommunicator
from pymglu.distributed.mpi import DEFAULT_TIMEOUT, MPICommunicator, mpi_available
from pymglu.distributed.parallel import DataParallel, config_digest

__all__ = ["Communicator", "LocalCommunicator", "MPICommunicator", "DataParallel", "DistributedError",
           "DistributedTimeoutError", "config_digest", "init_communicator", "mpi_available", "BACKENDS"]

#: what :func:`init_communicator` accepts.
BACKENDS = ("auto", "mpi", "nccl", "local")


def init_communicator(backend: str = "auto", timeout: float | None = DEFAULT_TIMEOUT) -> Communicator:
    """The communicator of this process.

    Args:
        backend: ``"mpi"`` (NumPy arrays), ``"nccl"`` (CuPy arrays, one GPU per rank),
            ``"local"`` (world size 1), or ``"auto"``: MPI when ``mpi4py`` imports, else local.
        timeout: seconds a collective may wait for the other ranks (``None``: forever).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "local" or (backend == "auto" and not mpi_available()):
        return LocalCommunicator()
    if backend == "nccl":
        from pymglu.distributed.nccl import NCCLCommunicator

        return NCCLCommunicator(timeout=timeout)
    if not mpi_available():
        raise DistributedError("backend 'mpi' needs mpi4py and an MPI library: pip install -e '.[distributed]'")
    return MPICommunicator(timeout=timeout)
