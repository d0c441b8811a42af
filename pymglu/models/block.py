"""``TransformerBlock``: pre-norm attention and feed-forward sub-layers, each with a residual add."""
from __future__ import annotations

from typing import Any

from pymglu.autograd.tensor import Tensor
from pymglu.models.attention import Attention
from pymglu.models.config import TransformerConfig
from pymglu.models.kv_cache import KVCache
from pymglu.nn import FeedForward, Module, RMSNorm

__all__ = ["TransformerBlock"]


class TransformerBlock(Module):
    """``x + attn(attn_norm(x))``, then ``x + ffn(ffn_norm(x))`` (Llama's pre-norm layout).

    Sub-modules: ``attn_norm``, ``attn`` (:class:`Attention`), ``ffn_norm``, ``ffn``
    (:class:`pymglu.nn.FeedForward` of ``config.ffn_kind`` with hidden width ``config.d_ff``).
    """

    def __init__(self, config: TransformerConfig, rng: Any = None) -> None:
        super().__init__()
        c = config
        self.attn_norm = RMSNorm(c.d_model, eps=c.norm_eps, dtype=c.np_dtype)
        self.attn = Attention(c.d_model, c.n_heads, rope_base=c.rope_base, dtype=c.np_dtype, rng=rng)
        self.ffn_norm = RMSNorm(c.d_model, eps=c.norm_eps, dtype=c.np_dtype)
        self.ffn = FeedForward(c.d_model, c.d_ff, kind=c.ffn_kind, n_masks=c.n_masks, dtype=c.np_dtype, rng=rng)

    def forward(self, x: Tensor, batch: int, positions: Any, cache: KVCache | None = None,
                layer: int = 0) -> Tensor:
        """``x`` ``(batch * T, d_model)`` -> the same shape (see :meth:`Attention.forward`)."""
        x = x + self.attn(self.attn_norm(x), batch, positions, cache, layer)
        return x + self.ffn(self.ffn_norm(x))
