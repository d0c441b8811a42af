"""Rank worker of test_nccl_gpu.py: data-parallel training steps replayed from a CUDA graph, rank 1 stops.

    mpiexec -n 2 python graph_stall_worker.py TIMEOUT

Both ranks train a tiny model with ``Trainer(graph=True)`` over NCCL for 4 steps (eager, recorded, two
replays); then rank 1 sleeps 4 x TIMEOUT without reducing, and rank 0 keeps stepping. A replay of rank 0
then waits in its recorded all-reduce for a peer that never comes; the next step's bounded host poll must
raise the communicator's timeout error within TIMEOUT seconds, not hang.
"""
from __future__ import annotations

import faulthandler
import sys
import time

import numpy as np

from pymglu.distributed import DataParallel, DistributedError, init_communicator
from pymglu.models import Transformer, TransformerConfig
from pymglu.models.data import split_corpus
from pymglu.models.training import Trainer, TrainSettings


def main(timeout: float) -> None:
    comm = init_communicator("nccl", timeout=timeout)
    model = Transformer(TransformerConfig(d_model=32, n_layers=1, n_heads=2, d_ff=48, ffn_kind="swimglu", n_masks=2,
                                          max_seq_len=16, dtype="bfloat16"), rng=0).to("cuda")
    dp = DataParallel(model, comm)
    dp.handshake("same")
    data = np.frombuffer(("a stalled peer must not hang the job. " * 60).encode(), dtype=np.uint8)
    train, val = split_corpus(data, 16)
    trainer = Trainer(model, TrainSettings(steps=100, batch_size=4, lr=1e-2, warmup_steps=1, eval_every=0,
                                           eval_batches=1, seed=0), train, val, parallel=dp, graph=True)
    for _ in range(4):
        trainer.train_step()
    assert trainer.graph_step.captures == 1 and trainer.graph_step.graph is not None
    print(f"rank {comm.rank}: 4 steps, the last two replayed", flush=True)
    # a hang from here on prints every thread's Python stack and ends this rank, so the test fails with the place
    # instead of running into its own time limit
    faulthandler.dump_traceback_later(10 * timeout + 10, exit=True)
    if comm.rank == 1:
        time.sleep(4 * timeout)
        return
    try:
        for _ in range(20):
            trainer.train_step(sync=False)
        trainer.flush()
    except DistributedError as e:
        print(f"rank 0 stopped: {e}", flush=True)
        comm.abort(5)
    else:
        print("rank 0 finished without an error", flush=True)


if __name__ == "__main__":
    main(float(sys.argv[1]))
