"""Public functions take DLPack producers of other libraries (PyTorch and JAX CPU arrays) wherever they take
an array, zero-copy, and return NumPy arrays / pymglu Tensors (docs/api.md, "DLPack")."""
import numpy as np
import pytest

import pymglu
from pymglu import functional, masks
from pymglu.autograd import Tensor, ops
from pymglu.dtypes import bfloat16

torch = pytest.importorskip("torch")


def _case(dtype=np.float32, n=2, d=40, h=24, tokens=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, d)).astype(dtype)
    W = (rng.standard_normal((h, d)) * d ** -0.5).astype(dtype)
    logits = rng.standard_normal((n, h, d)).astype(np.float32)
    return x, W, logits


def test_functional_takes_torch_tensors_and_returns_numpy():
    x, W, logits = _case()
    want_y = functional.mglu(x, W, logits > 0, "gelu")
    got_y = functional.mglu(torch.from_numpy(x), torch.from_numpy(W), torch.from_numpy(logits > 0), "gelu")
    assert isinstance(got_y, np.ndarray)
    np.testing.assert_array_equal(got_y, want_y)
    dy = np.ones_like(want_y)
    want = functional.mglu_backward(dy, x, W, logits > 0, "gelu")
    got = functional.mglu_backward(torch.from_numpy(dy), torch.from_numpy(x), torch.from_numpy(W),
                                   torch.from_numpy(logits > 0), "gelu")
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    np.testing.assert_array_equal(functional.glu(torch.from_numpy(x), torch.from_numpy(W), torch.from_numpy(W)),
                                  functional.glu(x, W, W))


def test_masks_and_tensor_and_ops_take_torch_tensors_zero_copy():
    _, W, logits = _case()
    t = torch.from_numpy(logits)
    np.testing.assert_array_equal(masks.pack_masks(t), masks.pack_masks(logits))
    tensor = Tensor(t)
    assert tensor.data.__array_interface__["data"][0] == t.data_ptr()  # zero-copy
    y = ops.mglu(Tensor(_case()[0], requires_grad=True), torch.from_numpy(W), t)
    assert isinstance(y, Tensor) and y.shape == (3, 24)


def test_bfloat16_torch_tensor_enters_as_ml_dtypes_bfloat16():
    x, W, logits = _case(dtype=bfloat16)
    tx = torch.from_numpy(x.view(np.uint16)).view(torch.bfloat16)
    tw = torch.from_numpy(W.view(np.uint16)).view(torch.bfloat16)
    y = functional.mglu(tx, tw, logits > 0)
    assert y.dtype == bfloat16
    np.testing.assert_array_equal(y.view(np.uint16), functional.mglu(x, W, logits > 0).view(np.uint16))


def test_layers_take_torch_inputs():
    layer = pymglu.nn.SwiMGLU(40, 24, 2, rng=0)
    x = _case()[0]
    np.testing.assert_array_equal(layer(torch.from_numpy(x)).data, layer(x).data)


def test_requires_grad_tensor_is_refused_with_a_clear_message():
    x, W, logits = _case()
    with pytest.raises(BufferError, match=r"requires grad.*detach\(\)"):
        functional.mglu(torch.from_numpy(x).requires_grad_(), W, logits > 0)


def test_jax_arrays_are_accepted():
    jnp = pytest.importorskip("jax.numpy")
    x, W, logits = _case()
    y = functional.mglu(jnp.asarray(x), jnp.asarray(W), jnp.asarray(logits > 0))
    assert isinstance(y, np.ndarray)
    np.testing.assert_allclose(y, functional.mglu(x, W, logits > 0), rtol=0, atol=0)
