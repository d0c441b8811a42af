"""Launchers of the decode-step kernels (``decode_step.cu``) for :class:`pymglu.models.GraphDecoder`.

Each launcher takes preallocated CuPy buffers and allocates nothing, so that a whole decode step can be
captured in a CUDA graph. The position of the step is read by the kernels from ``state[0]`` (an int32
device array; ``state[1]`` is the column of the greedy-token history), never passed as an argument.
Launches go to CuPy's current stream. Shapes and dtypes are the caller's contract: the decoder builds
every buffer itself, and the launchers check nothing (``attention_workspace`` refuses heads wider than
``MAX_HEAD_DIM``).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from pymglu import cuda as _cuda

__all__ = ["kernel_names", "DecodeKernels", "attention_workspace", "ATTENTION_CHUNK", "MAX_HEAD_DIM"]

_SOURCE = "decode_step.cu"
_TEMPLATED = ("decode_embed", "decode_rms_norm", "decode_rope_store", "decode_attention_partial",
              "decode_attention_combine", "decode_glu", "decode_argmax")
_THREADS = 256
ATTENTION_WARPS = 4  # as in decode_step.cu

#: cached positions per block of the attention kernel (each of its warps takes a quarter of them).
ATTENTION_CHUNK = 32

#: widest attention head the kernel serves (8 values per lane of a warp).
MAX_HEAD_DIM = 256


def _name(kernel: str, dtype: Any) -> str:
    return f"pymglu::{kernel}<{_cuda.CUDA_TYPE_NAMES[np.dtype(dtype)]}>"


def kernel_names() -> list[str]:
    """Every kernel instance this module can launch (for compile checks)."""
    return [_name(k, dt) for dt in _cuda.CUDA_TYPE_NAMES for k in _TEMPLATED] + ["pymglu::decode_advance"]


def _i32(v: int) -> np.int32:
    return np.int32(v)


class DecodeKernels:
    """The decode-step kernels of one dtype, compiled and fetched once.

    Args:
        dtype: float32, float16 or bfloat16 (the model's dtype).
    """

    def __init__(self, dtype: Any) -> None:
        dt = np.dtype(dtype)
        if dt not in _cuda.CUDA_TYPE_NAMES:
            raise TypeError(f"dtype: expected float32, float16 or bfloat16, got {dt.name}")
        self.dtype = dt
        names = tuple(_name(k, dt) for k in _TEMPLATED) + ("pymglu::decode_advance",)
        module = _cuda.load_module(_SOURCE, names)
        self._fn = {k: module.get_function(_name(k, dt)) for k in _TEMPLATED}
        self._advance = module.get_function("pymglu::decode_advance")

    def embed(self, ids: Any, table: Any, out: Any) -> None:
        """``out[b] = table[ids[b]]``: ids ``(B,)`` int32, table ``(V, d)``, out ``(B, d)``."""
        self._fn["decode_embed"]((ids.shape[0],), (_THREADS,), (ids, table, out, _i32(table.shape[1])))

    def rms_norm(self, x: Any, weight: Any, out: Any, eps: float) -> None:
        """``out = x / sqrt(mean(x^2, -1) + eps) * weight`` row by row: x, out ``(B, d)``, weight ``(d,)``."""
        self._fn["decode_rms_norm"]((x.shape[0],), (_THREADS,), (x, weight, out, _i32(x.shape[1]), np.float32(eps)))

    def rope_store(self, qkv: Any, q_out: Any, k_cache: Any, v_cache: Any, state: Any, base: float) -> None:
        """Rotate the new query and key at position ``state[0]`` and store key and value in the cache.

        qkv ``(B, 3 H Dh)`` rows ``[q | k | v]``; q_out ``(B, H, Dh)``; caches ``(B, H, capacity, Dh)``.
        """
        B, H, capacity, Dh = k_cache.shape
        self._fn["decode_rope_store"]((B * H,), (min(_THREADS, max(32, Dh)),),
                                      (qkv, q_out, k_cache, v_cache, state, _i32(H), _i32(Dh), _i32(capacity),
                                       np.float64(base)))

    def attention(self, q: Any, k_cache: Any, v_cache: Any, out: Any, state: Any, workspace: Any) -> None:
        """``out[b, head * Dh:]`` = softmax attention of ``q[b, head]`` over positions ``0 .. state[0]``.

        q ``(B, H, Dh)``; caches ``(B, H, capacity, Dh)``; out ``(B, H * Dh)``; ``workspace`` from
        :func:`attention_workspace` for these shapes.
        """
        B, H, capacity, Dh = k_cache.shape
        part_max, part_sum, part_acc = workspace
        chunks = part_max.shape[1]
        self._fn["decode_attention_partial"]((B * H, chunks), (32 * ATTENTION_WARPS,),
                                             (q, k_cache, v_cache, part_max, part_sum, part_acc, state, _i32(Dh),
                                              _i32(capacity), _i32(ATTENTION_CHUNK), np.float32(1.0 / math.sqrt(Dh))))
        self._fn["decode_attention_combine"]((B * H,), (min(_THREADS, max(32, Dh)),),
                                             (part_max, part_sum, part_acc, out, state, _i32(Dh), _i32(chunks),
                                              _i32(ATTENTION_CHUNK)))

    def glu(self, gate_value: Any, out: Any, activation: str) -> None:
        """``out = g(gate) * value`` for rows ``gate_value[b] = [gate | value]``: ``(B, 2h)`` -> ``(B, h)``."""
        B, h = out.shape
        self._fn["decode_glu"]((-(-h // _THREADS), B), (_THREADS,),
                               (gate_value, out, _i32(h), _i32(_cuda.ACTIVATION_CODES[activation])))

    def argmax(self, logits: Any, next_ids: Any, history: Any, state: Any) -> None:
        """``next_ids[b] = history[b, state[1]] = argmax(logits[b])`` (lowest index on ties)."""
        B, V = logits.shape
        self._fn["decode_argmax"]((B,), (_THREADS,), (logits, _i32(V), next_ids, history, _i32(history.shape[1]), state))

    def advance(self, state: Any) -> None:
        """``state += 1``: the next step decodes the next position into the next history column."""
        self._advance((1,), (1,), (state,))


def attention_workspace(batch: int, n_heads: int, head_dim: int, capacity: int) -> tuple[Any, Any, Any]:
    """float32 partial results of the attention chunks: running max and sum ``(B * H, chunks)`` and
    weighted values ``(B * H, chunks, head_dim)``, ``chunks = ceil(capacity / ATTENTION_CHUNK)``."""
    import cupy as cp

    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head_dim: the decode attention kernel serves heads of at most {MAX_HEAD_DIM}, got {head_dim}")
    chunks = -(-capacity // ATTENTION_CHUNK)
    return (cp.empty((batch * n_heads, chunks), dtype=np.float32), cp.empty((batch * n_heads, chunks), dtype=np.float32),
            cp.empty((batch * n_heads, chunks, head_dim), dtype=np.float32))
