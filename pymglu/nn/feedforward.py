"""``FeedForward``: a gated (or plain) up layer ``d -> h`` followed by a down projection ``h -> d``."""
from __future__ import annotations

from typing import Any

from pymglu import _checks
from pymglu.autograd import ops
from pymglu.autograd.tensor import Tensor
from pymglu.dtypes import float32
from pymglu.nn import _init
from pymglu.nn.glu import GLU, GeGLU, ReGLU, SwiGLU
from pymglu.nn.linear import Linear
from pymglu.nn.mglu import MGLU, GeMGLU, ReMGLU, SwiMGLU
from pymglu.nn.module import Module

__all__ = ["FeedForward", "FEEDFORWARD_KINDS"]

_GATED = {"swiglu": SwiGLU, "geglu": GeGLU, "reglu": ReGLU}
_MASKED = {"swimglu": SwiMGLU, "gemglu": GeMGLU, "remglu": ReMGLU}
_PLAIN = ("gelu", "relu")

#: accepted values of ``kind``.
FEEDFORWARD_KINDS = ("swiglu", "geglu", "reglu", "glu", "swimglu", "gemglu", "remglu", "mglu", "gelu", "relu")


class FeedForward(Module):
    """Transformer feed-forward block ``(..., d) -> (..., d)``: ``down(up(x))``.

    Args:
        d: model width; h: hidden width (integers >= 1).
        kind: the up layer. GLU family: ``"swiglu"``, ``"geglu"``, ``"reglu"``, ``"glu"`` (sigmoid);
            MGLU family: ``"swimglu"``, ``"gemglu"``, ``"remglu"``, ``"mglu"`` (sigmoid); plain FFN:
            ``"gelu"``, ``"relu"`` (``Linear(d, h)`` then the activation).
        n_masks: number of masks of an MGLU kind (default 1); must be left ``None`` for other kinds.
        approximate: GELU variant for ``"geglu"``, ``"gemglu"`` and ``"gelu"``: ``"none"`` (erf) or
            ``"tanh"``.
        dtype: parameter dtype; rng: seed or ``numpy.random.Generator``.

    Sub-modules: ``up`` (the gated layer, or a ``Linear(d, h)``) and ``down`` (``Linear(h, d)``).
    """

    def __init__(self, d: int, h: int, kind: str = "swiglu", n_masks: int | None = None,
                 approximate: str = "none", dtype: Any = float32, rng: Any = None) -> None:
        super().__init__()
        if kind not in FEEDFORWARD_KINDS:
            raise ValueError(f"kind: expected one of {FEEDFORWARD_KINDS}, got {kind!r}")
        self.d = _checks.check_positive_int("d", d)
        self.h = _checks.check_positive_int("h", h)
        self.kind = kind
        self.dtype = _init.check_float_dtype(dtype)
        gelu_name = _init.check_gelu_approximate(approximate)
        if n_masks is not None and kind not in _MASKED and kind != "mglu":
            raise ValueError(f"n_masks: only MGLU kinds take masks, got n_masks={n_masks!r} for kind={kind!r}")
        gen = _init.resolve_rng(rng)
        self.activation: str | None = None
        if kind in _MASKED or kind == "mglu":
            n = 1 if n_masks is None else n_masks
            if kind == "gemglu":
                self.up = GeMGLU(self.d, self.h, n_masks=n, approximate=approximate, dtype=self.dtype, rng=gen)
            elif kind == "mglu":
                self.up = MGLU(self.d, self.h, n_masks=n, activation="sigmoid", dtype=self.dtype, rng=gen)
            else:
                self.up = _MASKED[kind](self.d, self.h, n_masks=n, dtype=self.dtype, rng=gen)
        elif kind == "geglu":
            self.up = GeGLU(self.d, self.h, approximate=approximate, dtype=self.dtype, rng=gen)
        elif kind == "glu":
            self.up = GLU(self.d, self.h, activation="sigmoid", dtype=self.dtype, rng=gen)
        elif kind in _GATED:
            self.up = _GATED[kind](self.d, self.h, dtype=self.dtype, rng=gen)
        else:
            self.up = Linear(self.d, self.h, dtype=self.dtype, rng=gen)
            self.activation = gelu_name if kind == "gelu" else "relu"
        self.down = Linear(self.h, self.d, dtype=self.dtype, rng=gen)

    def forward(self, x: Any) -> Tensor:
        """``x`` ``(..., d)`` -> Tensor ``(..., d)`` in the layer's dtype."""
        u = self.up(x)
        if self.activation is not None:
            u = ops.activation(u, self.activation)
        return self.down(u)

    def extra_repr(self) -> str:
        return f"d={self.d}, h={self.h}, kind={self.kind!r}, dtype={self.dtype.name}"
