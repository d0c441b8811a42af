"""Host time of the autograd tape itself: tiny ops, so that the arithmetic costs next to nothing.

Usage:

    python benchmarks/tape_overhead.py [--device cpu|cuda] [--reps 2000]

Times ``y = (a * b) + a; y.sum().backward()`` on 2 x 2 float32 Tensors: four tape ops forward and their
backward. Prints the median over 9 rounds of the microseconds per iteration (wall clock; on ``cuda``
the device is synchronised before each round's clock stops, and the kernels are too small to matter).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--reps", type=int, default=2000)
    args = p.parse_args(argv)
    from pymglu.autograd import Tensor, ops

    if args.device == "cuda":
        import cupy as xp

        sync = xp.cuda.Device().synchronize
    else:
        xp, sync = np, (lambda: None)
    a = Tensor(xp.ones((2, 2), dtype=np.float32), requires_grad=True)
    b = Tensor(xp.ones((2, 2), dtype=np.float32), requires_grad=True)

    def run() -> float:
        sync()
        start = time.perf_counter()
        for _ in range(args.reps):
            y = ops.add(ops.mul(a, b), a)
            y.sum().backward()
        sync()
        return (time.perf_counter() - start) / args.reps * 1e6

    for _ in range(3):
        run()
    print(f"{args.device}: {statistics.median(run() for _ in range(9)):.1f} us per iteration "
          "(mul, add, sum forward and backward)")


if __name__ == "__main__":
    sys.exit(main())
