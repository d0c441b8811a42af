"""Steps skipped on the device: the loss scaler held in device memory, ``Optimizer.step(skip=...)`` and the
step scalars computed on the device, against the host's decisions and values on the same gradients."""
from __future__ import annotations

import time

import numpy as np
import pytest

from pymglu.amp import DynamicLossScaler
from pymglu.cuda import optimizers as fused
from pymglu.dtypes import float16
from pymglu.masks import pack_masks
from pymglu.nn import Parameter
from pymglu.optim import SGD, AdamW

pytestmark = pytest.mark.gpu
cp = pytest.importorskip("cupy")

SHAPES = ((37,), (3, 70), (2, 5, 40))  # the last one wants its sign bit-planes (mask logits)


def _params(seed, dtype=float16):
    rng = np.random.default_rng(seed)
    params = [Parameter(cp.asarray(rng.standard_normal(s).astype(dtype))) for s in SHAPES[:2]]
    logits = Parameter(cp.asarray(rng.standard_normal(SHAPES[2]).astype(np.float32)))
    logits.wants_sign_bits = True
    return params + [logits]


def _optimizer(kind, params):
    if kind == "adamw":
        return AdamW(params, lr=3e-2, betas=(0.9, 0.99), weight_decay=0.1)
    return SGD(params, lr=3e-2, momentum=0.9, weight_decay=0.1)


def _arrays(params, opt):
    """Every parameter, state array and sign bit-plane of ``opt``, as host arrays, in a fixed order."""
    out = []
    for p in params:
        out.append(p.data.get())
        for key, value in sorted(opt.state.get(id(p), {}).items()):
            if key != "step":
                out.append(value.get())
        bits = opt._sign_bits.get(id(p))
        if bits is not None:
            out.append(bits.get())
    return out


def _set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = g.copy()


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_step_with_skip_set_changes_nothing_and_clear_steps_as_the_host_does(kind):
    rng = np.random.default_rng(1)
    host_params, dev_params = _params(0), _params(0)
    host, dev = _optimizer(kind, host_params), _optimizer(kind, dev_params)
    one, zero = cp.ones(1, dtype=np.int32), cp.zeros(1, dtype=np.int32)
    for step in range(6):
        grads = [cp.asarray(rng.standard_normal(p.shape).astype(p.dtype)) for p in host_params]
        if step in (0, 3):  # skipped: the very first step (SGD's momentum buffer must not be read later), and one later
            _set_grads(dev_params, grads)
            before = _arrays(dev_params, dev) if step else [p.data.get() for p in dev_params]
            dev.step(skip=one)
            after = _arrays(dev_params, dev) if step else [p.data.get() for p in dev_params]
            assert len(before) == len(after)
            for b, a in zip(before, after):
                np.testing.assert_array_equal(a, b)
            # the bit-planes the skipped update left are those of the unchanged logits
            np.testing.assert_array_equal(dev._sign_bits[id(dev_params[2])].get(),
                                          pack_masks(dev_params[2].data).get())
            continue
        _set_grads(host_params, grads)
        _set_grads(dev_params, grads)
        host.step()
        dev.step(skip=zero)
        for a, b in zip(_arrays(host_params, host), _arrays(dev_params, dev)):
            np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)
    dev.settle_steps()
    for hp, dp in zip(host_params, dev_params):
        if id(hp) in host.state:
            assert dev.state[id(dp)]["step"] == host.state[id(hp)]["step"] == 4
    assert dev.state_dict()["state"][0]["step"] == 4  # state_dict settles as well


def test_device_rows_are_the_host_rows():
    steps = np.array([0, 1, 6, 999], dtype=np.int64)
    hyper = np.array([[3e-3, 0.9, 0.999, 0.1], [1e-2, 0.8, 0.99, 0.0], [3e-3, 0.9, 0.95, 0.01], [1e-4, 0.5, 0.9, 0.2]])
    for found in (0, 1):
        counts = cp.asarray(steps)
        rows = cp.full((4, 4), np.nan, dtype=np.float32)
        fused.adamw_device_rows(cp.asarray(hyper), counts, cp.asarray(np.array([found], np.int32)), rows)
        want_counts = steps + (1 - found)
        np.testing.assert_array_equal(counts.get(), want_counts)
        got = rows.get()
        assert np.all(got[:, 3] == found)
        if not found:
            for row, h, t in zip(got, hyper, want_counts):
                want = fused.adamw_scalars(lr=h[0], beta1=h[1], beta2=h[2], weight_decay=h[3], step=int(t))
                np.testing.assert_allclose(row, want, rtol=1e-7)
        sgd_rows = cp.full((4, 3), np.nan, dtype=np.float32)
        counts = cp.asarray(steps)
        fused.sgd_device_rows(cp.asarray(hyper[:, :1].copy()), counts, cp.asarray(np.array([found], np.int32)),
                              sgd_rows)
        np.testing.assert_array_equal(sgd_rows.get()[:, 2], [1 - found, 0, 0, 0])  # first only where 0 -> 1
        np.testing.assert_array_equal(sgd_rows.get()[:, 1], found)
    with pytest.raises(ValueError, match="steps: expected a C-contiguous int64"):
        fused.adamw_device_rows(cp.asarray(hyper), cp.asarray(steps.astype(np.int32)), cp.zeros(1, np.int32),
                                cp.empty((4, 4), np.float32))


def test_skip_is_checked_before_anything_changes():
    params = _params(0)
    opt = _optimizer("adamw", params)
    for p in params:
        p.grad = cp.ones(p.shape, dtype=p.dtype)
    before = _arrays(params, opt)
    with pytest.raises(ValueError, match=r"skip: expected a CuPy int32 array of shape \(1,\)"):
        opt.step(skip=cp.zeros(1, dtype=np.int64))
    assert all(np.array_equal(a, b) for a, b in zip(before, _arrays(params, opt)))
    assert opt._device_steps is None and opt.state == {}
    with fused.disabled(), pytest.raises(RuntimeError, match="cannot skip a step on the device"):
        opt.step(skip=cp.zeros(1, dtype=np.int32))
    assert opt._device_steps is None and opt.state == {}
    opt.step(skip=cp.zeros(1, dtype=np.int32))
    counts = opt._device_steps.counts
    with fused.disabled(), pytest.raises(RuntimeError, match="cannot skip a step on the device"):
        opt.step(skip=cp.zeros(1, dtype=np.int32))
    assert opt._device_steps.counts is counts and counts.get().tolist() == [1, 1, 1]  # not advanced


def _scaled_step(scaler, opt, params, grads):
    _set_grads(params, grads)
    scaler.unscale_(opt)
    scaler.step(opt)
    scaler.update()


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_a_scaler_held_on_the_device_decides_as_the_host_scaler(kind):
    rng = np.random.default_rng(2)
    host_params, dev_params = _params(0), _params(0)
    host_opt, dev_opt = _optimizer(kind, host_params), _optimizer(kind, dev_params)
    settings = dict(init_scale=2.0 ** 12, growth_factor=4.0, backoff_factor=0.25, growth_interval=2)
    host, dev = DynamicLossScaler(**settings), DynamicLossScaler(**settings)
    dev.hold_on_device(dev_params[0].data)
    assert dev.on_device and not host.on_device
    history = []
    for step in range(12):
        grads = [cp.asarray((rng.standard_normal(p.shape) * 100).astype(p.dtype)) for p in host_params]
        if step in (0, 1, 5, 9):  # an overflow: backs off; the others grow the scale every second step
            grads[step % 3][..., 0] = np.inf if step % 2 else np.nan
        _scaled_step(host, host_opt, host_params, grads)
        _scaled_step(dev, dev_opt, dev_params, grads)
        history.append((host.get_scale(), host.growth_tracker, host.skipped_steps))
        assert (dev.get_scale(), dev.growth_tracker, dev.skipped_steps) == history[-1]
    # 4096 backs off twice, grows every second clean step, backs off at each overflow
    assert [h[0] for h in history] == [1024.0, 256.0, 256.0, 1024.0, 1024.0, 256.0, 256.0, 1024.0, 1024.0, 256.0,
                                       256.0, 1024.0]
    assert [h[2] for h in history] == [1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4]
    for a, b in zip(_arrays(host_params, host_opt), _arrays(dev_params, dev_opt)):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)
    dev_opt.settle_steps()
    assert [st["step"] for st in dev_opt.state.values()] == [st["step"] for st in host_opt.state.values()]
    assert dev.state_dict() == host.state_dict()
    dev.release_device()
    assert not dev.on_device and dev.state_dict() == host.state_dict()


def test_a_scaler_held_on_the_device_scales_the_loss_as_the_host_does():
    from pymglu.autograd.tensor import Tensor

    for dtype, scale in ((np.float32, 2.0 ** 16), (float16, 2.0 ** 10), (float16, 2.0 ** 16)):
        loss = Tensor(cp.asarray(np.array(1.5, dtype=dtype)), requires_grad=True)
        host, dev = DynamicLossScaler(init_scale=scale), DynamicLossScaler(init_scale=scale)
        dev.hold_on_device(loss.data)
        want, got = host.scale(loss), dev.scale(loss)
        assert got.dtype == want.dtype == dtype and got.shape == ()
        np.testing.assert_array_equal(got.data.get(), want.data.get())  # 2**16 in float16: inf in both
    with pytest.raises(ValueError, match="loss: expected a CuPy array on device 0"):
        dev.scale(Tensor(np.array(1.0, dtype=np.float32), requires_grad=True))


def test_state_written_while_held_on_the_device_goes_there():
    scaler = DynamicLossScaler(init_scale=8.0)
    scaler.hold_on_device(cp.zeros(1))
    state = dict(scaler.state_dict(), scale=2.0 ** 20, growth_tracker=5, skipped_steps=7)
    scaler.load_state_dict(state)
    assert float(scaler._device.scale.get()[0]) == 2.0 ** 20 and int(scaler._device.skipped.get()[0]) == 7
    scaler.growth_tracker = 1
    assert int(scaler._device.tracker.get()[0]) == 1 and scaler.state_dict() == dict(state, growth_tracker=1)
    with pytest.raises(TypeError, match="like: expected a CuPy array"):
        scaler.hold_on_device(np.zeros(1))


def test_a_step_held_on_the_device_does_not_wait_for_it(busy_gpu):
    params = _params(0)
    opt = _optimizer("adamw", params)
    scaler = DynamicLossScaler()
    scaler.hold_on_device(params[0].data)
    grads = [cp.ones(p.shape, dtype=p.dtype) for p in params]
    _scaled_step(scaler, opt, params, grads)  # compiles the kernels and makes the state
    busy = busy_gpu(2.0)
    start = time.perf_counter()
    grads[1][0, 0] = np.inf
    _scaled_step(scaler, opt, params, grads)
    queued_while_busy = not busy.done
    assert queued_while_busy, f"the step waited for the device ({time.perf_counter() - start:.2f} s)"
    assert scaler.skipped_steps == 1 and scaler.get_scale() == 2.0 ** 15  # read back: waits, and sees the skip


def test_a_skipped_update_offers_the_bits_of_logits_changed_outside_the_optimizer():
    """A skipped update leaves its bit-plane buffer alone but still offers it: after the logits were
    replaced (a loaded checkpoint), the buffer must first be repacked from them."""
    params = _params(0)
    logits = params[2]
    opt = _optimizer("adamw", params)
    zero, one = cp.zeros(1, dtype=np.int32), cp.ones(1, dtype=np.int32)
    for p in params:
        p.grad = cp.ones(p.shape, dtype=p.dtype)
    opt.step(skip=zero)
    logits.data = -logits.data  # every sign flips, outside the optimizer
    opt.step(skip=one)
    np.testing.assert_array_equal(logits.sign_bits().get(), pack_masks(logits.data).get())
    logits.data[...] = cp.abs(logits.data)  # in place, version bumped by the caller
    logits.mark_modified()
    opt.step(skip=one)
    np.testing.assert_array_equal(logits.sign_bits().get(), pack_masks(logits.data).get())


def test_a_refused_device_step_leaves_the_scaler_where_it_was():
    params = _params(0)
    opt = _optimizer("adamw", params)
    scaler = DynamicLossScaler(init_scale=4.0)
    scaler.hold_on_device(params[0].data)
    _set_grads(params, [cp.full(p.shape, np.inf, dtype=p.dtype) for p in params])
    scaler.unscale_(opt)
    with fused.disabled(), pytest.raises(RuntimeError, match="cannot skip a step on the device"):
        scaler.step(opt)
    assert scaler.skipped_steps == 0 and opt.state == {}
    scaler.step(opt)  # the same step, now served: skipped (the gradients are inf)
    scaler.update()
    assert scaler.skipped_steps == 1 and scaler.get_scale() == 2.0
