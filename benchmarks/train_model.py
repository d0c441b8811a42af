"""Whole training steps of a small language model on one GPU: eager (optimizer kernels on and off) and
replayed from a captured CUDA graph.

Usage (on a machine with a CUDA GPU and CuPy):

    python benchmarks/train_model.py --out-dir bench_out

Models (bfloat16 with fp32 master weights, or ``--dtype float32`` / ``float16``; AdamW with warmup + cosine and
gradient clipping, through :class:`pymglu.models.training.Trainer`, random bytes as data):

* ``large``: d 1024, 8 layers, 8 heads, h 4096, 512 tokens x 16 windows per step;
* ``compare_ffn``: the model of ``examples/compare_ffn.py`` (d 256, 4 layers, h 1024, 256 x 32).

Each with SwiGLU and with SwiMGLU n = 4, in three variants: ``kernels`` (eager steps with
:mod:`pymglu.cuda.optimizers`: one kernel per parameter, the mask logits' update also writing the
bit-planes the next forward reads), ``expressions`` (the same trainer with those kernels disabled: CuPy
array expressions, the forward packing the logits) and ``graph`` (a second trainer, same initial model,
whose steps replay a captured CUDA graph: :class:`pymglu.models.GraphTrainStep`). Per model, ``--warmup``
steps of each trainer, then ``--rounds`` rounds in which each variant runs ``--steps`` steps in turn;
wall clock between two device synchronisations, median over the rounds. Run from an older checkout
(``PYTHONPATH``) it times what that checkout has. Then ``Trainer.evaluate`` (``--eval-batches`` batches)
of the eager and of the graph trainer, ``--rounds`` times each (the row's ms is per evaluation). Writes
``train_model.md`` and ``train_model.json``.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

MODELS = {
    "large": dict(d_model=1024, n_layers=8, n_heads=8, d_ff=4096, max_seq_len=512, batch=16),
    "compare_ffn": dict(d_model=256, n_layers=4, n_heads=4, d_ff=1024, max_seq_len=256, batch=32),
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="large,compare_ffn")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"),
                   help="parameter dtype (float16: with the dynamic loss scaler, on the host when eager, on the device in the graph)")
    p.add_argument("--eval-batches", type=int, default=16,
                   help="validation batches of Trainer.evaluate, timed once per round for the eager and the graph trainer")
    p.add_argument("--out-dir", default="bench_out")
    args = p.parse_args(argv)
    import cupy as cp

    try:
        from pymglu.cuda import optimizers
    except ImportError:  # a checkout from before the optimizer kernels: time its plain steps
        optimizers = None
    from pymglu.models import Transformer, TransformerConfig
    from pymglu.models.training import Trainer, TrainSettings

    has_graph = "graph" in inspect.signature(Trainer).parameters

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(0).integers(0, 256, size=4_000_000, dtype=np.uint8)
    rows = []
    for model_name in args.models.split(","):
        spec = dict(MODELS[model_name])
        batch = spec.pop("batch")
        for ffn in ("swiglu", "swimglu"):
            config = TransformerConfig(ffn_kind=ffn, n_masks=4 if ffn == "swimglu" else None, dtype=args.dtype, **spec)
            total = args.warmup + len(VARIANTS) * args.rounds * args.steps
            settings = TrainSettings(steps=total, batch_size=batch, lr=1e-3, warmup_steps=2, eval_every=0,
                                     eval_batches=args.eval_batches, seed=0)

            def trainer_for(graph):
                model = Transformer(config, rng=0).to("cuda")
                kwargs = {"graph": graph} if has_graph else {}
                return Trainer(model, settings, data[:3_900_000], data[3_900_000:], **kwargs)

            eager = trainer_for(False)
            variants = {"kernels": (eager, contextlib.nullcontext)}
            if optimizers is not None:
                variants["expressions"] = (eager, optimizers.disabled)
            else:
                variants = {"(no optimizer kernels)": (eager, contextlib.nullcontext)}
            if has_graph:
                variants["graph"] = (trainer_for(True), contextlib.nullcontext)
            for trainer, _ in variants.values():
                for _ in range(args.warmup):
                    trainer.train_step(sync=False)
                trainer.flush()
            times: dict[str, list[float]] = {label: [] for label in variants}
            for _ in range(args.rounds):
                for label, (trainer, context) in variants.items():
                    cp.cuda.Device().synchronize()
                    start = time.perf_counter()
                    with context():
                        for _ in range(args.steps):
                            trainer.train_step(sync=False)
                    trainer.flush()
                    cp.cuda.Device().synchronize()
                    times[label].append((time.perf_counter() - start) / args.steps)
            tokens = batch * config.max_seq_len
            for label, ts in times.items():
                trainer = variants[label][0]
                ms = statistics.median(ts) * 1e3
                rows.append({"model": model_name, "ffn": ffn, "optimizer": label, "step_ms": ms,
                             "tokens_per_s": tokens / ms * 1e3, "final_loss": trainer.history.train_loss[-1]})
                print(_row(rows[-1]), flush=True)
            evaluations: dict[str, list[float]] = {}
            for label in ("kernels", "graph"):
                if label not in variants:
                    continue
                trainer = variants[label][0]
                trainer.evaluate()  # eager first pass per shape, then the recording (graph trainer)
                trainer.evaluate()
                for _ in range(args.rounds):
                    cp.cuda.Device().synchronize()
                    start = time.perf_counter()
                    trainer.evaluate()
                    evaluations.setdefault(label, []).append(time.perf_counter() - start)
            eval_tokens = sum(x.size for x, _ in eager._eval_set)
            for label, ts in evaluations.items():
                ms = statistics.median(ts) * 1e3
                rows.append({"model": model_name, "ffn": ffn, "optimizer": f"evaluate ({label})", "step_ms": ms,
                             "tokens_per_s": eval_tokens / ms * 1e3, "final_loss": float("nan")})
                print(_row(rows[-1]), flush=True)
            del trainer, eager, variants
            cp.get_default_memory_pool().free_all_blocks()
    table = HEADER + "\n" + "\n".join(_row(r) for r in rows) + "\n"
    (out / "train_model.md").write_text(table)
    (out / "train_model.json").write_text(json.dumps(rows, indent=1))
    print(table)


VARIANTS = ("kernels", "expressions", "graph")
HEADER = ("| model | FFN | optimizer update | ms/step | tokens/s | last loss |\n"
          "|---|---|---|---:|---:|---:|")


def _row(r: dict) -> str:
    return (f"| {r['model']} | {r['ffn']} | {r['optimizer']} | {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | "
            f"{r['final_loss']:.3f} |")


if __name__ == "__main__":
    sys.exit(main())
