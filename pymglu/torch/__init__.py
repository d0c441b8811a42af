"""PyTorch adapter: MGLU layers as ``torch.nn.Module``s computed by pymglu through DLPack, zero-copy.

Importable only when PyTorch is installed (``pip install "pymglu[interop]"`` or any torch); pymglu never
depends on torch, and ``import pymglu`` never imports this package.

* :func:`mglu` / :class:`MGLUFunction`: the MGLU forward and backward (straight-through estimator for
  the mask logits) of :mod:`pymglu.functional` on CPU tensors (NumPy over torch's memory) and CUDA
  tensors (CuPy over torch's memory, on torch's current stream); CUDA calls of at most 16 tokens
  without autograd run the FlashMGLU decode kernel.
* :class:`MGLU`, :class:`SwiMGLU`, :class:`GeMGLU`, :class:`ReMGLU`: layers with ``W`` ``(h, d)`` and
  ``mask_logits`` ``(n, h, d)`` float32 as ``nn.Parameter``s.
* :func:`to_torch` / :func:`as_array`: zero-copy conversions (bfloat16 included).
"""
try:
    import torch  # noqa: F401
except ImportError as e:  # also when sys.modules["torch"] is None
    raise ImportError(
        "pymglu.torch needs PyTorch, which pymglu does not install: pip install 'pymglu[interop]' "
        "(or any torch build); the rest of pymglu works without it"
    ) from e

from pymglu.torch._bridge import as_array, to_torch
from pymglu.torch.function import MGLUFunction, mglu
from pymglu.torch.modules import MGLU, GeMGLU, ReMGLU, SwiMGLU

__all__ = ["MGLU", "GeMGLU", "MGLUFunction", "ReMGLU", "SwiMGLU", "as_array", "mglu", "to_torch"]
