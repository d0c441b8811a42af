"""``KVCache``: per-layer key and value buffers for incremental decoding.

The buffers are allocated once at full capacity (``max_seq_len`` positions) and filled in place, so a
decode step allocates no cache memory and its arrays keep fixed addresses (what a captured CUDA graph
needs later); attention reads the filled prefix as a view.
"""
from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from pymglu import _checks

__all__ = ["KVCache"]


class KVCache:
    """Keys and values of every layer for the positions decoded so far.

    Args:
        n_layers: number of attention layers; batch: sequences decoded together;
        n_heads: heads per layer; head_dim: width of one head;
        capacity: most positions the cache can hold (the model's ``max_seq_len``);
        dtype: dtype of the keys and values (the model's); xp: ``numpy`` or ``cupy``.

    Attributes:
        keys, values: lists of ``n_layers`` arrays ``(batch, n_heads, capacity, head_dim)``.
        length: positions filled so far, the same for every layer (the position of the next token).
    """

    def __init__(self, n_layers: int, batch: int, n_heads: int, head_dim: int, capacity: int, dtype: Any,
                 xp: ModuleType = np) -> None:
        self.n_layers = _checks.check_positive_int("n_layers", n_layers)
        self.batch = _checks.check_positive_int("batch", batch)
        self.capacity = _checks.check_positive_int("capacity", capacity)
        shape = (self.batch, _checks.check_positive_int("n_heads", n_heads),
                 self.capacity, _checks.check_positive_int("head_dim", head_dim))
        self.keys = [xp.zeros(shape, dtype=dtype) for _ in range(self.n_layers)]
        self.values = [xp.zeros(shape, dtype=dtype) for _ in range(self.n_layers)]
        self.length = 0

    @property
    def remaining(self) -> int:
        """Positions still free."""
        return self.capacity - self.length

    def positions(self, count: int) -> np.ndarray:
        """``(count,)`` int64 positions of the next ``count`` tokens: ``length .. length + count - 1``."""
        return np.arange(self.length, self.length + count, dtype=np.int64)

    def update(self, layer: int, k: Any, v: Any) -> tuple[Any, Any]:
        """Store the keys and values of ``T`` new positions of ``layer`` after the filled prefix.

        Args:
            layer: index in ``[0, n_layers)``.
            k, v: ``(batch, n_heads, T, head_dim)`` arrays of the cache's dtype and device.
        Returns:
            views ``(batch, n_heads, length + T, head_dim)`` of the keys and values of every position so
            far, the new ones included. ``length`` itself moves on only with :meth:`advance`, once every
            layer has stored its ``T`` positions.
        """
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise ValueError(f"layer: expected an index in [0, {self.n_layers}), got {layer!r}")
        buf_k, buf_v = self.keys[layer], self.values[layer]
        want = buf_k.shape[:2] + (None,) + buf_k.shape[3:]
        _checks.check_shape("k", k, want)
        _checks.check_shape("v", v, tuple(k.shape))
        T = k.shape[2]
        end = self.length + T
        if end > self.capacity:
            raise ValueError(
                f"KVCache: {T} new positions after {self.length} cached exceed the capacity of {self.capacity}; "
                "reset() the cache and prefill the last window instead"
            )
        buf_k[:, :, self.length:end] = k
        buf_v[:, :, self.length:end] = v
        return buf_k[:, :, :end], buf_v[:, :, :end]

    def advance(self, count: int) -> None:
        """Mark ``count`` more positions as filled (after every layer has stored them)."""
        count = _checks.check_positive_int("count", count, minimum=0)
        if self.length + count > self.capacity:
            raise ValueError(f"KVCache.advance: {self.length} + {count} exceeds the capacity {self.capacity}")
        self.length += count

    def reset(self) -> None:
        """Forget every position (the buffers are kept and overwritten by the next updates)."""
        self.length = 0

    def __repr__(self) -> str:
        k = self.keys[0]
        return (f"KVCache(n_layers={self.n_layers}, shape={tuple(k.shape)}, dtype={np.dtype(k.dtype).name}, "
                f"length={self.length})")
