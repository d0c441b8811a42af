"""``Transformer``: a Llama-style decoder-only language model built from pymglu layers.

Token embedding -> ``n_layers`` pre-norm blocks (RMSNorm, causal multi-head attention with rotary
position embeddings, RMSNorm, :class:`pymglu.nn.FeedForward` of any kind) -> RMSNorm -> output
projection (the embedding table itself when ``tie_embeddings``). Inside the model the residual stream
is kept flat, ``(batch * T, d_model)``, so that every projection is one 2-d matrix product.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from pymglu import _checks
from pymglu.autograd import ops
from pymglu.autograd.function import grad_enabled
from pymglu.autograd.tensor import Tensor
from pymglu.backend import get_array_module, unwrap
from pymglu.models.block import TransformerBlock
from pymglu.models.config import TransformerConfig
from pymglu.models.kv_cache import KVCache
from pymglu.nn import MGLU, Embedding, Linear, Module, ModuleList, RMSNorm
from pymglu.nn import _init

__all__ = ["Transformer"]


class Transformer(Module):
    """Decoder-only language model.

    Args:
        config: a :class:`TransformerConfig`.
        rng: seed or ``numpy.random.Generator`` for the initialisation (created on the CPU; ``.to("cuda")``
            moves the model).

    Sub-modules: ``embed`` (``Embedding(vocab_size, d_model)``, initialised ``N(0, 1/d_model)``), ``layers``
    (a :class:`pymglu.nn.ModuleList` of :class:`TransformerBlock`), ``norm`` (final RMSNorm) and, unless
    the embeddings are tied, ``head`` (``Linear(d_model, vocab_size)``).
    """

    def __init__(self, config: TransformerConfig, rng: Any = None) -> None:
        super().__init__()
        if not isinstance(config, TransformerConfig):
            raise TypeError(f"config: expected a TransformerConfig, got {type(config).__name__}")
        self.config = c = config
        gen = _init.resolve_rng(rng)
        self.embed = Embedding(c.vocab_size, c.d_model, dtype=c.np_dtype, init_std=c.d_model ** -0.5, rng=gen)
        self.layers = ModuleList(TransformerBlock(c, rng=gen) for _ in range(c.n_layers))
        self.norm = RMSNorm(c.d_model, eps=c.norm_eps, dtype=c.np_dtype)
        if not c.tie_embeddings:
            self.head = Linear(c.d_model, c.vocab_size, dtype=c.np_dtype, rng=gen)

    # ----------------------------------------------------------------- forward
    def forward(self, ids: Any, cache: KVCache | None = None, last_only: bool = False) -> Tensor:
        """Next-token logits.

        Args:
            ids: ``(B, T)`` integer ids in ``[0, vocab_size)`` (NumPy/CuPy array, Tensor or nested list),
                on the model's device.
            cache: a :class:`KVCache` (inference under :func:`pymglu.no_grad` only): the ``T`` tokens sit
                at positions ``cache.length ..`` and attend to the cached ones; the cache is filled and
                advanced by ``T``. Without a cache the tokens sit at positions ``0 .. T - 1``.
            last_only: compute the logits of the last position of each sequence only.
        Returns:
            ``(B, T, vocab_size)`` logits (``(B, 1, vocab_size)`` with ``last_only``) in the model's dtype.
        Raises:
            ValueError: ids not ``(B, T)``, or positions beyond ``max_seq_len``; RuntimeError: a cache
            while gradients are being recorded.
        """
        ids = unwrap(ids)
        if not hasattr(ids, "dtype"):
            ids = get_array_module(self.embed.weight.data).asarray(ids)
        _checks.check_ndim("ids", ids, 2)
        B, T = ids.shape
        if B < 1 or T < 1:
            raise ValueError(f"ids: expected at least one sequence of at least one token, got {_checks.describe(ids)}")
        offset = 0 if cache is None else cache.length
        if offset + T > self.config.max_seq_len:
            raise ValueError(
                f"ids: {T} tokens after {offset} cached exceed max_seq_len = {self.config.max_seq_len} "
                "(generate() crops its context to the last max_seq_len tokens)"
            )
        if cache is not None and grad_enabled():
            raise RuntimeError("a KVCache is for inference: run the model under pymglu.no_grad()")
        xp = get_array_module(ids, self.embed.weight.data)
        positions = xp.arange(offset, offset + T, dtype=np.int64)
        x = ops.reshape(self.embed(ids), (B * T, self.config.d_model))
        for i, block in enumerate(self.layers):
            x = block(x, B, positions, cache, i)
        if cache is not None:
            cache.advance(T)
        if last_only:
            x = ops.getitem(ops.reshape(x, (B, T, self.config.d_model)), (slice(None), -1))
        logits = self._project(self.norm(x))
        return ops.reshape(logits, (B, 1 if last_only else T, self.config.vocab_size))

    def _project(self, x: Tensor) -> Tensor:
        """``(N, d_model)`` -> ``(N, vocab_size)`` through the head or the tied embedding table."""
        if self.config.tie_embeddings:
            return ops.matmul(x, ops.transpose(self.embed.weight))
        return self.head(x)

    def loss(self, ids: Any, targets: Any) -> Tensor:
        """Mean next-token cross-entropy (nats per token) of ``(B, T)`` ``ids`` against ``(B, T)``
        ``targets``; a float32 (float64 for float64 models) scalar Tensor."""
        return ops.softmax_cross_entropy(self(ids), unwrap(targets))

    # ----------------------------------------------------------------- generation
    def new_cache(self, batch: int) -> KVCache:
        """An empty :class:`KVCache` for ``batch`` sequences, on the model's device, of ``max_seq_len``."""
        c = self.config
        xp = get_array_module(self.embed.weight.data)
        return KVCache(c.n_layers, batch, c.n_heads, c.head_dim, c.max_seq_len, c.np_dtype, xp)

    def generate(self, ids: Any, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 rng: Any = None, use_kv_cache: bool = True, use_graph: bool | None = None) -> np.ndarray:
        """Continue ``ids`` by ``max_new_tokens`` tokens; see :func:`pymglu.models.generation.generate`."""
        from pymglu.models.generation import generate

        return generate(self, ids, max_new_tokens, temperature=temperature, top_k=top_k, rng=rng,
                        use_kv_cache=use_kv_cache, use_graph=use_graph)

    # ----------------------------------------------------------------- statistics
    def mglu_layers(self) -> list[MGLU]:
        """The MGLU layer of each block's feed-forward, in depth order (empty for GLU and plain kinds)."""
        return [block.ffn.up for block in self.layers if isinstance(block.ffn.up, MGLU)]

    def set_recompute(self, recompute: bool) -> None:
        """Set :attr:`pymglu.nn.MGLU.recompute` on every MGLU layer: in training, recompute their ``n + 1``
        products in the backward instead of keeping them (less memory, more products; docs/training.md)."""
        for layer in self.mglu_layers():
            layer.recompute = bool(recompute)

    def num_weights(self) -> int:
        """Trainable weights that inference keeps: every parameter element except MGLU mask logits
        (those become one bit each)."""
        return sum(p.size for name, p in self.named_parameters() if not name.endswith("mask_logits"))

    def num_mask_bits(self) -> int:
        """Mask bits at inference: ``n_masks * d_ff * d_model`` per MGLU layer."""
        return sum(m.n_masks * m.h * m.d for m in self.mglu_layers())

    def gate_fractions(self) -> list[float]:
        """Per MGLU layer (depth order), the mean over its masks of the share of ``W`` given to the gate."""
        return [float(m.mask_stats()["mean_gate_fraction"]) for m in self.mglu_layers()]

    def extra_repr(self) -> str:
        c = self.config
        kind = c.ffn_kind + (f"(n={c.n_masks})" if c.is_mglu else "")
        return (f"vocab_size={c.vocab_size}, d_model={c.d_model}, n_layers={c.n_layers}, n_heads={c.n_heads}, "
                f"d_ff={c.d_ff}, ffn={kind}, max_seq_len={c.max_seq_len}, tie_embeddings={c.tie_embeddings}, "
                f"dtype={c.dtype}")
