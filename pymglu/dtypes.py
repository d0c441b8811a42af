"""Floating-point dtypes pymglu accepts, and the dtype each is computed in.

bfloat16 comes from ``ml_dtypes`` (NumPy has none); it and float16 are computed in float32 and the
results cast back. float64 is computed in float64 (the reference precision of the tests).
"""
from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

bfloat16 = np.dtype(ml_dtypes.bfloat16)
float16 = np.dtype(np.float16)
float32 = np.dtype(np.float32)
float64 = np.dtype(np.float64)

#: dtypes accepted for activations and weights.
FLOAT_DTYPES = (float64, float32, float16, bfloat16)
#: the 16-bit dtypes: computed in float32, given an fp32 master copy by the optimizers.
LOW_PRECISION_DTYPES = (float16, bfloat16)


def name(dtype: Any) -> str:
    """Readable dtype name (``bfloat16`` instead of NumPy's ``V2``-like repr)."""
    return np.dtype(dtype).name


def compute_dtype(dtype: Any) -> np.dtype:
    """float64 stays float64; every other float dtype is computed in float32."""
    return float64 if np.dtype(dtype) == float64 else float32


def is_float(dtype: Any) -> bool:
    return np.dtype(dtype) in FLOAT_DTYPES


def gradient_dtype_ok(param_dtype: Any, grad_dtype: Any) -> bool:
    """Whether a parameter of ``param_dtype`` may hold a gradient of ``grad_dtype``: its own dtype; float32
    for a 16-bit parameter (gradients kept wider); a 16-bit gradient for a float32 parameter (the mask-logit
    gradients of a 16-bit MGLU layer on the GPU, :func:`pymglu.cuda.training.logit_grad_dtype`)."""
    p, g = np.dtype(param_dtype), np.dtype(grad_dtype)
    return g == p or (p in LOW_PRECISION_DTYPES and g == float32) or (p == float32 and g in LOW_PRECISION_DTYPES)
