"""The tape: accumulation, reuse, no_grad, detach, freed graphs, deep chains, device mixing."""
import numpy as np
import pytest

import pymglu.backend
from pymglu.autograd import GraphFreedError, Tensor, no_grad, ops
from pymglu.autograd.function import Function
from pymglu.backend import DeviceMismatchError, unwrap


def test_gradients_accumulate_across_backward_calls():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(4), rng.standard_normal(4)
    ta, tb = Tensor(a, requires_grad=True), Tensor(b, requires_grad=True)
    (ta * tb).sum().backward()
    np.testing.assert_array_equal(ta.grad, b)
    (ta * tb * 3.0).sum().backward()
    np.testing.assert_allclose(ta.grad, 4 * b, rtol=1e-15)
    np.testing.assert_allclose(tb.grad, 4 * a, rtol=1e-15)
    ta.zero_grad()
    assert ta.grad is None


def test_tensor_reused_in_several_places():
    x = np.array([0.5, -1.5, 2.0])
    t = Tensor(x, requires_grad=True)
    y = t * t * t + t * 2.0 - ops.exp(t) + t[np.array([0, 0])].sum()  # several paths into t
    y.backward(np.ones(3))
    # the scalar sum is broadcast over 3 outputs, each sending 2 to t[0]
    np.testing.assert_allclose(t.grad, 3 * x ** 2 + 2 - np.exp(x) + np.array([6.0, 0, 0]), rtol=1e-14)


def test_diamond_graph_counts_each_path_once():
    t = Tensor(np.array(3.0), requires_grad=True)
    a = t * 2.0
    b = a + a      # 4t
    c = b * a      # 8t^2
    c.backward()
    assert float(t.grad) == pytest.approx(16 * 3.0)


class _NarrowGradient(Function):
    """``y = 2 x`` whose backward hands back a bfloat16 gradient, as the GPU path does for float32 mask
    logits of a bfloat16 MGLU layer."""

    def forward(self, x):
        return x * 2

    def backward(self, g):
        from pymglu.dtypes import bfloat16

        return (2 * g).astype(bfloat16)


def test_16_bit_gradients_of_a_float32_leaf_are_summed_in_float32():
    from pymglu.dtypes import bfloat16

    x = Tensor(np.ones(3, dtype=np.float32), requires_grad=True)
    _NarrowGradient.apply(x).backward(np.full(3, 256.0, dtype=np.float32))
    assert x.grad.dtype == bfloat16  # one gradient is kept as it came: 512
    # bfloat16 is 4 apart at 512: 512 + 2 rounds to 512 there, and 512 + 2 + 2 stays 512; float32 keeps 516
    _NarrowGradient.apply(x).backward(np.full(3, 1.0, dtype=np.float32))
    assert x.grad.dtype == np.float32
    _NarrowGradient.apply(x).backward(np.full(3, 1.0, dtype=np.float32))
    np.testing.assert_array_equal(x.grad, [516.0] * 3)
    y = Tensor(np.ones(3, dtype=np.float32), requires_grad=True)  # two uses within one graph
    (_NarrowGradient.apply(y) * 256.0 + _NarrowGradient.apply(y)).sum().backward()
    assert y.grad.dtype == np.float32
    np.testing.assert_array_equal(y.grad, [514.0] * 3)


def test_leaf_gradients_are_private_arrays():
    a, b = Tensor(np.ones(3), requires_grad=True), Tensor(np.ones(3), requires_grad=True)
    u = np.arange(3.0)
    (a + b).backward(u)
    assert a.grad is not u and a.grad is not b.grad
    a.grad *= 10.0  # an in-place update (gradient clipping) must not touch b.grad or the caller's u
    np.testing.assert_array_equal(b.grad, [0.0, 1.0, 2.0])
    np.testing.assert_array_equal(u, [0.0, 1.0, 2.0])


def test_no_grad_records_nothing():
    t = Tensor(np.ones(3), requires_grad=True)
    with no_grad():
        y = ops.silu(t * 2.0).sum()
    assert not y.requires_grad and y.is_leaf
    with pytest.raises(RuntimeError, match="does not require a gradient"):
        y.backward()
    z = (t * 2.0).sum()  # recording resumes after the block
    assert z.requires_grad and not z.is_leaf


def test_detach_cuts_the_graph():
    t = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    d = (t * 3.0).detach()
    assert not d.requires_grad and d.is_leaf
    y = (t * d).sum()  # d is a constant: dy/dt = d = 3t
    y.backward()
    np.testing.assert_array_equal(t.grad, [3.0, 6.0])


def test_second_backward_needs_retain_graph():
    t = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    y = (ops.exp(t) * t).sum()
    y.backward(retain_graph=True)
    first = t.grad.copy()
    y.backward()
    np.testing.assert_allclose(t.grad, 2 * first, rtol=1e-15)
    with pytest.raises(GraphFreedError, match="retain_graph=True"):
        y.backward()


def test_deep_chain_backpropagates_without_recursion():
    t = Tensor(np.array([1.0, -2.0]), requires_grad=True)
    y = t
    for _ in range(5000):
        y = y * 1.0001 + 0.5
    y.sum().backward()
    np.testing.assert_allclose(t.grad, np.full(2, 1.0001 ** 5000), rtol=1e-10)


def test_backward_checks_the_seed_gradient():
    t = Tensor(np.ones((2, 3)), requires_grad=True)
    y = t * 2.0
    with pytest.raises(ValueError, match="grad must be given for a non-scalar output"):
        y.backward()
    with pytest.raises(ValueError, match=r"grad: expected shape \(2, 3\)"):
        y.backward(np.ones(3))


def test_requires_grad_needs_a_float_dtype():
    with pytest.raises(TypeError, match="requires_grad needs a float dtype"):
        Tensor(np.arange(3), requires_grad=True)


@pytest.fixture
def fake_gpu_array(monkeypatch):
    """A NumPy array that pymglu.backend reports as living on cuda:0 (no CuPy needed)."""
    fake = np.ones(3)
    real = pymglu.backend.device_of
    monkeypatch.setattr(pymglu.backend, "device_of", lambda x: "cuda:0" if unwrap(x) is fake else real(x))
    return fake


def test_mixing_devices_raises(fake_gpu_array):
    t = Tensor(np.ones(3), requires_grad=True)
    with pytest.raises(DeviceMismatchError, match="argument 0 on cpu, argument 1 on cuda:0"):
        ops.add(t, fake_gpu_array)
    with pytest.raises(DeviceMismatchError):
        ops.mul(Tensor(fake_gpu_array), t)
    with pytest.raises(DeviceMismatchError):
        ops.concat([t, Tensor(fake_gpu_array)])
    with pytest.raises(DeviceMismatchError):
        ops.rms_norm(Tensor(np.ones((2, 3))), fake_gpu_array)


def test_index_and_ids_on_another_device_raise(monkeypatch):
    # a fake-GPU integer array for ids / indices
    ids = np.array([0, 1, 1])
    real = pymglu.backend.device_of
    monkeypatch.setattr(pymglu.backend, "device_of", lambda x: "cuda:0" if unwrap(x) is ids else real(x))
    w = Tensor(np.ones((3, 2)), requires_grad=True)
    with pytest.raises(DeviceMismatchError):
        ops.embedding(w, ids)
    with pytest.raises(DeviceMismatchError):
        ops.getitem(w, ids)
    with pytest.raises(DeviceMismatchError):
        ops.softmax_cross_entropy(w, ids)


class _Spy(Function):
    """The identity, noting in ``events`` when its backward runs."""

    def forward(self, x, events):
        self.events = events
        return x.copy()

    def backward(self, grad_output):
        self.events.append("backward of the first layer's output")
        return (grad_output,)


@pytest.mark.parametrize("weight_first", [False, True], ids=["matmul(h, w2)", "matmul(w2, h)"])
def test_a_parameter_gradient_is_stored_before_the_earlier_layers_backpropagate(weight_first):
    """Data parallelism starts a bucket's reduction from the gradient hooks, so a later layer's weight must
    get its gradient (and run its hooks) before backward reaches the earlier layers, not at the end, whether
    the weight is the op's first input or a later one."""
    rng = np.random.default_rng(0)
    x = Tensor(rng.standard_normal((3, 4)))
    w1 = Tensor(rng.standard_normal((4, 5)), requires_grad=True)
    w2 = Tensor(rng.standard_normal((2, 3) if weight_first else (5, 2)), requires_grad=True)
    events: list[str] = []
    w1.register_grad_hook(lambda p: events.append("w1 grad"))
    w2.register_grad_hook(lambda p: events.append("w2 grad"))
    h = _Spy.apply(ops.matmul(x, w1), events=events)
    y = ops.matmul(w2, h) if weight_first else ops.matmul(h, w2)
    y.sum().backward()
    assert events == ["w2 grad", "backward of the first layer's output", "w1 grad"]
    h_value = x.data @ w1.data
    expected = np.ones((2, 5)) @ h_value.T if weight_first else h_value.T @ np.ones((3, 2))
    np.testing.assert_allclose(w2.grad, expected, rtol=1e-12)
