"""Train a small byte-level Llama-style language model with pymglu alone (no PyTorch).

    python examples/train_lm.py                      # CPU default: SwiMGLU (4 masks), about a minute on 2 cores
    python examples/train_lm.py --ffn swiglu         # the same model with a SwiGLU feed-forward
    python examples/train_lm.py --data input.txt --out runs/mine --steps 2000
    python examples/train_lm.py --out runs/mine --steps 4000 --resume   # continue that run
    mpiexec -n 2 python examples/train_lm.py --distributed --out runs/dp   # data parallel, 2 processes

Data: ``--data FILE`` (raw bytes, any text), or by default the help pages every CPython ships
(``pydoc_data.topics``); the first 90% trains, the last 10% validates. Each step draws random windows
of ``--seq-len`` bytes. AdamW (mask logits and norm weights undecayed) with linear warmup and cosine
decay, gradient clipping at ``--grad-clip``; validation loss every ``--eval-every`` steps, after which the
checkpoint ``OUT/checkpoint.safetensors`` (model, optimizer, config, step) is rewritten atomically. At
the end the model writes a sample from a prompt, decoding with its KV cache.

``--device auto`` runs on CuPy when a CUDA device is usable, else on NumPy.

``--distributed`` (under ``mpiexec -n N``): data parallelism through :mod:`pymglu.distributed`, MPI on the
CPU and NCCL on GPUs (one GPU per rank; the NCCL path is untested on hardware). ``--batch-size`` is the
global batch, split evenly over the ranks; gradients are averaged after each backward pass; only rank 0
prints and writes the checkpoint; the checkpoint resumes at any world size that divides the batch. Ranks
first check that they run the same configuration; a rank that fails, or stops answering for
``--dist-timeout`` seconds, ends the whole job with an error (docs/distributed.md).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

# One BLAS thread unless the caller sets it: the model's matrices are small, so a second thread gains
# little (95 -> 112 ms per default train_lm step on an idle 2-core machine) and makes a step 3-7x slower
# as soon as another process competes for the cores. OPENBLAS_NUM_THREADS=2 restores it.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np

import pymglu
from pymglu import io
from pymglu.models import ByteTokenizer, Transformer, TransformerConfig
from pymglu.models.checkpoint import (CHECKPOINT_NAME, ConfigMismatchError, load_training_checkpoint, read_config,
                                      save_training_checkpoint)
from pymglu.models.data import DataError, load_corpus, split_corpus
from pymglu.models.training import Trainer, TrainSettings
from pymglu.nn import FEEDFORWARD_KINDS


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not np.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


#: --graph choices as Trainer's ``graph`` argument
GRAPH_CHOICES = {"auto": None, "on": True, "off": False}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data and output")
    g.add_argument("--data", default=None, help="text file to train on (default: the embedded pydoc_data corpus)")
    g.add_argument("--out", default=None, help="run directory for the checkpoint and metrics "
                   "(default: runs/lm-<ffn>-<time>)")
    g.add_argument("--resume", action="store_true", help="continue the checkpoint in --out (same model settings)")
    g.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    m = p.add_argument_group("model")
    m.add_argument("--ffn", choices=FEEDFORWARD_KINDS, default="swimglu", help="feed-forward kind")
    m.add_argument("--n-masks", type=_positive_int, default=None, help="masks of an MGLU kind (default 4)")
    m.add_argument("--d-model", type=_positive_int, default=128)
    m.add_argument("--n-layers", type=_positive_int, default=2)
    m.add_argument("--n-heads", type=_positive_int, default=4)
    m.add_argument("--d-ff", type=_positive_int, default=384, help="feed-forward hidden width h")
    m.add_argument("--seq-len", type=_positive_int, default=64, help="context window in bytes")
    m.add_argument("--untied", action="store_true", help="separate output projection (default: tied embeddings)")
    m.add_argument("--recompute", action="store_true",
                   help="MGLU layers recompute their n + 1 products in the backward instead of keeping them: "
                        "less activation memory for n + 1 more products per layer (docs/training.md)")
    m.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="parameter dtype; 16-bit dtypes train with fp32 master weights (and loss scaling for "
                   "float16): mixed precision for the GPU, slower than float32 on a CPU")
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=_positive_int, default=300)
    t.add_argument("--batch-size", type=_positive_int, default=16)
    t.add_argument("--lr", type=_non_negative_float, default=3e-3)
    t.add_argument("--min-lr-ratio", type=_non_negative_float, default=0.1)
    t.add_argument("--warmup", type=_non_negative_int, default=30)
    t.add_argument("--weight-decay", type=_non_negative_float, default=0.1)
    t.add_argument("--grad-clip", type=_non_negative_float, default=1.0, help="0 disables clipping")
    t.add_argument("--eval-every", type=_non_negative_int, default=50, help="0: evaluate at the end only")
    t.add_argument("--eval-batches", type=_positive_int, default=8)
    t.add_argument("--seed", type=_non_negative_int, default=0)
    t.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    t.add_argument("--graph", choices=("auto", "on", "off"), default="auto",
                   help="replay each step from a captured CUDA graph (auto: on GPUs; float16 keeps its loss scaler on the device)")
    d = p.add_argument_group("data parallelism (launch with mpiexec -n N)")
    d.add_argument("--distributed", action="store_true", help="average gradients over the MPI ranks "
                   "(NCCL on GPUs); --batch-size is the global batch")
    d.add_argument("--dist-timeout", type=_non_negative_float, default=300.0,
                   help="seconds a rank waits for the others in a collective before the job is ended (0: forever)")
    d.add_argument("--world-size", type=_positive_int, default=None,
                   help="the number of ranks this run expects (checked at startup; default: any)")
    s = p.add_argument_group("sample")
    s.add_argument("--sample-tokens", type=_non_negative_int, default=200, help="bytes to generate at the end")
    s.add_argument("--prompt", default=None, help="prompt text (default: the start of the validation text)")
    s.add_argument("--temperature", type=_non_negative_float, default=0.8, help="0: greedy")
    s.add_argument("--top-k", type=_positive_int, default=40)
    return p


def _device(parser: argparse.ArgumentParser, choice: str) -> str:
    if choice == "gpu" and not pymglu.gpu_available():
        parser.error("--device gpu: CuPy is not installed or no CUDA device is usable")
    return "gpu" if choice == "gpu" or (choice == "auto" and pymglu.gpu_available()) else "cpu"


def _config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> TransformerConfig:
    try:
        return TransformerConfig(
            vocab_size=ByteTokenizer.vocab_size, d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
            d_ff=args.d_ff, ffn_kind=args.ffn, n_masks=args.n_masks, max_seq_len=args.seq_len,
            tie_embeddings=not args.untied, dtype=args.dtype)
    except (ValueError, TypeError) as e:
        parser.error(f"model settings: {e}")


def _settings(args: argparse.Namespace) -> TrainSettings:
    return TrainSettings(steps=args.steps, batch_size=args.batch_size, lr=args.lr, min_lr_ratio=args.min_lr_ratio,
                         warmup_steps=args.warmup, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
                         eval_every=args.eval_every, eval_batches=args.eval_batches, seed=args.seed)


def _checkpoint_path(parser: argparse.ArgumentParser, args: argparse.Namespace, config: TransformerConfig) -> Path:
    """The run's checkpoint path, after checking that this run may write (or resume) it."""
    if args.out is None:
        if args.resume:
            parser.error("--resume needs --out DIR, the directory of the run to continue")
        kind = config.ffn_kind + (f"{config.n_masks}" if config.is_mglu else "")
        args.out = str(Path("runs") / f"lm-{kind}-{time.strftime('%Y%m%d-%H%M%S')}")
    out = Path(args.out)
    path = out / CHECKPOINT_NAME
    if out.exists() and not out.is_dir():
        parser.error(f"--out {str(out)!r} exists and is not a directory")
    if args.resume:
        if not path.is_file():
            parser.error(f"--resume: no checkpoint {str(path)!r} to continue")
        try:
            saved = read_config(path)
        except (io.CheckpointError, FileNotFoundError) as e:
            parser.error(f"--resume: {e}")
        differences = saved.differences(config)
        if differences:
            parser.error(str(ConfigMismatchError(path, differences)))
    elif path.exists():
        parser.error(f"{str(path)!r} already exists; pass --resume to continue it, or choose another --out "
                     "(nothing was overwritten)")
    return path


def _communicator(parser: argparse.ArgumentParser, args: argparse.Namespace, device: str) -> Any:
    """The job's communicator (world size 1 without ``--distributed``)."""
    from pymglu import distributed

    if not args.distributed:
        return distributed.LocalCommunicator()
    if not distributed.mpi_available():
        parser.error("--distributed needs mpi4py and an MPI library: pip install -e '.[distributed]'")
    return distributed.init_communicator("nccl" if device == "gpu" else "mpi", timeout=args.dist_timeout or None)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    device = _device(parser, args.device)
    comm = _communicator(parser, args, device)
    if comm.size == 1:
        return _train(parser, args, device, comm)
    try:  # one failing rank ends every rank at once, instead of leaving them waiting in a collective
        return _train(parser, args, device, comm)
    except BaseException as e:
        if isinstance(e, SystemExit) and not e.code:  # --help: every rank leaves the same way
            raise
        code = e.code if isinstance(e, SystemExit) and isinstance(e.code, int) else 1
        if not isinstance(e, SystemExit):
            print(f"rank {comm.rank}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        sys.stderr.flush()
        comm.abort(code or 1)
        raise


def _train(parser: argparse.ArgumentParser, args: argparse.Namespace, device: str, comm: Any) -> int:
    from pymglu.distributed import DataParallel

    main_rank = comm.is_main
    say = print if main_rank else (lambda *a, **k: None)
    if args.prompt is not None and not args.prompt:
        parser.error("--prompt: give at least one character")
    try:
        corpus, source = load_corpus(args.data)
        train_data, val_data = split_corpus(corpus, args.seq_len)
    except DataError as e:
        parser.error(f"--data: {e}")
    config = _config(parser, args)
    if args.recompute and not config.is_mglu:
        parser.error(f"--recompute: only MGLU kinds keep n + 1 products to recompute, got --ffn {args.ffn}")
    settings = _settings(args)
    path = _checkpoint_path(parser, args, config)

    model = Transformer(config, rng=args.seed)
    model.set_recompute(args.recompute)
    if device == "gpu":
        model.to("cuda")
    parallel = DataParallel(model, comm) if args.distributed else None
    try:
        trainer = Trainer(model, settings, train_data, val_data, parallel=parallel, graph=GRAPH_CHOICES[args.graph])
    except (ValueError, TypeError) as e:
        parser.error(f"training settings: {e}")
    if args.resume:  # every rank reads the checkpoint (rank 0's copy is broadcast below anyway)
        try:
            load_training_checkpoint(path, trainer)
        except (ConfigMismatchError, io.CheckpointError) as e:
            parser.error(f"--resume: {e}")
    if parallel is not None:
        parallel.handshake(json.dumps({"config": config.to_dict(), "settings": dataclasses.asdict(settings),
                                       "data": source, "bytes": int(train_data.size), "step": trainer.step,
                                       "device": device}), expected_world_size=args.world_size)
        parallel.broadcast_parameters()
    if main_rank:
        path.parent.mkdir(parents=True, exist_ok=True)

    kind = config.ffn_kind + (f" (n_masks={config.n_masks})" if config.is_mglu else "")
    if parallel is not None:
        say(f"data parallel: {comm.size} ranks ({type(comm).__name__}), {settings.batch_size // comm.size} windows "
            f"per rank per step, gradients averaged in {len(parallel.buckets)} bucket(s)")
    say(f"data: {source}; {train_data.size:,} training and {val_data.size:,} validation bytes")
    say(f"model: {config.n_layers} layers, d_model {config.d_model}, {config.n_heads} heads, d_ff {config.d_ff}, "
          f"feed-forward {kind}, {config.dtype}; {model.num_weights():,} weights + {model.num_mask_bits():,} "
          f"mask bits; {'CuPy (GPU)' if device == 'gpu' else 'NumPy (CPU)'}")
    say(f"training: steps {trainer.step} -> {settings.steps}, batch {settings.batch_size} x {config.max_seq_len} "
          f"bytes, AdamW lr {settings.lr:g} (warmup {settings.warmup_steps}, cosine); checkpoint {str(path)!r}")

    def checkpoint(tr: Trainer) -> None:
        if main_rank:  # one writer; the write is atomic (pymglu.io), so no rank ever sees half a file
            save_training_checkpoint(path, tr, extra={"train.data": source, "train.world_size": str(comm.size)})

    start = time.perf_counter()
    history = trainer.run(progress=main_rank and not args.no_progress, log=print if main_rank else None,
                          on_eval=checkpoint)
    wall = time.perf_counter() - start
    if not main_rank:
        return 0
    if history.train_loss:
        k = min(10, len(history.train_loss))
        first, last = float(np.mean(history.train_loss[:k])), float(np.mean(history.train_loss[-k:]))
        print(f"train loss (mean of {k} steps) {first:.3f} at the start -> {last:.3f} at step {trainer.step}; "
              f"validation loss {history.val_loss[-1]:.3f}; {history.tokens_per_second:,.0f} training tokens/s; "
              f"{wall:.1f} s this run")
        if trainer.scaler is not None:
            print(f"float16 loss scale {trainer.scaler.get_scale():g}; {trainer.scaler.skipped_steps} steps skipped "
                  "for non-finite gradients")
    else:
        print(f"the checkpoint is already at step {trainer.step} (--steps {settings.steps}): nothing to train")
    metrics = {"config": config.to_dict(), "settings": dataclasses.asdict(settings), "data": source,
               "device": device, "world_size": comm.size, "step": trainer.step, "wall_seconds_last_run": wall,
               **history.to_dict()}
    (path.parent / "metrics.json").write_text(json.dumps(metrics, indent=1))

    if args.sample_tokens:
        tok = ByteTokenizer()
        prompt = tok.encode(args.prompt) if args.prompt is not None else val_data[:48].astype(np.int64)
        ids = model.generate(prompt, args.sample_tokens, temperature=args.temperature, top_k=args.top_k,
                             rng=args.seed)
        print(f"sample (temperature {args.temperature:g}, top-k {args.top_k}, KV cache):")
        print(tok.decode(ids[:prompt.size]) + "|" + tok.decode(ids[prompt.size:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
