"""Swap SwiGLU for pymglu's SwiMGLU in a small PyTorch transformer, then train it on the CPU.

    pip install -e ".[interop]"          # or any torch build; pymglu itself never needs torch
    python examples/torch_swap_ffn.py    # ~300 steps, well under 2 minutes on 2 CPU cores

The model is a tiny byte-level decoder (embedding, pre-norm blocks of causal self-attention and a
SwiGLU feed-forward, tied output head) written with plain torch. :func:`swap_swiglu_for_swimglu` walks
it and replaces every ``SwiGLU`` feed-forward ``down(silu(x Wg^T) * x Wv^T)`` by
``down(SwiMGLU(x))``: one shared ``W`` ``(h, d)`` and ``n_masks`` learned binary masks instead of two
matrices, computed by pymglu (NumPy over torch's memory through DLPack, no copies) inside torch's
autograd. The mask logits learn through the straight-through estimator and are kept out of weight
decay. Corpus: the text of ``pydoc_data.topics`` (shipped with CPython), as bytes.

Options: ``--steps N``, ``--n-masks N``, ``--baseline`` (also train the unswapped SwiGLU model for
comparison), ``--seed N``.
"""
from __future__ import annotations

import os

# pymglu's CPU path runs NumPy's BLAS (OpenBLAS) between torch's OpenMP regions; on a few cores the idle
# threads of each pool spin against the other's work (on 2 shared cores: 3x slower when quiet, 25x under
# load). This model is small: one thread each is fastest. Set before NumPy and torch load their thread
# pools; explicit settings in the environment win.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from pydoc_data import topics  # noqa: E402

import pymglu.torch as pt  # noqa: E402


class SwiGLU(torch.nn.Module):
    """The feed-forward to replace: ``down(silu(gate(x)) * up(x))``, ``(..., d) -> (..., d)``."""

    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.gate = torch.nn.Linear(d, h, bias=False)
        self.up = torch.nn.Linear(d, h, bias=False)
        self.down = torch.nn.Linear(h, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class SwiMGLUFeedForward(torch.nn.Module):
    """``down(SwiMGLU(x))``: the MGLU feed-forward, ``(..., d) -> (..., d)``."""

    def __init__(self, d: int, h: int, n_masks: int) -> None:
        super().__init__()
        self.mglu = pt.SwiMGLU(d, h, n_masks)
        self.down = torch.nn.Linear(h, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.mglu(x))


class Block(torch.nn.Module):
    """Pre-norm transformer block: causal multi-head self-attention, then the feed-forward."""

    def __init__(self, d: int, heads: int, h: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = torch.nn.LayerNorm(d)
        self.qkv = torch.nn.Linear(d, 3 * d, bias=False)
        self.proj = torch.nn.Linear(d, d, bias=False)
        self.norm2 = torch.nn.LayerNorm(d)
        self.ffn: torch.nn.Module = SwiGLU(d, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(B, T, d))
        return x + self.ffn(self.norm2(x))


class TinyLM(torch.nn.Module):
    """Byte-level decoder: ``(B, T)`` int64 bytes -> ``(B, T, 256)`` logits."""

    def __init__(self, d: int = 64, heads: int = 4, h: int = 192, layers: int = 2, context: int = 64) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(256, d)
        torch.nn.init.normal_(self.embed.weight, std=0.02)  # small: it is also the output head
        self.pos = torch.nn.Parameter(0.02 * torch.randn(context, d))
        self.blocks = torch.nn.ModuleList(Block(d, heads, h) for _ in range(layers))
        self.norm = torch.nn.LayerNorm(d)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx) + self.pos[: idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.norm(x) @ self.embed.weight.T


def swap_swiglu_for_swimglu(model: torch.nn.Module, n_masks: int = 2) -> int:
    """Replace every :class:`SwiGLU` in ``model`` (in place) by a :class:`SwiMGLUFeedForward` of the
    same widths and device; returns how many were swapped. The new layers start from their own
    initialisation (an MGLU has one ``W`` where the GLU had two)."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, SwiGLU):
                h, d = child.gate.weight.shape
                new = SwiMGLUFeedForward(d, h, n_masks).to(child.gate.weight.device)
                setattr(parent, name, new)
                swapped += 1
    return swapped


def corpus_bytes() -> np.ndarray:
    """The pydoc topics text as uint8 bytes (about 0.8 MB)."""
    text = "\n\n".join(topics.topics[key] for key in sorted(topics.topics))
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)


def batches(data: np.ndarray, batch: int, context: int, seed: int):
    """Endless random ``(inputs, targets)`` windows, ``(batch, context)`` int64 each."""
    rng = np.random.default_rng(seed)
    while True:
        starts = rng.integers(0, len(data) - context - 1, size=batch)
        window = np.stack([data[s:s + context + 1] for s in starts]).astype(np.int64)
        yield torch.from_numpy(window[:, :-1]), torch.from_numpy(window[:, 1:])


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: matrices decay; mask logits, norms, embeddings' positions and biases do not."""
    decay, keep = [], []
    for name, p in model.named_parameters():
        (keep if name.endswith("mask_logits") or p.dim() < 2 or name == "pos" else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: np.ndarray, context: int) -> float:
    """Mean next-byte cross-entropy over 32 fixed windows of ``data``."""
    model.eval()
    starts = np.linspace(0, len(data) - context - 2, 32).astype(int)
    window = torch.from_numpy(np.stack([data[s:s + context + 1] for s in starts]).astype(np.int64))
    loss = F.cross_entropy(model(window[:, :-1]).reshape(-1, 256), window[:, 1:].reshape(-1)).item()
    model.train()
    return loss


def train(model: torch.nn.Module, train_data: np.ndarray, steps: int, seed: int, label: str,
          batch: int = 16, context: int = 64, lr: float = 3e-3) -> list[float]:
    """AdamW with linear warmup and cosine decay; prints the smoothed loss every 25 steps."""
    opt = torch.optim.AdamW(parameter_groups(model, 0.1), lr=lr, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    losses, smooth, start = [], None, time.perf_counter()
    data = batches(train_data, batch, context, seed)
    for step in range(1, steps + 1):
        x, y = next(data)
        loss = F.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        smooth = losses[-1] if smooth is None else 0.9 * smooth + 0.1 * losses[-1]
        if step == 1 or step % 25 == 0 or step == steps:
            print(f"[{label}] step {step:4d}  loss {smooth:.3f}  ({time.perf_counter() - start:.1f} s)", flush=True)
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--n-masks", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline", action="store_true", help="also train the unswapped SwiGLU model")
    args = parser.parse_args()

    data = corpus_bytes()
    split = int(0.95 * len(data))
    train_data, val_data = data[:split], data[split:]
    print(f"corpus: pydoc_data.topics, {len(data):,} bytes ({len(train_data):,} train / {len(val_data):,} val)")

    torch.manual_seed(args.seed)
    model = TinyLM()
    glu_params = sum(p.numel() for p in model.parameters())
    if args.baseline:
        baseline = TinyLM()
        baseline.load_state_dict(model.state_dict())
    n = swap_swiglu_for_swimglu(model, args.n_masks)
    layers = [m for m in model.modules() if isinstance(m, pt.SwiMGLU)]
    masks_before = [m.masks().clone() for m in layers]
    weights = sum(p.numel() for name, p in model.named_parameters() if not name.endswith("mask_logits"))
    print(f"swapped {n} SwiGLU feed-forwards for SwiMGLU (n_masks={args.n_masks}): weights {glu_params:,} -> "
          f"{weights:,} (+ {args.n_masks} bit(s) per FFN weight as learned masks)")

    initial = evaluate(model, val_data, 64)
    losses = train(model, train_data, args.steps, args.seed, "SwiMGLU")
    final = evaluate(model, val_data, 64)
    flipped = sum(int((m.masks() != b).sum()) for m, b in zip(layers, masks_before))
    total = sum(b.numel() for b in masks_before)
    print(f"SwiMGLU: validation loss {initial:.3f} -> {final:.3f}; train loss {losses[0]:.3f} -> "
          f"{np.mean(losses[-10:]):.3f}; {flipped:,} of {total:,} mask bits flipped")
    if args.baseline:
        base_losses = train(baseline, train_data, args.steps, args.seed, "SwiGLU")
        print(f"SwiGLU baseline: validation loss {evaluate(baseline, val_data, 64):.3f}; train loss "
              f"{base_losses[0]:.3f} -> {np.mean(base_losses[-10:]):.3f}")
    if not final < initial:
        raise SystemExit(f"validation loss did not fall ({initial:.3f} -> {final:.3f})")


if __name__ == "__main__":
    main()
