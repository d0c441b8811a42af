"""Do NCCL all-reduces run beside a stream of cuBLAS products, eagerly and inside a CUDA graph?

Usage (two ranks, one GPU each; CuPy with NCCL, mpi4py and mpiexec):

    mpiexec -n 2 python benchmarks/overlap_probe.py [--products 64] [--buckets 32] [--bucket-mb 25]

A synthetic backward pass: ``--products`` bfloat16 products of ``--size``-square matrices on one stream
(through :func:`pymglu.cuda.gemm.gemm`), and ``--buckets`` float32 all-reduces of ``--bucket-mb`` MiB each,
bucket ``j`` started (on the communicator's stream, as :class:`pymglu.distributed.DataParallel` does) after
product ``j * products / buckets``; the products' stream then waits for every reduction. Timed with CUDA
events around ``--repeats`` back-to-back runs, median of ``--rounds``, per run, four ways:

* ``products``: the products alone;
* ``all-reduces``: the reductions alone;
* ``both, eager``: both, launched from Python;
* ``both, graph``: both, recorded once in a CUDA graph and replayed.

If the reductions ran beside the products, ``both`` would take about ``max(products, all-reduces)``; if
they ran after or between them, about the sum. Inputs are random (never zeros). Prints a Markdown table
on rank 0.
"""
from __future__ import annotations

import argparse
import statistics


def main(argv: list[str] | None = None) -> None:
    import cupy as cp
    import numpy as np

    from pymglu.cuda.capture import record_graph
    from pymglu.cuda.gemm import gemm
    from pymglu.distributed import init_communicator
    from pymglu.dtypes import bfloat16

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--products", type=int, default=64)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--buckets", type=int, default=32)
    p.add_argument("--bucket-mb", type=float, default=25.0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)

    comm = init_communicator("nccl")
    rng = cp.random.default_rng(comm.rank)
    n = args.size
    a = rng.standard_normal((n, n), dtype=np.float32).astype(bfloat16)
    b = rng.standard_normal((n, n), dtype=np.float32).astype(bfloat16)
    outs = [cp.empty((n, n), dtype=bfloat16) for _ in range(2)]
    buffers = [rng.standard_normal(int(args.bucket_mb * 2**20) // 4, dtype=np.float32) for _ in range(args.buckets)]
    every = max(1, args.products // args.buckets)
    stream = cp.cuda.Stream(non_blocking=True)

    def run(products: bool, reductions: bool) -> None:
        handles = []
        for i in range(args.products if products else 0):
            gemm(a, b, outs[i % 2])
            if reductions and i % every == every - 1 and len(handles) < len(buffers):
                handles.append(comm.all_reduce_sum_start(buffers[len(handles)]))
        if reductions:
            handles += [comm.all_reduce_sum_start(buf) for buf in buffers[len(handles):]]
            comm.wait_all(handles)

    def timed(fn) -> float:
        with stream:
            from cupy_backends.cuda.libs import cublas

            cublas.setStream(cp.cuda.device.get_cublas_handle(), stream.ptr)
            for _ in range(2):
                fn()
            comm.check_pending()
            stream.synchronize()
            times = []
            for _ in range(args.rounds):
                start = stream.record()
                for _ in range(args.repeats):
                    fn()
                end = stream.record()
                comm.check_pending()
                end.synchronize()
                times.append(cp.cuda.get_elapsed_time(start, end) / args.repeats)
        return statistics.median(times)

    rows = [("products", timed(lambda: run(True, False))),
            ("all-reduces", timed(lambda: run(False, True))),
            ("both, eager", timed(lambda: run(True, True)))]
    graph, _ = record_graph(stream, lambda: run(True, True))
    rows.append(("both, graph", timed(lambda: graph.launch(stream=stream))))
    if comm.rank == 0:
        print(f"{args.products} products of {n}^3 bf16, {args.buckets} all-reduces of {args.bucket_mb:g} MiB float32")
        print("| run | ms |")
        print("|---|---:|")
        for name, ms in rows:
            print(f"| {name} | {ms:.2f} |")


if __name__ == "__main__":
    main()
