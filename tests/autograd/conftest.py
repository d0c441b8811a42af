"""Independent float64 reference formulas shared by the autograd tests (scalar math, no pymglu code)."""
import math

import numpy as np
import pytest


def _vec(f):
    return np.vectorize(f, otypes=[np.float64])


def _sig(z):
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def _phi(z):  # standard normal CDF
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


_K, _C = math.sqrt(2.0 / math.pi), 0.044715

REFERENCE_ACTIVATIONS = {
    # name: (g, g')
    "silu": (_vec(lambda z: z * _sig(z)), _vec(lambda z: _sig(z) * (1 + z * (1 - _sig(z))))),
    "gelu": (
        _vec(lambda z: z * _phi(z)),
        _vec(lambda z: _phi(z) + z * math.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)),
    ),
    "gelu_tanh": (
        _vec(lambda z: 0.5 * z * (1 + math.tanh(_K * (z + _C * z ** 3)))),
        _vec(
            lambda z: 0.5 * (1 + math.tanh(_K * (z + _C * z ** 3)))
            + 0.5 * z * (1 - math.tanh(_K * (z + _C * z ** 3)) ** 2) * _K * (1 + 3 * _C * z * z)
        ),
    ),
    "relu": (_vec(lambda z: max(z, 0.0)), _vec(lambda z: 1.0 if z > 0 else 0.0)),
    "sigmoid": (_vec(_sig), _vec(lambda z: _sig(z) * (1 - _sig(z)))),
}


@pytest.fixture
def ref_act():
    """``{name: (g, g')}``: NumPy-vectorised scalar formulas of the five gating functions."""
    return REFERENCE_ACTIVATIONS
