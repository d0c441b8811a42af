"""Probe: how fast does cuBLAS run the training step's three product shapes in each operand layout?

Usage (on a machine with a CUDA GPU and CuPy):

    python benchmarks/probe_gemm_layouts.py [--shapes 4096x4096x14336,4096x2048x8192,16384x2048x8192]

For one masked weight ``W`` (``h x d``), an input ``x`` (``T x d``) and an output gradient ``e``
(``T x h``), all bfloat16, the products of the training step through ``pymglu.cuda.gemm``:

* ``fwd x W^T``: the forward's ``x W^T -> (T, h)`` bfloat16 (both operands K-major, as the package);
* ``dx e W``: the backward's ``e W -> (T, d)`` float32, accumulated (as the package);
* ``dx eT^T W``: the same from ``e`` stored transposed (``h x T``);
* ``G e^T x``: the weight/logit-gradient product ``e^T x -> (h, d)`` float32 (as the package: both
  operands have the tokens as their outer dimension);
* ``G eT xT^T``: the same from ``e`` and ``x`` stored transposed (``h x T`` and ``d x T``), so that both
  operands are K-major like the forward's;
* ``transpose x``: ``x -> xT`` (``cupy.ascontiguousarray(x.T)``), the price of the second layout.

Each is timed as ``--calls`` back-to-back calls between CUDA events, median of ``--rounds``; inputs are
random normal (never zeros) and each variant's result is checked against the package layout's.
The package does not use this; a probe to decide whether it should.
"""
from __future__ import annotations

import argparse
import statistics

import cupy as cp

from pymglu.cuda.gemm import gemm
from pymglu.dtypes import bfloat16


def _time(fn, calls: int, rounds: int) -> float:
    fn()
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    times = []
    for _ in range(rounds):
        start.record()
        for _ in range(calls):
            fn()
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop) / calls)
    return statistics.median(times)


def _rel(a, b) -> float:
    a = a.astype(cp.float64)
    b = b.astype(cp.float64)
    return float(cp.linalg.norm(a - b) / cp.linalg.norm(b))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="4096x4096x14336,4096x2048x8192,16384x2048x8192", help="T x d x h, comma-separated")
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--rounds", type=int, default=9)
    args = p.parse_args(argv)
    rng = cp.random.default_rng(0)
    print("| T x d x h | product | ms | TFLOP/s | rel. diff to package layout |")
    print("|---|---|---:|---:|---:|")
    for shape in args.shapes.split(","):
        T, d, h = (int(v) for v in shape.split("x"))
        x = rng.standard_normal((T, d), dtype=cp.float32).astype(bfloat16)
        W = (rng.standard_normal((h, d), dtype=cp.float32) * 0.02).astype(bfloat16)
        e = rng.standard_normal((T, h), dtype=cp.float32).astype(bfloat16)
        eT = cp.ascontiguousarray(e.T)
        xT = cp.ascontiguousarray(x.T)
        s = cp.full((T, h), cp.nan, dtype=bfloat16)
        dx = cp.full((T, d), cp.nan, dtype=cp.float32)
        dx2 = cp.full((T, d), cp.nan, dtype=cp.float32)
        G = cp.full((h, d), cp.nan, dtype=cp.float32)
        G2 = cp.full((h, d), cp.nan, dtype=cp.float32)
        xT_out = cp.empty_like(xT)
        flop = 2.0 * T * d * h
        variants = [
            ("fwd x W^T", lambda: gemm(x, W, s, trans_b=True), None),
            ("dx e W", lambda: gemm(e, W, dx), None),
            ("dx eT^T W", lambda: gemm(eT, W, dx2, trans_a=True), (dx2, dx)),
            ("G e^T x", lambda: gemm(e, x, G, trans_a=True), None),
            ("G eT xT^T", lambda: gemm(eT, xT, G2, trans_b=True), (G2, G)),
        ]
        for name, fn, check in variants:
            ms = _time(fn, args.calls, args.rounds)
            rel = "" if check is None else f"{_rel(*check):.1e}"
            print(f"| {T} x {d} x {h} | {name} | {ms:.3f} | {flop / ms / 1e9:.0f} | {rel} |", flush=True)
        ms = _time(lambda: cp.copyto(xT_out, x.T), args.calls, args.rounds)
        print(f"| {T} x {d} x {h} | transpose x | {ms:.3f} | | |", flush=True)
        del x, W, e, eT, xT, s, dx, dx2, G, G2, xT_out
        cp.get_default_memory_pool().free_all_blocks()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
