"""How long the gradient all-reduces of one data-parallel step take on their own, on the GPUs of one host.

Usage (two ranks, one GPU each; CuPy with NCCL, mpi4py and mpiexec):

    mpiexec -n 2 python benchmarks/allreduce_probe.py --model large

Builds the model of ``benchmarks/scaling.py`` (``--model``), plans its gradient buckets as
:class:`pymglu.distributed.DataParallel` does, and times one step's worth of bucket all-reduces (each bucket's
float32 buffer, gradients plus presence flags, on the communicator's stream) with CUDA events around
``--repeats`` back-to-back steps, after ``--warmup`` of them; the median of ``--rounds`` rounds, per step.
This is the transfer a two-GPU training step has to hide behind its backward pass: scaling.py's step time
on two GPUs minus its time on one, set against this, says how much of it the backward hides. Buffers are
filled with random values (never zeros). Prints one Markdown row on rank 0.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv: list[str] | None = None) -> None:
    import cupy as cp

    from pymglu.distributed import DataParallel, init_communicator
    from pymglu.models import Transformer, TransformerConfig
    from scaling import MODELS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="large", choices=sorted(MODELS))
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)

    comm = init_communicator("nccl")
    spec = dict(MODELS[args.model])
    spec.pop("batch")
    model = Transformer(TransformerConfig(ffn_kind="swimglu", n_masks=4, dtype="bfloat16", **spec), rng=0).to("cuda")
    dp = DataParallel(model, comm)
    rng = cp.random.default_rng(comm.rank)
    buffers = [rng.standard_normal(b.numel + len(b.params), dtype=np.float32) for b in dp.buckets]
    stream = cp.cuda.get_current_stream()

    def one_step() -> None:
        comm.wait_all([comm.all_reduce_sum_start(buf) for buf in buffers])

    for _ in range(args.warmup):
        one_step()
    comm.check_pending()
    per_step = []
    for _ in range(args.rounds):
        start, end = stream.record(), None
        for _ in range(args.repeats):
            one_step()
        end = stream.record()
        comm.check_pending()
        end.synchronize()
        per_step.append(cp.cuda.get_elapsed_time(start, end) / args.repeats)
    if comm.rank == 0:
        mb = sum(buf.nbytes for buf in buffers) / 1e6
        ms = statistics.median(per_step)
        print("| model | ranks | buckets | MB per step | ms per step (median) | GB/s (algorithm) |")
        print("|---|---:|---:|---:|---:|---:|")
        print(f"| {args.model} | {comm.size} | {len(buffers)} | {mb:.1f} | {ms:.2f} | {mb / ms:.0f} |")


if __name__ == "__main__":
    main()
