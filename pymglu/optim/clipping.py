"""Global-norm gradient clipping."""
from __future__ import annotations

from typing import Any

import numpy as np

from pymglu import _checks, dtypes as _dtypes
from pymglu.autograd.tensor import Tensor
from pymglu.backend import get_array_module, unwrap
from pymglu.cuda import optimizers as _fused
from pymglu.optim.optimizer import ParamsLike, _collect_params


def clip_grad_norm(params: ParamsLike, max_norm: float, eps: float = 1e-6) -> Any:
    """Scale all gradients in place so that their global L2 norm is at most ``max_norm``.

    The norm is computed over every parameter that has a gradient, in float32 (float64 when any
    gradient is float64), without leaving the device; on CuPy (float32/float16/bfloat16 gradients) in
    a few launches for all of them (:func:`pymglu.cuda.optimizers.clip_grads`). Gradients are multiplied by
    ``min(1, max_norm / (norm + eps))``.

    Each ``p.grad`` is replaced by a scaled copy (no gradient array is written through), so arrays the
    caller still holds keep their values.

    Returns:
        the norm before clipping, as a 0-d array on the gradients' device (``float(...)`` reads it).
    """
    max_norm = _checks.check_finite("max_norm", max_norm, minimum=0.0, strict_min=True)
    tensors = []
    for it in _collect_params(params):
        group_params = it["params"] if isinstance(it, dict) else [it]
        for p in _collect_params(group_params):
            if not isinstance(p, Tensor):
                raise TypeError(f"params: expected Parameters, got a {type(p).__name__}")
            if p.grad is not None:
                tensors.append(p)
    if not tensors:
        return np.zeros((), dtype=np.float32)
    grads = [unwrap(p.grad) for p in tensors]
    if _fused.clip_supports(grads):  # two launches per dtype instead of several per gradient
        scaled, total = _fused.clip_grads(grads, max_norm, eps)
        for p, g in zip(tensors, scaled):
            p.grad = g
        return total
    xp = get_array_module(*grads)
    acc = _dtypes.float64 if any(np.dtype(g.dtype) == _dtypes.float64 for g in grads) else _dtypes.float32
    total_sq = xp.zeros((), dtype=acc)
    for g in grads:
        gc = g.astype(acc, copy=False)
        total_sq = total_sq + xp.vdot(gc.ravel(), gc.ravel())
    total = xp.sqrt(total_sq)
    scale = xp.minimum(xp.asarray(1.0, dtype=acc), max_norm / (total + eps))
    for p, g in zip(tensors, grads):
        p.grad = (g.astype(acc, copy=False) * scale).astype(g.dtype, copy=False)
    return total


