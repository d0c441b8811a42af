"""Where the time of one graph decode step goes: each launch of a block's step timed on its own.

Usage (GPU): ``python benchmarks/profile_decode_step.py [--n-layers 2] [--position 144]``

For SwiGLU and SwiMGLU n = 4 at the shapes of ``decode_e2e.py`` (random weights), every launch of the
first block's step (and the final norm, head and argmax) is captured ``--reps`` times back to back in a
CUDA graph on the decoder's stream, the graph is replayed and timed with CUDA events, and the median
time per launch is printed, next to the whole step replayed the same way (its launches advance the
position, so the whole step is timed from the position given and on). Launch gaps inside a graph are
part of each figure, as they are of the step.
"""
from __future__ import annotations

import argparse
import statistics

import numpy as np

import cupy as cp
from cupy_backends.cuda.libs import cublas

from pymglu.cuda.flash_mglu import flash_mglu
from pymglu.cuda.gemm import gemm
from pymglu.models import GraphDecoder, TransformerConfig

from decode_e2e import build


def time_launch(decoder: GraphDecoder, launch, reps: int, replays: int) -> float:
    """Median seconds per call of ``launch`` captured ``reps`` times in one graph."""
    s = decoder.stream
    with s:
        launch()
        cublas.setStream(cp.cuda.device.get_cublas_handle(), s.ptr)
        s.begin_capture()
        try:
            for _ in range(reps):
                launch()
        finally:
            graph = s.end_capture()
        start, end = cp.cuda.Event(), cp.cuda.Event()
        times = []
        for _ in range(replays):
            start.record(s)
            graph.launch(s)
            end.record(s)
            end.synchronize()
            times.append(cp.cuda.get_elapsed_time(start, end) / 1e3 / reps)
    return statistics.median(times)


def profile(decoder: GraphDecoder, position: int, reps: int, replays: int) -> list[tuple[str, float]]:
    k, c, blk = decoder.kernels, decoder.config, decoder.blocks[0]
    decoder.state[...] = cp.asarray([position, 0], dtype=np.int32)
    launches = [
        ("embed", lambda: k.embed(decoder.ids, decoder.embed_table, decoder.x)),
        ("rms_norm", lambda: k.rms_norm(decoder.x, blk.attn_norm, decoder.x_norm, c.norm_eps)),
        ("gemm qkv", lambda: gemm(decoder.x_norm, blk.wqkv, decoder.qkv, trans_b=True)),
        ("rope + cache store", lambda: k.rope_store(decoder.qkv, decoder.q, decoder.cache.keys[0],
                                                     decoder.cache.values[0], decoder.state, c.rope_base)),
        ("attention (partial + combine)", lambda: k.attention(decoder.q, decoder.cache.keys[0],
                                                               decoder.cache.values[0], decoder.attn, decoder.state,
                                                               decoder.attention_workspace)),
        ("gemm o (accumulate)", lambda: gemm(decoder.attn, blk.wo, decoder.x, trans_b=True, accumulate=True)),
    ]
    if blk.mglu:
        launches.append(("FlashMGLU", lambda: flash_mglu(decoder.x_norm, blk.flash_weights, None, blk.activation,
                                                          out=decoder.hidden)))
    else:
        launches.append(("gemm gate+value", lambda: gemm(decoder.x_norm, blk.w_gate_value, decoder.gate_value,
                                                         trans_b=True)))
        launches.append(("glu activation", lambda: k.glu(decoder.gate_value, decoder.hidden, blk.activation)))
    launches += [
        ("gemm down (accumulate)", lambda: gemm(decoder.hidden, blk.w_down, decoder.x, trans_b=True, accumulate=True)),
        ("head gemm", lambda: gemm(decoder.x_norm, decoder.head, decoder.logits, trans_b=True)),
        ("argmax", lambda: k.argmax(decoder.logits, decoder.ids, decoder.history, decoder.state)),
    ]
    rows = [(name, time_launch(decoder, fn, reps, replays)) for name, fn in launches]
    decoder.state[...] = cp.asarray([position, 0], dtype=np.int32)
    steps = min(reps, c.max_seq_len - position - 1)
    rows.append((f"whole step ({c.n_layers} layers)", time_launch(decoder, lambda: decoder._record_step("greedy"),
                                                                 steps, 1)))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--position", type=int, default=144)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--replays", type=int, default=7)
    args = p.parse_args()
    common = dict(vocab_size=256, d_model=2048, n_layers=args.n_layers, n_heads=16, d_ff=8192,
                  max_seq_len=args.position + 2 * args.reps + 2, dtype="bfloat16")
    results = {}
    for seed, (name, cfg) in enumerate([("SwiGLU", TransformerConfig(ffn_kind="swiglu", **common)),
                                        ("SwiMGLU n=4", TransformerConfig(ffn_kind="swimglu", n_masks=4, **common))]):
        decoder = GraphDecoder(build(cfg, seed), 1)
        decoder.prefill(np.random.default_rng(0).integers(0, 256, size=(1, args.position)))
        results[name] = profile(decoder, args.position, args.reps, args.replays)
    print(f"| launch (block 0, position {args.position}) | " + " | ".join(f"{n} µs" for n in results) + " |")
    print("|---|" + "---|" * len(results))
    order = [n for rows in results.values() for n, _ in rows]
    for n in dict.fromkeys(order):
        cells = [f"{1e6 * dict(rows)[n]:.1f}" if n in dict(rows) else "—" for rows in results.values()]
        print(f"| {n} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
