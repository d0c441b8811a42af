"""Inverted dropout."""
from __future__ import annotations

from typing import Any

import numpy as np

from pymglu import _checks
from pymglu.autograd.function import Function
from pymglu.autograd.ops._util import real_number
from pymglu.autograd.tensor import Tensor
from pymglu.backend import get_array_module, unwrap
from pymglu.dtypes import FLOAT_DTYPES


def _uniform(xp: Any, rng: Any, shape: tuple[int, ...]) -> Any:
    """Uniform ``[0, 1)`` float32 samples of ``shape`` on ``xp``'s device, drawn from ``rng``."""
    if isinstance(rng, (bool, np.bool_)):
        raise TypeError(f"rng: expected None, an int seed or a random Generator, got {rng!r}")
    if xp is np:
        if rng is None or isinstance(rng, (int, np.integer)):
            rng = np.random.default_rng(None if rng is None else int(rng))
        if not isinstance(rng, np.random.Generator):
            raise TypeError(
                f"rng: expected None, an int seed or a numpy.random.Generator for NumPy data, got {type(rng).__name__}"
            )
        return rng.random(shape, dtype=np.float32)
    # CuPy data: draw on the device, never on the host.
    if rng is None or isinstance(rng, (int, np.integer)):
        rng = xp.random.default_rng(None if rng is None else int(rng))
    if not type(rng).__module__.startswith("cupy"):
        raise TypeError(
            f"rng: expected None, an int seed or a cupy.random Generator for CuPy data, got {type(rng).__name__} "
            "(a NumPy Generator would draw on the host)"
        )
    return rng.random(shape, dtype=np.float32)


class Dropout(Function):
    """``y = x * keep / (1 - p)`` with ``keep ~ Bernoulli(1 - p)``; backward ``g * keep / (1 - p)``."""

    def forward(self, x: Any, p: float = 0.5, rng: Any = None) -> Any:
        xp = get_array_module(x)
        self.keep = _uniform(xp, rng, tuple(x.shape)) >= p
        self.scale = 1.0 / (1.0 - p)
        return xp.where(self.keep, x * self.scale, 0).astype(x.dtype, copy=False)

    def backward(self, g: Any) -> tuple[Any]:
        xp = get_array_module(g)
        return (xp.where(self.keep, g * self.scale, 0).astype(g.dtype, copy=False),)


def dropout(x: Any, p: float, training: bool = True, rng: Any = None) -> Any:
    """Inverted dropout: zero each element with probability ``p`` and scale the rest by ``1 / (1 - p)``.

    Args:
        x: float Tensor of any shape; the result has its shape and dtype.
        p: drop probability, a finite number in ``[0, 1)``.
        training: when False (or when ``p == 0``) the input is returned unchanged, as a Tensor.
        rng: ``None`` (fresh entropy), an int seed, or a random Generator on ``x``'s device:
            ``numpy.random.Generator`` for NumPy data, ``cupy.random`` Generator for CuPy data.
    Raises:
        ValueError: ``p`` not finite or outside ``[0, 1)``. TypeError: ``x`` not float, or a bad ``rng``.
    """
    p = real_number("p", p, minimum=0.0)
    if p >= 1.0:
        raise ValueError(f"p: expected a drop probability in [0, 1), got {p!r}")
    _checks.check_dtype("x", unwrap(x), FLOAT_DTYPES)
    if not training or p == 0.0:
        return x if isinstance(x, Tensor) else Tensor(x)
    return Dropout.apply(x, p=p, rng=rng)
