"""Are the training step's cuBLAS products slower when replayed from a CUDA graph than when launched eagerly?

In stop 37's first ``train_layer.py`` run SwiGLU's layer step was 3.4% faster replayed than eager
(d = 4096, T = 4096) but the MGLU step 1.3% slower, so the replayed ratio (the one issue 4 is judged on)
came out 2.71x against 2.58x eager. This probe times, at one (T, d, h) and n = 4, each kind of product
the step runs (``pymglu.cuda.gemm``), and the whole SwiGLU and MGLU steps, three ways in turns:

* ``eager``: the calls launched from Python, ten of them between two CUDA events;
* ``graph``: the same calls captured once (``pymglu.cuda.capture.record_graph``, a private memory pool)
  and replayed;
* ``graph+ws``: captured after ``cublasSetWorkspace`` gave cuBLAS a ``--workspace-mib`` buffer of ours
  (``cublasSetStream``, which the capture calls, resets the handle to cuBLAS's default workspace).

Usage (GPU machine): ``python benchmarks/probe_graph_products.py [--shape 4096x4096x14336] [--rounds 15]``, or
both shapes with ``bash benchmarks/gpu_visit.sh graph-probe``. Prints one Markdown table: milliseconds per call
(median over rounds), and each graph column against eager. Stop 37's answer (results_stop37_probes_h200.md):
replayed products are 2-4% faster than eager ones (the batched one level at d = 4096), the workspace changes
nothing, and replaying moves SwiGLU's step by -1.0 to -1.8% and the MGLU steps by +0.8 to -3.1%: the first
run's gap between the two was within the spread of a run, not something the graph does to MGLU.
"""
from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cupy as cp  # noqa: E402

from pymglu import functional, masks as mask_ops  # noqa: E402
from pymglu.cuda import gemm as gemm_mod, masked_gemm  # noqa: E402
from pymglu.cuda.capture import record_graph  # noqa: E402
from pymglu.cuda.gemm import gemm, gemm_batched  # noqa: E402
from pymglu.dtypes import bfloat16  # noqa: E402


def set_workspace(buffer) -> None:
    """cuBLAS's handle (CuPy's) given ``buffer`` as its workspace on its current stream."""
    gemm_mod._cublas_fn("cublasGemmEx")  # makes sure CuPy's cuBLAS is loaded, then finds it
    lib = None
    with open("/proc/self/maps", encoding="utf-8") as maps:
        for line in maps:
            mapped = line.rsplit(maxsplit=1)[-1]
            if Path(mapped).name.startswith("libcublas.so"):
                lib = ctypes.CDLL(mapped)
                break
    if lib is None:
        raise RuntimeError("probe_graph_products: libcublas.so is not mapped into this process")
    setter = lib.cublasSetWorkspace_v2
    setter.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    setter.restype = ctypes.c_int
    status = setter(cp.cuda.device.get_cublas_handle(), buffer.data.ptr, buffer.nbytes)
    if status != 0:
        raise RuntimeError(f"cublasSetWorkspace_v2 failed with status {status}")


def graph_of(body, calls: int, workspace=None):
    """``body`` run ``calls`` times under one capture (after giving cuBLAS ``workspace``, if any); returns a
    callable that replays the graph on the current stream."""
    body()
    cp.cuda.Device().synchronize()
    stream, pool = cp.cuda.Stream(non_blocking=True), cp.cuda.MemoryPool()

    def captured():
        if workspace is not None:
            set_workspace(workspace)
        for _ in range(calls):
            body()

    graph, _ = record_graph(stream, captured, pool)

    def replay(graph=graph, pool=pool):
        graph.launch(stream=cp.cuda.get_current_stream())

    return replay


def time_turns(variants: dict, per_launch: dict, rounds: int) -> dict:
    """Median ms per call of each variant; ``per_launch[name]`` calls happen in one launch of it."""
    for fn in variants.values():
        fn()
    cp.cuda.Device().synchronize()
    start, end = cp.cuda.Event(), cp.cuda.Event()
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            launches = max(1, 10 // per_launch[name])
            start.record()
            for _ in range(launches):
                fn()
            end.record()
            end.synchronize()
            times[name].append(cp.cuda.get_elapsed_time(start, end) / (launches * per_launch[name]))
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="4096x4096x14336", help="T x d x h")
    p.add_argument("--masks", type=int, default=4)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--group", type=int, default=10, help="products per captured graph (a step graph holds one step)")
    p.add_argument("--workspace-mib", type=int, default=32)
    args = p.parse_args(argv)
    T, d, h = (int(v) for v in args.shape.split("x"))
    n = args.masks
    rng = np.random.default_rng(0)

    def randn(*shape, scale=1.0):
        return cp.asarray((rng.standard_normal(shape, dtype=np.float32) * scale).astype(bfloat16))

    x, W, Wv, dy = randn(T, d), randn(h, d, scale=d ** -0.5), randn(h, d, scale=d ** -0.5), randn(T, h)
    e = randn(n, T, h)
    out_th = cp.empty((T, h), dtype=bfloat16)
    dx32 = cp.asarray(rng.standard_normal((T, d), dtype=np.float32))
    dW32 = cp.empty((h, d), dtype=cp.float32)
    G = cp.empty((n, h, d), dtype=bfloat16)
    given = mask_ops.pack_masks(cp.asarray(rng.standard_normal((n, h, d), dtype=np.float32)))
    workspace = cp.empty(args.workspace_mib << 20, dtype=cp.uint8)

    def glu_step():
        _, cache = functional.glu_forward(x, W, Wv, "silu")
        return functional.glu_backward(dy, x, W, Wv, "silu", cache, consume_cache=True)

    def mglu_step():
        _, cache = functional.mglu_forward(x, W, given, "silu")
        return functional.mglu_backward(dy, x, W, given, "silu", cache, consume_cache=True)

    def mglu_apply_mask_step():
        with masked_gemm.disabled():
            return mglu_step()

    bodies = {
        "x W^T -> bf16 (forward)": (lambda: gemm(x, W, out_th, trans_b=True), args.group),
        "e W -> fp32 += (dx)": (lambda: gemm(e[0], W, dx32, accumulate=True), args.group),
        "e^T x -> fp32 (dW)": (lambda: gemm(e[0], x, dW32, trans_a=True), args.group),
        f"{n} x e^T x -> bf16 (batched dlogits)": (lambda: gemm_batched(e, x, G, trans_a=True), args.group),
        "SwiGLU step": (glu_step, 1),
        f"MGLU n={n} step": (mglu_step, 1),
        f"MGLU n={n} step, apply_mask": (mglu_apply_mask_step, 1),
    }
    print(f"| {T} x {d} x {h}, n = {n} | eager ms | graph ms | graph+ws ms | graph / eager | graph+ws / eager |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, (body, calls) in bodies.items():
        variants = {"eager": body, "graph": graph_of(body, calls), "graph+ws": graph_of(body, calls, workspace)}
        per = {"eager": 1, "graph": calls, "graph+ws": calls}
        ms = time_turns(variants, per, args.rounds)
        print(f"| {label} | {ms['eager']:.3f} | {ms['graph']:.3f} | {ms['graph+ws']:.3f} | "
              f"{ms['graph'] / ms['eager']:.3f} | {ms['graph+ws'] / ms['eager']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
