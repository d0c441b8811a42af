"""The package's masked-GEMM kernels against the cuBLAS paths they replace and against cuBLAS unmasked, in turns.

Usage (on an sm_90 GPU with CuPy):

    python benchmarks/masked_products.py [--shapes 4096x4096x14336,4096x2048x8192,16384x4096x14336] [--masks 4]

For each shape ``T x d x h`` (bfloat16, random normal inputs, never zeros), two sets of products timed in
turns, round by round:

* **forward**, one masked product ``x (M W)^T`` ``(T, h)``: :func:`pymglu.cuda.masked_gemm.masked_product`
  (``kernel``), ``apply_mask`` + cuBLAS (what the kernel replaces), and cuBLAS's unmasked ``x W^T`` (the
  rate to reach);
* **dx**, ``dv W + sum_i e_i (M_i W)`` ``(T, d)`` over ``--masks`` planes: :func:`masked_dx`'s launch on
  transposed bit-planes (``kernel``), the cuBLAS path of :mod:`pymglu.cuda.training` (``n + 1``
  products into a float32 buffer, ``apply_mask`` two planes at a time, the rounding), and ``n + 1``
  unmasked cuBLAS products of the same shape into float32 (the rate to reach).

Every variant's output is first checked against the cuBLAS path's (relative difference printed; outputs
poisoned with NaN before). Two sets of inputs are rotated; ``--calls`` back-to-back calls between CUDA
events, median of ``--rounds`` rounds. Prints one Markdown table; ``--out FILE`` also writes the rows as
JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics

import numpy as np

import cupy as cp

from pymglu import masks as mask_ops
from pymglu.cuda import masked_gemm, training
from pymglu.cuda.gemm import gemm
from pymglu.dtypes import bfloat16, float32


def _inputs(rng, T: int, d: int, h: int, n: int) -> dict:
    normal = lambda *shape: cp.asarray(rng.standard_normal(shape, dtype=np.float32)).astype(bfloat16)  # noqa: E731
    W = (cp.asarray(rng.standard_normal((h, d), dtype=np.float32)) * d ** -0.5).astype(bfloat16)
    bits = mask_ops.pack_masks(cp.asarray(rng.standard_normal((n, h, d), dtype=np.float32)))
    return {"x": normal(T, d), "dv": normal(T, h), "e": normal(n, T, h), "W": W, "bits": bits,
            "bits_t": masked_gemm.transpose_bits(bits, cp.empty((n, d, -(-h // 32)), dtype=np.uint32))}


def _forward_variants(sets: list, T: int, d: int, h: int) -> dict:
    outs = [cp.empty((T, h), dtype=bfloat16) for _ in sets]
    built = [cp.empty((1, h, d), dtype=bfloat16) for _ in sets]

    def kernel(k):
        masked_gemm.launch_unchecked(sets[k]["x"], sets[k]["W"], sets[k]["bits"][0], outs[k])

    def apply_mask_cublas(k):
        training.apply_mask(sets[k]["W"], sets[k]["bits"][:1], built[k])
        gemm(sets[k]["x"], built[k][0], outs[k], trans_b=True)

    def dense(k):
        gemm(sets[k]["x"], sets[k]["W"], outs[k], trans_b=True)

    return {"kernel": kernel, "apply_mask + cuBLAS": apply_mask_cublas, "cuBLAS unmasked": dense}, outs


def _dx_variants(sets: list, T: int, d: int, h: int, n: int) -> dict:
    outs = [cp.empty((T, d), dtype=bfloat16) for _ in sets]
    acc = [cp.empty((T, d), dtype=float32) for _ in sets]

    def kernel(k):
        s = sets[k]
        masked_gemm.launch_dx_unchecked(s["dv"], s["e"], s["W"], s["bits_t"], outs[k])

    def cublas_path(k):  # the training path's own dx (a new array per call, as there)
        s = sets[k]
        outs[k] = training._dx_by_cublas(s["dv"], s["e"], s["W"], s["bits"])

    def dense(k):
        s = sets[k]
        gemm(s["dv"], s["W"], acc[k])
        for i in range(n):
            gemm(s["e"][i], s["W"], acc[k], accumulate=True)

    return {"kernel": kernel, "apply_mask + cuBLAS": cublas_path,
            "cuBLAS unmasked": dense}, outs


def _rel(a, b) -> float:
    a, b = a.astype(cp.float64), b.astype(cp.float64)
    return float(cp.linalg.norm(a - b) / cp.linalg.norm(b))


def _check(variants: dict, outs: list, reference: str) -> dict:
    """Each variant's relative difference from ``reference``'s output on input set 0 (outputs NaN first)."""
    outs[0].fill(np.nan)
    variants[reference](0)
    want = outs[0].copy()
    diffs = {}
    for label, fn in variants.items():
        if label == "cuBLAS unmasked":
            continue
        outs[0].fill(np.nan)
        fn(0)
        diffs[label] = _rel(outs[0], want)
        assert np.isfinite(diffs[label]) and diffs[label] < 1e-2, (label, diffs[label])
    return diffs


def _time_in_turns(variants: dict, n_sets: int, calls: int, rounds: int) -> dict:
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    times = {label: [] for label in variants}
    for fn in variants.values():
        fn(0)
    for _ in range(rounds):
        for label, fn in variants.items():
            start.record()
            for c in range(calls):
                fn(c % n_sets)
            stop.record()
            stop.synchronize()
            times[label].append(cp.cuda.get_elapsed_time(start, stop) / calls)
    return {label: statistics.median(t) for label, t in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="4096x4096x14336,4096x2048x8192,16384x4096x14336")
    parser.add_argument("--masks", type=int, default=4)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    rows = []
    for shape in args.shapes.split(","):
        T, d, h = (int(v) for v in shape.split("x"))
        n = args.masks
        rng = np.random.default_rng(T + d + h)
        sets = [_inputs(rng, T, d, h, n) for _ in range(2)]
        fn = _forward_variants(sets, T, d, h)
        dx = _dx_variants(sets, T, d, h, n)
        for kind, (variants, outs), flops in (("forward", fn, 2.0 * T * d * h),
                                             ("dx", dx, 2.0 * T * d * h * (n + 1))):
            diffs = _check(variants, outs, "apply_mask + cuBLAS")
            times = _time_in_turns(variants, len(sets), args.calls, args.rounds)
            base = times["apply_mask + cuBLAS"]
            for label, ms in times.items():
                rows.append({"shape": shape, "kind": kind, "variant": label, "ms": ms,
                             "tflops": flops / ms / 1e9, "x_cublas_path": ms / base,
                             "rel_diff": diffs.get(label)})
        del sets, fn, dx
        cp.get_default_memory_pool().free_all_blocks()
    print(f"masks {args.masks}, bfloat16, {args.calls} calls x median of {args.rounds} rounds, in turns\n")
    print("| T x d x h | products | variant | ms | TFLOP/s | x apply_mask + cuBLAS | rel. diff |")
    print("|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        diff = "" if r["rel_diff"] is None else f"{r['rel_diff']:.1e}"
        print(f"| {r['shape']} | {r['kind']} | {r['variant']} | {r['ms']:.3f} | {r['tflops']:.0f} | "
              f"{r['x_cublas_path']:.3f} | {diff} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"masks": args.masks, "calls": args.calls, "rounds": args.rounds, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
