"""Probe: where one layer's training step spends its time in place, and what merged products would save.

Usage (on a machine with a CUDA GPU and CuPy):

    python benchmarks/probe_step_products.py [--shapes 4096x2048x8192,4096x4096x14336] [--masks 4]

Two parts, bfloat16, SiLU, random normal inputs (never zeros):

1. **In place.** The step of ``train_layer.py``'s ``swiglu``, ``mglu-bits-given`` and
   ``mglu-bits-given-apply-mask`` variants runs with a CUDA event recorded after every cuBLAS product,
   every kernel of :mod:`pymglu.cuda.training` and every :mod:`pymglu.cuda.masked_gemm` launch, behind a
   spin kernel long enough for the host to queue all of ``--steps`` steps first. So the time between two
   events is the GPU's own time for that launch in the step (its kernel plus any gap before it). Prints
   each launch's median over the steps, and the sum per kind.
2. **Merged products.** Each product set of both steps, timed as the package runs it (one cuBLAS call
   per product) and merged into fewer, larger calls on the same operands, as a different layout of the
   activations would allow:

   * SwiGLU: ``x [Wg; Wv]^T`` (N = 2h), ``[dg dv] [Wg; Wv]`` (K = 2h), ``[dg dv]^T x`` (M = 2h);
   * MGLU: the forward's masked pairs ``x [M_i W; M_j W]^T`` (N = 2h), the ``dx`` pairs
     ``[e_i e_j] [M_i W; M_j W]`` (K = 2h) and the weight/logit gradients ``[dv e_1 ... e_n]^T x``
     (M = (n + 1) h) in one call, the activations stored token-major ``(T, n + 1, h)`` so that every
     merged operand is one strided matrix.

   Each variant's results are checked against the separate calls' (relative difference printed). The
   package does not merge; a probe to decide whether it should.

Timing: ``--calls`` back-to-back calls between CUDA events, median of ``--rounds``; the separate and the
merged calls of a set take turns, round by round.
"""
from __future__ import annotations

import argparse
import statistics
from collections import defaultdict

import numpy as np

import cupy as cp

from pymglu import functional, masks as mask_ops
from pymglu.cuda import gemm as gemm_module
from pymglu.cuda import masked_gemm, training
from pymglu.dtypes import bfloat16

_OP_N, _OP_T = 0, 1


def gemm_ld(a, b, out, *, trans_a=False, trans_b=False, accumulate=False):
    """``out = op(a) @ op(b)`` (``+=`` with ``accumulate``) on row-major 2-d CuPy views whose rows may be
    strided (unit stride along each row): cublasGemmEx with the views' row strides as leading
    dimensions. The probe's own call; the package's :func:`pymglu.cuda.gemm.gemm` takes packed rows only."""
    for m in (a, b, out):
        assert m.ndim == 2 and m.strides[1] == m.itemsize, m.strides
    M, K = (a.shape[1], a.shape[0]) if trans_a else a.shape
    K2, N = (b.shape[1], b.shape[0]) if trans_b else b.shape
    assert K == K2 and out.shape == (M, N), (a.shape, b.shape, out.shape)
    types = gemm_module._DATA_TYPES
    ld = lambda m: m.strides[0] // m.itemsize  # noqa: E731
    beta = gemm_module._ONE if accumulate else gemm_module._ZERO
    with gemm_module._host_pointer_handle("gemm_ld") as handle:
        status = gemm_module._cublas_fn("cublasGemmEx")(
            handle, _OP_T if trans_b else _OP_N, _OP_T if trans_a else _OP_N, N, M, K,
            gemm_module._ONE.ctypes.data,
            b.data.ptr, types[np.dtype(b.dtype)], ld(b),
            a.data.ptr, types[np.dtype(a.dtype)], ld(a),
            beta.ctypes.data, out.data.ptr, types[np.dtype(out.dtype)], ld(out),
            gemm_module._CUBLAS_COMPUTE_32F, gemm_module._CUBLAS_GEMM_DEFAULT)
    assert status == 0, status
    return out


def _time_in_turns(fns: list, calls: int, rounds: int) -> list:
    """Median ms per call of each of ``fns``, timed in turns: every round times ``calls`` back-to-back
    calls of each in order, so that a change of clocks during the run reaches all of them alike."""
    for fn in fns:
        fn()
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    times = [[] for _ in fns]
    for _ in range(rounds):
        for fn, out in zip(fns, times):
            start.record()
            for _ in range(calls):
                fn()
            stop.record()
            stop.synchronize()
            out.append(cp.cuda.get_elapsed_time(start, stop) / calls)
    return [statistics.median(t) for t in times]


def _rel(a, b) -> float:
    a = a.astype(cp.float64)
    b = b.astype(cp.float64)
    return float(cp.linalg.norm(a - b) / cp.linalg.norm(b))


_SPIN = r"""
extern "C" __global__ void spin(long long cycles) {
    long long start = clock64();
    while (clock64() - start < cycles) { }
}"""


def in_place(steps: dict, n_steps: int, head_start_ms: float) -> dict:
    """Per launch label: the median GPU milliseconds of that launch in the step (part 1)."""
    records: list = []
    original_gemm, original_launch = training.gemm, training._launch
    original_batched = training.gemm_batched
    original_masked = masked_gemm.launch_unchecked
    original_dx, original_transpose = masked_gemm.launch_dx_unchecked, masked_gemm.transpose_bits

    def label_of_gemm(a, b, out, trans_a=False, trans_b=False, accumulate=False):
        M = a.shape[1] if trans_a else a.shape[0]
        K = a.shape[0] if trans_a else a.shape[1]
        N = b.shape[0] if trans_b else b.shape[1]
        return f"gemm {M}x{N}x{K}{' +=' if accumulate else ''} -> {np.dtype(out.dtype).name}"

    def gemm(a, b, out, **kw):
        result = original_gemm(a, b, out, **kw)
        ev = cp.cuda.Event()
        ev.record()
        records.append((label_of_gemm(a, b, out, **kw), ev))
        return result

    def batched(a, b, out, **kw):
        result = original_batched(a, b, out, **kw)
        ev = cp.cuda.Event()
        ev.record()
        records.append((f"gemm_batched {out.shape[0]} x " + label_of_gemm(a[0], b if b.ndim == 2 else b[0], out[0], **kw), ev))
        return result

    def launch(kernel, dtype, vec, work_items, args, name=None):
        original_launch(kernel, dtype, vec, work_items, args, name=name)
        ev = cp.cuda.Event()
        ev.record()
        records.append((kernel, ev))

    def masked(x, W, bits, out):
        result = original_masked(x, W, bits, out)
        ev = cp.cuda.Event()
        ev.record()
        records.append((f"masked_gemm {x.shape[0]}x{W.shape[0]}x{x.shape[1]}", ev))
        return result

    def masked_dx(dv, e, W, bits_t, out):
        result = original_dx(dv, e, W, bits_t, out)
        ev = cp.cuda.Event()
        ev.record()
        records.append((f"masked_dx {dv.shape[0]}x{W.shape[1]}x{W.shape[0]} ({e.shape[0] + 1} products)", ev))
        return result

    def transpose(bits, out=None):
        result = original_transpose(bits, out)
        ev = cp.cuda.Event()
        ev.record()
        records.append(("transpose_bits", ev))
        return result

    def patch(on):
        if on:
            training.gemm, training._launch, masked_gemm.launch_unchecked = gemm, launch, masked
            training.gemm_batched = batched
            masked_gemm.launch_dx_unchecked, masked_gemm.transpose_bits = masked_dx, transpose
        else:
            training.gemm, training._launch, masked_gemm.launch_unchecked = original_gemm, original_launch, original_masked
            training.gemm_batched = original_batched
            masked_gemm.launch_dx_unchecked, masked_gemm.transpose_bits = original_dx, original_transpose

    spin = cp.RawKernel(_SPIN, "spin")
    rate_khz = cp.cuda.runtime.deviceGetAttribute(cp.cuda.runtime.cudaDevAttrClockRate, 0)
    out = {}
    for name, step in steps.items():
        step()
        cp.cuda.Device().synchronize()
        patch(True)
        try:
            records.clear()
            spin((1,), (1,), (np.int64(head_start_ms * rate_khz),))
            spin_done = cp.cuda.Event()
            spin_done.record()
            per_step = []
            for _ in range(n_steps):
                begin = cp.cuda.Event()
                begin.record()
                records.append(("begin", begin))
                step()
                per_step.append(len(records))
            queued = not spin_done.done
            cp.cuda.Device().synchronize()
        finally:
            patch(False)
        if not queued:
            print(f"# {name}: the spin ended before every step was queued; raise --head-start")
        times = defaultdict(list)
        totals = []
        start = 0
        for stop in per_step:
            chunk = records[start:stop]
            step_ms = cp.cuda.get_elapsed_time(chunk[0][1], chunk[-1][1])
            totals.append(step_ms)
            for position, ((_, prev), (label, ev)) in enumerate(zip(chunk, chunk[1:])):
                times[(position, label)].append(cp.cuda.get_elapsed_time(prev, ev))
            start = stop
        out[name] = ({key: statistics.median(v) for key, v in times.items()}, statistics.median(totals))
    return out


def merged_products(T: int, d: int, h: int, n: int, calls: int, rounds: int) -> list:
    """Rows (step, product set, separate ms, merged ms, rel. diff) of part 2."""
    rng = cp.random.default_rng(0)
    f32 = cp.float32
    normal = lambda *shape, scale=1.0: (rng.standard_normal(shape, dtype=f32) * scale).astype(bfloat16)  # noqa: E731
    x = normal(T, d)
    rows = []

    # SwiGLU: stacked weights and token-major activations [g v] (T, 2h)
    Wgv = normal(2 * h, d, scale=d ** -0.5)
    Wg, Wv = Wgv[:h], Wgv[h:]
    dgv = normal(T, 2 * h)
    dg, dv = cp.ascontiguousarray(dgv[:, :h]), cp.ascontiguousarray(dgv[:, h:])
    gv = cp.full((T, 2 * h), cp.nan, dtype=bfloat16)
    g_sep, v_sep = cp.full((T, h), cp.nan, dtype=bfloat16), cp.full((T, h), cp.nan, dtype=bfloat16)
    dx_sep, dx_mer = cp.full((T, d), cp.nan, dtype=f32), cp.full((T, d), cp.nan, dtype=f32)
    dW_sep = cp.full((2 * h, d), cp.nan, dtype=bfloat16)
    dW_mer = cp.full((2 * h, d), cp.nan, dtype=bfloat16)

    def glu_fwd_sep():
        gemm_ld(x, Wg, g_sep, trans_b=True)
        gemm_ld(x, Wv, v_sep, trans_b=True)

    def glu_dx_sep():
        gemm_ld(dg, Wg, dx_sep)
        gemm_ld(dv, Wv, dx_sep, accumulate=True)

    def glu_dw_sep():
        gemm_ld(dg, x, dW_sep[:h], trans_a=True)
        gemm_ld(dv, x, dW_sep[h:], trans_a=True)

    sets = [
        ("swiglu", "forward (2 -> 1)", glu_fwd_sep, lambda: gemm_ld(x, Wgv, gv, trans_b=True),
         lambda: _rel(gv, cp.concatenate([g_sep, v_sep], axis=1))),
        ("swiglu", "dx (2 -> 1)", glu_dx_sep, lambda: gemm_ld(dgv, Wgv, dx_mer), lambda: _rel(dx_mer, dx_sep)),
        ("swiglu", "dW (2 -> 1)", glu_dw_sep, lambda: gemm_ld(dgv, x, dW_mer, trans_a=True),
         lambda: _rel(dW_mer, dW_sep)),
    ]

    # MGLU: token-major activations A (T, n + 1, h): slot 0 t (dv_sum in the backward), slot i s_i (e_i)
    W = normal(h, d, scale=d ** -0.5)
    bits = mask_ops.pack_masks(rng.standard_normal((n, h, d), dtype=f32))
    masked = cp.empty((2, h, d), dtype=bfloat16)
    training.apply_mask(W, bits[:2], masked)
    pair = masked.reshape(2 * h, d)
    A = normal(T, (n + 1) * h)
    slot = lambda i: A[:, i * h:(i + 1) * h]  # noqa: E731
    e_sep = [cp.ascontiguousarray(slot(i)) for i in range(n + 1)]
    s_sep = [cp.full((T, h), cp.nan, dtype=bfloat16) for _ in range(n + 1)]
    S = cp.full((T, (n + 1) * h), cp.nan, dtype=bfloat16)
    mdx_sep, mdx_mer = cp.full((T, d), cp.nan, dtype=f32), cp.full((T, d), cp.nan, dtype=f32)
    G_sep = cp.full(((n + 1) * h, d), cp.nan, dtype=f32)
    G_mer = cp.full(((n + 1) * h, d), cp.nan, dtype=f32)
    # the same masked pair stands for every pair of masks: the products' shapes and bytes are the step's
    pairs = [(1 + 2 * p, 2 + 2 * p) for p in range(n // 2)]

    def mglu_fwd_sep():
        gemm_ld(x, W, s_sep[0], trans_b=True)
        for i, j in pairs:
            gemm_ld(x, masked[0], s_sep[i], trans_b=True)
            gemm_ld(x, masked[1], s_sep[j], trans_b=True)

    def mglu_fwd_mer():
        gemm_ld(x, W, S[:, :h], trans_b=True)
        for i, _ in pairs:
            gemm_ld(x, pair, S[:, i * h:(i + 2) * h], trans_b=True)

    def mglu_dx_sep():
        gemm_ld(e_sep[0], W, mdx_sep)
        for i, j in pairs:
            gemm_ld(e_sep[i], masked[0], mdx_sep, accumulate=True)
            gemm_ld(e_sep[j], masked[1], mdx_sep, accumulate=True)

    def mglu_dx_mer():
        gemm_ld(slot(0), W, mdx_mer)
        for i, _ in pairs:
            gemm_ld(A[:, i * h:(i + 2) * h], pair, mdx_mer, accumulate=True)

    def mglu_g_sep():
        for i in range(n + 1):
            gemm_ld(e_sep[i], x, G_sep[i * h:(i + 1) * h], trans_a=True)

    def fwd_check():
        return max(_rel(S[:, i * h:(i + 1) * h], s_sep[i]) for i in range(n + 1))

    sets += [
        ("mglu", f"forward ({n + 1} -> {1 + len(pairs)})", mglu_fwd_sep, mglu_fwd_mer, fwd_check),
        ("mglu", f"dx ({n + 1} -> {1 + len(pairs)})", mglu_dx_sep, mglu_dx_mer, lambda: _rel(mdx_mer, mdx_sep)),
        ("mglu", f"dW_acc and G ({n + 1} -> 1)", mglu_g_sep, lambda: gemm_ld(A, x, G_mer, trans_a=True),
         lambda: _rel(G_mer, G_sep)),
    ]
    for step, what, separate, merged, check in sets:
        t_sep, t_mer = _time_in_turns([separate, merged], calls, rounds)
        rows.append((step, what, t_sep, t_mer, check()))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="4096x2048x8192,4096x4096x14336", help="T x d x h, comma-separated")
    p.add_argument("--masks", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--head-start", type=float, default=300.0, help="milliseconds of spin before the steps")
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--skip-in-place", action="store_true")
    p.add_argument("--skip-merged", action="store_true", help="no part 2 (the merged products)")
    p.add_argument("--no-apply-mask-step", action="store_true",
                   help="no mglu-bits-given-apply-mask step (the masked products built by apply_mask for cuBLAS, "
                        "pymglu.cuda.masked_gemm off) and no mglu-bits-given-dx-kernel step (its dx kernel on)")
    args = p.parse_args(argv)
    n = args.masks
    assert n % 2 == 0, "--masks: the merged MGLU products pair the masks"
    for shape in args.shapes.split(","):
        T, d, h = (int(v) for v in shape.split("x"))
        print(f"\n## T = {T}, d = {d}, h = {h}, n = {n}")
        if not args.skip_in_place:
            rng = np.random.default_rng(0)
            f32 = np.float32
            x = cp.asarray(rng.standard_normal((T, d), dtype=f32).astype(bfloat16))
            dy = cp.asarray(rng.standard_normal((T, h), dtype=f32).astype(bfloat16))
            Wg = cp.asarray((rng.standard_normal((h, d), dtype=f32) * d ** -0.5).astype(bfloat16))
            Wv = cp.asarray((rng.standard_normal((h, d), dtype=f32) * d ** -0.5).astype(bfloat16))
            bits = mask_ops.pack_masks(cp.asarray(rng.standard_normal((n, h, d), dtype=f32) * 0.01))

            def glu_step():
                _, cache = functional.glu_forward(x, Wg, Wv, "silu")
                return functional.glu_backward(dy, x, Wg, Wv, "silu", cache, consume_cache=True)

            def mglu_step():
                _, cache = functional.mglu_forward(x, Wg, bits, "silu")
                return functional.mglu_backward(dy, x, Wg, bits, "silu", cache, consume_cache=True)

            def apply_mask_step():
                with masked_gemm.disabled():
                    return mglu_step()

            def dx_kernel_step():
                with masked_gemm.dx_kernel(True):
                    return mglu_step()

            steps = {"swiglu": glu_step, "mglu-bits-given": mglu_step}
            if not args.no_apply_mask_step:
                steps["mglu-bits-given-apply-mask"] = apply_mask_step
                steps["mglu-bits-given-dx-kernel"] = dx_kernel_step
            result = in_place(steps, args.steps, args.head_start)
            for name, (per_launch, total) in result.items():
                print(f"\n### {name}: {total:.3f} ms per step in place (median of {args.steps})\n")
                print("| # | launch | ms |\n|---:|---|---:|")
                kinds = defaultdict(float)
                for (position, label), ms in sorted(per_launch.items()):
                    print(f"| {position} | {label} | {ms:.3f} |")
                    kinds["gemm" if label.startswith("gemm") else label] += ms
                print("\n" + "; ".join(f"{k} {v:.3f}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])))
            del x, dy, Wg, Wv, bits
            cp.get_default_memory_pool().free_all_blocks()
        if args.skip_merged:
            continue
        print("\n| step | products | separate ms | merged ms | saved | rel. diff |\n|---|---|---:|---:|---:|---:|")
        totals = defaultdict(lambda: [0.0, 0.0])
        for step, what, t_sep, t_mer, diff in merged_products(T, d, h, n, args.calls, args.rounds):
            print(f"| {step} | {what} | {t_sep:.3f} | {t_mer:.3f} | {(1 - t_mer / t_sep) * 100:.1f}% | {diff:.1e} |")
            totals[step][0] += t_sep
            totals[step][1] += t_mer
        for step, (t_sep, t_mer) in totals.items():
            print(f"| {step} | all | {t_sep:.3f} | {t_mer:.3f} | {(1 - t_mer / t_sep) * 100:.1f}% | |")
        if "swiglu" in totals and "mglu" in totals:
            print(f"\nproducts MGLU / SwiGLU: separate {totals['mglu'][0] / totals['swiglu'][0]:.3f}x, "
                  f"merged {totals['mglu'][1] / totals['swiglu'][1]:.3f}x")
        cp.get_default_memory_pool().free_all_blocks()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
