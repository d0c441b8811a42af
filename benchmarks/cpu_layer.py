"""CPU step of one feed-forward layer: :mod:`pymglu.functional`'s MGLU and GLU forward + backward on NumPy.

The reference path is what the README's main job (``examples/train_lm.py`` on a machine without a GPU)
trains with. This times it at that job's layer size by default (``N = 16 x 64`` tokens, ``d = 128``,
``h = 384``) for SwiMGLU at each ``--masks`` and for SwiGLU, float32, on normal random inputs drawn once (``dy`` too),
the cache handed to the backward as the tape hands it (``consume_cache=True``). The variants take turns for
``--rounds`` rounds of ``--steps`` steps each; the median per-step time is reported, with the time spent
in the products alone (the same matrix products, timed by themselves) to show what the elementwise work costs.

Usage: ``python benchmarks/cpu_layer.py [--tokens 1024] [--d 128] [--h 384] [--masks 1,2,4,8]``
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from pymglu import functional


def _timed(fn, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--h", type=int, default=384)
    p.add_argument("--masks", default="4", help="comma list of n")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    N, d, h = args.tokens, args.d, args.h
    f32 = np.float32
    x = rng.standard_normal((N, d), dtype=f32)
    dy = rng.standard_normal((N, h), dtype=f32)
    Wg, Wv = (rng.standard_normal((h, d), dtype=f32) * d ** -0.5 for _ in range(2))

    def glu_step():
        y, cache = functional.glu_forward(x, Wg, Wv, "silu")
        return functional.glu_backward(dy, x, Wg, Wv, "silu", cache, consume_cache=True)

    def glu_products():
        gate, value = x @ Wg.T, x @ Wv.T
        return gate @ Wg + value @ Wv, gate.T @ x, value.T @ x

    variants = {"swiglu": glu_step}
    products = {"swiglu": glu_products}
    for n in (int(v) for v in args.masks.split(",")):
        masks = rng.standard_normal((n, h, d)) > 0

        def mglu_step(masks=masks):
            y, cache = functional.mglu_forward(x, Wg, masks, "silu")
            return functional.mglu_backward(dy, x, Wg, masks, "silu", cache, consume_cache=True)

        def mglu_products(masks=masks, n=n):
            t = x @ Wg.T
            for m in masks:
                masked = Wg * m
                x @ masked.T, t @ masked, t.T @ x
            return t @ Wg, t.T @ x

        variants[f"swimglu{n}"] = mglu_step
        products[f"swimglu{n}"] = mglu_products
    times = {name: [] for name in variants}
    product_times = {name: [] for name in variants}
    for fn in (*variants.values(), *products.values()):
        fn()
    for _ in range(args.rounds):
        for name in variants:
            times[name].append(_timed(variants[name], args.steps))
            product_times[name].append(_timed(products[name], args.steps))
    print(f"CPU layer step (forward + backward), N = {N}, d = {d}, h = {h}, float32, median of {args.rounds} rounds")
    print("| variant | ms per step | of which products | x SwiGLU |")
    print("|---|---:|---:|---:|")
    base = statistics.median(times["swiglu"])
    for name in variants:
        ms, prod = statistics.median(times[name]), statistics.median(product_times[name])
        print(f"| {name} | {ms:.2f} | {prod:.2f} | {ms / base:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
