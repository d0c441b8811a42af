"""Probe for issue 4: how far the training epilogues (``mglu_train.cu``) are from the bandwidth, and why.

Times the four elementwise epilogues of the fused training path on CuPy arrays of one layer's step
(bfloat16, T x h activations, n masks), each compiled three ways from the package's own sources:

* ``library``: the kernels as the package builds them (since stop 27: ``sigmoidf_`` in common.cuh with
  ``__fdividef``, one approximate reciprocal, and the activation a compile-time constant in each loop);
* ``IEEE division``: the same source with ``sigmoidf_`` computing ``1 / (1 + e^-s)`` with the IEEE
  division, as before stop 27, to see how much of the time is the activation's arithmetic;

and each with the activation SiLU (the one the benchmarks train) and ReLU (no transcendental: the
kernels' memory-bound floor for the same bytes). The inputs are random normals, outputs poisoned with
NaN before the first call; the IEEE variant's outputs are compared with the library's (largest difference
in units of the output's last place). Timing: ``--calls`` back-to-back launches between CUDA events, the
variants taking turns, median of ``--rounds`` rounds; effective bandwidth counts each kernel's minimal
bytes (every input read once, every output written once).

Usage on a GPU machine: ``python benchmarks/probe_epilogues.py [--tokens 4096 --hidden 14336 --masks 4]``.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np

import cupy as cp

from pymglu import cuda as pcuda
from pymglu.cuda import training
from pymglu.dtypes import bfloat16

SOURCE_DIR = Path(pcuda.__file__).parent
IEEE_SIGMOID = "__device__ __forceinline__ float sigmoidf_(float s) { return 1.0f / (1.0f + __expf(-s)); }"
FAST_SIGMOID = "__device__ __forceinline__ float sigmoidf_(float s) { return __fdividef(1.0f, 1.0f + __expf(-s)); }"
KERNELS = ("mglu_epilogue_fwd", "mglu_epilogue_bwd", "glu_epilogue_fwd", "glu_epilogue_bwd")
WRITES = {"mglu_epilogue_fwd": ("y",), "mglu_epilogue_bwd": ("e", "dvs"), "glu_epilogue_fwd": ("y",),
          "glu_epilogue_bwd": ("dg", "dv")}


def build(ieee: bool):
    """The four bfloat16 epilogues, VEC 8, from the package's sources (the IEEE sigmoid when ``ieee``)."""
    common = (SOURCE_DIR / "common.cuh").read_text()
    if ieee:
        if FAST_SIGMOID not in common:
            raise RuntimeError("common.cuh's sigmoidf_ changed; update the probe")
        common = common.replace(FAST_SIGMOID, IEEE_SIGMOID)
    tmp = Path(tempfile.mkdtemp())
    (tmp / "common.cuh").write_text(common)
    names = [f"pymglu::{k}<__nv_bfloat16, 8>" for k in KERNELS]
    module = cp.RawModule(code=(SOURCE_DIR / "mglu_train.cu").read_text(), options=("-std=c++17", f"-I{tmp}"),
                          name_expressions=names)
    return {k: module.get_function(name) for k, name in zip(KERNELS, names)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=14336)
    p.add_argument("--masks", type=int, default=4)
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)
    T, h, n = args.tokens, args.hidden, args.masks
    nh = T * h
    rng = np.random.default_rng(0)

    def normal(shape):
        return cp.asarray(rng.standard_normal(shape, dtype=np.float32).astype(bfloat16))

    t, dy, gate, value = normal((nh,)), normal((nh,)), normal((nh,)), normal((nh,))
    s = normal((n, nh))
    outs = {k: cp.full(shape, np.nan, dtype=bfloat16) for k, shape in
            (("y", (nh,)), ("e", (n, nh)), ("dvs", (nh,)), ("dg", (nh,)), ("dv", (nh,)))}
    item = 2
    kernel_bytes = {"mglu_epilogue_fwd": (n + 2) * nh * item, "mglu_epilogue_bwd": (2 * n + 3) * nh * item,
                    "glu_epilogue_fwd": 3 * nh * item, "glu_epilogue_bwd": 5 * nh * item}
    builds = {"library": build(False), "IEEE division": build(True)}
    blocks = min(-(-nh // 8 // training._THREADS), pcuda.multiprocessor_count() * 16)

    def launcher(fns, kernel, act):
        a = np.int32(act)
        args = {"mglu_epilogue_fwd": (t, s, outs["y"], np.int32(n), np.int64(nh), a),
                "mglu_epilogue_bwd": (dy, t, s, outs["e"], outs["dvs"], np.int32(n), np.int64(nh), a),
                "glu_epilogue_fwd": (gate, value, outs["y"], np.int64(nh), a),
                "glu_epilogue_bwd": (dy, gate, value, outs["dg"], outs["dv"], np.int64(nh), a)}[kernel]
        return lambda: fns[kernel]((blocks,), (training._THREADS,), args)

    acts = {"silu": 0, "relu": 3}
    print(f"# T={T}, h={h}, n={n}, bfloat16; ms per call (median of {args.rounds} rounds), TB/s on minimal bytes")
    print("| kernel | activation | library | IEEE division | largest difference (ulp) | library TB/s |")
    print("|---|---|---:|---:|---:|---:|")
    start, end = cp.cuda.Event(), cp.cuda.Event()
    for kernel in KERNELS:
        for act_name, act in acts.items():
            results = {}
            for label, fns in builds.items():
                for o in outs.values():
                    o.fill(np.nan)
                launcher(fns, kernel, act)()
                results[label] = [cp.asnumpy(outs[name]).astype(np.float32) for name in WRITES[kernel]]
                if not all(np.isfinite(r).all() for r in results[label]):
                    raise RuntimeError(f"{kernel} ({label}, {act_name}) left outputs unwritten or not finite")
            ulp = 0.0
            for a, b in zip(results["library"], results["IEEE division"]):
                # the spacing of bfloat16 at |a|: 2^(exponent - 7)
                spacing = np.exp2(np.floor(np.log2(np.maximum(np.abs(a), 1e-30))) - 7)
                ulp = max(ulp, float(np.max(np.abs(a - b) / spacing)))
            times = {label: [] for label in builds}
            calls = {label: launcher(fns, kernel, act) for label, fns in builds.items()}
            for fn in calls.values():
                fn()
            for _ in range(args.rounds):
                for label, fn in calls.items():
                    start.record()
                    for _ in range(args.calls):
                        fn()
                    end.record()
                    end.synchronize()
                    times[label].append(cp.cuda.get_elapsed_time(start, end) / args.calls)
            med = {label: statistics.median(v) for label, v in times.items()}
            tbs = kernel_bytes[kernel] / (med["library"] * 1e-3) / 1e12
            print(f"| {kernel} | {act_name} | {med['library']:.3f} | {med['IEEE division']:.3f} | {ulp:.1f} | {tbs:.2f} |",
                  flush=True)
    copy = cp.empty((n + 1) * nh, dtype=bfloat16)
    src = cp.concatenate([t, s.ravel()])
    start.record()
    for _ in range(args.calls):
        copy[...] = src
    end.record()
    end.synchronize()
    ms = cp.cuda.get_elapsed_time(start, end) / args.calls
    print(f"# device copy of {(n + 1) * nh * item / 1e6:.0f} MB: {ms:.3f} ms, {2 * (n + 1) * nh * item / ms / 1e9:.2f} TB/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
