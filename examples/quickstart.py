"""Quickstart: train a SwiMGLU layer (weights and mask logits), pack its masks, check inference.

Runs on NumPy on any machine (on CuPy with ``--gpu`` when a CUDA device is present):

    python examples/quickstart.py

1. A student SwiMGLU layer learns to imitate a fixed random teacher SwiMGLU layer with AdamW (mask
   logits excluded from weight decay); the loss is printed as it falls.
2. The layer goes to eval mode, where it runs on masks packed into uint32 bit-planes; its outputs must
   equal the training-mode outputs bit for bit.
3. The layer drops its logits (inference form: W plus bit-planes), is saved to a safetensors checkpoint,
   loaded into a fresh inference-form layer, and must again give identical outputs.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

import pymglu
from pymglu import nn, optim


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--d", type=int, default=32, help="input width")
    parser.add_argument("--h", type=int, default=64, help="hidden width")
    parser.add_argument("--n-masks", type=int, default=4)
    parser.add_argument("--gpu", action="store_true", help="run on CuPy (needs a CUDA device)")
    args = parser.parse_args(argv)
    if args.gpu and not pymglu.gpu_available():
        parser.error("--gpu: no usable CUDA device / CuPy on this machine")
    xp = __import__("cupy") if args.gpu else np
    rng = np.random.default_rng(0)

    teacher = nn.SwiMGLU(args.d, args.h, n_masks=args.n_masks, rng=1)
    teacher.mask_logits.data = rng.standard_normal(teacher.mask_logits.shape).astype(np.float32)
    student = nn.SwiMGLU(args.d, args.h, n_masks=args.n_masks, rng=2)
    if args.gpu:
        teacher.to("cuda")
        student.to("cuda")
    teacher.eval()
    opt = optim.AdamW(optim.param_groups_no_decay(student, weight_decay=0.01), lr=3e-3)
    sched = optim.WarmupCosine(opt, warmup_steps=20, total_steps=args.steps)
    masks_before = student.masks().copy()

    print(f"training {student!r} for {args.steps} steps on {'CuPy' if args.gpu else 'NumPy'}")
    first = last = None
    for step in range(args.steps):
        x = xp.asarray(rng.standard_normal((64, args.d)).astype(np.float32))
        with pymglu.no_grad():
            target = teacher(x).data
        diff = student(x) - target
        loss = (diff * diff).mean()
        opt.zero_grad()
        loss.backward()
        optim.clip_grad_norm(student.parameters(), 1.0)
        opt.step()
        sched.step()
        value = float(loss.item())
        first = value if first is None else first
        last = value
        if step % 50 == 0 or step == args.steps - 1:
            print(f"  step {step:4d}  loss {value:.5f}")
    changed = float((student.masks() != masks_before).mean())
    print(f"loss {first:.4f} -> {last:.4f}; {100 * changed:.1f}% of mask bits changed during training")
    stats = student.mask_stats()
    print("gate fraction per mask:", np.round(stats["gate_fraction"], 3))

    x = xp.asarray(rng.standard_normal((8, args.d)).astype(np.float32))
    with pymglu.no_grad():
        y_train = student(x).data
        student.eval()
        y_packed = student(x).data
    same_packed = bool((y_train == y_packed).all())
    print(f"eval on packed bit-planes {tuple(student.pack().shape)} equals training forward: {same_packed}")

    student.drop_logits()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "swimglu.safetensors"
        pymglu.save_checkpoint(path, student)
        fresh = nn.SwiMGLU(args.d, args.h, n_masks=args.n_masks, rng=3).drop_logits()
        pymglu.load_checkpoint(path, fresh)
        if args.gpu:
            fresh.to("cuda")
        fresh.eval()
        with pymglu.no_grad():
            y_loaded = fresh(x).data
        size = path.stat().st_size
    same_loaded = bool((y_loaded == y_packed).all())
    print(f"inference-form checkpoint ({size} bytes) reloaded, same outputs: {same_loaded}")

    ok = last < 0.5 * first and same_packed and same_loaded
    print("quickstart:", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
