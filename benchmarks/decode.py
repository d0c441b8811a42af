"""Decode benchmark: FlashMGLU against a device copy, GLU on cuBLAS (CuPy and torch) and a naive MGLU.

Usage (on a machine with a CUDA GPU and CuPy):

    python benchmarks/decode.py --out-dir bench_out            # full sweep of the issue
    python benchmarks/decode.py --quick                        # one shape, a few T and n

Every variant is captured in a CUDA graph of back-to-back calls that rotate through enough weight sets
to exceed the L2 cache several times, launched once (plus ``--warmup`` seconds of back-to-back replays,
none by default), then replayed ``--replays`` times, each replay timed with CUDA events; the median
per-call time of the replays is one timing. Every timing of a shape and mask count is repeated in
``--rounds`` interleaved rounds (each round times every token count and configuration once), and the
fastest round is reported: the H200 has spells of 10-20% slower timings that last about a configuration
(docs/benchmarks.md, timing protocol), and a spell can only make a timing slower. Effective bandwidth
counts the minimal bytes: ``2hd + n*hd/8`` for MGLU (16-bit W plus one bit per mask and element) and ``4hd`` for GLU.
The naive MGLU (2n masked matmuls on CuPy, masks as dense 0/1 tensors, the paper's baseline) is timed
at T = 1 in bfloat16 only. Outputs ``decode.md`` (Markdown table), ``decode.json`` (raw numbers) and
``decode.png`` (plot).

``--warps`` and ``--ahead`` sweep the tensor-core kernel's configuration (warps per strip, groups in
flight per warp), ``--pdl off,start`` times every configuration launched normally and with programmatic
dependent launch (``flash_mglu(pdl=True)``: each call of the graph starts while the one before it
finishes; ``--pdl off,start,end`` also times the trigger after the blocks' last loads); every combination is timed, the last column lists them, and the row's FlashMGLU time is the
fastest of them (with none of these options, the library's own choice, launched normally).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
from pathlib import Path

import numpy as np

import cupy as cp

from pymglu import dtypes, masks
from pymglu.cuda import flash_mglu as fm

L2_BYTES = 50 * 2**20
SHAPES = [(2048, 8192), (4096, 14336), (8192, 28672)]
TOKENS = [1, 2, 4, 8, 16]
N_MASKS = [1, 2, 4, 8]

_SILU_MUL = r"""
#include <cuda_bf16.h>
#include <cuda_fp16.h>
template <typename T> __device__ float f(T v);
template <> __device__ float f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ float f<__half>(__half v) { return __half2float(v); }
template <typename T> __device__ T g(float v);
template <> __device__ __nv_bfloat16 g<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __half g<__half>(float v) { return __float2half_rn(v); }
template <typename T>
__global__ void silu_mul(const T* gu, T* y, int tokens, int h) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= tokens * h) return;
  int t = i / h, j = i % h;
  float a = f(gu[(size_t)t * 2 * h + j]), b = f(gu[(size_t)t * 2 * h + h + j]);
  y[i] = g<T>(a / (1.0f + __expf(-a)) * b);
}
"""
_CT = {dtypes.bfloat16: "__nv_bfloat16", dtypes.float16: "__half"}


def _silu_mul_kernel(dtype):
    name = f"silu_mul<{_CT[np.dtype(dtype)]}>"
    return cp.RawModule(code=_SILU_MUL, options=("-std=c++17",), name_expressions=(name,)).get_function(name)


#: seconds of back-to-back work each timing runs before it measures (``--warmup``), beyond the few calls
#: and the one graph launch every timing starts with. Off by default: on the H200 a quarter second of it
#: made the third configuration after each weight packing 13-16% slower, reproducibly, while without it
#: the same configurations ran in line with their neighbours (docs/flash_mglu_history.md, "Timing protocol").
WARMUP_S = 0.0


def _warmup_repeats(once_s: float) -> int:
    """How many more runs of a unit of work that took ``once_s`` seconds fill :data:`WARMUP_S`."""
    return min(1000, math.ceil(WARMUP_S / max(once_s, 1e-6)))


def _warm_up(run_once, stream) -> None:
    """Runs ``run_once`` (one timed unit of work) back to back for about :data:`WARMUP_S` seconds;
    nothing when it is 0."""
    if WARMUP_S <= 0:
        return
    start, end = cp.cuda.Event(), cp.cuda.Event()
    start.record(stream)
    run_once()
    end.record(stream)
    end.synchronize()
    for _ in range(_warmup_repeats(cp.cuda.get_elapsed_time(start, end) / 1e3)):
        run_once()
    stream.synchronize()


def time_events(calls, replays: int, stream) -> float:
    """Median seconds per call over ``replays`` event-timed runs of all ``calls`` back to back."""
    with stream:
        for c in calls[: min(3, len(calls))]:
            c()
        _warm_up(lambda: [c() for c in calls], stream)
        times = []
        start, end = cp.cuda.Event(), cp.cuda.Event()
        for _ in range(replays):
            start.record(stream)
            for c in calls:
                c()
            end.record(stream)
            end.synchronize()
            times.append(cp.cuda.get_elapsed_time(start, end) / 1e3 / len(calls))
    return statistics.median(times)


def time_graph(calls, replays: int, stream) -> float:
    """Median seconds per call: ``calls`` (a list of thunks) captured once, replayed ``replays`` times."""
    with stream:
        for c in calls[: min(3, len(calls))]:
            c()
        stream.synchronize()
        stream.begin_capture()
        for c in calls:
            c()
        graph = stream.end_capture()
        graph.launch(stream)
        stream.synchronize()
        _warm_up(lambda: graph.launch(stream), stream)
        times = []
        start, end = cp.cuda.Event(), cp.cuda.Event()
        for _ in range(replays):
            start.record(stream)
            graph.launch(stream)
            end.record(stream)
            end.synchronize()
            times.append(cp.cuda.get_elapsed_time(start, end) / 1e3 / len(calls))
    return statistics.median(times)


def time_torch(calls, replays: int) -> float:
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for c in calls[:3]:
            c()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    if WARMUP_S > 0:  # as _warm_up, on torch's stream
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        for _ in range(_warmup_repeats(start.elapsed_time(end) / 1e3)):
            graph.replay()
        torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / len(calls))
    return statistics.median(times)


def n_sets(bytes_per_set: int) -> int:
    return max(2, math.ceil(3 * L2_BYTES / bytes_per_set))


def bench_shape(dtype, d, h, tokens_list, n_list, args, rng, have_torch):
    rows = []
    default_warps, default_ahead, default_trigger = fm.MMA_WARPS, fm.MMA_AHEAD, fm.PDL_TRIGGER
    default_paired, default_bound = fm.PAIRED_COLUMNS, fm.MIN_BLOCKS_BOUND
    stream = cp.cuda.Stream(non_blocking=True)
    elem = 2
    calls_per_graph = args.calls
    # device copy: the bandwidth ceiling (bytes read + written)
    nbytes = 256 * 2**20
    src, dst = cp.ones(nbytes // 4, cp.float32), cp.empty(nbytes // 4, cp.float32)
    copy_s = min(time_graph([lambda: dst.__setitem__(Ellipsis, src)] * calls_per_graph, args.replays, stream)
                 for _ in range(args.rounds))
    copy_bw = 2 * nbytes / copy_s
    del src, dst

    n_w = n_sets(elem * h * d)
    Ws = [(cp.random.standard_normal((h, d), dtype=cp.float32) / math.sqrt(d)).astype(dtype) for _ in range(n_w)]
    # GLU baseline: stacked gate+up weight (2h, d), cuBLAS through CuPy plus a fused SiLU*mul kernel
    n_g = n_sets(2 * elem * h * d)
    Wg = [(cp.random.standard_normal((2 * h, d), dtype=cp.float32) / math.sqrt(d)).astype(dtype) for _ in range(n_g)]
    silu_mul = _silu_mul_kernel(dtype)
    glu_calls = {}  # T -> {"cupy": thunks, "torch": thunks}
    for T in tokens_list:
        x = cp.asarray(rng.standard_normal((T, d), dtype=np.float32).astype(dtype))
        gu = cp.empty((T, 2 * h), dtype=dtype)
        y = cp.empty((T, h), dtype=dtype)
        blocks = (T * h + 255) // 256

        def glu_call(k, x=x, gu=gu, y=y, T=T, blocks=blocks):
            cp.matmul(x, Wg[k % n_g].T, out=gu)
            silu_mul((blocks,), (256,), (gu, y, np.int32(T), np.int32(h)))

        glu_calls[T] = {"cupy": [lambda k=k, c=glu_call: c(k) for k in range(calls_per_graph)]}
        if have_torch:
            import torch
            import torch.nn.functional as F

            tx = torch.from_dlpack(x)
            tw = [torch.from_dlpack(w) for w in Wg]

            def torch_call(k, tx=tx):
                gu_t = F.linear(tx, tw[k % n_g])
                return F.silu(gu_t[:, :h]) * gu_t[:, h:]

            glu_calls[T]["torch"] = [lambda k=k, c=torch_call: c(k) for k in range(calls_per_graph)]
    # CuPy refuses cuBLAS calls during stream capture: its GLU runs back to back, timed with events.
    glu_rounds = {(T, lib): [] for T in tokens_list for lib in glu_calls[T]}
    for _ in range(args.rounds):
        for T in tokens_list:
            for lib, calls in glu_calls[T].items():
                glu_rounds[T, lib].append(time_events(calls, args.replays, stream) if lib == "cupy"
                                          else time_torch(calls, args.replays))
    glu = {T: {lib: min(glu_rounds[T, lib]) for lib in glu_calls[T]} for T in tokens_list}
    del Wg, glu_calls

    for n in n_list:
        planes = [masks.pack_masks(cp.random.random((n, h, d), dtype=cp.float32) < 0.5) for _ in range(n_w)]
        packed = [fm.pack_weights(W, p) for W, p in zip(Ws, planes)]
        naive_s = None
        if args.naive and (np.dtype(dtype) == dtypes.bfloat16 or args.quick):
            dense = (cp.random.random((n, h, d), dtype=cp.float32) < 0.5).astype(dtype)
            x1 = cp.asarray(rng.standard_normal((1, d), dtype=np.float32).astype(dtype))
            ones = cp.ones((), dtype=dtype)

            def naive_call(W=Ws[0]):
                y = None
                for i in range(n):
                    gate = x1 @ (W * dense[i]).T
                    value = x1 @ (W * (ones - dense[i])).T
                    term = gate.astype(cp.float32)
                    term = term / (1 + cp.exp(-term)) * value.astype(cp.float32)
                    y = term if y is None else y + term
                return y.astype(dtype)

            naive_s = time_events([naive_call] * 3, max(3, args.replays // 4), stream)  # ms-long calls: no graph needed
            del dense
        xs = {T: cp.asarray(rng.standard_normal((T, d), dtype=np.float32).astype(dtype)) for T in tokens_list}
        outs = {T: cp.empty((T, h), dtype=dtype) for T in tokens_list}
        # (warps, groups ahead, PDL, paired columns, register bound); None: the library's choice
        configs = list(itertools.product(args.warps, args.ahead, args.pdl, args.paired, args.bound))
        flash_rounds = {(T, c): [] for T in tokens_list for c in configs}
        for _ in range(args.rounds):  # every (T, configuration) once per round, so slow spells hit them alike
            for T in tokens_list:
                for config in configs:
                    fm.MMA_WARPS, fm.MMA_AHEAD = config[:2]
                    fm.PDL_TRIGGER = config[2] or default_trigger  # launched normally: the library's own build
                    fm.PAIRED_COLUMNS = default_paired if config[3] is None else config[3]
                    fm.MIN_BLOCKS_BOUND = default_bound if config[4] is None else config[4]
                    flash_rounds[T, config].append(time_graph(
                        [lambda k=k, x=xs[T], out=outs[T], pdl=bool(config[2]): fm.flash_mglu(x, packed[k % n_w], out=out, pdl=pdl)
                         for k in range(calls_per_graph)], args.replays, stream))
            fm.MMA_WARPS, fm.MMA_AHEAD, fm.PDL_TRIGGER = default_warps, default_ahead, default_trigger
            fm.PAIRED_COLUMNS, fm.MIN_BLOCKS_BOUND = default_paired, default_bound
        for T in tokens_list:
            by_warps = {c: min(flash_rounds[T, c]) for c in configs}
            t = min(by_warps.values())
            mglu_bytes = 2 * h * d + n * h * d / 8
            best_glu = min(glu[T].values())
            rows.append({
                "dtype": np.dtype(dtype).name, "d": d, "h": h, "T": T, "n": n,
                "copy_TBps": copy_bw / 1e12,
                "flash_us": t * 1e6,
                "flash_us_by_warps": {_config_label(*c): v * 1e6 for c, v in by_warps.items()},
                "flash_us_rounds": {_config_label(*c): [v * 1e6 for v in flash_rounds[T, c]] for c in configs},
                "best_warps": min(by_warps, key=by_warps.get)[0] or fm.mma_config(n, d)[0],
                "flash_TBps": mglu_bytes / t / 1e12, "flash_pct_copy": 100 * mglu_bytes / t / copy_bw,
                "glu_cupy_us": glu[T]["cupy"] * 1e6, "glu_torch_us": glu[T].get("torch", float("nan")) * 1e6,
                "glu_TBps": 4 * h * d / best_glu / 1e12,
                "speedup_vs_glu": best_glu / t, "bound_vs_glu": 32 / (16 + n),
                "naive_us": (naive_s * 1e6 if (naive_s is not None and T == 1) else float("nan")),
                "speedup_vs_naive": (naive_s / t if (naive_s is not None and T == 1) else float("nan")),
            })
            print(_row_md(rows[-1]), flush=True)
        del packed, planes
    del Ws
    cp.get_default_memory_pool().free_all_blocks()
    return rows


def _config_label(warps, ahead, pdl=None, paired=None, bound=None):
    """'lib', '4' (warps), 'a2' (groups ahead), '4a2', each with '+pdl-start' ('+pdl-end') when launched
    with programmatic dependent launch triggered at the blocks' start (after their last loads, the
    library's default); 'pdl-start' or 'pdl-end' alone for the library's configuration; 'p1' / 'p0' when
    the paired-column instance for T <= 4 is forced on / off; 'b1' / 'b0' with the register bound
    (pymglu.cuda.flash_mglu.MIN_BLOCKS_BOUND) forced on / off: the kernel configuration of a timing."""
    label = ("" if warps is None else str(warps)) + ("" if ahead is None else f"a{ahead}")
    label += ("" if paired is None else f"p{int(paired)}") + ("" if bound is None else f"b{int(bound)}")
    if pdl:
        tag = f"pdl-{pdl}"
        return label + "+" + tag if label else tag
    return label or "lib"


HEADER = ("| dtype | d | h | T | n | copy TB/s | FlashMGLU us | TB/s | % copy | GLU cupy us | GLU torch us "
          "| GLU TB/s | vs GLU | bound | naive us | vs naive | warps | us by config (warps, aN: groups ahead) |\n|" + "---|" * 18)


def _row_md(r):
    f = lambda v, p=1: "-" if v != v else f"{v:.{p}f}"  # noqa: E731
    return (f"| {r['dtype']} | {r['d']} | {r['h']} | {r['T']} | {r['n']} | {f(r['copy_TBps'], 2)} | {f(r['flash_us'])} "
            f"| {f(r['flash_TBps'], 2)} | {f(r['flash_pct_copy'])} | {f(r['glu_cupy_us'])} | {f(r['glu_torch_us'])} "
            f"| {f(r['glu_TBps'], 2)} | {f(r['speedup_vs_glu'], 2)}x | {f(r['bound_vs_glu'], 2)}x | {f(r['naive_us'])} "
            f"| {f(r['speedup_vs_naive'])}x | {r['best_warps']} "
            f"| {' '.join(f'{w}:{v:.1f}' for w, v in r['flash_us_by_warps'].items())} |")


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for (dt, d, h) in sorted({(r["dtype"], r["d"], r["h"]) for r in rows}):
        sel = [r for r in rows if (r["dtype"], r["d"], r["h"], r["T"]) == (dt, d, h, 1)]
        ns = [r["n"] for r in sel]
        axes[0].plot(ns, [r["flash_pct_copy"] for r in sel], marker="o", label=f"{dt} {d}x{h}")
        axes[1].plot(ns, [r["speedup_vs_glu"] for r in sel], marker="o", label=f"{dt} {d}x{h}")
    ns = sorted({r["n"] for r in rows})
    axes[1].plot(ns, [32 / (16 + n) for n in ns], "k--", label="byte bound 32/(16+n)")
    axes[0].set(xlabel="masks n", ylabel="% of copy bandwidth (T=1)", title="FlashMGLU effective bandwidth")
    axes[1].set(xlabel="masks n", ylabel="speed-up over best GLU (T=1)", title="FlashMGLU vs cuBLAS GLU")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", default="bench_out")
    p.add_argument("--quick", action="store_true", help="one shape, T in {1, 8}, n in {1, 4, 8}")
    p.add_argument("--dtypes", default="bfloat16,float16")
    p.add_argument("--calls", type=int, default=30, help="calls per captured graph")
    p.add_argument("--replays", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds over all timings of a shape and mask count; each time reported is the fastest round")
    p.add_argument("--warmup", type=float, default=None, help=f"seconds of back-to-back warm-up before each timing (default {WARMUP_S})")
    p.add_argument("--warps", type=lambda s: [None if v == "lib" else int(v) for v in s.split(",")], default=None,
                   help="warps per block of the tensor-core kernel to sweep (default: the library's)")
    p.add_argument("--ahead", type=lambda s: [None if v == "lib" else int(v) for v in s.split(",")], default=None,
                   help="groups each warp keeps in flight (1 to 3) to sweep, with every --warps value (default: the library's)")
    p.add_argument("--shapes", type=lambda t: [tuple(int(v) for v in item.split("x")) for item in t.split(",")],
                   default=None, help="d x h shapes, e.g. 2048x8192,4096x14336 (default: the issue's, or two with --quick)")
    p.add_argument("--pdl", type=lambda s: s.split(","), default=["off"],
                   help="comma list of launch modes timed as separate configurations in the same rounds: off (normal "
                        "launch), start (flash_mglu(pdl=True), the next call may start once every block has started), "
                        "end (pdl=True with PDL_TRIGGER = 'end': once every block has issued its last loads)")
    p.add_argument("--paired", type=lambda s: [{"lib": None, "on": True, "off": False}[v] for v in s.split(",")],
                   default=[None], help="comma list of lib, on, off: the paired-column instance for T <= 4 "
                                        "(pymglu.cuda.flash_mglu.PAIRED_COLUMNS), timed as separate configurations")
    p.add_argument("--bound", type=lambda s: [{"lib": None, "on": True, "off": False}[v] for v in s.split(",")],
                   default=[None], help="comma list of lib, on, off: the tensor-core instances built with or without "
                                        "the 16-warps-per-SM register bound (pymglu.cuda.flash_mglu.MIN_BLOCKS_BOUND)")
    p.add_argument("--tokens", type=lambda s: [int(v) for v in s.split(",")], default=None,
                   help="token counts (default: the issue's, or 1, 8, 16 with --quick)")
    p.add_argument("--masks", type=lambda s: [int(v) for v in s.split(",")], default=None,
                   help="mask counts (default: the issue's, or 1, 4, 8 with --quick)")
    p.add_argument("--no-naive", dest="naive", action="store_false")
    p.add_argument("--no-torch", dest="torch", action="store_false")
    args = p.parse_args(argv)
    if args.warmup is not None:
        globals()["WARMUP_S"] = args.warmup
    args.warps = args.warps or [None]  # None: the library's choice (pymglu.cuda.flash_mglu.mma_config)
    args.ahead = args.ahead or [None]  # None: the library's choice (pymglu.cuda.flash_mglu.mma_config)
    bad = [m for m in args.pdl if m not in ("off", "start", "end")]
    if bad:
        p.error(f"--pdl: expected off, start or end, got {bad}")
    args.pdl = [None if m == "off" else m for m in args.pdl]
    have_torch = False
    if args.torch:
        try:
            import torch

            have_torch = torch.cuda.is_available()
        except Exception:
            have_torch = False
    shapes, tokens, ns = (SHAPES[1:], [1, 8, 16], [1, 4, 8]) if args.quick else (SHAPES, TOKENS, N_MASKS)
    shapes, tokens, ns = args.shapes or shapes, args.tokens or tokens, args.masks or ns
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    print(f"device: {dev['name'].decode()}  torch baseline: {have_torch}", flush=True)
    print(HEADER, flush=True)
    rng = np.random.default_rng(0)
    cp.random.seed(0)
    rows = []
    for dt in args.dtypes.split(","):
        for d, h in shapes:
            rows += bench_shape(np.dtype(getattr(dtypes, dt)), d, h, tokens, ns, args, rng, have_torch)
            # written after every shape, so that a run cut short keeps what it measured
            (out / "decode.json").write_text(json.dumps(rows, indent=1))
            (out / "decode.md").write_text(" ".join(sys.argv) + "\n\n" + HEADER + "\n"
                                           + "\n".join(_row_md(r) for r in rows) + "\n")
            plot(rows, out / "decode.png")


if __name__ == "__main__":
    main()
