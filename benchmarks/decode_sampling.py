"""Sampled decoding with the token drawn on the device against drawn on the host, and greedy decoding.

Usage (on a machine with a CUDA GPU and CuPy):

    python benchmarks/decode_sampling.py --out-dir bench_out

Two models, batch 1, bfloat16, random weights (``decode_e2e.build``): the 1B-class configuration of
``decode_e2e.py`` and the small model of ``examples/compare_ffn.py``, each with SwiGLU and SwiMGLU n = 4.
Each decodes with :class:`pymglu.models.GraphDecoder` (the fused step where served) in three ways, after
the same 16-token prompt:

* ``greedy``: ``decoder.greedy`` (argmax on the device, the replays back to back);
* ``device sampling``: ``decoder.sample`` (temperature and top-k drawn on the device from uniform draws
  uploaded once per call, the replays back to back): what ``generate`` runs since stop 24;
* ``host sampling``: ``decoder.step`` and ``choose_next`` per token (the logits copied to the host, the
  choice made there, the token uploaded): what ``generate`` ran before.

Every run is timed on the host's clock from the first replay to the last token on the host (all three end
with a host copy, and host sampling waits on the device every token); median over ``--repeats`` runs, the
three ways taking turns. Outputs ``decode_sampling.md`` and ``decode_sampling.json``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import cupy as cp

from decode_e2e import PROMPT, build
from pymglu.models import GraphDecoder, TransformerConfig
from pymglu.models.generation import choose_next

CONFIGS = {"1B-class": dict(d_model=2048, d_ff=8192, n_layers=16, n_heads=16),
           "compare_ffn": dict(d_model=256, d_ff=1024, n_layers=4, n_heads=4)}


def run(decoder: GraphDecoder, how: str, prompt: np.ndarray, steps: int, temperature: float, top_k: int,
        seed: int) -> float:
    """Seconds per token of ``steps`` tokens decoded ``how`` after a prefill of ``prompt``."""
    first = decoder.prefill(prompt).argmax(-1)
    rng = np.random.default_rng(seed)
    decoder.stream.synchronize()
    t0 = time.perf_counter()
    if how == "greedy":
        decoder.greedy(first, steps)
    elif how == "device sampling":
        decoder.sample(first, steps, temperature, top_k, rng.random((steps, 1)))
    else:
        token = first
        for _ in range(steps):
            token = choose_next(decoder.step(token), temperature, top_k, rng)
    return (time.perf_counter() - t0) / steps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of: " + ", ".join(CONFIGS))
    p.add_argument("--steps", type=int, default=256)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--out-dir", type=Path, default=Path("bench_out"))
    args = p.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    prompt = np.random.default_rng(0).integers(0, 256, size=(1, PROMPT))
    ways = ("greedy", "device sampling", "host sampling")
    rows = []
    for config_name in [c.strip() for c in args.configs.split(",") if c.strip()]:
        common = dict(vocab_size=256, max_seq_len=PROMPT + args.steps + 1, tie_embeddings=True, dtype="bfloat16",
                      **CONFIGS[config_name])
        for seed, (label, kind, n) in enumerate((("SwiGLU", "swiglu", None), ("SwiMGLU n=4", "swimglu", 4))):
            model = build(TransformerConfig(ffn_kind=kind, n_masks=n, **common), seed)
            decoder = GraphDecoder(model, 1)
            for how in ways:  # capture, compile, warm up
                run(decoder, how, prompt, 4, args.temperature, args.top_k, 0)
            times: dict[str, list[float]] = {how: [] for how in ways}
            for r in range(args.repeats):
                for how in ways:
                    times[how].append(run(decoder, how, prompt, args.steps, args.temperature, args.top_k, r))
            for how in ways:
                s = statistics.median(times[how])
                rows.append({"config": config_name, "model": label, "fused": decoder.fused, "way": how,
                             "s_per_token": s, "tokens_per_s": 1 / s, "all_s": times[how]})
            del decoder, model
            cp.get_default_memory_pool().free_all_blocks()

    dev = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"].decode()
    lines = [f"Device: {dev}; bfloat16, batch 1, vocab 256, prompt {PROMPT}, {args.steps} tokens per run, temperature "
             f"{args.temperature}, top-k {args.top_k}, median of {args.repeats} runs (host clock).", "",
             "| model | FFN | step | greedy ms/token | device sampling ms/token | host sampling ms/token "
             "| device sampling over host sampling | device sampling over greedy |", "|---|---|---|---|---|---|---|---|"]
    for k in range(0, len(rows), 3):
        g, d, h = rows[k:k + 3]
        lines.append(f"| {g['config']} | {g['model']} | {'fused' if g['fused'] else 'launches'} "
                     f"| {1e3 * g['s_per_token']:.3f} | {1e3 * d['s_per_token']:.3f} | {1e3 * h['s_per_token']:.3f} "
                     f"| {h['s_per_token'] / d['s_per_token']:.2f}x faster | {d['s_per_token'] / g['s_per_token']:.3f}x |")
    table = "\n".join(lines)
    print(table)
    (args.out_dir / "decode_sampling.md").write_text(table + "\n")
    (args.out_dir / "decode_sampling.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "device": dev, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
