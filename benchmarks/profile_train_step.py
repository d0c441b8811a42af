"""Where a language model's training step spends its time on the GPU, op by op.

Usage (on a machine with a CUDA GPU and CuPy):

    python benchmarks/profile_train_step.py [--model large] [--ffn swimglu] [--steps 5]

Builds the model of ``benchmarks/train_model.py`` (bfloat16, AdamW, gradient clipping), runs a few
steps to warm up, then ``--steps`` steps in which every tape op's ``forward`` and ``backward`` (each
:class:`pymglu.autograd.Function` subclass), the loss, the gradient clipping and the optimizer step are
bracketed by CUDA events and host clocks. Device time is the time between an op's two events (the
stream runs the ops one after another, so it is the op's kernels plus any gap while the host was still
launching them); host time is what Python spent in the call. Prints a table per op kind, sorted by
device time, summed over the timed steps and divided by their number.

With ``--head-start MS`` a spin kernel of that many milliseconds runs before the timed steps. While it
spins, the host queues the steps' launches, so (as long as the queue holds them all, which the script
checks) the events then time the GPU's own work per op, without the host's launch gaps: device time
against host time says how far the step is from being GPU-bound.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict

import numpy as np


def all_subclasses(cls):
    out = set()
    for sub in cls.__subclasses__():
        out.add(sub)
        out |= all_subclasses(sub)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="large")
    p.add_argument("--ffn", default="swimglu")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--head-start", type=float, default=0.0,
                   help="milliseconds of GPU spin before the timed steps (0: none)")
    args = p.parse_args(argv)
    import cupy as cp

    import pymglu.autograd.ops  # noqa: F401  (registers every op)
    from pymglu import optim
    from pymglu.autograd.function import Function
    from pymglu.models import Transformer, TransformerConfig
    from pymglu.models.training import Trainer, TrainSettings

    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from train_model import MODELS

    spec = dict(MODELS[args.model])
    batch = spec.pop("batch")
    config = TransformerConfig(ffn_kind=args.ffn, n_masks=4 if args.ffn != "swiglu" else None, dtype="bfloat16",
                               **spec)
    model = Transformer(config, rng=0).to("cuda")
    data = np.random.default_rng(0).integers(0, 256, size=2_000_000, dtype=np.uint8)
    settings = TrainSettings(steps=100, batch_size=batch, lr=1e-3, warmup_steps=2, eval_every=0, eval_batches=1,
                             seed=0)
    trainer = Trainer(model, settings, data[:1_900_000], data[1_900_000:])
    for _ in range(3):
        trainer.train_step()

    records: list[tuple[str, object, object, float]] = []
    active = [False]

    def timed(label, fn):
        def wrapper(*a, **k):
            if not active[0]:
                return fn(*a, **k)
            start, stop = cp.cuda.Event(), cp.cuda.Event()
            t0 = time.perf_counter()
            start.record()
            out = fn(*a, **k)
            stop.record()
            records.append((label, start, stop, time.perf_counter() - t0))
            return out
        return wrapper

    for cls in all_subclasses(Function):
        for method in ("forward", "backward"):
            if method in cls.__dict__:
                setattr(cls, method, timed(f"{cls.__name__}.{method}", cls.__dict__[method]))
    optimizer = trainer.optimizer
    optimizer.step = timed("optimizer.step", optimizer.step)
    optimizer.zero_grad = timed("optimizer.zero_grad", optimizer.zero_grad)
    optim.clip_grad_norm = timed("clip_grad_norm", optim.clip_grad_norm)

    cp.cuda.Device().synchronize()
    spin = cp.RawKernel(r"""
extern "C" __global__ void spin(long long cycles) {
    long long start = clock64();
    while (clock64() - start < cycles) { }
}""", "spin")
    spin_done = cp.cuda.Event()
    if args.head_start > 0:
        rate_khz = cp.cuda.runtime.deviceGetAttribute(cp.cuda.runtime.cudaDevAttrClockRate, 0)
        spin((1,), (1,), (np.int64(args.head_start * rate_khz),))
    spin_done.record()
    active[0] = True
    wall0 = time.perf_counter()
    step_start, step_stop = cp.cuda.Event(), cp.cuda.Event()
    step_start.record()
    for _ in range(args.steps):
        trainer.train_step(sync=False)
    step_stop.record()
    queued_before_spin_end = not spin_done.done if args.head_start > 0 else None
    trainer.flush()
    cp.cuda.Device().synchronize()
    wall = time.perf_counter() - wall0
    active[0] = False

    device = defaultdict(float)
    host = defaultdict(float)
    calls = defaultdict(int)
    for label, start, stop, host_s in records:
        device[label] += cp.cuda.get_elapsed_time(start, stop)
        host[label] += host_s * 1e3
        calls[label] += 1
    total = cp.cuda.get_elapsed_time(step_start, step_stop) / args.steps
    print(f"# {args.model} {args.ffn}: {total:.1f} ms per step on the device, {wall / args.steps * 1e3:.1f} ms wall")
    if queued_before_spin_end is not None:
        print("# head start: every step was queued before the spin ended (device times are the GPU's own)"
              if queued_before_spin_end else
              "# head start too short or launch queue full: the spin ended before the host had queued every step")
    print("| op | calls/step | device ms/step | host ms/step |\n|---|---:|---:|---:|")
    for label in sorted(device, key=device.get, reverse=True):
        print(f"| {label} | {calls[label] / args.steps:.0f} | {device[label] / args.steps:.2f} | "
              f"{host[label] / args.steps:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
