"""Rank worker of test_mpi.py: rank 1 leaves early, rank 0 keeps reducing gradients.

    mpiexec -n 2 python exit_worker.py clean|crash|stall TIMEOUT [mpi|nccl]

``clean``: rank 1 returns (MPI finalizes normally) before the first all-reduce; rank 0 must raise
DistributedTimeoutError after TIMEOUT seconds (with NCCL, or the DistributedError of NCCL's report that
the peer exited), print it and end the job. ``crash``: rank 1 ends with
``os._exit(3)`` (no MPI finalize), as a killed process would; the launcher must end the job. ``stall``:
rank 1 stays alive but never reduces (sleeps 4 x TIMEOUT); rank 0 must stop with the timeout error (with
NCCL the gradient reductions do not block the host: the final blocking ``mean`` meets the error).
"""
from __future__ import annotations

import faulthandler
import os
import sys
import time

import numpy as np

from pymglu.distributed import DataParallel, DistributedError, init_communicator
from pymglu.models import Transformer, TransformerConfig


def main(mode: str, timeout: float, backend: str = "mpi") -> None:
    comm = init_communicator(backend, timeout=timeout)
    net = Transformer(TransformerConfig(vocab_size=16, d_model=8, n_layers=1, n_heads=2, d_ff=12, max_seq_len=4), rng=0)
    xp = np
    if backend == "nccl":
        import cupy as xp

        net.to("cuda")
    dp = DataParallel(net, comm)
    dp.handshake("same")
    # a hang from here on prints every thread's Python stack and ends this rank, so the test fails with the place
    # instead of running into its own time limit
    faulthandler.dump_traceback_later(10 * timeout + 10, exit=True)
    if comm.rank == 1:
        if mode == "crash":
            print(f"rank 1 crashes at {time.time():.3f}", flush=True)  # the test times the end of the job from here
            os._exit(3)
        if mode == "stall":
            time.sleep(4 * timeout)
        return
    try:
        for step in range(3):
            x, y = dp.shard_batch(np.array([[1, 2, 3], [3, 2, 1]]), np.array([[2, 3, 4], [2, 1, 0]]))
            net.loss(xp.asarray(x), xp.asarray(y)).backward()
            dp.reduce_gradients()
        dp.mean(1.0)
    except DistributedError as e:  # the timeout, or NCCL's report of a dead peer
        print(f"rank 0 stopped: {e}", flush=True)
        comm.abort(5)  # MPI_Abort may return before the launcher ends this process
    else:
        print("rank 0 finished without an error", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]), *sys.argv[3:])
