"""Argument checks of pymglu.cuda.training's public helpers: they run before any launch, so NumPy arrays
exercise them on any machine (a call with good arguments would need CuPy and a GPU)."""
import numpy as np
import pytest

from pymglu.cuda import training
from pymglu.dtypes import bfloat16, float16, float32


def _args(h=5, d=40, planes=None, dtype=float32):
    lead = () if planes is None else (planes,)
    W = np.ones((h, d), dtype=dtype)
    bits = np.zeros(lead + (h, -(-d // 32)), dtype=np.uint32)
    out = np.full(lead + (h, d), np.nan, dtype=dtype)
    return W, bits, out


@pytest.mark.parametrize("planes", [None, 2])
def test_apply_mask_refuses_mismatched_shapes_naming_the_argument(planes):
    W, bits, out = _args(planes=planes)
    with pytest.raises(ValueError, match=r"bits: expected shape .*5, 2\)"):
        training.apply_mask(W, bits[..., :1], out)
    with pytest.raises(ValueError, match=r"out: expected shape .*5, 40\)"):
        training.apply_mask(W, bits, out[..., :39])
    with pytest.raises(ValueError, match="W: expected a 2-d array"):
        training.apply_mask(W[None], bits, out)
    with pytest.raises(ValueError, match="bits: expected a 2 or 3-d array"):
        training.apply_mask(W, bits.reshape(-1), out)
    assert np.isnan(out).all()  # nothing written


def test_apply_mask_refuses_dtypes_and_strides():
    W, bits, out = _args(planes=2)
    with pytest.raises(TypeError, match="bits: expected dtype in \\(uint32\\)"):
        training.apply_mask(W, bits.astype(np.int32), out)
    with pytest.raises(TypeError, match="W and out must share a dtype"):
        training.apply_mask(W, bits, out.astype(float16))
    with pytest.raises(TypeError, match="W: expected dtype"):
        training.apply_mask(W.astype(np.float64), bits, out.astype(np.float64))
    strided = np.ones((5, 80), dtype=float32)[:, ::2]
    with pytest.raises(ValueError, match="W: expected a C-contiguous array"):
        training.apply_mask(strided, bits, out)
    assert np.isnan(out).all()


def test_narrow_refuses_other_sources_and_targets():
    with pytest.raises(TypeError, match="src: expected dtype in \\(float32\\)"):
        training.narrow(np.ones(4, dtype=bfloat16), float16)
    with pytest.raises(ValueError, match="src: expected a C-contiguous array"):
        training.narrow(np.ones((4, 4), dtype=float32).T, float16)
    with pytest.raises(TypeError, match="dtype: expected float32, float16 or bfloat16, got float64"):
        training.narrow(np.ones(4, dtype=float32), np.float64)
    src = np.ones(4, dtype=float32)
    assert training.narrow(src, float32) is src


def test_layer_entries_check_the_weight_and_bits_once_before_any_launch():
    """mglu_forward / mglu_backward launch the masked-weight kernel unchecked per mask group: their entry
    checks W and the bit-planes instead."""
    x = np.ones((3, 40), dtype=float32)
    W, bits, _ = _args(planes=2)
    with pytest.raises(ValueError, match=r"bits: expected shape \(\*, 5, 2\)"):
        training.mglu_forward(x, W, bits[:, :4], "silu")
    with pytest.raises(ValueError, match="W: expected a C-contiguous array"):
        training.mglu_forward(x, np.ones((5, 80), dtype=float32)[:, ::2], bits, "silu")
    with pytest.raises(TypeError, match="bits: expected dtype in \\(uint32\\)"):
        training.mglu_backward(np.ones((3, 5), dtype=float32), x, W, bits.astype(np.int64), "silu",
                               (np.ones((3, 5), dtype=float32), np.ones((2, 3, 5), dtype=float32)))
