"""Launcher of the device-side token sampler (``decode_sample.cu``) for :class:`pymglu.models.GraphDecoder`.

:class:`Sampler` draws the next token of each row of ``(B, V)`` logits with temperature and top-k, as
:func:`pymglu.models.generation.choose_next` does on the host, from uniform draws the caller uploads
(one per row and step, so a seeded ``numpy.random.Generator`` gives the same draws on both paths). The
temperature, ``top_k`` and the step's column are read from device memory, so one captured CUDA graph
serves every step and every setting. Like :mod:`pymglu.cuda.decode_step`, the launcher allocates
nothing and checks nothing: the decoder builds every buffer.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from pymglu import cuda as _cuda

__all__ = ["Sampler", "kernel_names"]

_SOURCE = "decode_sample.cu"
_THREADS = 256  # SAMPLE_THREADS in decode_sample.cu


def _name(dtype: Any) -> str:
    return f"pymglu::decode_sample<{_cuda.CUDA_TYPE_NAMES[np.dtype(dtype)]}>"


def kernel_names() -> list[str]:
    """Every kernel instance this module can launch (for compile checks)."""
    return [_name(dt) for dt in _cuda.CUDA_TYPE_NAMES]


class Sampler:
    """The sampling kernel for logits of one dtype (float32, float16 or bfloat16), compiled once."""

    def __init__(self, dtype: Any) -> None:
        dt = np.dtype(dtype)
        if dt not in _cuda.CUDA_TYPE_NAMES:
            raise TypeError(f"dtype: expected float32, float16 or bfloat16, got {dt.name}")
        self._fn = _cuda.load_module(_SOURCE, (_name(dt),)).get_function(_name(dt))

    def __call__(self, logits: Any, uniforms: Any, inv_temperature: Any, top_k: Any, next_ids: Any, history: Any,
                 state: Any, after_advance: bool) -> None:
        """``next_ids[b] = history[b, c]`` = the token drawn for row ``b`` with ``uniforms[c, b]``.

        Args:
            logits: ``(B, V)`` in the sampler's dtype.
            uniforms: ``(columns, B)`` float32 draws in ``[0, 1)``.
            inv_temperature: ``(1,)`` float32, ``1 / temperature`` (> 0).
            top_k: ``(1,)`` int32, ``>= 1``; ``>= V`` keeps every token.
            next_ids: ``(B,)`` int32; history: ``(B, columns or more)`` int32.
            state: the decoder's int32 state; ``c = state[1]``, or ``state[1] - 1`` with ``after_advance``
                (when the step has already moved the state on, as the fused step does).
        """
        B, V = logits.shape
        self._fn((B,), (_THREADS,), (logits, np.int32(V), uniforms, inv_temperature, top_k, next_ids, history,
                                     np.int32(history.shape[1]), state, np.int32(1 if after_advance else 0)))
