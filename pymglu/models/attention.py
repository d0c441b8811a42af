"""``Attention``: causal multi-head self-attention with rotary embeddings and an optional KV cache."""
from __future__ import annotations

from typing import Any

from pymglu import _checks
from pymglu.autograd import ops
from pymglu.autograd.tensor import Tensor
from pymglu.models.kv_cache import KVCache
from pymglu.nn import Linear, Module

__all__ = ["Attention"]


class Attention(Module):
    """Multi-head causal self-attention on a flattened token stream.

    Args:
        d_model: model width; n_heads: heads (dividing ``d_model``, with an even head width).
        rope_base: base of the rotary frequencies. dtype: parameter dtype. rng: seed or Generator.

    Sub-modules: ``wq``, ``wk``, ``wv``, ``wo``, each ``Linear(d_model, d_model)`` without bias.
    """

    def __init__(self, d_model: int, n_heads: int, rope_base: float = 10000.0, dtype: Any = "float32",
                 rng: Any = None) -> None:
        super().__init__()
        self.d_model = _checks.check_positive_int("d_model", d_model)
        self.n_heads = _checks.check_positive_int("n_heads", n_heads)
        if d_model % n_heads or (d_model // n_heads) % 2:
            raise ValueError(f"n_heads: must divide d_model = {d_model} into heads of even width, got {n_heads}")
        self.head_dim = d_model // n_heads
        self.rope_base = float(rope_base)
        self.wq = Linear(d_model, d_model, dtype=dtype, rng=rng)
        self.wk = Linear(d_model, d_model, dtype=dtype, rng=rng)
        self.wv = Linear(d_model, d_model, dtype=dtype, rng=rng)
        self.wo = Linear(d_model, d_model, dtype=dtype, rng=rng)

    def forward(self, x: Tensor, batch: int, positions: Any, cache: KVCache | None = None,
                layer: int = 0) -> Tensor:
        """Attend over the ``T`` positions of each sequence (and the cached ones before them).

        Args:
            x: ``(batch * T, d_model)`` Tensor, the rows of sequence ``b`` at ``b * T .. b * T + T - 1``.
            batch: number of sequences ``B``.
            positions: ``(T,)`` integer array on ``x``'s device, the absolute positions of the rows
                (``cache.length + arange(T)`` with a cache).
            cache: keys and values of earlier positions; the new ones are stored in it (layer ``layer``).
        Returns:
            ``(batch * T, d_model)`` Tensor in ``x``'s dtype.
        """
        N, D = x.shape
        B, H, Dh = batch, self.n_heads, self.head_dim
        T = N // B

        def heads(t: Tensor) -> Tensor:  # (B*T, D) -> (B, H, T, Dh)
            return ops.transpose(ops.reshape(t, (B, T, H, Dh)), (0, 2, 1, 3))

        q = ops.rope(heads(self.wq(x)), positions, base=self.rope_base)
        k = ops.rope(heads(self.wk(x)), positions, base=self.rope_base)
        v = heads(self.wv(x))
        if cache is not None:
            k_all, v_all = cache.update(layer, k.data, v.data)
            k, v = Tensor(k_all), Tensor(v_all)
        out = ops.causal_self_attention(q, k, v)
        return self.wo(ops.reshape(ops.transpose(out, (0, 2, 1, 3)), (N, D)))

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, n_heads={self.n_heads}, rope_base={self.rope_base}"
