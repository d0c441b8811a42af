"""Training-step benchmark of one gated layer: fused MGLU (n + 1 scheme) against SwiGLU and a naive MGLU.

Usage (on a machine with a CUDA GPU and CuPy):

    python benchmarks/train_layer.py --out-dir bench_out          # the issue's sweep
    python benchmarks/train_layer.py --quick                      # one shape, T = 4096, n in {1, 4}
    python benchmarks/train_layer.py --tokens 16384 --masks 4     # a subset (also --shapes 4096x14336)

One step = forward and backward of the layer on ``T`` tokens in bfloat16 (``y``, then ``dx``, ``dW`` and,
for MGLU, the mask-logit gradients, bfloat16 like ``dW``; MGLU also packs its logits into bit-planes every step, as
training does). Variants, all in the same run:

* ``mglu``: :mod:`pymglu.functional` on CuPy, i.e. the fused path of :mod:`pymglu.cuda.training`;
* ``mglu-bits-given``: the same step without the pack, the bit-planes made once outside: what a training
  loop runs when the optimizer's update writes them (:mod:`pymglu.cuda.optimizers`);
* ``mglu-bits-given-apply-mask``: the same with :mod:`pymglu.cuda.masked_gemm` switched off, the masked
  products built by ``apply_mask`` for cuBLAS as before stop 32 (the same step wherever the kernels are not
  used: other GPUs than sm_90, and more than ``masked_gemm.MAX_TOKENS`` tokens, which
  ``--masked-gemm-max-tokens`` changes for the run);
* ``mglu-bits-given-dx-kernel``: the same with the backward's ``dx`` kernel switched on
  (``masked_gemm.dx_kernel()``; off by default since stop 33), its ``n + 1`` products in one kernel;
* ``mglu-bits-given-unbatched`` (with ``--unbatched-too``): the bits-given step with the ``n`` products
  ``G_i = e_i^T x`` as ``n`` cuBLAS calls, as before stop 35, instead of one strided-batched call;
* ``mglu-bits-given-fp32-logits`` (with ``--fp32-logits-too``): the bits-given step with the ``G_i``
  products and the logit gradients in float32 (``pymglu.cuda.training.narrow_logit_grads(False)``), as
  before stop 35; by default they are bfloat16, as ``dW``;
* ``mglu-recompute`` (at the n of ``--recompute-n``): the same with ``keep_cache=False``, the backward
  recomputing ``t`` and ``s_i`` in chunks of tokens (``4 (n + 1)`` products per step);
* ``swiglu``: pymglu's GLU on the same path (two cuBLAS products per pass + fused epilogues);
* ``swiglu-torch``: torch's SwiGLU (stacked gate+up weight, ``F.linear``, autograd), when importable;
* ``naive-torch``: the paper's scheme (its Algorithm 2), 2n masked matmuls per pass with
  straight-through masks and masked copies of W built by multiplication, in torch with autograd; when
  torch is missing, ``naive``: the same scheme written with CuPy. Run for n <= ``--naive-max-n``.

The CuPy variants of a shape (SwiGLU and every MGLU variant at every n) are timed together, taking turns:
after ``--warmup`` steps of each and at least ``--warm-seconds`` of steps in turn (the GPU's clocks ramp
up from idle while the host prepares the inputs), each round times one group of ``--steps`` back-to-back
steps of every variant between two CUDA events, for ``--reps`` rounds; the median per-step time over the
rounds is reported. So a change of clocks during the run reaches SwiGLU and MGLU alike (before stop 27
SwiGLU was timed first and alone, and its time moved by up to 13% between runs of the same code). torch's
variants are timed on their own, after them.
With ``--graphs`` (the default) SwiGLU's step and the ``mglu-bits-given`` steps are also captured as CUDA
graphs (``pymglu.cuda.capture.record_graph``, each with its own memory pool) and their replays, on the
current stream, join the turns as ``swiglu (graph)`` and ``mglu-bits-given (graph)`` (and
``mglu-bits-given-apply-mask (graph)``, ``mglu-bits-given-dx-kernel (graph)``): the
same kernels without the host's launches between them, which is how ``GraphTrainStep`` runs a training
step; their ratio is against ``swiglu (graph)``. "x SwiGLU" is against pymglu's SwiGLU, the one timed in turns
(the faster of the two SwiGLUs in every run so far; the script prints a note if torch's is faster). TFLOP/s counts the products only:
``3 (n + 1) * 2 T d h`` for MGLU (``4 (n + 1)`` with recompute), ``6 * 2 T d h`` for SwiGLU, ``6n * 2 T d h``
for the naive MGLU. Peak memory is the high-water mark of memory in use during one step, inputs and
outputs included (CuPy: an allocator wrapper around the pool; torch: ``max_memory_allocated``). Outputs
``train_layer.md``, ``train_layer.json`` and ``train_layer.png``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

import cupy as cp

from pymglu import functional, masks as mask_ops
from pymglu.cuda import masked_gemm, switched, training
from pymglu.dtypes import bfloat16

SHAPES = [(2048, 8192), (4096, 14336)]
TOKENS = [4096, 16384]
N_MASKS = [1, 2, 4, 8]


class PeakTracker:
    """CuPy allocator that records the most bytes in use at once in the default pool."""

    def __init__(self) -> None:
        self.pool = cp.get_default_memory_pool()
        self.peak = 0

    def malloc(self, size: int):
        mem = self.pool.malloc(size)
        self.peak = max(self.peak, self.pool.used_bytes())
        return mem

    def reset(self) -> None:
        self.peak = self.pool.used_bytes()


def time_steps(step, warmup: int, reps: int, steps: int) -> float:
    """Median seconds per step over ``reps`` event-timed groups of ``steps`` back-to-back calls."""
    for _ in range(warmup):
        step()
    start, end = cp.cuda.Event(), cp.cuda.Event()
    times = []
    for _ in range(reps):
        start.record()
        for _ in range(steps):
            step()
        end.record()
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end) / 1e3 / steps)
    return statistics.median(times)


def time_in_turns(steps: dict, warmup: int, reps: int, group: int, warm_seconds: float) -> dict:
    """Median seconds per step of each callable in ``steps``, timed in turns (module docstring)."""
    import time

    for fn in steps.values():
        for _ in range(warmup):
            fn()
    cp.cuda.Device().synchronize()
    start_wall = time.perf_counter()
    while time.perf_counter() - start_wall < warm_seconds:
        for fn in steps.values():
            fn()
        cp.cuda.Device().synchronize()
    start, end = cp.cuda.Event(), cp.cuda.Event()
    times = {name: [] for name in steps}
    for _ in range(reps):
        for name, fn in steps.items():
            start.record()
            for _ in range(group):
                fn()
            end.record()
            end.synchronize()
            times[name].append(cp.cuda.get_elapsed_time(start, end) / 1e3 / group)
    return {name: statistics.median(t) for name, t in times.items()}


def captured(step):
    """``step`` captured as a CUDA graph with its own memory pool; returns a callable that replays it on the
    current stream, where the other variants run and the timing events are recorded (the graph and pool
    live as long as the callable)."""
    from pymglu.cuda.capture import record_graph

    step()  # compiles the kernels and sizes cuBLAS's workspace outside the capture
    cp.cuda.Device().synchronize()
    stream, pool = cp.cuda.Stream(non_blocking=True), cp.cuda.MemoryPool()
    graph, _ = record_graph(stream, step, pool)

    def replay(graph=graph, pool=pool):
        graph.launch(stream=cp.cuda.get_current_stream())

    return replay


def peak_bytes(step, tracker: PeakTracker, live: int) -> int:
    """High-water mark of one step, counting ``live`` bytes of inputs already allocated."""
    cp.cuda.Device().synchronize()
    tracker.reset()
    base = tracker.pool.used_bytes()
    step()
    cp.cuda.Device().synchronize()
    return tracker.peak - base + live


def naive_step(x, W, logits, dy, n):
    """The paper's MGLU: per mask a gate and a value product with dense masked copies, then backward."""
    y = cp.zeros(dy.shape, dtype=cp.float32)
    dx = cp.zeros(x.shape, dtype=cp.float32)
    dW = cp.zeros(W.shape, dtype=cp.float32)
    dl = cp.empty(logits.shape, dtype=cp.float32)
    for i in range(n):
        m = (logits[i] > 0).astype(W.dtype)
        Wg, Wv = W * m, W - W * m
        gate, value = x @ Wg.T, x @ Wv.T
        g32, v32 = gate.astype(cp.float32), value.astype(cp.float32)
        sig = 1.0 / (1.0 + cp.exp(-g32))
        y += g32 * sig * v32
        dyf = dy.astype(cp.float32)
        d_value = (dyf * g32 * sig).astype(W.dtype)
        d_gate = (dyf * v32 * sig * (1.0 + g32 * (1.0 - sig))).astype(W.dtype)
        dx += (d_gate @ Wg).astype(cp.float32) + (d_value @ Wv).astype(cp.float32)
        dWg, dWv = (d_gate.T @ x).astype(cp.float32), (d_value.T @ x).astype(cp.float32)
        mf = m.astype(cp.float32)
        dW += mf * dWg + (1.0 - mf) * dWv
        dl[i] = W.astype(cp.float32) * (dWg - dWv)
    return y.astype(W.dtype), dx.astype(W.dtype), dW.astype(W.dtype), dl


def _time_torch(step, warmup, reps, steps):
    import torch

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(reps):
        s.record()
        for _ in range(steps):
            step()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3 / steps)
    return statistics.median(times)


def _torch_peak(step, live_bytes):
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base + live_bytes


def bench_torch_naive(T, d, h, n, args):
    """The paper's Algorithm 2 in torch: per mask, STE masks, two masked products, autograd backward."""
    import torch
    import torch.nn.functional as F

    dev = torch.device("cuda")
    x = torch.randn(T, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    W = (torch.randn(h, d, device=dev) * d ** -0.5).to(torch.bfloat16).requires_grad_()
    L = (torch.randn(n, h, d, device=dev) * 0.01).requires_grad_()
    dy = torch.randn(T, h, device=dev, dtype=torch.bfloat16)

    def step():
        y = None
        for i in range(n):
            m = ((L[i] > 0).float() + L[i] - L[i].detach()).to(torch.bfloat16)
            out = F.silu(F.linear(x, W * m)) * F.linear(x, W * (1 - m))
            y = out if y is None else y + out
        y.backward(dy)
        x.grad = W.grad = L.grad = None

    t = _time_torch(step, 1, max(3, args.reps // 2), 1)
    peak = _torch_peak(step, x.numel() * 2 + W.numel() * 2 + L.numel() * 4 + dy.numel() * 2)
    return t, peak


def bench_torch(T, d, h, args):
    import torch
    import torch.nn.functional as F

    dev = torch.device("cuda")
    x = torch.randn(T, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(2 * h, d, device=dev) * d ** -0.5).to(torch.bfloat16).requires_grad_()
    dy = torch.randn(T, h, device=dev, dtype=torch.bfloat16)

    def step():
        gate, up = F.linear(x, w).chunk(2, dim=-1)
        (F.silu(gate) * up).backward(dy)
        x.grad = None
        w.grad = None

    t = _time_torch(step, args.warmup, args.reps, args.steps)
    return t, _torch_peak(step, x.numel() * 2 + w.numel() * 2 + dy.numel() * 2)


def bench_shape(T, d, h, n_list, args, have_torch, tracker):
    rng = np.random.default_rng(0)
    rows = []

    def add(row):
        rows.append(row)
        print(_row_md(row), flush=True)
    x = cp.asarray(rng.standard_normal((T, d), dtype=np.float32).astype(bfloat16))
    dy = cp.asarray(rng.standard_normal((T, h), dtype=np.float32).astype(bfloat16))
    flop_unit = 2.0 * T * d * h
    xdy_bytes = x.nbytes + dy.nbytes
    base = {"T": T, "d": d, "h": h}

    Wg = cp.asarray((rng.standard_normal((h, d), dtype=np.float32) * d ** -0.5).astype(bfloat16))
    Wv = cp.asarray((rng.standard_normal((h, d), dtype=np.float32) * d ** -0.5).astype(bfloat16))
    W = Wg

    def glu_step():
        _, cache = functional.glu_forward(x, Wg, Wv, "silu")
        return functional.glu_backward(dy, x, Wg, Wv, "silu", cache, consume_cache=True)

    rows_peak = {}
    # (name, n, step, products per 2Tdh, bytes alive besides the step's own), timed in turns
    variants = [("swiglu", 0, glu_step, 6, xdy_bytes + Wg.nbytes + Wv.nbytes)]
    logits_of = {}
    for n in n_list:
        logits = logits_of[n] = cp.asarray(rng.standard_normal((n, h, d), dtype=np.float32) * 0.01)
        given = mask_ops.pack_masks(logits)
        live = xdy_bytes + W.nbytes + logits.nbytes

        def mglu_step(logits=logits):
            bits = mask_ops.pack_masks(logits)
            _, cache = functional.mglu_forward(x, W, bits, "silu")
            return functional.mglu_backward(dy, x, W, bits, "silu", cache, consume_cache=True)

        def bits_given_step(given=given):
            _, cache = functional.mglu_forward(x, W, given, "silu")
            return functional.mglu_backward(dy, x, W, given, "silu", cache, consume_cache=True)

        def recompute_step(logits=logits):
            bits = mask_ops.pack_masks(logits)
            y, _ = functional.mglu_forward(x, W, bits, "silu", keep_cache=False)
            del y
            return functional.mglu_backward(dy, x, W, bits, "silu", None)

        def apply_mask_step(given=given):
            with masked_gemm.disabled():
                return bits_given_step(given)

        def dx_kernel_step(given=given):
            with masked_gemm.dx_kernel(True):
                return bits_given_step(given)

        def unbatched_step(given=given):
            with switched(training, "_BATCHED_LOGIT_PRODUCTS", False):
                return bits_given_step(given)

        def fp32_logits_step(given=given):
            with training.narrow_logit_grads(False):
                return bits_given_step(given)

        variants.append(("mglu", n, mglu_step, 3 * (n + 1), live))
        if args.bits_given:
            variants.append(("mglu-bits-given", n, bits_given_step, 3 * (n + 1), live + given.nbytes))
            if args.apply_mask_too:
                variants.append(("mglu-bits-given-apply-mask", n, apply_mask_step, 3 * (n + 1), live + given.nbytes))
                variants.append(("mglu-bits-given-dx-kernel", n, dx_kernel_step, 3 * (n + 1), live + given.nbytes))
            if args.unbatched_too:
                variants.append(("mglu-bits-given-unbatched", n, unbatched_step, 3 * (n + 1), live + given.nbytes))
            if args.fp32_logits_too:
                variants.append(("mglu-bits-given-fp32-logits", n, fp32_logits_step, 3 * (n + 1),
                                 live + given.nbytes))
        if n in args.recompute_n:
            variants.append(("mglu-recompute", n, recompute_step, 4 * (n + 1), live))
    replays = {}
    if args.graphs:
        for name, n, step, products, live in list(variants):
            if name == "swiglu" or name.startswith("mglu-bits-given"):
                replays[(name, n)] = captured(step)
                variants.append((f"{name} (graph)", n, replays[(name, n)], products, live))
    times = time_in_turns({(name, n): step for name, n, step, _, _ in variants}, args.warmup, args.reps,
                          args.steps, args.warm_seconds)
    swiglu_peak = None
    for name, n, step, products, live in variants:
        t = times[(name, n)]
        graph = name.endswith("(graph)")
        # a replay allocates nothing: its peak is the eager step's
        peak = peak_bytes(step, tracker, live) if not graph else rows_peak[name[: -len(" (graph)")], n]
        row = {**base, "variant": name, "n": n, "ms": t * 1e3, "tflops": products * flop_unit / t / 1e12,
               "peak_gb": peak / 1e9}
        if name == "swiglu":
            swiglu_peak = peak / 1e9
        elif name != "swiglu (graph)":
            swiglu_ms = times[("swiglu (graph)" if graph else "swiglu", 0)] * 1e3
            row.update(vs_swiglu=t * 1e3 / swiglu_ms, bound=products / 6,
                       mem_allowance_gb=swiglu_peak + 3 * logits_of[n].nbytes / 1e9)
        rows_peak[name, n] = peak
        add(row)
    swiglu_ms = times[("swiglu", 0)] * 1e3
    del replays
    if have_torch:
        t, peak = bench_torch(T, d, h, args)
        add({**base, "variant": "swiglu-torch", "n": 0, "ms": t * 1e3,
                     "tflops": 6 * flop_unit / t / 1e12, "peak_gb": peak / 1e9})
        if t * 1e3 < swiglu_ms:
            print(f"# note: torch's SwiGLU ({t * 1e3:.2f} ms, timed alone) beat pymglu's ({swiglu_ms:.2f} ms) at "
                  f"T={T}, d={d}, h={h}; the x SwiGLU column is against pymglu's", flush=True)
    for n in n_list:
        if not (args.naive and n <= args.naive_max_n):
            continue
        logits = logits_of[n]
        if have_torch:
            tn, peak = bench_torch_naive(T, d, h, n, args)
        else:
            step = lambda: naive_step(x, W, logits, dy, n)  # noqa: E731
            tn = time_steps(step, 1, max(3, args.reps // 2), 1)
            peak = peak_bytes(step, tracker, xdy_bytes + W.nbytes + logits.nbytes)
        fused = times[("mglu", n)]
        add({**base, "variant": "naive-torch" if have_torch else "naive", "n": n, "ms": tn * 1e3,
             "tflops": 6 * n * flop_unit / tn / 1e12, "peak_gb": peak / 1e9, "vs_swiglu": tn * 1e3 / swiglu_ms,
             "vs_fused": tn / fused})
    return rows


def breakdown(T, d, h, n, args):
    """Time each piece of one fused MGLU step alone; returns rows (piece, count per step, ms each, ms total)."""
    from pymglu.cuda.gemm import gemm

    rng = np.random.default_rng(1)
    f32 = np.float32
    x = cp.asarray(rng.standard_normal((T, d), dtype=f32).astype(bfloat16))
    W = cp.asarray((rng.standard_normal((h, d), dtype=f32) * d ** -0.5).astype(bfloat16))
    logits = cp.asarray(rng.standard_normal((n, h, d), dtype=f32))
    bits = mask_ops.pack_masks(logits)
    th = cp.asarray(rng.standard_normal((T, h), dtype=f32).astype(bfloat16))
    s = cp.asarray(rng.standard_normal((n, T, h), dtype=f32).astype(bfloat16))
    e = s.copy()
    groups = training._masked_groups(n)
    size = groups[0].stop - groups[0].start  # masked weights per apply_mask call (the last may build fewer)
    out_th, masked = cp.empty_like(th), cp.empty((size, h, d), dtype=W.dtype)
    dx32, dW32 = cp.empty((T, d), dtype=f32), cp.empty((h, d), dtype=f32)
    G = cp.asarray(rng.standard_normal((n, h, d), dtype=f32).astype(training.logit_grad_dtype(W.dtype)))
    th_G = cp.empty((h, d), dtype=G.dtype)
    g_vec = training._weight_grads_vecs(G.dtype)[0]
    dW = cp.empty_like(W)
    nh = T * h
    act = 0
    pieces = {
        "pack logits to bits": (1, lambda: mask_ops.pack_masks(logits)),
        "x W^T -> bf16 (forward product)": (n + 1, lambda: gemm(x, W, out_th, trans_b=True)),
        "e W -> fp32 += (dx product)": (n + 1, lambda: gemm(th, W, dx32, accumulate=True)),
        "(sum dv)^T x -> fp32 (dW product)": (1, lambda: gemm(th, x, dW32, trans_a=True)),
        f"e^T x -> {G.dtype} (dlogits products)": (n, lambda: gemm(th, x, th_G, trans_a=True)),
        f"apply_mask ({size} masked W per call)": (2 * len(groups), lambda: training.apply_mask(W, bits[:size], masked)),
        "epilogue forward": (1, lambda: training._launch(
            "mglu_epilogue_fwd", W.dtype, 8, nh // 8, (th, s, out_th, np.int32(n), np.int64(nh), np.int32(act)))),
        "epilogue backward": (1, lambda: training._launch(
            "mglu_epilogue_bwd", W.dtype, 8, nh // 8, (th, th, s, e, out_th, np.int32(n), np.int64(nh), np.int32(act)))),
        "weight grads (all masks)": (1, lambda: training._launch(
            "mglu_weight_grads", W.dtype, g_vec, h * d // g_vec,
            (G, W, bits, dW32, dW, np.int32(n), np.int32(h), np.int32(d), np.int32(bits.shape[-1])),
            name=training._weight_grads_name(W.dtype, G.dtype, g_vec))),
        "dx fp32 -> bf16 (narrow)": (1, lambda: training.narrow(dx32, bfloat16)),
    }
    rows = []
    for name, (count, fn) in pieces.items():
        t = time_steps(fn, 2, args.reps, 5) * 1e3
        rows.append({"piece": name, "count": count, "ms": t, "total_ms": count * t})
    return rows


HEADER = ("| T | d | h | variant | n | ms/step | TFLOP/s | peak GB | x SwiGLU (bound) | mem allowance GB |\n"
          "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|")


def _row_md(r):
    ratio = f"{r['vs_swiglu']:.2f}" if "vs_swiglu" in r else ""
    if "bound" in r:
        ratio += f" ({r['bound']:.2f})"
    allowance = f"{r['mem_allowance_gb']:.2f}" if "mem_allowance_gb" in r else ""
    return (f"| {r['T']} | {r['d']} | {r['h']} | {r['variant']} | {r['n'] or ''} | {r['ms']:.2f} | "
            f"{r['tflops']:.0f} | {r['peak_gb']:.2f} | {ratio} | {allowance} |")


def plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    keys = sorted({(r["T"], r["d"], r["h"]) for r in rows})
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.6), squeeze=False)
    for ax, (T, d, h) in zip(axes[0], keys):
        sel = [r for r in rows if (r["T"], r["d"], r["h"]) == (T, d, h)]
        for variant, style in (("mglu", "o-"), ("naive", "s--"), ("naive-torch", "s--")):
            pts = sorted((r["n"], r["vs_swiglu"]) for r in sel if r["variant"] == variant)
            if pts:
                ax.plot(*zip(*pts), style, label=f"{variant} / SwiGLU")
        ns = sorted({r["n"] for r in sel if r["variant"] == "mglu"})
        ax.plot(ns, [3 * (n + 1) / 6 for n in ns], "k:", label="3(n+1)/6 bound")
        ax.set_title(f"T={T}, d={d}, h={h}", fontsize=9)
        ax.set_xlabel("masks n")
        ax.set_xscale("log", base=2)
        ax.set_ylabel("step time / SwiGLU")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", default="bench_out")
    p.add_argument("--quick", action="store_true", help="d=4096, h=14336, T=4096, n in {1, 4}")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=7, help="timed rounds")
    p.add_argument("--warm-seconds", type=float, default=1.0,
                   help="seconds of steps in turn before the timed rounds (clocks ramp up from idle)")
    p.add_argument("--no-graphs", dest="graphs", action="store_false",
                   help="no CUDA-graph replays of the SwiGLU and bits-given steps")
    p.add_argument("--no-breakdown", dest="breakdown", action="store_false",
                   help="skip the piece-by-piece timing of one MGLU step")
    p.add_argument("--steps", type=int, default=3, help="back-to-back steps per timed group")
    p.add_argument("--naive-max-n", type=int, default=4)
    p.add_argument("--no-naive", dest="naive", action="store_false")
    p.add_argument("--no-torch", dest="torch", action="store_false")
    p.add_argument("--no-bits-given", dest="bits_given", action="store_false",
                   help="skip the mglu-bits-given variant (the step without the pack)")
    p.add_argument("--no-apply-mask-too", dest="apply_mask_too", action="store_false",
                   help="skip mglu-bits-given-apply-mask and mglu-bits-given-dx-kernel: the bits-given step "
                        "with pymglu.cuda.masked_gemm off (its masked products built by apply_mask for cuBLAS, "
                        "the path before stop 32), and with its dx kernel on (off by default, stop 33)")
    p.add_argument("--unbatched-too", action="store_true",
                   help="also time mglu-bits-given-unbatched: the bits-given step with its n products G_i = e_i^T x "
                        "as n cuBLAS calls instead of one strided-batched call (before stop 35)")
    p.add_argument("--fp32-logits-too", action="store_true",
                   help="also time mglu-bits-given-fp32-logits: the bits-given step with the logit gradients in "
                        "float32 (pymglu.cuda.training.narrow_logit_grads(False)), the default before stop 35")
    p.add_argument("--masked-gemm-max-tokens", type=int,
                   help="the bound on T up to which the forward's masked products run in pymglu.cuda.masked_gemm "
                        "(default: masked_gemm.MAX_TOKENS, 2048 since stop 37; a large value times the kernel at every T)")
    p.add_argument("--recompute-n", default="4", help="masks at which the recompute variant also runs ('' for none)")
    p.add_argument("--shapes", help="comma list of dxh (default: the issue's 2048x8192,4096x14336)")
    p.add_argument("--tokens", help="comma list of T (default: 4096,16384)")
    p.add_argument("--masks", help="comma list of n (default: 1,2,4,8)")
    args = p.parse_args(argv)
    if args.masked_gemm_max_tokens is not None:
        masked_gemm.MAX_TOKENS = args.masked_gemm_max_tokens
    args.recompute_n = [int(v) for v in args.recompute_n.split(",") if v]
    have_torch = False
    if args.torch:
        try:
            import torch

            have_torch = torch.cuda.is_available()
        except ImportError:
            pass
    tracker = PeakTracker()
    cp.cuda.set_allocator(tracker.malloc)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shapes, tokens, n_list = (([(4096, 14336)], [4096], [1, 4]) if args.quick else (SHAPES, TOKENS, N_MASKS))
    if args.shapes:
        shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes.split(",")]
    if args.tokens:
        tokens = [int(v) for v in args.tokens.split(",")]
    if args.masks:
        n_list = [int(v) for v in args.masks.split(",")]
    print(f"# {cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}, bfloat16, torch: {have_torch}")
    print(HEADER)
    rows = []
    for d, h in shapes:
        for T in tokens:
            rows += bench_shape(T, d, h, n_list, args, have_torch, tracker)
            cp.get_default_memory_pool().free_all_blocks()
    parts, lines = [], []
    if args.breakdown:
        T, (d, h), n = tokens[0], shapes[-1], 4
        parts = breakdown(T, d, h, n, args)
        lines = [f"\nOne fused MGLU step at T={T}, d={d}, h={h}, n={n}, piece by piece (each timed alone):\n",
                 "| piece | per step | ms each | ms per step |", "|---|---:|---:|---:|"]
        lines += [f"| {r['piece']} | {r['count']} | {r['ms']:.3f} | {r['total_ms']:.2f} |" for r in parts]
        lines.append(f"| sum | | | {sum(r['total_ms'] for r in parts):.2f} |")
        print("\n".join(lines))
    (out / "train_layer.json").write_text(json.dumps({"rows": rows, "breakdown": parts}, indent=1))
    (out / "train_layer.md").write_text(HEADER + "\n" + "\n".join(_row_md(r) for r in rows) + "\n"
                                        + "\n".join(lines) + "\n")
    plot(rows, out / "train_layer.png")
    print(f"wrote {out / 'train_layer.md'}")


if __name__ == "__main__":
    main()
