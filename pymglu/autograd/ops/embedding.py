"""Embedding lookup: rows of a ``(V, D)`` table gathered by integer ids, with a scatter-add backward."""
from __future__ import annotations

from typing import Any

import numpy as np

from pymglu import _checks
from pymglu.autograd.function import Function
from pymglu.backend import get_array_module, unwrap
from pymglu.dtypes import FLOAT_DTYPES, compute_dtype


def check_ids(name: str, ids: Any, size: int) -> None:
    """``ids`` must be an integer array with every value in ``[0, size)``.

    The values are read (a host synchronisation on a GPU) unless the dtype cannot hold a bad one.
    """
    if not hasattr(ids, "dtype") or np.dtype(ids.dtype).kind not in "iu":
        raise TypeError(f"{name}: expected an integer array, got {_checks.describe(ids)}")
    if ids.size == 0 or _checks.integers_below(ids.dtype, size):
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= size:
        raise ValueError(
            f"{name}: expected every value in [0, {size}), got values in [{lo}, {hi}] "
            f"({_checks.describe(ids)})"
        )


class Embedding(Function):
    """``out[..., :] = weight[ids[...], :]``; the gradient of ``weight`` adds up repeated ids."""

    def forward(self, weight: Any, ids: Any) -> Any:
        _checks.check_ndim("weight", weight, 2)
        _checks.check_dtype("weight", weight, FLOAT_DTYPES)
        check_ids("ids", ids, weight.shape[0])
        self.ids, self.weight_shape, self.weight_dtype = ids, tuple(weight.shape), weight.dtype
        return weight[ids]

    def backward(self, g: Any) -> tuple[Any, None]:
        if not self.needs_input_grad[0]:
            return None, None
        xp = get_array_module(g)
        V, D = self.weight_shape
        ct = compute_dtype(self.weight_dtype)
        dw = xp.zeros((V, D), dtype=ct)
        xp.add.at(dw, self.ids.reshape(-1), g.reshape(-1, D).astype(ct, copy=False))
        return dw.astype(self.weight_dtype, copy=False), None


def embedding(weight: Any, ids: Any) -> Any:
    """Look up rows of an embedding table.

    Args:
        weight: ``(V, D)`` float Tensor (or array): float64, float32, float16 or bfloat16.
        ids: integer array (or integer Tensor, or nested list) of any shape ``(...)``, every value in
            ``[0, V)``; same device as ``weight``. Never differentiated. The values are checked, which
            on a GPU waits for the device, unless the dtype cannot exceed the table (``uint8`` ids and
            ``V >= 256``, as in a byte-level model).
    Returns:
        Tensor of shape ``(..., D)`` in ``weight``'s dtype. The gradient of ``weight`` scatter-adds the
        upstream rows (accumulated in float32 for low-precision tables, float64 for float64), so ids that
        occur several times receive the sum of their rows.
    Raises:
        TypeError: ``weight`` not a float array, or ``ids`` not integers.
        ValueError: ``weight`` not 2-d, or an id outside ``[0, V)``.
    """
    raw = unwrap(ids)
    if not hasattr(raw, "dtype"):
        raw = get_array_module(unwrap(weight)).asarray(raw)
    return Embedding.apply(weight, raw)
