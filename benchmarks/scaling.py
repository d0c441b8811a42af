"""Data-parallel scaling on the GPUs of one host: tokens/s per GPU on k GPUs relative to one GPU.

Usage (on a machine with several GPUs, CuPy with NCCL, mpi4py and mpiexec):

    python benchmarks/scaling.py --gpus 1,2 --out-dir bench_out     # launches one mpiexec job per count

Weak scaling: every GPU trains on the same per-GPU batch, so k GPUs take a global batch k times larger.
Each job builds the model (bfloat16, fp32 master weights), averages gradients through
:class:`pymglu.distributed.DataParallel` over NCCL, runs ``--warmup`` steps, then times ``--steps`` steps
(wall clock between two device synchronisations, losses read back once at the end), with each step kind
of ``--graphs``: replays of a captured CUDA graph that holds the NCCL reductions (``on``, since stop 24)
and eager steps (``off``). Models:

* ``compare_ffn``: the model of ``examples/compare_ffn.py`` (d 256, 4 layers, h 1024, SwiMGLU n = 4,
  256 tokens x 32 windows per GPU);
* ``large``: d 1024, 8 layers, 8 heads, h 4096, SwiMGLU n = 4, 512 tokens x 16 windows per GPU.

Efficiency = (tokens/s per GPU on k GPUs) / (tokens/s on 1 GPU with the same step kind). Writes ``scaling.md`` and
``scaling.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

MODELS = {
    "compare_ffn": dict(d_model=256, n_layers=4, n_heads=4, d_ff=1024, max_seq_len=256, batch=32),
    "large": dict(d_model=1024, n_layers=8, n_heads=8, d_ff=4096, max_seq_len=512, batch=16),
}


def worker(args) -> None:
    """One rank of a job (run under mpiexec)."""
    import cupy as cp

    from pymglu.distributed import DataParallel, init_communicator
    from pymglu.models import Transformer, TransformerConfig
    from pymglu.models.training import Trainer, TrainSettings

    spec = dict(MODELS[args.model])
    per_gpu = spec.pop("batch")
    comm = init_communicator("nccl" if args.world > 1 else "local")
    if args.world == 1:
        cp.cuda.Device(0).use()
    config = TransformerConfig(ffn_kind=args.ffn, n_masks=4 if args.ffn != "swiglu" else None, dtype="bfloat16",
                               **spec)
    model = Transformer(config, rng=0).to("cuda")
    dp_options = {"overlap": args.overlap == "on"}
    if args.bucket_mb is not None:
        dp_options["bucket_bytes"] = int(args.bucket_mb * 2**20)
    parallel = DataParallel(model, comm, **dp_options) if comm.size > 1 else None
    if parallel is not None:
        parallel.broadcast_parameters()
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, size=4_000_000, dtype=np.uint8)
    settings = TrainSettings(steps=args.warmup + args.steps, batch_size=per_gpu * comm.size, lr=1e-3,
                             warmup_steps=2, eval_every=0, eval_batches=1, seed=0)
    trainer = Trainer(model, settings, data[:3_900_000], data[3_900_000:], parallel=parallel,
                      graph={"on": True, "off": False}[args.graph])
    for _ in range(args.warmup):
        trainer.train_step(sync=False)
    trainer.flush()
    cp.cuda.Device().synchronize()
    poll_seconds = [0.0]
    if parallel is not None:  # host time spent waiting in the bounded poll of the pending reductions
        synchronize = parallel.synchronize

        def timed_synchronize(*a, **k):
            t0 = time.perf_counter()
            try:
                return synchronize(*a, **k)
            finally:
                poll_seconds[0] += time.perf_counter() - t0
        parallel.synchronize = timed_synchronize
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        trainer.train_step(sync=False)
    trainer.flush()
    cp.cuda.Device().synchronize()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    if comm.rank == 0:
        tokens = args.steps * settings.batch_size * config.max_seq_len
        Path(args.result).write_text(json.dumps({
            "model": args.model, "ffn": args.ffn, "graph": args.graph, "gpus": comm.size,
            "step_ms": seconds / args.steps * 1e3,
            "tokens_per_s": tokens / seconds, "tokens_per_s_per_gpu": tokens / seconds / comm.size,
            "per_gpu_batch": per_gpu, "seq_len": config.max_seq_len, "overlap": args.overlap,
            "bucket_mb": args.bucket_mb,
            "final_loss": trainer.history.train_loss[-1],
            # host diagnostics of rank 0: CPUs it may run on, its CPU time (all threads) and its time in the poll
            "affinity_cpus": len(os.sched_getaffinity(0)), "cpu_ms_per_step": cpu_seconds / args.steps * 1e3,
            "poll_ms_per_step": poll_seconds[0] / args.steps * 1e3}))


def driver(args) -> None:
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mpiexec = str(Path(sys.executable).parent / "mpiexec")
    if not Path(mpiexec).exists():
        import shutil

        mpiexec = shutil.which("mpiexec") or "mpiexec"
    rows = []
    for model, graph, k in [(m, g, int(k)) for m in args.models.split(",") for g in args.graphs.split(",")
                            for k in args.gpus.split(",")]:
        result = out / f"scaling_{model}_{graph}_{k}.json"
        cmd = [sys.executable, __file__, "--worker", "--model", model, "--ffn", args.ffn, "--world", str(k),
               "--graph", graph, "--warmup", str(args.warmup), "--steps", str(args.steps), "--result", str(result),
               "--overlap", args.overlap] + ([] if args.bucket_mb is None else ["--bucket-mb", str(args.bucket_mb)])
        if k > 1:
            cmd = [mpiexec, *args.mpiexec_args.split(), "-n", str(k)] + cmd
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        if proc.returncode != 0:
            print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"{model} on {k} GPUs failed (exit {proc.returncode})")
        rows.append(json.loads(result.read_text()))
        base = next((r for r in rows if r["model"] == model and r["graph"] == graph and r["gpus"] == 1), None)
        rows[-1]["efficiency"] = (rows[-1]["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"]
                                  if base is not None else float("nan"))  # no 1-GPU row in --gpus
        print(_row(rows[-1]), flush=True)
    table = HEADER + "\n" + "\n".join(_row(r) for r in rows) + "\n"
    (out / "scaling.md").write_text(table)
    (out / "scaling.json").write_text(json.dumps(rows, indent=1))
    print(table)


HEADER = ("| model | FFN | step | GPUs | batch/GPU x seq | ms/step | tokens/s | tokens/s per GPU | efficiency "
          "| rank 0: CPUs / CPU ms / poll ms per step |\n"
          "|---|---|---|---:|---|---:|---:|---:|---:|---|")


def _row(r) -> str:
    step = {"on": "graph", "off": "eager"}[r["graph"]]
    return (f"| {r['model']} | {r['ffn']} | {step} | {r['gpus']} | {r['per_gpu_batch']} x {r['seq_len']} | {r['step_ms']:.1f} | "
            f"{r['tokens_per_s']:,.0f} | {r['tokens_per_s_per_gpu']:,.0f} | {r['efficiency']:.1%} | "
            f"{r.get('affinity_cpus', '?')} / {r.get('cpu_ms_per_step', float('nan')):.1f} / {r.get('poll_ms_per_step', float('nan')):.1f} |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpus", default="1,2", help="GPU counts, comma-separated (1 first: the baseline)")
    p.add_argument("--models", default="compare_ffn,large")
    p.add_argument("--ffn", default="swimglu", choices=("swimglu", "swiglu"))
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--graphs", default="on,off", help="step kinds, comma-separated: on (replays of a captured CUDA "
                   "graph, the reductions recorded with it), off (eager)")
    p.add_argument("--graph", default="on", choices=("on", "off"), help=argparse.SUPPRESS)
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--overlap", default="on", choices=("on", "off"),
                   help="DataParallel(overlap=...): start each bucket's all-reduce during backward (on) or after it")
    p.add_argument("--bucket-mb", type=float, default=None, help="DataParallel bucket_bytes in MiB (default: the library's)")
    p.add_argument("--mpiexec-args", default="", help="extra mpiexec options, e.g. '-bind-to none'")
    p.add_argument("--out-dir", default="bench_out")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", default="compare_ffn", help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    worker(args) if args.worker else driver(args)


if __name__ == "__main__":
    main()
