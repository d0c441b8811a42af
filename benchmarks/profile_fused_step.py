"""Where the time of one fused decode step goes: per-phase timestamps of every block (H200 or any GPU).

Usage: python benchmarks/profile_fused_step.py [--quick] [--masks 4] [--position 144]

Builds the decode_e2e.py models (SwiGLU and SwiMGLU, d 2048, h 8192, 16 layers, bf16, batch 1, random
weights), prefills ``--position`` tokens, then runs single fused launches with
``FusedDecodeStep.trace`` set: each block writes %globaltimer at its start, at the end of each phase (its
arrival at the phase boundary), at its release and at its end. A release is a grid barrier's after the
q k v and attention phases, and after the o, up and down phases the moment the block holds every row of
the flagged packets its next staging reads (stop 30). For each phase kind (q k v, attention, o, up, down,
logits) the table gives, as medians over the layers of the last of ``--launches`` launches:
- ``work max``: the slowest block's time from its release (or start) to its arrival (the phase's
  critical path), and ``work mean`` over the blocks;
- ``release``: the time from the last arrival to the first release (what the barrier or the wait for the
  packets costs).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cupy as cp  # noqa: E402

from decode_e2e import build  # noqa: E402
from pymglu.models import GraphDecoder, TransformerConfig  # noqa: E402

PHASES = ("qkv", "attention", "o", "up", "down")


def profile(decoder: GraphDecoder, launches: int) -> dict[str, tuple[float, float, float]]:
    step = decoder.fused_step
    first = np.zeros(1, dtype=np.int32)
    for _ in range(launches):
        trace = step.new_trace()
        with decoder.stream:
            decoder.ids.set(first, stream=decoder.stream)
            step.launch(True)
        decoder.stream.synchronize()
        decoder.state[0] -= 1  # stay at the same position
    t = trace.get().astype(np.int64)
    K = step.barriers
    out: dict[str, list] = {p: [] for p in PHASES + ("logits",)}
    for k in range(K + 1):
        start = t[0] if k == 0 else t[2 * k]          # releases of barrier k - 1 (or the start)
        end = t[1 + 2 * k]                             # arrivals at barrier k (or the end)
        work = (end - start) / 1e3
        release = (t[2 + 2 * k].min() - t[1 + 2 * k].max()) / 1e3 if k < K else 0.0
        out[PHASES[k % 5] if k < K else "logits"].append((work.max(), work.mean(), release))
    total = (t[-1].max() - t[0].min()) / 1e3
    rows = {p: tuple(statistics.median(v[i] for v in vals) for i in range(3)) for p, vals in out.items()}
    rows["total (us)"] = (total, total, 0.0)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--masks", type=int, default=4)
    ap.add_argument("--position", type=int, default=144)
    ap.add_argument("--launches", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="4 layers")
    ap.add_argument("--fused-warps", type=int, default=None, choices=[8, 16])
    ap.add_argument("--staged-merge", type=int, default=None, help="the fused step's STAGED_MERGE_CHUNKS")
    ap.add_argument("--teams", default="", help="teams per product to force, e.g. up=2,qkv=4")
    args = ap.parse_args(argv)
    from pymglu.cuda import decode_fused

    decode_fused.WARPS_OVERRIDE = args.fused_warps
    if args.staged_merge is not None:
        decode_fused.STAGED_MERGE_CHUNKS = args.staged_merge
    decode_fused.TEAMS_OVERRIDE = {k: int(v) for k, v in (kv.split("=") for kv in args.teams.split(",") if kv)}
    common = dict(vocab_size=256, d_model=2048, n_layers=4 if args.quick else 16, n_heads=16, d_ff=8192,
                  max_seq_len=args.position + 8, tie_embeddings=True, dtype="bfloat16")
    variants = {"SwiGLU": TransformerConfig(ffn_kind="swiglu", **common),
                f"SwiMGLU n={args.masks}": TransformerConfig(ffn_kind="swimglu", n_masks=args.masks, **common)}
    prompt = np.random.default_rng(0).integers(0, 256, size=(1, args.position))
    print(f"fused step, position {args.position}; us per phase (median over layers): slowest block / mean "
          "block / barrier release after the last arrival\n")
    for seed, (name, cfg) in enumerate(variants.items()):
        decoder = GraphDecoder(build(cfg, seed), 1, fused=True)
        decoder.prefill(prompt)
        rows = profile(decoder, args.launches)
        print(f"| {name} ({decoder.fused_step.warps} warps, teams {decoder.fused_step.teams}) | slowest | mean | release |\n|---|---|---|---|")
        for p, (mx, mean, rel) in rows.items():
            print(f"| {p} | {mx:.2f} | {mean:.2f} | {rel:.2f} |")
        print()
        del decoder
        cp.get_default_memory_pool().free_all_blocks()
    return 0


if __name__ == "__main__":
    sys.exit(main())
