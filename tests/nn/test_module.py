"""Module / Parameter machinery: registration, traversal order, modes, buffers, validated state loading."""
from __future__ import annotations

import numpy as np
import pytest

from pymglu.backend import gpu_available
from pymglu.nn import Linear, Module, Parameter, RMSNorm, StateDictError


class Block(Module):
    def __init__(self, rng: int = 0) -> None:
        super().__init__()
        self.scale = Parameter(np.ones(3, dtype=np.float32))
        self.inner = Linear(3, 4, bias=True, rng=rng)
        self.norm = RMSNorm(4)
        self.register_buffer("count", np.zeros(2, dtype=np.int64))
        self.register_buffer("cache", np.zeros(5, dtype=np.float32), persistent=False)

    def forward(self, x):
        return self.norm(self.inner(x * self.scale))


class Model(Module):
    def __init__(self, rng: int = 0) -> None:
        super().__init__()
        self.a = Block(rng)
        self.b = Block(rng + 1)
        self.head = Parameter(np.zeros((2, 2), dtype=np.float32))


def snapshot(module: Module) -> dict[str, np.ndarray]:
    return {k: np.array(v, copy=True) for k, v in module.state_dict().items()}


def assert_same_state(module: Module, snap: dict[str, np.ndarray]) -> None:
    state = module.state_dict()
    assert list(state) == list(snap)
    for k, v in snap.items():
        assert state[k].dtype == v.dtype
        np.testing.assert_array_equal(state[k], v)


def test_parameter_defaults_and_versions():
    p = Parameter(np.zeros(3, dtype=np.float32))
    assert p.requires_grad and p.is_leaf and p.grad is None
    v = p.version
    p.data = np.ones(3, dtype=np.float32)
    assert p.version == v + 1
    p.mark_modified()
    assert p.version == v + 2
    assert not Parameter([1.0, 2.0], requires_grad=False).requires_grad
    with pytest.raises(TypeError, match="float"):
        Parameter(np.arange(3))
    with pytest.raises(TypeError, match="float"):
        p.data = np.arange(3)


def test_sign_bits_offered_hold_only_for_the_same_data_and_version():
    p = Parameter(np.array([0.5, -1.0, 2.0], dtype=np.float32))
    assert not p.wants_sign_bits and p.sign_bits() is None
    bits = np.array([5], dtype=np.uint32)
    p.offer_sign_bits(bits)
    assert p.sign_bits() is bits
    p.mark_modified()
    assert p.sign_bits() is None  # an in-place edit, recorded
    p.offer_sign_bits(bits)
    p.data = p.data.copy()
    assert p.sign_bits() is None  # a new array


def test_named_parameters_are_dotted_and_ordered():
    m = Model()
    names = [n for n, _ in m.named_parameters()]
    assert names == [
        "head",
        "a.scale", "a.inner.weight", "a.inner.bias", "a.norm.weight",
        "b.scale", "b.inner.weight", "b.inner.bias", "b.norm.weight",
    ]
    assert [id(p) for p in m.parameters()] == [id(p) for _, p in m.named_parameters()]
    assert [type(c).__name__ for c in m.children()] == ["Block", "Block"]
    assert [n for n, _ in m.named_modules()] == ["", "a", "a.inner", "a.norm", "b", "b.inner", "b.norm"]


def test_shared_parameter_listed_once():
    m = Model()
    m.b.inner.weight = m.a.inner.weight
    names = [n for n, _ in m.named_parameters()]
    assert "a.inner.weight" in names and "b.inner.weight" not in names
    assert len(m.parameters()) == len({id(p) for p in m.parameters()})


def test_train_eval_propagate_and_zero_grad():
    m = Model()
    assert all(mod.training for mod in m.modules())
    assert m.eval() is m
    assert not any(mod.training for mod in m.modules())
    m.train()
    assert all(mod.training for mod in m.modules())
    for p in m.parameters():
        p.grad = np.ones(p.shape, dtype=p.dtype)
    m.zero_grad()
    assert all(p.grad is None for p in m.parameters())


def test_state_dict_holds_parameters_then_persistent_buffers():
    m = Model()
    state = m.state_dict()
    assert list(state) == [n for n, _ in m.named_parameters()] + ["a.count", "b.count"]
    assert "a.cache" not in state
    assert state["a.inner.weight"] is m.a.inner.weight.data


def test_registration_errors():
    class Forgetful(Module):
        def __init__(self):
            self.w = Parameter(np.zeros(2))

    with pytest.raises(RuntimeError, match="super"):
        Forgetful()
    m = Model()
    with pytest.raises(TypeError, match="is a Parameter"):
        m.head = np.zeros((2, 2), dtype=np.float32)
    with pytest.raises(ValueError, match="already has"):
        m.register_buffer("head", np.zeros(1))
    with pytest.raises(ValueError, match="identifier"):
        m.register_buffer("a.b", np.zeros(1))
    m.head = None
    assert "head" not in [n for n, _ in m.named_parameters()]


def test_load_state_dict_round_trip_copies_values():
    src, dst = Model(rng=0), Model(rng=7)
    assert not np.array_equal(src.a.inner.weight.data, dst.a.inner.weight.data)
    state = src.state_dict()
    result = dst.load_state_dict(state)
    assert result == {"missing": [], "unexpected": []}
    assert_same_state(dst, snapshot(src))
    assert dst.a.inner.weight.data is not src.a.inner.weight.data
    dst.a.inner.weight.data[0, 0] += 1.0
    assert dst.a.inner.weight.data[0, 0] != src.a.inner.weight.data[0, 0]


def test_failed_load_names_every_problem_and_changes_nothing():
    m = Model(rng=3)
    before = snapshot(m)
    versions = [p.version for p in m.parameters()]
    bad = dict(Model(rng=0).state_dict())
    del bad["a.scale"]                                          # missing
    bad["extra.weight"] = np.zeros(1, dtype=np.float32)         # unexpected
    bad["b.inner.weight"] = np.zeros((5, 3), dtype=np.float32)  # wrong shape
    bad["b.norm.weight"] = np.ones(4, dtype=np.float64)         # wrong dtype
    with pytest.raises(StateDictError) as info:
        m.load_state_dict(bad)
    msg = str(info.value)
    for key in ("a.scale", "extra.weight", "b.inner.weight", "b.norm.weight", "(5, 3)", "float64"):
        assert key in msg
    assert info.value.missing == ["a.scale"] and info.value.unexpected == ["extra.weight"]
    assert_same_state(m, before)
    assert [p.version for p in m.parameters()] == versions


def test_non_strict_load_tolerates_missing_but_not_mismatch():
    m = Model(rng=3)
    src = Model(rng=0)
    partial = {"a.inner.weight": src.a.inner.weight.data, "unknown": np.zeros(1)}
    result = m.load_state_dict(partial, strict=False)
    np.testing.assert_array_equal(m.a.inner.weight.data, src.a.inner.weight.data)
    assert result["unexpected"] == ["unknown"] and "b.scale" in result["missing"]
    before = snapshot(m)
    with pytest.raises(StateDictError, match="a.scale"):
        m.load_state_dict({"a.scale": np.zeros(4, dtype=np.float32)}, strict=False)
    assert_same_state(m, before)
    with pytest.raises(TypeError, match="mapping"):
        m.load_state_dict([("a.scale", np.zeros(3))])


def test_to_cpu_and_bad_targets():
    m = Model()
    w = m.a.inner.weight.data
    assert m.to("cpu") is m
    np.testing.assert_array_equal(m.a.inner.weight.data, w)
    with pytest.raises(ValueError, match="cpu"):
        m.to("tpu")
    if not gpu_available():
        with pytest.raises(RuntimeError, match="CuPy"):
            m.to("cuda")


@pytest.mark.gpu
def test_to_cuda_and_back():
    import cupy as cp

    m = Model()
    ref = snapshot(m)
    m.to("cuda")
    assert all(isinstance(p.data, cp.ndarray) for p in m.parameters())
    assert isinstance(m.a.count, cp.ndarray)
    m.load_state_dict(ref)  # a NumPy state loads onto the GPU parameters
    assert isinstance(m.a.inner.weight.data, cp.ndarray)
    m.to("cpu")
    assert_same_state(m, ref)
