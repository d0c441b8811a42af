"""DLPack between JAX (CPU) and pymglu: zero-copy imports by pointer equality (bfloat16 included),
exports, JAX's own rules (read-only buffers, 64-byte alignment), and MGLU on JAX arrays against a
jax.numpy reference with jax.vjp gradients."""
import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

import pymglu  # noqa: E402
from pymglu import functional  # noqa: E402
from pymglu.dtypes import bfloat16  # noqa: E402
from pymglu.interop import array_from_dlpack, export  # noqa: E402


def _address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def _aligned(shape, dtype, alignment=64):
    """An uninitialised NumPy array whose data starts on an ``alignment``-byte boundary."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + alignment, dtype=np.uint8)
    start = -_address(raw) % alignment
    return raw[start:start + nbytes].view(dtype).reshape(shape)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16, jnp.int32], ids=lambda d: d.__name__)
def test_jax_arrays_import_zero_copy_and_read_only(dtype):
    j = (jnp.arange(12) % 5 - 2).astype(dtype).reshape(3, 4)
    t = pymglu.from_dlpack(j)
    assert _address(t.data) == j.unsafe_buffer_pointer()
    assert t.dtype == (bfloat16 if dtype == jnp.bfloat16 else np.dtype(dtype))
    assert not t.data.flags.writeable  # JAX buffers are immutable
    np.testing.assert_array_equal(np.asarray(t.data, dtype=np.float64), np.asarray(j, dtype=np.float64))
    assert pymglu.from_dlpack(j, copy=True).data.flags.writeable


@pytest.mark.parametrize("dtype", [np.float32, bfloat16], ids=lambda d: np.dtype(d).name)
def test_aligned_pymglu_arrays_export_to_jax_zero_copy(dtype):
    a = _aligned((8, 16), dtype)
    a[...] = np.arange(128).reshape(8, 16).astype(dtype)
    j = jnp.from_dlpack(export(a))
    assert j.dtype == (jnp.bfloat16 if dtype == bfloat16 else jnp.float32)
    assert j.unsafe_buffer_pointer() == _address(a)
    np.testing.assert_array_equal(np.asarray(j, dtype=np.float32), a.astype(np.float32))


def test_jax_copies_unaligned_buffers():
    """JAX's rule (not pymglu's): CPU buffers not on a 64-byte boundary are copied on import."""
    a = _aligned((4, 4), np.float32)
    unaligned = a.reshape(-1)[4:].reshape(3, 4)  # 16 bytes past the boundary
    unaligned[...] = 1.0
    j = jnp.from_dlpack(export(unaligned))
    assert j.unsafe_buffer_pointer() != _address(unaligned)
    np.testing.assert_array_equal(np.asarray(j), unaligned)


def test_read_only_arrays_cannot_go_back_to_jax_without_a_copy():
    """JAX asks for a legacy (unversioned) capsule, which cannot say read-only, so NumPy refuses."""
    view = pymglu.from_dlpack(jnp.ones(4, dtype=jnp.bfloat16)).data
    with pytest.raises(BufferError, match=r"x: bfloat16 array of shape \(4,\) on cpu cannot be exported .*not to "
                                          r"JAX: export x.copy\(\)"):
        jnp.from_dlpack(export(view))
    np.testing.assert_array_equal(np.asarray(jnp.from_dlpack(export(view.copy())), dtype=np.float32), np.ones(4))


def _jax_mglu(x, W, logits):
    """Algorithm 2 in jax.numpy, with the straight-through estimator written with stop_gradient."""
    M = (logits > 0).astype(W.dtype) + logits - jax.lax.stop_gradient(logits)
    y = 0.0
    for i in range(M.shape[0]):
        y = y + jax.nn.silu(x @ (W * M[i]).T) * (x @ (W * (1 - M[i])).T)
    return y


def test_mglu_on_jax_arrays_matches_jax_numpy_values_and_vjp():
    key = jax.random.PRNGKey(0)
    kx, kw, kl, kd = jax.random.split(key, 4)
    x = jax.random.normal(kx, (5, 32))
    W = jax.random.normal(kw, (48, 32)) / np.sqrt(32)
    logits = 0.01 * jax.random.normal(kl, (2, 48, 32))
    dy = jax.random.normal(kd, (5, 48))
    xa, Wa, la = (pymglu.from_dlpack(v).data for v in (x, W, logits))
    masks = la > 0
    y, cache = functional.mglu_forward(xa, Wa, masks, "silu")
    dx, dW, dlogits = functional.mglu_backward(array_from_dlpack(dy), xa, Wa, masks, "silu", cache)
    y_ref, vjp = jax.vjp(_jax_mglu, x, W, logits)
    np.testing.assert_allclose(y, np.asarray(y_ref), rtol=1e-4, atol=1e-5)
    for name, got, want in zip(("x", "W", "logits"), (dx, dW, dlogits), vjp(dy)):
        np.testing.assert_allclose(got, np.asarray(want), rtol=1e-4, atol=1e-5, err_msg=name)
    back = jnp.from_dlpack(export(y))  # the result as a JAX array (zero-copy when 64-byte aligned)
    np.testing.assert_array_equal(np.asarray(back), y)


def test_optimizer_steps_never_write_into_jax_buffers():
    """A Parameter over a JAX buffer (read-only) is an in-place path: the step must rebind, not write."""
    from pymglu.nn.module import Parameter

    j = jnp.ones((2, 3))
    p = Parameter(pymglu.from_dlpack(j).data)
    opt = pymglu.optim.SGD([p], lr=0.5)
    p.grad = np.ones((2, 3), dtype=np.float32)
    opt.step()
    np.testing.assert_array_equal(np.asarray(j), np.ones((2, 3)))
    np.testing.assert_array_equal(p.data, np.full((2, 3), 0.5))
    assert _address(p.data) != j.unsafe_buffer_pointer()
