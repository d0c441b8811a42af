"""Autoregressive generation: greedy, temperature and top-k sampling, with or without a KV cache.

The model sees at most its last ``max_seq_len`` tokens, at positions ``0 ..``. Without a cache every
step recomputes that whole window. With a cache (:class:`pymglu.models.KVCache`) the prompt window is
computed once and each step runs the one new token against the cached keys and values; once the
cache is full, the step computes the last window afresh (as the no-cache path does), so both paths see
the same context and greedy decoding gives the same tokens.

Token choice runs on the host: each step copies the ``(B, vocab_size)`` logits of the last position
to NumPy (a small device-to-host copy on a GPU) and draws with a NumPy ``Generator``.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from pymglu import _checks
from pymglu.autograd.function import no_grad
from pymglu.backend import get_array_module, to_numpy, unwrap
from pymglu.nn import _init

__all__ = ["generate", "choose_next"]


def choose_next(logits: np.ndarray, temperature: float, top_k: int | None, rng: np.random.Generator) -> np.ndarray:
    """Next token of each row of ``(B, V)`` host logits -> ``(B,)`` int64.

    ``temperature == 0``: argmax (greedy, the lowest id on ties). Otherwise a draw from
    ``softmax(logits / temperature)`` restricted to the ``top_k`` largest logits when ``top_k`` is given
    (ties at the k-th value are all kept).
    """
    z = np.asarray(logits, dtype=np.float64)
    if temperature == 0.0:
        return z.argmax(axis=-1).astype(np.int64)
    z = z / temperature
    if top_k is not None and top_k < z.shape[-1]:
        kth = np.partition(z, -top_k, axis=-1)[:, -top_k][:, None]
        z = np.where(z >= kth, z, -np.inf)
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    cdf = np.cumsum(p, axis=-1)
    u = rng.random(z.shape[0])[:, None] * cdf[:, -1:]
    return np.minimum((cdf <= u).sum(axis=-1), z.shape[-1] - 1).astype(np.int64)


def _check_ids(ids: Any, vocab_size: int) -> tuple[np.ndarray, bool]:
    """``ids`` as a ``(B, T)`` host int64 array, and whether the caller gave a 1-d sequence."""
    raw = unwrap(ids)
    arr = to_numpy(raw) if hasattr(raw, "dtype") else np.asarray(raw)
    if arr.ndim not in (1, 2) or arr.shape[-1] < 1 or (arr.ndim == 2 and arr.shape[0] < 1):
        raise ValueError(f"ids: expected a non-empty (T,) or (B, T) array of token ids, got {_checks.describe(arr)}")
    if np.dtype(arr.dtype).kind not in "iu":
        raise TypeError(f"ids: expected integer token ids, got {_checks.describe(arr)}")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"ids: expected values in [0, {vocab_size}), got values in [{lo}, {hi}]")
    one_d = arr.ndim == 1
    return (arr[None, :] if one_d else arr).astype(np.int64), one_d


def generate(model: Any, ids: Any, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             rng: Any = None, use_kv_cache: bool = True, use_graph: bool | None = None) -> np.ndarray:
    """Continue token sequences with a :class:`pymglu.models.Transformer`.

    Args:
        model: the Transformer (on any device); it runs in eval mode under :func:`pymglu.no_grad` (so MGLU
            layers use their packed masks, and FlashMGLU on a GPU for up to 16 tokens), and its
            training flag is restored afterwards.
        ids: prompt token ids, ``(T,)`` or ``(B, T)``, integers in ``[0, vocab_size)``, ``T >= 1``
            (NumPy/CuPy array, Tensor or list).
        max_new_tokens: tokens to append (>= 0).
        temperature: 0 for greedy decoding, else the softmax temperature (> 0).
        top_k: sample among the ``top_k`` most likely tokens only (``None``: all).
        rng: ``None``, a seed or a ``numpy.random.Generator`` for sampling.
        use_kv_cache: decode with a :class:`KVCache` (one new token per step) instead of recomputing the
            window every step.
        use_graph: decode the one-token steps with a captured CUDA graph
            (:class:`pymglu.models.GraphDecoder`; needs ``use_kv_cache``). ``None`` (default): when the
            model is on a GPU and the decoder serves it (:func:`pymglu.models.graph_decoder.unsupported_reason`),
            else eagerly. ``True``: the graph or a ``ValueError`` saying why not. ``False``: eagerly.
            Graph steps choose their tokens on the device (greedy, or sampled from draws of ``rng`` made
            on the host, the same draws as the eager path) and run back to back until the cache is full.
            Prefills (the prompt, and the last window when the cache is full) always run eagerly.
    Returns:
        NumPy int64 array, the prompt followed by the new tokens: ``(T + max_new_tokens,)`` for a 1-d
        prompt, ``(B, T + max_new_tokens)`` for a 2-d one.
    """
    c = model.config
    tokens, one_d = _check_ids(ids, c.vocab_size)
    max_new_tokens = _checks.check_positive_int("max_new_tokens", max_new_tokens, minimum=0)
    temperature = _checks.check_finite("temperature", temperature, minimum=0.0)
    if top_k is not None:
        top_k = _checks.check_positive_int("top_k", top_k)
    gen = _init.resolve_rng(rng)
    xp = get_array_module(model.embed.weight.data)
    B, L = tokens.shape[0], c.max_seq_len
    out = np.empty((B, tokens.shape[1] + max_new_tokens), dtype=np.int64)
    out[:, :tokens.shape[1]] = tokens
    filled = tokens.shape[1]
    decoder = _graph_decoder(model, B, use_kv_cache, use_graph)
    was_training = model.training
    model.eval()
    try:
        if decoder is not None:
            with no_grad():
                _generate_with_graph(decoder, out, tokens.shape[1], max_new_tokens, temperature, top_k, gen)
            return out[0] if one_d else out
        with no_grad():
            cache = model.new_cache(B) if use_kv_cache else None
            for _ in range(max_new_tokens):
                if cache is None or cache.length in (0, L):  # no cache, first step, or a full cache
                    if cache is not None:
                        cache.reset()
                    step_ids = out[:, max(0, filled - L):filled]
                else:
                    step_ids = out[:, filled - 1:filled]
                logits = model(xp.asarray(step_ids), cache=cache, last_only=True)
                out[:, filled] = choose_next(to_numpy(logits.data)[:, -1], temperature, top_k, gen)
                filled += 1
    finally:
        model.train(was_training)
    return out[0] if one_d else out


def _graph_decoder(model: Any, batch: int, use_kv_cache: bool, use_graph: bool | None) -> Any:
    """The :class:`GraphDecoder` that serves this call, or ``None`` for the eager path."""
    if use_graph is None:
        if not use_kv_cache:
            return None
    elif not isinstance(use_graph, bool):
        raise TypeError(f"use_graph: expected None, True or False, got {use_graph!r}")
    elif not use_graph:
        return None
    elif not use_kv_cache:
        raise ValueError("use_graph=True needs use_kv_cache=True (the graph decodes one cached token per step)")
    from pymglu.models import graph_decoder

    reason = graph_decoder.unsupported_reason(model)
    if reason is not None:
        if use_graph:
            raise ValueError(f"use_graph=True: the graph decoder cannot serve this model: {reason}")
        return None
    return graph_decoder.decoder_for(model, batch)


def _generate_with_graph(decoder: Any, out: np.ndarray, filled: int, max_new_tokens: int, temperature: float,
                         top_k: int | None, gen: np.random.Generator) -> None:
    """Fill ``out[:, filled:filled + max_new_tokens]`` with the decoder: the same contexts as the eager
    cached path (a full cache is refilled with the last ``max_seq_len`` tokens)."""
    L = decoder.cache.capacity
    end = filled + max_new_tokens
    decoder.cache.reset()
    while filled < end:
        if decoder.cache.length in (0, L):
            logits = decoder.prefill(out[:, max(0, filled - L):filled])
            out[:, filled] = choose_next(to_numpy(logits), temperature, top_k, gen)
            filled += 1
        else:
            steps = min(end - filled, L - decoder.cache.length)
            if temperature == 0.0:
                out[:, filled:filled + steps] = decoder.greedy(out[:, filled - 1], steps)
            else:  # the draws choose_next would take, one row per step
                draws = gen.random((steps, out.shape[0]))
                out[:, filled:filled + steps] = decoder.sample(out[:, filled - 1], steps, temperature, top_k, draws)
            filled += steps
