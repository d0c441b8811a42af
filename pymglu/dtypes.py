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


def name(dtype: Any) -> str:
    """Readable dtype name (``bfloat16`` instead of NumPy's ``V2``-like repr)."""
    return np.dtype(dtype).name


def compute_dtype(dtype: Any) -> np.dtype:
    """float64 stays float64; every other float dtype is computed in float32."""
    return float64 if np.dtype(dtype) == float64 else float32


def is_float(dtype: Any) -> bool:
    return np.dtype(dtype) in FLOAT_DTYPES
