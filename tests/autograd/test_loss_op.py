"""softmax_cross_entropy: values against a direct formula, gradients, ignore_index, stability, errors."""
import math

import numpy as np
import pytest

from pymglu import dtypes
from pymglu.autograd import Tensor, check_grads, ops


def reference(z, t, ignore_index=-100, reduction="mean"):
    z2, t1 = z.reshape(-1, z.shape[-1]), t.reshape(-1)
    losses = np.zeros(t1.shape)
    for j, (row, tj) in enumerate(zip(z2, t1)):
        if tj != ignore_index:
            losses[j] = -math.log(math.exp(row[tj]) / sum(math.exp(v) for v in row))
    if reduction == "none":
        return losses.reshape(t.shape)
    total = losses.sum()
    n = int(np.sum(t1 != ignore_index))
    return total / n if reduction == "mean" and n else total


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("lead, C, seed", [((6,), 5, 0), ((2, 3), 7, 1), ((4,), 1, 2), ((), 3, 3)])
def test_values_and_grads(lead, C, seed, reduction):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal(lead + (C,)) * 3
    t = rng.integers(0, C, size=lead)
    if t.size > 2:
        t.flat[1] = -100
    loss = ops.softmax_cross_entropy(Tensor(z), t, reduction=reduction)
    np.testing.assert_allclose(loss.data, reference(z, t, reduction=reduction), rtol=1e-12, atol=1e-14)
    check_grads(lambda a: ops.softmax_cross_entropy(a, t, reduction=reduction), [z])


def test_gradient_closed_form_and_custom_ignore_index():
    rng = np.random.default_rng(5)
    z = rng.standard_normal((5, 4))
    t = np.array([0, 3, 7, 1, 7])  # 7 is ignored
    zt = Tensor(z, requires_grad=True)
    loss = ops.softmax_cross_entropy(zt, t, ignore_index=7)
    np.testing.assert_allclose(loss.data, reference(z, t, ignore_index=7), rtol=1e-12)
    loss.backward()
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    expected = np.zeros_like(z)
    for j in (0, 1, 3):
        expected[j] = p[j] / 3
        expected[j, t[j]] -= 1 / 3
    np.testing.assert_allclose(zt.grad, expected, rtol=1e-12, atol=1e-15)


def test_all_ignored_gives_zero_loss_and_zero_grad():
    z = Tensor(np.random.default_rng(6).standard_normal((3, 4)), requires_grad=True)
    loss = ops.softmax_cross_entropy(z, np.full(3, -100))
    assert float(loss.data) == 0.0
    loss.backward()
    np.testing.assert_array_equal(z.grad, np.zeros((3, 4)))
    assert np.all(np.isfinite(z.grad))


def test_large_logits_are_stable():
    z = Tensor(np.array([[1000.0, 0.0, -1000.0], [5e4, 5e4, 5e4]]), requires_grad=True)
    loss = ops.softmax_cross_entropy(z, np.array([1, 2]), reduction="none")
    np.testing.assert_allclose(loss.data, [1000.0, math.log(3)], rtol=1e-12)
    loss.backward(np.ones(2))
    np.testing.assert_allclose(z.grad, [[1, -1, 0], [1 / 3, 1 / 3, -2 / 3]], atol=1e-12)


@pytest.mark.parametrize("dtype", [dtypes.float32, dtypes.float16, dtypes.bfloat16])
def test_low_precision_logits(dtype):
    rng = np.random.default_rng(7)
    z = (rng.standard_normal((8, 11)) * 4).astype(dtype)
    t = rng.integers(0, 11, 8)
    zt = Tensor(z, requires_grad=True)
    loss = ops.softmax_cross_entropy(zt, t)
    assert loss.dtype == np.float32  # the loss is reported in the compute dtype
    np.testing.assert_allclose(float(loss.data), reference(z.astype(np.float64), t), rtol=1e-5)
    loss.backward()
    assert zt.grad.dtype == dtype
    np.testing.assert_allclose(zt.grad.astype(np.float64).sum(axis=1), 0.0, atol=2e-2)


def test_errors():
    z = Tensor(np.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"targets: expected class indices in \[0, 3\) or ignore_index=-100, got 3"):
        ops.softmax_cross_entropy(z, np.array([0, 1, 3, 2]))
    with pytest.raises(ValueError, match=r"targets: expected class indices .* got -1"):
        ops.softmax_cross_entropy(z, np.array([0, -1, 0, 0]))
    with pytest.raises(ValueError, match=r"targets: expected shape \(4\), got int64 array of shape \(4, 1\)"):
        ops.softmax_cross_entropy(z, np.zeros((4, 1), dtype=np.int64))
    with pytest.raises(TypeError, match="targets: expected an integer array, got float64"):
        ops.softmax_cross_entropy(z, np.zeros(4))
    with pytest.raises(TypeError, match="logits: expected dtype"):
        ops.softmax_cross_entropy(np.zeros((4, 3), dtype=np.int32), np.zeros(4, dtype=np.int64))
    with pytest.raises(ValueError, match="reduction: expected one of"):
        ops.softmax_cross_entropy(z, np.zeros(4, dtype=np.int64), reduction="avg")
    with pytest.raises(TypeError, match="ignore_index: expected an int"):
        ops.softmax_cross_entropy(z, np.zeros(4, dtype=np.int64), ignore_index=None)


class _UnreadableTargets(np.ndarray):
    """Targets whose values (and masks derived from them) may not be read on the host."""

    def any(self, *a, **k):
        raise AssertionError("targets read back")

    sum = any


def test_uint8_targets_over_256_classes_are_not_read_back():
    rng = np.random.default_rng(7)
    z = rng.standard_normal((10, 256))
    t = rng.integers(0, 256, size=10).astype(np.uint8)
    loss = ops.softmax_cross_entropy(Tensor(z), t.view(_UnreadableTargets))
    np.testing.assert_allclose(loss.data, reference(z, t.astype(np.int64)), rtol=1e-12)
    with pytest.raises(AssertionError, match="targets read back"):  # an ignore_index a uint8 can hold counts them
        ops.softmax_cross_entropy(Tensor(z), t.view(_UnreadableTargets), ignore_index=0)
    with pytest.raises(AssertionError, match="targets read back"):  # fewer classes: the range is checked
        ops.softmax_cross_entropy(Tensor(z[:, :255]), t.view(_UnreadableTargets))
