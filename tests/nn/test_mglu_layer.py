"""MGLU layers: reference equality, training with mask logits, packed inference form and its cache."""
from __future__ import annotations

import numpy as np
import pytest

from pymglu import functional, masks as masks_mod
from pymglu.autograd import Tensor, no_grad, ops
from pymglu.nn import GeMGLU, MGLU, ReMGLU, StateDictError, SwiMGLU
from pymglu.optim import AdamW, param_groups_no_decay


def randn(rng, *shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


@pytest.mark.parametrize(
    "cls, kwargs, activation",
    [(MGLU, {}, "sigmoid"), (SwiMGLU, {}, "silu"), (GeMGLU, {}, "gelu"),
     (GeMGLU, {"approximate": "tanh"}, "gelu_tanh"), (ReMGLU, {}, "relu")],
)
@pytest.mark.parametrize("n_masks", [1, 3])
def test_forward_equals_functional_reference(cls, kwargs, activation, n_masks):
    rng = np.random.default_rng(n_masks)
    layer = cls(37, 11, n_masks=n_masks, dtype=np.float64, rng=2, **kwargs)
    assert layer.activation == activation
    assert layer.W.shape == (11, 37) and layer.mask_logits.shape == (n_masks, 11, 37)
    assert layer.mask_logits.dtype == np.float32
    x = randn(rng, 2, 5, 37, dtype=np.float64)
    y = layer(x)
    assert y.shape == (2, 5, 11)
    want = functional.mglu(x, layer.W.data, layer.mask_logits.data > 0, activation)
    np.testing.assert_array_equal(y.data, want)


def test_logit_init_follows_the_paper():
    logits = SwiMGLU(64, 96, n_masks=4, rng=0).mask_logits.data
    assert abs(logits.std() - 0.01) < 0.001 and abs(logits.mean()) < 0.001
    frac = (logits > 0).mean()
    assert 0.45 < frac < 0.55


def test_eval_on_packed_masks_equals_training_forward():
    rng = np.random.default_rng(0)
    layer = SwiMGLU(45, 20, n_masks=3, rng=1)
    x = randn(rng, 7, 45)
    y_train = layer(x).data
    packed = layer.pack()
    assert packed.dtype == np.uint32 and packed.shape == (3, 20, 2)
    np.testing.assert_array_equal(packed, masks_mod.pack_masks(layer.mask_logits.data > 0))
    layer.eval()
    with no_grad():
        y_eval = layer(x).data
    np.testing.assert_array_equal(y_eval, y_train)
    # gradients still reach x and W through the fixed masks in eval mode
    xt = Tensor(x, requires_grad=True)
    layer(xt).backward(np.ones((7, 20), dtype=np.float32))
    assert xt.grad.shape == x.shape and layer.W.grad is not None and layer.mask_logits.grad is None


def test_packed_cache_is_reused_and_refreshed():
    rng = np.random.default_rng(1)
    layer = SwiMGLU(16, 8, n_masks=2, rng=2).eval()
    x = randn(rng, 3, 16)
    layer(x)
    first = layer.packed_masks
    layer(x)
    assert layer.packed_masks is first  # unchanged logits: no re-pack

    flipped = -layer.mask_logits.data
    layer.mask_logits.data = flipped  # assignment bumps the version
    y = layer(x).data
    assert layer.packed_masks is not first
    np.testing.assert_array_equal(y, functional.mglu(x, layer.W.data, flipped > 0, "silu"))

    second = layer.packed_masks
    layer.mask_logits.data[0] = -layer.mask_logits.data[0]  # in-place edit, announced below
    layer.mask_logits.mark_modified()
    y = layer(x).data
    assert layer.packed_masks is not second
    np.testing.assert_array_equal(y, functional.mglu(x, layer.W.data, layer.mask_logits.data > 0, "silu"))

    # an optimizer step on the logits refreshes the cache too
    layer.train()
    opt = AdamW([layer.mask_logits], lr=0.05, weight_decay=0.0)
    ops.mean(layer(x) * layer(x)).backward()
    opt.step()
    layer.eval()
    y = layer(x).data
    np.testing.assert_array_equal(y, functional.mglu(x, layer.W.data, layer.mask_logits.data > 0, "silu"))


def test_training_swimglu_reduces_loss_and_moves_masks():
    rng = np.random.default_rng(0)
    d, h, n, tokens = 8, 12, 2, 64
    teacher = SwiMGLU(d, h, n_masks=n, rng=10)
    teacher.mask_logits.data = randn(rng, n, h, d)
    student = SwiMGLU(d, h, n_masks=n, rng=11)
    x = randn(rng, tokens, d)
    with no_grad():
        target = teacher(x).data
    masks_before = student.mask_logits.data > 0
    opt = AdamW(param_groups_no_decay(student, weight_decay=0.01), lr=2e-2)

    def loss_fn():
        diff = student(x) - target
        return ops.mean(diff * diff)

    first = float(loss_fn().data)
    for _ in range(100):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    final = float(loss_fn().data)
    assert final < 0.3 * first, (first, final)
    changed = int((masks_before != (student.mask_logits.data > 0)).sum())
    assert changed > 0.02 * masks_before.size, changed
    # the no-decay helper kept the logits out of the decayed group
    assert opt.param_groups[1]["names"] == ["mask_logits"] and opt.param_groups[1]["weight_decay"] == 0.0


def test_recompute_layer_trains_exactly_like_the_cached_one():
    rng = np.random.default_rng(3)
    x, target = randn(rng, 2, 9, 8), randn(rng, 2, 9, 12)
    layers = [GeMGLU(8, 12, n_masks=3, rng=5), GeMGLU(8, 12, n_masks=3, rng=5, recompute=True)]
    assert "recompute=True" in repr(layers[1]) and not layers[0].recompute
    opts = [AdamW(layer.parameters(), lr=1e-2) for layer in layers]
    for _ in range(5):
        for layer, opt in zip(layers, opts):
            opt.zero_grad()
            diff = layer(x) - target
            ops.mean(diff * diff).backward()
            opt.step()
    for name in ("W", "mask_logits"):
        np.testing.assert_allclose(getattr(layers[1], name).data, getattr(layers[0], name).data, rtol=1e-12)


def test_drop_logits_gives_a_pure_inference_layer():
    rng = np.random.default_rng(2)
    layer = ReMGLU(40, 9, n_masks=2, rng=3)
    x = randn(rng, 4, 40)
    y_ref = layer(x).data
    stats_ref = layer.mask_stats()
    assert layer.drop_logits() is layer
    assert layer.inference_only and not layer.training
    assert [n for n, _ in layer.named_parameters()] == ["W"]
    assert list(layer.state_dict()) == ["W", "packed_masks"]
    assert layer.state_dict()["packed_masks"].shape == (2, 9, 2)
    np.testing.assert_array_equal(layer(x).data, y_ref)
    stats = layer.mask_stats()
    np.testing.assert_array_equal(stats["gate_fraction"], stats_ref["gate_fraction"])
    np.testing.assert_array_equal(stats["jaccard"], stats_ref["jaccard"])
    layer.train()
    with pytest.raises(RuntimeError, match="inference form"):
        layer(x)
    layer.eval()
    assert layer.drop_logits() is layer

    fresh = ReMGLU(40, 9, n_masks=2, rng=99).drop_logits()
    fresh.load_state_dict(layer.state_dict())
    np.testing.assert_array_equal(fresh(x).data, y_ref)


def test_form_and_mask_count_mismatch_are_rejected_without_change():
    training = SwiMGLU(16, 8, n_masks=2, rng=0)
    inference = SwiMGLU(16, 8, n_masks=2, rng=1).drop_logits()
    before = {k: v.copy() for k, v in training.state_dict().items()}
    with pytest.raises(StateDictError) as info:
        training.load_state_dict(inference.state_dict())
    assert "mask_logits" in str(info.value) and "packed_masks" in str(info.value)
    wrong_n = SwiMGLU(16, 8, n_masks=3, rng=2)
    with pytest.raises(StateDictError, match=r"mask_logits: shape \(3, 8, 16\)"):
        training.load_state_dict(wrong_n.state_dict())
    with pytest.raises(StateDictError, match="packed_masks"):
        inference.load_state_dict(SwiMGLU(16, 8, n_masks=3, rng=2).drop_logits().state_dict())
    for k, v in training.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_flash_kernel_is_not_used_on_numpy():
    layer = SwiMGLU(8, 4, rng=0).eval()
    assert layer._flash_module(Tensor(np.zeros((1, 8), dtype=np.float32))) is None


@pytest.mark.gpu
def test_flash_kernel_dispatch_on_gpu(monkeypatch):
    import cupy as cp
    from pymglu.cuda import flash_mglu as fm

    calls = []
    real = fm.flash_mglu

    def counting_flash(x, *args, **kwargs):
        calls.append(tuple(x.shape))
        return real(x, *args, **kwargs)

    monkeypatch.setattr(fm, "flash_mglu", counting_flash)
    layer = SwiMGLU(64, 32, n_masks=2, rng=0).to("cuda").eval()
    x = cp.asarray(np.random.default_rng(0).standard_normal((2, 8, 64)).astype(np.float32))
    with no_grad():
        y_small = layer(x)
        layer(x.reshape(16, 64).repeat(2, axis=0))  # 32 tokens: reference path
    assert calls == [(2, 8, 64)]
    layer(x)  # gradients wanted for W: reference path
    assert calls == [(2, 8, 64)]
    want = functional.mglu(x.astype(cp.float64), layer.W.data.astype(cp.float64), layer.mask_logits.data > 0, "silu")
    assert float(cp.linalg.norm(y_small.data - want) / cp.linalg.norm(want)) < 1e-5


@pytest.mark.gpu
def test_real_flash_kernel_matches_reference_and_caches_weights():
    import cupy as cp

    pytest.importorskip("pymglu.cuda.flash_mglu")
    from pymglu.dtypes import bfloat16

    rng = np.random.default_rng(3)
    layer = SwiMGLU(200, 72, n_masks=3, dtype=bfloat16, rng=4).to("cuda").eval()
    x = cp.asarray(rng.standard_normal((4, 200)).astype(bfloat16))
    with no_grad():
        y = layer(x).data
        cached = layer._flash_cache[1]
        layer(x)
        assert layer._flash_cache[1] is cached
        want = functional.mglu(x, layer.W.data, layer.mask_logits.data > 0, "silu")
        np.testing.assert_allclose(cp.asnumpy(y).astype(np.float32), cp.asnumpy(want).astype(np.float32),
                                   rtol=2e-2, atol=2e-2)
        layer.W.data = layer.W.data * 2
        y2 = layer(x).data
        assert layer._flash_cache[1] is not cached
        want2 = functional.mglu(x, layer.W.data, layer.mask_logits.data > 0, "silu")
        np.testing.assert_allclose(cp.asnumpy(y2).astype(np.float32), cp.asnumpy(want2).astype(np.float32),
                                   rtol=2e-2, atol=4e-2)
