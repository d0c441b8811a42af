"""End-to-end decode benchmark: a 1B-class Transformer, SwiGLU against SwiMGLU, batch 1, bfloat16.

Usage (on a machine with a CUDA GPU and CuPy):

    python benchmarks/decode_e2e.py --out-dir bench_out          # d 2048, h 8192, 16 layers
    python benchmarks/decode_e2e.py --quick                      # 4 layers, fewer repeats

Each model (random weights and random masks, drawn on the GPU) decodes with
:class:`pymglu.models.GraphDecoder`, with each step kind of ``--kinds``: ``fused`` (one persistent launch
per token, ``pymglu.cuda.decode_fused``) and ``launches`` (about ten launches per block, cuBLAS
products and FlashMGLU). A 16-token prompt is prefilled, then ``--steps`` greedy tokens are
decoded by replaying the captured one-token step back to back, timed with CUDA events on the decoder's
stream; the median over ``--repeats`` runs (the models take turns) is reported. Same run: a
device-to-device copy of 1 GiB (the bandwidth ceiling) and the eager cached decode of each model (one
Python-driven step per token, host-synchronised as ``generate`` is), to show what the graph removes.

Bytes per token count what one step must read: every weight matrix of every block (``W_q, W_k, W_v,
W_o``; SwiGLU's ``W_gate, W_value, W_down``, SwiMGLU's ``W, W_down`` plus ``n`` mask bits per element
of ``W``), the norm weights, the output projection (the tied embedding table), one embedding row, and
the keys and values of the cached positions at the mean position of the timed steps. The byte ratio of
the two models bounds the speed-up. Outputs ``decode_e2e.md`` and ``decode_e2e.json``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import cupy as cp

import pymglu
from pymglu.cuda import decode_fused
from pymglu.models import GraphDecoder, Transformer, TransformerConfig
from pymglu.nn import _init

PROMPT = 16


@contextlib.contextmanager
def host_zeros_init():
    """Build the model with zero-filled host parameters (fast); the caller draws them on the GPU."""
    saved = _init.normal
    _init.normal = lambda rng, shape, std, dtype: np.zeros(shape, dtype=dtype)
    try:
        yield
    finally:
        _init.normal = saved


def build(config: TransformerConfig, seed: int) -> Transformer:
    """``config``'s model on the GPU with random weights (``N(0, 1/d_in)``) and random mask logits."""
    with host_zeros_init():
        model = Transformer(config)
    model.to("cuda")
    rng = cp.random.default_rng(seed)
    for name, p in model.named_parameters():
        if p.ndim == 1:
            continue  # RMSNorm weights stay ones
        std = 1.0 if name.endswith("mask_logits") else p.shape[-1] ** -0.5
        p.data = (rng.standard_normal(p.shape, dtype=np.float32) * std).astype(p.dtype)
    return model.eval()


def bytes_per_token(model: Transformer, mean_position: float) -> dict[str, float]:
    """What one decode step of ``model`` reads, in bytes, split by part."""
    c = model.config
    item = np.dtype(c.np_dtype).itemsize
    weights = sum(p.size for name, p in model.named_parameters()
                  if p.ndim == 2 and not name.startswith("embed")) * item
    masks = model.num_mask_bits() / 8
    norms = (2 * c.n_layers + 1) * c.d_model * item
    head = c.vocab_size * c.d_model * item + c.d_model * item  # tied table, plus one embedding row
    kv = 2 * c.n_layers * c.d_model * (mean_position + 1) * item
    return {"weights": weights, "masks": masks, "norms": norms, "head": head, "kv_cache": kv,
            "total": weights + masks + norms + head + kv}


def copy_bandwidth(repeats: int) -> float:
    """Median bytes/s of a 1 GiB device-to-device copy (read + write counted)."""
    src = cp.random.standard_normal(2**27, dtype=np.float64)  # 1 GiB
    dst = cp.empty_like(src)
    start, end = cp.cuda.Event(), cp.cuda.Event()
    times = []
    for _ in range(repeats + 1):
        start.record()
        dst[...] = src
        end.record()
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end) / 1e3)
    del src, dst
    return 2 * 2**30 / statistics.median(times[1:])


def time_graph_decode(decoder: GraphDecoder, prompt: np.ndarray, steps: int) -> float:
    """Seconds per token of ``steps`` greedy graph steps after a prefill of ``prompt``."""
    first = int(decoder.prefill(prompt)[0].argmax())
    start, end = cp.cuda.Event(), cp.cuda.Event()
    start.record(decoder.stream)
    decoder.greedy([first], steps)
    end.record(decoder.stream)
    end.synchronize()
    return cp.cuda.get_elapsed_time(start, end) / 1e3 / steps


def time_eager_decode(model: Transformer, prompt: np.ndarray, steps: int) -> float:
    """Wall seconds per token of the eager cached decode (as ``generate(use_graph=False)`` runs it)."""
    with pymglu.no_grad():
        cache = model.new_cache(1)
        logits = model(cp.asarray(prompt), cache=cache, last_only=True)
        token = int(logits.data[0, -1].argmax().get())
        cp.cuda.Device().synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            logits = model(cp.asarray([[token]]), cache=cache, last_only=True)
            token = int(logits.data[0, -1].argmax().get())
        return (time.perf_counter() - t0) / steps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d-model", type=int, default=2048)
    p.add_argument("--d-ff", type=int, default=8192)
    p.add_argument("--n-layers", type=int, default=16)
    p.add_argument("--n-heads", type=int, default=16)
    p.add_argument("--vocab-size", type=int, default=256)
    p.add_argument("--masks", type=int, nargs="+", default=[4], help="SwiMGLU mask counts to run")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--steps", type=int, default=256, help="greedy tokens per timed run")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--eager-steps", type=int, default=16)
    p.add_argument("--kinds", default="fused,launches", help="step kinds to time, comma-separated")
    p.add_argument("--fused-warps", type=int, default=None, choices=[8, 16],
                   help="warps per block of the fused step (default: the library's choice)")
    p.add_argument("--staged-merge", type=int, default=None,
                   help="the fused step's STAGED_MERGE_CHUNKS (0: the attention chunks always merged in the attention "
                        "phase; default: the library's)")
    p.add_argument("--teams", default="",
                   help="teams per block to force for some products of the fused step, e.g. up=2 (both models; "
                        "default: the library's rule, decode_fused.choose_teams)")
    p.add_argument("--quick", action="store_true", help="4 layers, 5 repeats")
    p.add_argument("--out-dir", type=Path, default=Path("bench_out"))
    args = p.parse_args(argv)
    if args.quick:
        args.n_layers, args.repeats = 4, 5
    args.out_dir.mkdir(parents=True, exist_ok=True)
    max_seq_len = PROMPT + args.steps + 1
    common = dict(vocab_size=args.vocab_size, d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
                  d_ff=args.d_ff, max_seq_len=max_seq_len, tie_embeddings=True, dtype=args.dtype)
    variants = [("SwiGLU", TransformerConfig(ffn_kind="swiglu", **common))]
    variants += [(f"SwiMGLU n={n}", TransformerConfig(ffn_kind="swimglu", n_masks=n, **common)) for n in args.masks]
    prompt = np.random.default_rng(0).integers(0, args.vocab_size, size=(1, PROMPT))
    mean_position = PROMPT + (args.steps - 1) / 2

    copy_bw = copy_bandwidth(args.repeats)
    models = {name: build(cfg, seed) for seed, (name, cfg) in enumerate(variants)}
    decode_fused.WARPS_OVERRIDE = args.fused_warps
    if args.staged_merge is not None:
        decode_fused.STAGED_MERGE_CHUNKS = args.staged_merge
    decode_fused.TEAMS_OVERRIDE = {k: int(v) for k, v in (kv.split("=") for kv in args.teams.split(",") if kv)}
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if not kinds or set(kinds) - {"fused", "launches"}:
        p.error(f"--kinds: expected 'fused' and/or 'launches', got {args.kinds!r}")
    decoders = {(name, kind): GraphDecoder(m, 1, fused=kind == "fused") for name, m in models.items() for kind in kinds}
    for key in decoders:  # capture, compile and warm up outside the timed runs
        time_graph_decode(decoders[key], prompt, 4)
    graph_s: dict[tuple[str, str], list[float]] = {key: [] for key in decoders}
    for _ in range(args.repeats):
        for key in graph_s:
            graph_s[key].append(time_graph_decode(decoders[key], prompt, args.steps))
    eager_s = {name: time_eager_decode(m, prompt, args.eager_steps) for name, m in models.items()}

    rows = []
    for kind in kinds:
        base = None
        for name, model in models.items():
            b = bytes_per_token(model, mean_position)
            s = statistics.median(graph_s[name, kind])
            row = {"variant": name, "step": kind, "params": model.num_weights(),
                   "mask_bits": model.num_mask_bits(), "bytes_per_token": b, "graph_s_per_token": s,
                   "graph_tokens_per_s": 1 / s, "graph_all_s": graph_s[name, kind],
                   "effective_GBps": b["total"] / s / 1e9, "share_of_copy": b["total"] / s / copy_bw,
                   "eager_s_per_token": eager_s[name], "eager_tokens_per_s": 1 / eager_s[name]}
            if base is None:
                base = row
            else:
                row["speedup"] = base["graph_s_per_token"] / s
                row["byte_bound"] = base["bytes_per_token"]["total"] / b["total"]
                row["share_of_bound"] = row["speedup"] / row["byte_bound"]
                row["share_of_bound_gain"] = (row["speedup"] - 1) / (row["byte_bound"] - 1)
            rows.append(row)

    dev = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"].decode()
    lines = [f"Device: {dev}; {args.dtype}, batch 1, d {args.d_model}, h {args.d_ff}, {args.n_layers} layers, "
             f"{args.n_heads} heads, vocab {args.vocab_size} (tied), prompt {PROMPT}, {args.steps} greedy tokens "
             f"per run, median of {args.repeats}; copy bandwidth {copy_bw / 1e9:.0f} GB/s.", "",
             "| model | step | weights | MB read per token | graph tokens/s | ms/token | effective GB/s | % of copy "
             "| eager tokens/s | speed-up over SwiGLU (same step) | byte bound | speed-up / bound |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        extra = (f"{r['speedup']:.3f}x | {r['byte_bound']:.3f}x | {100 * r['share_of_bound']:.1f}% "
                 f"({100 * r['share_of_bound_gain']:.0f}% of the gain)" if "speedup" in r else "— | — | —")
        lines.append(f"| {r['variant']} | {r['step']} | {r['params'] / 1e6:.0f}M | {r['bytes_per_token']['total'] / 1e6:.1f} "
                     f"| {r['graph_tokens_per_s']:.0f} | {1e3 * r['graph_s_per_token']:.3f} "
                     f"| {r['effective_GBps']:.0f} | {100 * r['share_of_copy']:.1f}% "
                     f"| {r['eager_tokens_per_s']:.0f} | {extra} |")
    table = "\n".join(lines)
    print(table)
    (args.out_dir / "decode_e2e.md").write_text(table + "\n")
    (args.out_dir / "decode_e2e.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "device": dev, "copy_Bps": copy_bw, "rows": rows},
        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
