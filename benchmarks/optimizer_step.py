"""Optimizer-step benchmark: AdamW (and SGD) on the parameters of one feed-forward block, on the GPU.

Usage (on a machine with a CUDA GPU and CuPy):

    python benchmarks/optimizer_step.py --out-dir bench_out     # d 4096, h 14336 and d 2048, h 8192
    python benchmarks/optimizer_step.py --shapes 2048x8192 --masks 4

Per shape ``d x h`` it builds two bfloat16 :class:`pymglu.nn.FeedForward` blocks, SwiGLU and SwiMGLU
with ``n`` masks (``up`` + ``down``: SwiGLU holds ``3hd`` weights, SwiMGLU ``2hd`` weights and ``nhd``
float32 mask logits), gives every parameter a random gradient (float32 for the bfloat16 weights, as
the fused training path returns them) and times ``optimizer.step()``:

* ``fused``: :mod:`pymglu.cuda.optimizers`, one kernel per parameter (the default on CuPy); for mask
  logits the same kernel writes the sign bit-planes that the next forward reads;
* ``unfused``: the same optimizer with that module disabled, i.e. a chain of CuPy array expressions per
  parameter (what ran before the fused kernels; the step also leaves the packing of the new logits
  to the next forward, which ``+ pack`` adds).

Each variant runs 3 warm-up steps, then ``--reps`` timed groups of ``--steps`` back-to-back steps
between CUDA events, the variants interleaved; median ms per step. ``GB`` counts the minimal traffic of
one AdamW step: per bfloat16 weight the parameter (read, write), the float32 master and both moments
(read, write) and the float32 gradient (read), 30 bytes; per float32 logit 28 bytes, plus the written
bits. The parameters together are about 5x the 50 MB L2 at the smaller shape, so every step reads
HBM. Writes ``optimizer_step.md`` / ``.json`` into ``--out-dir``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from pathlib import Path

import numpy as np

import cupy as cp

from pymglu import masks as mask_ops
from pymglu.dtypes import bfloat16
from pymglu.nn import FeedForward
from pymglu.optim import SGD, AdamW

try:
    from pymglu.cuda import optimizers as fused_optimizers
except ImportError:  # an older checkout without the fused kernels
    fused_optimizers = None


def build(kind: str, d: int, h: int, n: int | None, seed: int) -> tuple[FeedForward, list]:
    """A bfloat16 block on the GPU whose parameters all carry random gradients."""
    block = FeedForward(d, h, kind=kind, n_masks=n, dtype=bfloat16, rng=seed)
    block.to("cuda")
    rng = cp.random.default_rng(seed)
    params = block.parameters()
    for p in params:
        p.grad = (rng.standard_normal(p.shape, dtype=cp.float32) * 1e-3)
    return block, params


def step_bytes(params: list, optimizer: str) -> float:
    """Minimal bytes one step moves (see the module docstring)."""
    total = 0.0
    for p in params:
        size = int(np.prod(p.shape))
        if np.dtype(p.dtype).itemsize == 2:
            total += size * (30 if optimizer == "adamw" else 2 + 2 + 8 + 4 + 8)
        else:
            total += size * (28 if optimizer == "adamw" else 4 + 4 + 8 + 4)
    return total


def time_steps(fn, steps: int, reps: int) -> list[float]:
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    out = []
    for _ in range(reps):
        start.record()
        for _ in range(steps):
            fn()
        stop.record()
        stop.synchronize()
        out.append(cp.cuda.get_elapsed_time(start, stop) / steps)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="4096x14336,2048x8192", help="d x h, comma separated")
    p.add_argument("--masks", type=int, default=4)
    p.add_argument("--optimizers", default="adamw,sgd")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--out-dir", default="bench_out")
    args = p.parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    rows = []
    for shape in args.shapes.split(","):
        d, h = (int(v) for v in shape.split("x"))
        for opt_name in args.optimizers.split(","):
            for kind, n in (("swiglu", None), ("swimglu", args.masks)):
                block, params = build(kind, d, h, n, seed=d + h)
                make = (lambda ps: AdamW(ps, lr=1e-4, weight_decay=0.01)) if opt_name == "adamw" else \
                    (lambda ps: SGD(ps, lr=1e-4, momentum=0.9, weight_decay=0.01))
                opt = make(params)
                logits = [p for p in params if np.dtype(p.dtype) == np.float32 and len(p.shape) == 3]

                def unfused_step(opt=opt, logits=logits):
                    with fused_optimizers.disabled() if fused_optimizers else contextlib.nullcontext():
                        opt.step()
                    for lg in logits:  # the next forward packs the new logits
                        mask_ops.pack_masks(lg.data)

                variants = {"unfused + pack" if logits else "unfused": unfused_step}
                if fused_optimizers is not None:
                    def fused_step(opt=opt, block=block):
                        opt.step()
                        if kind == "swimglu":
                            block.up._current_packed()  # adopts the bits the step wrote (no pack)
                    variants["fused"] = fused_step
                times = {k: [] for k in variants}
                for fn in variants.values():
                    for _ in range(3):
                        fn()
                for _ in range(3):
                    for label, fn in variants.items():
                        times[label] += time_steps(fn, args.steps, max(1, args.reps // 3 + 1))
                gb = step_bytes(params, opt_name) / 1e9
                for label, ts in times.items():
                    ms = statistics.median(ts)
                    rows.append({"d": d, "h": h, "optimizer": opt_name, "model": kind, "n": n, "variant": label,
                                 "ms": ms, "GB": gb, "TB/s": gb / ms})
                    print(f"| {d} | {h} | {opt_name} | {kind} | {n or ''} | {label} | {ms:.3f} | {gb:.2f} | "
                          f"{gb / ms:.2f} |", flush=True)
                del block, params, opt
                cp.get_default_memory_pool().free_all_blocks()

    header = "| d | h | optimizer | model | n | variant | ms/step | GB (minimal) | TB/s |\n|---:|---:|---|---|---:|---|---:|---:|---:|\n"
    lines = [f"| {r['d']} | {r['h']} | {r['optimizer']} | {r['model']} | {r['n'] or ''} | {r['variant']} | "
             f"{r['ms']:.3f} | {r['GB']:.2f} | {r['TB/s']:.2f} |" for r in rows]
    (out_dir / "optimizer_step.md").write_text(header + "\n".join(lines) + "\n")
    (out_dir / "optimizer_step.json").write_text(json.dumps(rows, indent=1))
    print(header + "\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
