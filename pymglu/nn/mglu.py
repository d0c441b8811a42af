"""MGLU layers: one shared weight, ``n`` learned binary masks (Tajima et al., arXiv 2506.23225).

Letters: here ``d`` is the layer's **input** (model) width and ``h`` its **hidden** width, so
``x`` is ``(..., d)``, ``W`` is ``(h, d)`` and the output is ``(..., h)``. The paper swaps the letters
(it writes ``x in R^h`` and ``W in R^{h x d}`` with ``h`` the model width and ``d`` the intermediate
width): the paper's ``h`` is our ``d`` and the paper's ``d`` is our ``h``.

Two forms of a layer:

* **training form**: Parameters ``W`` ``(h, d)`` and ``mask_logits`` ``(n, h, d)`` float32; the masks are
  ``mask_logits > 0`` and the logits learn through the straight-through estimator. ``state_dict``:
  ``W``, ``mask_logits``.
* **inference form** (after :meth:`MGLU.drop_logits`): Parameter ``W`` and the buffer ``packed_masks``
  ``(n, h, ceil(d/32))`` uint32 bit-planes (:mod:`pymglu.masks`). ``state_dict``: ``W``, ``packed_masks``.

In eval mode a training-form layer runs on bit-planes packed from its logits, and so does its training
forward on CuPy (the logits still get their gradient). The packed copy is cached
and keyed on the identity of the logits array and the Parameter's version counter
(:attr:`pymglu.nn.Parameter.version`), which every assignment to ``.data``, every optimizer step and
every ``load_state_dict`` bumps; code that edits ``mask_logits.data`` in place by hand calls
``mask_logits.mark_modified()`` (or :meth:`MGLU.pack`). Checking the key costs nothing per call, where
comparing the logits themselves would read ``n`` times the bytes of ``W``. When the optimizer's update
kernel wrote the bit-planes of the new logits (:attr:`pymglu.nn.Parameter.wants_sign_bits`, set here),
the layer takes those instead of packing.
"""
from __future__ import annotations

import math
from types import ModuleType
from typing import Any, Callable

from pymglu import _checks, activations
from pymglu import masks as _masks
from pymglu.autograd import ops
from pymglu.autograd.function import grad_enabled
from pymglu.autograd.tensor import Tensor
from pymglu.backend import is_cupy_array
from pymglu.dtypes import bfloat16, float16, float32
from pymglu.nn import _init
from pymglu.nn.module import Module, Parameter

__all__ = ["MGLU", "SwiMGLU", "GeMGLU", "ReMGLU", "FLASH_MAX_TOKENS"]

#: eval-mode calls on CuPy arrays with at most this many tokens go to ``pymglu.cuda.flash_mglu``.
FLASH_MAX_TOKENS = 16

_FLASH_DTYPES = (float16, bfloat16, float32)


class MGLU(Module):
    """Masked gated linear unit ``(..., d) -> (..., h)``:
    ``y = sum_i g(x (M_i*W)^T) * x ((1-M_i)*W)^T`` with ``M_i = mask_logits_i > 0``.

    Args:
        d: input (model) width; h: hidden width (integers >= 1). See the module docstring for the
            paper's swapped letters.
        n_masks: number of masks ``n`` (integer >= 1).
        activation: gating function ``g``, one of :data:`pymglu.activations.ACTIVATIONS`.
        dtype: dtype of ``W`` (float64, float32, float16 or bfloat16); inputs must share it. The logits
            are float32 whatever ``dtype`` is (their float32 master copy, DESIGN.md section 2).
        rng: seed or ``numpy.random.Generator``.
        recompute: in training mode, keep no ``t``/``s_i`` between forward and backward and recompute
            them in the backward (on the GPU a chunk of tokens at a time): ``n + 1`` more products per
            step, and activation memory of about SwiGLU's instead of ``(n + 1)`` values per token and
            hidden unit. An attribute; may be changed between steps.

    Parameters: ``W`` ``(h, d)`` initialised ``N(0, 1) * d ** -0.5``; ``mask_logits`` ``(n, h, d)``
    initialised ``0.01 * N(0, 1)`` (the paper's choice). Buffer ``packed_masks`` (see module docstring).
    """

    def __init__(self, d: int, h: int, n_masks: int = 1, activation: str = "sigmoid", dtype: Any = float32,
                 rng: Any = None, recompute: bool = False) -> None:
        super().__init__()
        self.d = _checks.check_positive_int("d", d)
        self.h = _checks.check_positive_int("h", h)
        self.n_masks = _checks.check_positive_int("n_masks", n_masks)
        self.activation = activations.check_activation(activation)
        self.dtype = _init.check_float_dtype(dtype)
        gen = _init.resolve_rng(rng)
        self.W = Parameter(_init.normal(gen, (self.h, self.d), self.d ** -0.5, self.dtype))
        self.mask_logits = Parameter(_init.normal(gen, (self.n_masks, self.h, self.d), 0.01, float32), decay=False)
        self.mask_logits.wants_sign_bits = True  # optimizers with a fused update write the bit-planes
        self.register_buffer("packed_masks", None, persistent=False)
        self._packed_key: tuple[Any, int] | None = None
        self.inference_only = False
        self.recompute = bool(recompute)

    # ----------------------------------------------------------------- packing
    def pack(self) -> Any:
        """Pack ``mask_logits > 0`` into ``packed_masks`` ``(n, h, ceil(d/32))`` uint32 and return it.

        On an inference-form layer this returns the stored bit-planes unchanged.
        """
        if self.inference_only:
            return self.packed_masks
        logits = self.mask_logits
        self.packed_masks = _masks.pack_masks(logits.data)  # float logits are thresholded at 0
        self._packed_key = (logits.data, logits.version)
        return self.packed_masks

    def _current_packed(self) -> Any:
        """The bit-planes for the current logits: the cached ones while the logits are unchanged, else
        those the optimizer's update wrote for the new logits (:meth:`Parameter.sign_bits`), else packed."""
        if self.inference_only:
            return self.packed_masks
        key = self._packed_key
        logits = self.mask_logits
        if key is None or key[0] is not logits.data or key[1] != logits.version or self.packed_masks is None:
            offered = logits.sign_bits()
            if offered is None:
                return self.pack()
            self.packed_masks = offered
            self._packed_key = (logits.data, logits.version)
        return self.packed_masks

    def drop_logits(self) -> "MGLU":
        """Turn this layer into its inference form: keep ``W`` and the packed bit-planes, drop the logits.

        The layer is switched to eval mode; running it in training mode afterwards raises. Returns
        ``self``. A fresh layer of the inference form (to load an inference checkpoint into) is
        ``SwiMGLU(d, h, n_masks).drop_logits()``.
        """
        if self.inference_only:
            return self
        self.pack()
        del self.mask_logits
        self._packed_key = None
        self.set_buffer_persistent("packed_masks", True)
        self.inference_only = True
        self.eval()
        return self

    def masks(self) -> Any:
        """The current boolean masks ``(n, h, d)`` (from the logits, or unpacked from the bit-planes)."""
        if self.inference_only:
            return _masks.unpack_masks(self.packed_masks, self.d)
        return self.mask_logits.data > 0

    def mask_stats(self) -> dict[str, Any]:
        """:func:`pymglu.masks.mask_statistics` of the current masks: gate fraction per mask, its mean,
        pairwise agreement and Jaccard matrices (NumPy float64)."""
        return _masks.mask_statistics(self.masks())

    # ----------------------------------------------------------------- forward
    def forward(self, x: Any) -> Tensor:
        """``x`` ``(..., d)`` in the layer's dtype -> Tensor ``(..., h)``.

        Training mode: differentiable in ``x``, ``W`` and ``mask_logits`` (STE). Eval mode: fixed
        packed masks (see :meth:`_inference_forward`), differentiable in ``x`` and ``W``.
        """
        x = _init.as_tensor(x)
        _init.check_input("x", x, self.d, self.dtype, "d")
        if not self.training:
            return self._inference_forward(x)
        if self.inference_only:
            raise RuntimeError(
                f"{type(self).__name__} is in inference form (drop_logits() removed mask_logits) and cannot "
                "run in training mode; call .eval() to run it"
            )
        packed = self._current_packed() if is_cupy_array(self.mask_logits.data) else None
        return ops.mglu(x, self.W, self.mask_logits, activation=self.activation, recompute=self.recompute,
                        packed=packed)

    def _inference_forward(self, x: Tensor) -> Tensor:
        """Eval-mode forward on the packed bit-planes: the FlashMGLU kernel when :meth:`_flash_module`
        says it applies, else the reference op (which also records gradients for ``x`` and ``W``)."""
        packed = self._current_packed()
        fm = self._flash_module(x)
        if fm is None:
            return ops.mglu(x, self.W, packed, activation=self.activation)
        return Tensor(fm.flash_mglu(x.data, self._flash_weights(fm.pack_weights, packed), None, self.activation))

    def _flash_weights(self, pack_weights: Callable[[Any, Any], Any], packed: Any) -> Any:
        """The kernel's own inference format of ``(W, packed)``, built once and kept until ``W`` or the
        bit-planes change (same identity-and-version key as the bit-plane cache)."""
        key = (self.W.data, self.W.version, packed)
        cached = self.__dict__.get("_flash_cache")
        if cached is not None and cached[0][0] is key[0] and cached[0][1] == key[1] and cached[0][2] is key[2]:
            return cached[1]
        weights = pack_weights(self.W.data, packed)
        self._flash_cache = (key, weights)
        return weights

    def _flash_module(self, x: Tensor) -> ModuleType | None:
        """:mod:`pymglu.cuda.flash_mglu` when the GPU decode kernel applies, else ``None``.

        It applies to CuPy inputs of at most ``MAX_TOKENS`` (16) tokens in float16, bfloat16 or float32,
        with at most ``MAX_MASKS`` masks, when no gradient is to be recorded.
        """
        if not is_cupy_array(x.data) or self.dtype not in _FLASH_DTYPES:
            return None
        if grad_enabled() and (x.requires_grad or self.W.requires_grad):
            return None
        from pymglu.cuda import flash_mglu as fm

        if math.prod(x.shape[:-1]) > fm.MAX_TOKENS or self.n_masks > fm.MAX_MASKS:
            return None
        return fm

    def extra_repr(self) -> str:
        form = "inference" if self.inference_only else "training"
        return (f"d={self.d}, h={self.h}, n_masks={self.n_masks}, activation={self.activation!r}, "
                f"dtype={self.dtype.name}, form={form}" + (", recompute=True" if self.recompute else ""))


class SwiMGLU(MGLU):
    """MGLU with SiLU gating (see :class:`MGLU`)."""

    def __init__(self, d: int, h: int, n_masks: int = 1, dtype: Any = float32, rng: Any = None,
                 recompute: bool = False) -> None:
        super().__init__(d, h, n_masks=n_masks, activation="silu", dtype=dtype, rng=rng, recompute=recompute)


class GeMGLU(MGLU):
    """MGLU with GELU gating; ``approximate="none"`` (erf, default) or ``"tanh"`` (see :class:`MGLU`)."""

    def __init__(self, d: int, h: int, n_masks: int = 1, approximate: str = "none", dtype: Any = float32,
                 rng: Any = None, recompute: bool = False) -> None:
        super().__init__(d, h, n_masks=n_masks, activation=_init.check_gelu_approximate(approximate),
                         dtype=dtype, rng=rng, recompute=recompute)


class ReMGLU(MGLU):
    """MGLU with ReLU gating (see :class:`MGLU`)."""

    def __init__(self, d: int, h: int, n_masks: int = 1, dtype: Any = float32, rng: Any = None,
                 recompute: bool = False) -> None:
        super().__init__(d, h, n_masks=n_masks, activation="relu", dtype=dtype, rng=rng, recompute=recompute)
