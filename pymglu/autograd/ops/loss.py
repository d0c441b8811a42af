"""Softmax cross-entropy as one Function with a hand-written backward."""
from __future__ import annotations

from typing import Any

import numpy as np

from pymglu import _checks
from pymglu.autograd.function import Function
from pymglu.backend import get_array_module, unwrap
from pymglu.dtypes import FLOAT_DTYPES, compute_dtype

REDUCTIONS = ("mean", "sum", "none")


class SoftmaxCrossEntropy(Function):
    """``loss_j = logsumexp(z_j) - z_j[t_j]`` for every non-ignored position ``j``; backward
    ``dz_j = (softmax(z_j) - onehot(t_j)) * dloss_j`` (zero at ignored positions)."""

    def forward(self, logits: Any, targets: Any, ignore_index: int = -100, reduction: str = "mean") -> Any:
        _checks.check_dtype("logits", logits, FLOAT_DTYPES)
        _checks.check_min_ndim("logits", logits, 1)
        if logits.shape[-1] < 1:
            raise ValueError(f"logits: expected at least one class in the last dim, got {_checks.describe(logits)}")
        if not hasattr(targets, "dtype") or np.dtype(targets.dtype).kind not in "iu":
            raise TypeError(f"targets: expected an integer array, got {_checks.describe(targets)}")
        _checks.check_shape("targets", targets, tuple(logits.shape[:-1]))
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
            raise TypeError(f"ignore_index: expected an int, got {ignore_index!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
        xp = get_array_module(logits, targets)
        C = logits.shape[-1]
        ct = compute_dtype(logits.dtype)

        z = logits.reshape(-1, C).astype(ct, copy=False)
        t = targets.reshape(-1)
        valid = t != ignore_index
        if not _checks.integers_below(t.dtype, C):  # reading the values waits for a GPU; skipped when none can be bad
            bad = valid & ((t < 0) | (t >= C))
            if bool(bad.any()):
                first = int(t[xp.nonzero(bad)[0][0]])
                raise ValueError(
                    f"targets: expected class indices in [0, {C}) or ignore_index={ignore_index}, got {first} "
                    f"({_checks.describe(targets)})"
                )
        safe_t = xp.where(valid, t, 0)
        rows = xp.arange(z.shape[0])
        shifted = z - z.max(axis=-1, keepdims=True)
        lse = xp.log(xp.exp(shifted).sum(axis=-1))
        per_item = xp.where(valid, lse - shifted[rows, safe_t], 0).astype(ct, copy=False)

        info = np.iinfo(t.dtype)
        count = int(valid.sum()) if info.min <= ignore_index <= info.max else t.size
        self.shape, self.dtype, self.reduction = tuple(logits.shape), logits.dtype, reduction
        self.shifted, self.lse, self.safe_t, self.valid, self.count = shifted, lse, safe_t, valid, count
        if reduction == "none":
            return per_item.reshape(targets.shape)
        total = per_item.sum()
        return xp.asarray(total / count if reduction == "mean" and count else total, dtype=ct)

    def backward(self, g: Any) -> tuple[Any, None]:
        xp = get_array_module(g)
        ct = self.shifted.dtype
        if self.reduction == "none":
            scale = g.reshape(-1).astype(ct, copy=False)
        else:
            scale = g.astype(ct, copy=False)
            if self.reduction == "mean" and self.count:
                scale = scale / self.count
        scale = xp.where(self.valid, scale, 0).astype(ct, copy=False)
        grad = xp.exp(self.shifted - self.lse[:, None])  # softmax
        grad[xp.arange(grad.shape[0]), self.safe_t] -= 1
        grad *= scale[:, None]
        return grad.astype(self.dtype, copy=False).reshape(self.shape), None


def softmax_cross_entropy(logits: Any, targets: Any, ignore_index: int = -100, reduction: str = "mean") -> Any:
    """Cross-entropy of integer class targets under a softmax over the last axis of ``logits``.

    Args:
        logits: ``(N, C)`` or ``(..., C)`` float Tensor (float64, float32, float16 or bfloat16).
        targets: integer array (or integer Tensor) of shape ``logits.shape[:-1]``, each value in
            ``[0, C)`` or equal to ``ignore_index``; same device as ``logits``. Never differentiated.
            The values are checked and the ignored ones counted, which on a GPU waits for the device,
            except where the dtype rules both out (``uint8`` targets with ``C >= 256`` and a negative
            ``ignore_index``, as in a byte-level model).
        ignore_index: target value whose positions contribute no loss and no gradient.
        reduction: ``"mean"`` (over the non-ignored positions; 0 with zero gradient when all are
            ignored), ``"sum"``, or ``"none"`` (per position, shape ``targets.shape``, 0 at ignored ones).
    Returns:
        Tensor in the compute dtype (float32 for low-precision logits, float64 for float64): a scalar, or
        ``targets.shape`` for ``reduction="none"``. The gradient of ``logits`` has ``logits``' dtype.

    The log-softmax subtracts the row maximum first, so large logits neither overflow nor lose the loss.
    """
    raw = unwrap(targets)
    if isinstance(raw, (list, tuple)):
        raw = get_array_module(unwrap(logits)).asarray(raw)
    return SoftmaxCrossEntropy.apply(logits, raw, ignore_index=ignore_index, reduction=reduction)
