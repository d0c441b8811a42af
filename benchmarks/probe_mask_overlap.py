"""Probe: can ``apply_mask`` (memory-bound) run beside the cuBLAS products (compute-bound) of a training step?

Usage (on a machine with a CUDA GPU and CuPy):

    python benchmarks/probe_mask_overlap.py [--shapes 4096x4096x14336,4096x2048x8192] [--masks 4]

The forward's masked products ``s_i = x (M_i * W)^T``, ``i = 1..n`` (bfloat16), timed four ways, each as
``--calls`` back-to-back loops between CUDA events on one stream, median of ``--rounds``:

* ``no mask``: the ``n`` cuBLAS products on ``W`` itself (the floor);
* ``serial``: ``apply_mask`` then the product, mask after mask, one buffer (what the package runs);
* ``overlap g``: two buffers; a second stream of higher priority builds ``M_{i+1} * W`` with a grid of
  ``g`` blocks (``full``: the package's grid) while the first multiplies with ``M_i * W``, events ordering
  the two.

The package does not use this; a probe to decide whether it should.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import numpy as np

import cupy as cp

from pymglu import cuda as _cuda
from pymglu.cuda import training
from pymglu.cuda.gemm import gemm
from pymglu.masks import pack_masks


def apply_mask(W, plane, out, blocks):
    h, d = W.shape
    vec = training._wide_vec(W.dtype)
    fn = _cuda.get_function(training._SOURCE, training._name("apply_mask", W.dtype, vec))
    if blocks is None:
        training.apply_mask(W, plane, out)
    else:
        fn((blocks,), (training._THREADS,), (W, plane, out, np.int32(1), np.int32(h), np.int32(d), np.int32(plane.shape[-1])))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="4096x4096x14336,4096x2048x8192", help="T x d x h, comma-separated")
    p.add_argument("--masks", type=int, default=4)
    p.add_argument("--grids", default="full,132,66,33,16", help="apply_mask grids of the overlap variants")
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)
    from pymglu.dtypes import bfloat16

    main_stream = cp.cuda.Stream(non_blocking=True)
    side = cp.cuda.Stream(non_blocking=True, priority=-100)  # CUDA clamps to the greatest priority
    print("| T x d x h | n | variant | ms per n products | x no mask | apply_mask share hidden |")
    print("|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        T, d, h = (int(v) for v in shape.split("x"))
        n = args.masks
        rng = cp.random.default_rng(0)
        x = (rng.standard_normal((T, d), dtype=np.float32) * 0.5).astype(bfloat16)
        W = (rng.standard_normal((h, d), dtype=np.float32) * d ** -0.5).astype(bfloat16)
        bits = pack_masks(rng.standard_normal((n, h, d), dtype=np.float32) > 0)
        s = cp.empty((n, T, h), dtype=bfloat16)
        bufs = [cp.empty_like(W), cp.empty_like(W)]

        def no_mask():
            for i in range(n):
                gemm(x, W, s[i], trans_b=True)

        def serial():
            for i in range(n):
                gemm(x, training.apply_mask(W, bits[i], bufs[0]), s[i], trans_b=True)

        def overlap(blocks):
            def run():
                ready = [None, None]
                free = [None, None]
                with side:
                    side.wait_event(main_stream.record())  # the buffers' last readers are done
                    apply_mask(W, bits[0], bufs[0], blocks)
                    ready[0] = side.record()
                for i in range(n):
                    if i + 1 < n:
                        with side:
                            if free[(i + 1) % 2] is not None:
                                side.wait_event(free[(i + 1) % 2])
                            apply_mask(W, bits[i + 1], bufs[(i + 1) % 2], blocks)
                            ready[(i + 1) % 2] = side.record()
                    main_stream.wait_event(ready[i % 2])
                    gemm(x, bufs[i % 2], s[i], trans_b=True)
                    free[i % 2] = main_stream.record()
            return run

        variants = [("no mask", no_mask), ("serial", serial)]
        variants += [(f"overlap {g}", overlap(None if g == "full" else int(g))) for g in args.grids.split(",")]
        with main_stream:
            for name, fn in variants:  # correctness: every variant's s equals the serial one's
                s.fill(np.nan)
                fn()
                if name == "serial":
                    ref_all = s.copy()
                main_stream.synchronize()
            times = {name: [] for name, _ in variants}
            for _ in range(args.rounds):
                for name, fn in variants:
                    start, end = cp.cuda.Event(), cp.cuda.Event()
                    start.record(main_stream)
                    for _ in range(args.calls):
                        fn()
                    end.record(main_stream)
                    end.synchronize()
                    times[name].append(cp.cuda.get_elapsed_time(start, end) / args.calls)
            for name, fn in variants:
                s.fill(np.nan)
                fn()
                main_stream.synchronize()
                if name != "no mask":
                    assert bool((s == ref_all).all()), f"{name}: products differ from the serial ones"
        base = statistics.median(times["no mask"])
        ser = statistics.median(times["serial"])
        for name, _ in variants:
            m = statistics.median(times[name])
            hidden = "" if name == "no mask" else f"{100 * (ser - m) / (ser - base):.0f}%"
            print(f"| {shape} | {n} | {name} | {m:.3f} | {m / base:.3f} | {hidden} |")
        variants = times = None
        cp.get_default_memory_pool().free_all_blocks()
    return 0


if __name__ == "__main__":
    sys.exit(main())
