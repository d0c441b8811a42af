"""Mixed precision on the CPU: fp32 master weights in the optimizers, the dynamic loss scaler, and 16-bit
FeedForward layers trained against their float32 twins."""
from __future__ import annotations

import math

import numpy as np
import pytest

from pymglu import nn
from pymglu.amp import MAX_SCALE, MIN_SCALE, DynamicLossScaler
from pymglu.autograd import GraphFreedError
from pymglu.dtypes import bfloat16, float16
from pymglu.nn import Parameter
from pymglu.optim import SGD, AdamW, clip_grad_norm

LOW = [pytest.param(bfloat16, id="bf16"), pytest.param(float16, id="fp16")]


def _params(rng, dtype, shapes=((4, 3), (5,))):
    return [Parameter(rng.standard_normal(s).astype(dtype)) for s in shapes]


def _snapshot(params, opt):
    """Bytes of every parameter and optimizer state array, and every step counter."""
    out = [("param", i, p.dtype.str, p.data.tobytes()) for i, p in enumerate(params)]
    for i, p in enumerate(params):
        for k, v in sorted(opt.state.get(id(p), {}).items()):
            out.append(("state", i, k, v if k == "step" else (v.dtype.str, v.tobytes())))
    return out


# ---------------------------------------------------------------------------------- master weights
@pytest.mark.parametrize("dtype", LOW)
def test_adamw_master_matches_float64_reference(dtype):
    rng = np.random.default_rng(0)
    params = _params(rng, dtype)
    lr, b1, b2, eps, wd = 3e-2, 0.9, 0.99, 1e-6, 0.1
    opt = AdamW(params, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    master = [p.data.astype(np.float64) for p in params]
    m = [np.zeros(p.shape) for p in params]
    v = [np.zeros(p.shape) for p in params]
    for t in range(1, 7):
        for i, p in enumerate(params):
            g = rng.standard_normal(p.shape).astype(dtype)
            p.grad = g
            g = g.astype(np.float64)
            master[i] = master[i] * (1 - lr * wd)
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            master[i] = master[i] - lr * (m[i] / (1 - b1 ** t)) / (np.sqrt(v[i] / (1 - b2 ** t)) + eps)
        opt.step()
        for p, ref in zip(params, master):
            st = opt.state[id(p)]
            assert st["master"].dtype == np.float32 and st["step"] == t
            np.testing.assert_allclose(st["master"], ref, rtol=2e-6, atol=2e-7)
            assert p.dtype == dtype
            assert p.data.tobytes() == st["master"].astype(dtype).tobytes()  # the rounded master, exactly


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("dtype", LOW)
def test_sgd_master_matches_float64_reference(dtype, nesterov):
    rng = np.random.default_rng(1)
    params = _params(rng, dtype)
    lr, mu, wd = 0.05, 0.9, 0.01
    opt = SGD(params, lr=lr, momentum=mu, weight_decay=wd, nesterov=nesterov)
    master = [p.data.astype(np.float64) for p in params]
    buf = [None] * len(params)
    for _ in range(6):
        for i, p in enumerate(params):
            g = rng.standard_normal(p.shape).astype(dtype)
            p.grad = g
            d = g.astype(np.float64) + wd * master[i]
            buf[i] = d if buf[i] is None else mu * buf[i] + d
            master[i] = master[i] - lr * (d + mu * buf[i] if nesterov else buf[i])
        opt.step()
        for p, ref in zip(params, master):
            np.testing.assert_allclose(opt.state[id(p)]["master"], ref, rtol=2e-6, atol=2e-7)
            assert p.data.tobytes() == opt.state[id(p)]["master"].astype(dtype).tobytes()


@pytest.mark.parametrize("make", [lambda ps, mw: SGD(ps, lr=1e-3, master_weights=mw),
                                  lambda ps, mw: AdamW(ps, lr=1e-3, weight_decay=0.0, master_weights=mw)],
                         ids=["sgd", "adamw"])
def test_master_weights_keep_updates_below_the_16_bit_resolution(make):
    # bfloat16 has 8 significant bits: 1 - 1e-3 rounds back to 1, so without a master nothing ever moves
    with_master, without = Parameter(np.ones(4, dtype=bfloat16)), Parameter(np.ones(4, dtype=bfloat16))
    opt_a, opt_b = make([with_master], True), make([without], False)
    for _ in range(60):
        with_master.grad = np.ones(4, dtype=bfloat16)
        without.grad = np.ones(4, dtype=bfloat16)
        opt_a.step()
        opt_b.step()
    assert "master" not in opt_b.state.get(id(without), {})
    np.testing.assert_array_equal(without.data.astype(np.float32), 1.0)
    master = opt_a.state[id(with_master)]["master"]
    np.testing.assert_allclose(master, 1.0 - 60 * 1e-3, rtol=1e-4)
    np.testing.assert_array_equal(with_master.data, master.astype(bfloat16))
    assert float(with_master.data[0]) < 0.95


def test_float32_parameters_get_no_master():
    rng = np.random.default_rng(2)
    p32, p64 = Parameter(rng.standard_normal(3).astype(np.float32)), Parameter(rng.standard_normal(3))
    opt = AdamW([p32, p64], lr=0.1)
    p32.grad, p64.grad = np.ones(3, dtype=np.float32), np.ones(3)
    opt.step()
    assert set(opt.state[id(p32)]) == set(opt.state[id(p64)]) == {"step", "exp_avg", "exp_avg_sq"}
    assert opt.state[id(p64)]["exp_avg"].dtype == np.float64


def test_gradient_dtypes_accepted_for_16_bit_parameters():
    p = Parameter(np.ones(3, dtype=bfloat16))
    opt = SGD([p], lr=0.5)
    p.grad = np.ones(3, dtype=np.float32)  # a float32 "master gradient" (what unscale_ produces)
    opt.step()
    np.testing.assert_array_equal(p.data.astype(np.float32), 0.5)
    p.grad = np.ones(3, dtype=float16)
    with pytest.raises(ValueError, match=r"gradient dtype float16 != parameter dtype bfloat16 \(or float32\)"):
        opt.step()
    q = Parameter(np.ones(3, dtype=np.float32))
    q.grad = np.ones(3)
    with pytest.raises(ValueError, match=r"gradient dtype float64 != parameter dtype float32 \(or float16, bfloat16\)"):
        SGD([q], lr=0.5).step()


@pytest.mark.parametrize("grad_dtype", [float16, bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("make", [lambda ps: AdamW(ps, lr=0.1, weight_decay=0.1), lambda ps: SGD(ps, lr=0.1, momentum=0.9)],
                         ids=["adamw", "sgd"])
def test_float32_parameters_take_16_bit_gradients(make, grad_dtype):
    """A float32 parameter (the mask logits of a 16-bit MGLU layer on the GPU) takes a 16-bit gradient and
    steps exactly as with the same values given in float32."""
    rng = np.random.default_rng()
    start = rng.standard_normal((4, 33)).astype(np.float32)
    grads = [rng.standard_normal(start.shape).astype(grad_dtype) for _ in range(3)]
    p16, p32 = Parameter(start.copy()), Parameter(start.copy())
    opt16, opt32 = make([p16]), make([p32])
    for g in grads:
        p16.grad, p32.grad = g, g.astype(np.float32)
        opt16.step()
        opt32.step()
    assert p16.data.dtype == np.float32
    np.testing.assert_array_equal(p16.data, p32.data)
    assert not np.array_equal(p16.data, start)


def test_master_follows_changes_made_outside_the_optimizer():
    p = Parameter(np.ones(4, dtype=bfloat16))
    opt = SGD([p], lr=1e-3)
    for _ in range(10):
        p.grad = np.ones(4, dtype=bfloat16)
        opt.step()
    master = opt.state[id(p)]["master"]
    precise = master.copy()
    assert not np.array_equal(precise, p.data.astype(np.float32))  # the master holds bits p cannot

    p.grad = np.zeros(4, dtype=bfloat16)
    opt.step()                                  # nothing changed outside: the master is kept as is
    np.testing.assert_array_equal(master, precise)

    p.data[1] = 3.0                             # in-place edit, announced
    p.mark_modified()
    opt.step()
    np.testing.assert_array_equal(master[[0, 2, 3]], precise[[0, 2, 3]])  # untouched elements keep their bits
    assert master[1] == 3.0 and float(p.data[1]) == 3.0

    p.data = np.full(4, -2.0, dtype=bfloat16)   # assignment, as Module.load_state_dict does
    opt.step()
    np.testing.assert_array_equal(master, -2.0)
    np.testing.assert_array_equal(p.data.astype(np.float32), -2.0)


def test_module_load_state_dict_resets_the_master():
    layer = nn.Linear(3, 2, dtype=bfloat16, rng=0)
    opt = SGD(layer, lr=1e-3)
    layer.weight.grad = np.ones((2, 3), dtype=bfloat16)
    opt.step()
    new = np.full((2, 3), 0.25, dtype=bfloat16)
    layer.load_state_dict({"weight": new})
    layer.weight.grad = np.zeros((2, 3), dtype=bfloat16)
    opt.step()
    np.testing.assert_array_equal(layer.weight.data, new)
    np.testing.assert_array_equal(opt.state[id(layer.weight)]["master"], 0.25)


def test_parameter_dtype_change_is_refused_before_any_update():
    a, b = Parameter(np.ones(3, dtype=bfloat16)), Parameter(np.ones(2, dtype=bfloat16))
    opt = AdamW([a, b], lr=0.1)
    a.grad, b.grad = np.ones(3, dtype=bfloat16), np.ones(2, dtype=bfloat16)
    opt.step()
    b.data = np.ones(2, dtype=np.float32)
    a.grad, b.grad = np.ones(3, dtype=bfloat16), np.ones(2, dtype=np.float32)
    before = _snapshot([a, b], opt)
    with pytest.raises(ValueError, match="nothing was updated.*master") as info:
        opt.step()
    assert "float32" in str(info.value)
    assert _snapshot([a, b], opt) == before


def test_master_weights_argument_is_validated():
    with pytest.raises(TypeError, match="master_weights"):
        AdamW([Parameter(np.ones(2))], master_weights="yes")
    assert SGD([Parameter(np.ones(2))], lr=0.1, master_weights=False).master_weights is False


# ---------------------------------------------------------------------------------- the loss scaler
@pytest.mark.parametrize("kwargs, name", [
    ({"init_scale": float("nan")}, "init_scale"),
    ({"init_scale": 0.0}, "init_scale"),
    ({"init_scale": -1.0}, "init_scale"),
    ({"init_scale": float("inf")}, "init_scale"),
    ({"init_scale": 2.0 ** 200}, "init_scale"),
    ({"growth_factor": 0.5}, "growth_factor"),
    ({"growth_factor": float("inf")}, "growth_factor"),
    ({"backoff_factor": 0.0}, "backoff_factor"),
    ({"backoff_factor": 1.5}, "backoff_factor"),
    ({"backoff_factor": float("nan")}, "backoff_factor"),
    ({"growth_interval": 0}, "growth_interval"),
    ({"growth_interval": 2.5}, "growth_interval"),
    ({"growth_interval": True}, "growth_interval"),
])
def test_scaler_arguments_are_validated(kwargs, name):
    with pytest.raises(ValueError, match=name):
        DynamicLossScaler(**kwargs)


def test_scaler_state_machine_step_by_step():
    p = Parameter(np.zeros(3, dtype=np.float32))
    opt = SGD([p], lr=0.1)
    scaler = DynamicLossScaler(init_scale=8.0, growth_factor=4.0, backoff_factor=0.25, growth_interval=2)
    # (gradient value or None for inf, expected: stepped, scale, growth_tracker, skipped_steps) per step
    script = [
        (1.0, True, 8.0, 1, 0),
        (1.0, True, 32.0, 0, 0),    # second clean step in a row: grow
        (None, False, 8.0, 0, 1),   # overflow: back off, restart the count
        (1.0, True, 8.0, 1, 1),
        (None, False, 2.0, 0, 2),   # an overflow before the interval completes resets the count
        (1.0, True, 2.0, 1, 2),
        (1.0, True, 8.0, 0, 2),
        (float("nan"), False, 2.0, 0, 3),
    ]
    for value, stepped, scale, tracker, skipped in script:
        before = p.data.copy()
        grad = np.full(3, np.inf if value is None else value * scaler.get_scale(), dtype=np.float32)
        p.grad = grad
        assert scaler.step(opt) is stepped
        scaler.update()
        assert (scaler.get_scale(), scaler.growth_tracker, scaler.skipped_steps) == (scale, tracker, skipped)
        if stepped:
            np.testing.assert_array_equal(p.data, before - 0.1 * value)  # unscaled exactly (power of two)
        else:
            np.testing.assert_array_equal(p.data, before)


def test_scale_is_clamped():
    p = Parameter(np.zeros(1, dtype=np.float32))
    opt = SGD([p], lr=0.1)
    low = DynamicLossScaler(init_scale=MIN_SCALE, backoff_factor=0.5)
    high = DynamicLossScaler(init_scale=MAX_SCALE, growth_interval=1)
    p.grad = np.full(1, np.inf, dtype=np.float32)
    low.step(opt)
    low.update()
    p.grad = np.zeros(1, dtype=np.float32)
    high.step(opt)
    high.update()
    assert low.get_scale() == MIN_SCALE and high.get_scale() == MAX_SCALE


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("make", [lambda ps: AdamW(ps, lr=0.1), lambda ps: SGD(ps, lr=0.1, momentum=0.9)],
                         ids=["adamw", "sgd-momentum"])
def test_skipped_step_changes_no_byte(make, bad):
    rng = np.random.default_rng(3)
    params = _params(rng, bfloat16) + _params(rng, np.float32, shapes=((2, 2),))
    opt = make(params)
    scaler = DynamicLossScaler(init_scale=2.0 ** 4)
    for _ in range(2):
        for p in params:
            p.grad = (rng.standard_normal(p.shape) * 16).astype(p.dtype)
        assert scaler.step(opt)
        scaler.update()
    before = _snapshot(params, opt)
    for p in params:
        p.grad = (rng.standard_normal(p.shape) * 16).astype(p.dtype)
    params[-1].grad[1, 0] = bad
    assert scaler.step(opt) is False
    assert _snapshot(params, opt) == before
    scaler.update()
    assert scaler.get_scale() == 2.0 ** 3 and scaler.skipped_steps == 1


def test_unscale_writes_float32_gradients_into_one_buffer():
    S = 2.0 ** 16
    half, brain = Parameter(np.ones(3, dtype=float16)), Parameter(np.ones(2, dtype=bfloat16))
    single, double = Parameter(np.ones(4, dtype=np.float32)), Parameter(np.ones(2))
    opt = SGD([half, brain, single, double], lr=0.1)
    tiny = np.full(3, 2.0 ** -10, dtype=float16)     # 2**-26 after unscaling: below float16's smallest subnormal
    held = [tiny, np.full(2, 3.0, dtype=bfloat16), np.full(4, 5.0, dtype=np.float32), np.full(2, 7.0)]
    for p, g in zip((half, brain, single, double), held):
        p.grad = g
    scaler = DynamicLossScaler(init_scale=S)
    scaler.unscale_(opt)
    assert [p.grad.dtype for p in (half, brain, single, double)] == [np.float32] * 3 + [np.float64]
    np.testing.assert_array_equal(half.grad, 2.0 ** -26)
    np.testing.assert_array_equal(brain.grad, 3.0 / S)
    np.testing.assert_array_equal(single.grad, 5.0 / S)
    np.testing.assert_array_equal(double.grad, 7.0 / S)
    assert half.grad.base is brain.grad.base is single.grad.base  # one buffer, one reduction
    assert double.grad.base is not half.grad.base
    np.testing.assert_array_equal(held[0], 2.0 ** -10)  # the caller's arrays are not written
    np.testing.assert_array_equal(held[2], 5.0)
    assert scaler.step(opt)
    np.testing.assert_array_equal(half.data, np.float16(1.0 - 0.1 * 2.0 ** -26))  # rounded master


def test_unscale_checks_gradients_first():
    p, q = Parameter(np.ones(3, dtype=float16)), Parameter(np.ones(2, dtype=float16))
    opt = AdamW([p, q], lr=0.1)
    good, bad = np.ones(3, dtype=float16), np.ones(5, dtype=float16)
    p.grad, q.grad = good, bad
    scaler = DynamicLossScaler()
    with pytest.raises(ValueError, match="nothing was updated.*gradient shape"):
        scaler.unscale_(opt)
    assert p.grad is good and q.grad is bad and opt.state == {}
    q.grad = np.ones(2, dtype=float16)
    assert scaler.step(opt)  # the failed call left no record behind


def test_scaler_call_order_is_enforced():
    p = Parameter(np.ones(2, dtype=np.float32))
    opt = SGD([p], lr=0.1)
    scaler = DynamicLossScaler()
    with pytest.raises(RuntimeError, match="update: no unscale_"):
        scaler.update()
    p.grad = np.ones(2, dtype=np.float32)
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="unscale_.. was already called"):
        scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="without step"):
        scaler.update()
    with pytest.raises(RuntimeError, match="step is in progress"):
        scaler.load_state_dict(scaler.state_dict())
    assert scaler.step(opt)
    with pytest.raises(RuntimeError, match="step.. was already called"):
        scaler.step(opt)
    scaler.update()
    with pytest.raises(TypeError, match="optimizer"):
        scaler.step(object())
    with pytest.raises(TypeError, match="loss"):
        scaler.scale(np.ones(()))
    with pytest.raises(ValueError, match="does not require a gradient"):
        scaler.scale(nn.Linear(2, 1, rng=0)(np.ones(2, dtype=np.float32)).detach())


def test_two_optimizers_share_one_scaler():
    a, b = Parameter(np.zeros(2, dtype=np.float32)), Parameter(np.zeros(2, dtype=np.float32))
    opt_a, opt_b = SGD([a], lr=1.0), SGD([b], lr=1.0)
    scaler = DynamicLossScaler(init_scale=4.0)
    a.grad, b.grad = np.full(2, 4.0, dtype=np.float32), np.full(2, np.inf, dtype=np.float32)
    assert scaler.step(opt_a) and not scaler.step(opt_b)
    scaler.update()
    np.testing.assert_array_equal(a.data, -1.0)
    np.testing.assert_array_equal(b.data, 0.0)
    assert scaler.get_scale() == 2.0  # one overflow anywhere lowers the shared scale


def test_scale_keeps_the_loss_dtype():
    scaler = DynamicLossScaler(init_scale=2.0 ** 16)
    for dtype, want in ((np.float32, 2.0 ** 16 * 1.5), (bfloat16, 2.0 ** 16 * 1.5), (float16, np.inf)):
        w = Parameter(np.full(1, 1.5, dtype=dtype))
        loss = w.sum()
        scaled = scaler.scale(loss)
        assert scaled.dtype == dtype and float(scaled.data.astype(np.float64)) == want
        scaled.backward()
        assert w.grad.dtype == dtype and float(w.grad[0].astype(np.float64)) == (2.0 ** 16 if want != np.inf else np.inf)


def test_scaler_state_dict_round_trip_and_validation():
    scaler = DynamicLossScaler(init_scale=1024.0, growth_interval=3)
    p = Parameter(np.zeros(1, dtype=np.float32))
    opt = SGD([p], lr=0.1)
    for value in (1.0, np.inf, 1.0):
        p.grad = np.full(1, value, dtype=np.float32)
        scaler.step(opt)
        scaler.update()
    state = scaler.state_dict()
    assert state == {"scale": 512.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 3,
                     "growth_tracker": 1, "skipped_steps": 1}
    other = DynamicLossScaler()
    other.load_state_dict(state)
    assert other.state_dict() == state
    bad = dict(state, scale=float("nan"), growth_interval=0, growth_tracker=-1)
    with pytest.raises(ValueError) as info:
        other.load_state_dict(bad)
    msg = str(info.value)
    assert "nothing was changed" in msg and "scale" in msg and "growth_interval" in msg and "growth_tracker" in msg
    with pytest.raises(ValueError, match="keys"):
        other.load_state_dict({"scale": 1.0})
    assert other.state_dict() == state


# ---------------------------------------------------------------------------------- layers
D, H, N_MASKS, BATCH, STEPS = 16, 48, 2, 64, 50


def _regression_data():
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((8, BATCH, D)).astype(np.float32)
    teacher = nn.FeedForward(D, H, kind="swiglu", rng=123)
    return xs, [teacher(x).data for x in xs]


def _train(kind, dtype, scaler=None, clip=None):
    """Train a FeedForward on a fixed regression task; returns (model, first loss, final eval loss)."""
    xs, ys = _regression_data()
    model = nn.FeedForward(D, H, kind=kind, n_masks=N_MASKS if "mglu" in kind else None, dtype=dtype, rng=0)
    opt = AdamW(model, lr=3e-3, weight_decay=0.01)
    first = None
    for step in range(STEPS):
        x, y = xs[step % len(xs)].astype(dtype), ys[step % len(ys)].astype(dtype)
        diff = model(x) - y
        loss = (diff * diff).mean()
        first = float(loss.data.astype(np.float64)) if first is None else first
        opt.zero_grad()
        if scaler is None:
            loss.backward()
            for p in model.parameters():
                assert p.grad.dtype == p.dtype, (p, p.grad.dtype)
            if clip:
                clip_grad_norm(model.parameters(), clip)
            opt.step()
        else:
            with np.errstate(over="ignore", invalid="ignore"):  # float16 overflow is the expected event here
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                if clip:
                    clip_grad_norm(model.parameters(), clip)
                scaler.step(opt)
                scaler.update()
    final = np.mean([((model(x.astype(dtype)).data.astype(np.float64) - y) ** 2).mean() for x, y in zip(xs, ys)])
    return model, opt, first, final


@pytest.mark.parametrize("kind", ["swimglu", "swiglu"])
def test_bf16_feedforward_trains_like_its_float32_twin(kind):
    _, _, first32, final32 = _train(kind, np.float32)
    model, opt, first16, final16 = _train(kind, bfloat16)
    assert model.up.dtype == bfloat16 and model.down.weight.dtype == bfloat16
    if kind == "swimglu":
        assert model.up.mask_logits.dtype == np.float32
    for p in model.parameters():
        st = opt.state[id(p)]
        assert ("master" in st) == (p.dtype == bfloat16)
    assert final32 < 0.4 * first32
    assert abs(final16 - final32) <= 0.03 * final32, (final16, final32)


def test_fp16_feedforward_with_loss_scaler_skips_overflow_and_recovers():
    _, _, first32, final32 = _train("swimglu", np.float32)
    scaler = DynamicLossScaler(growth_interval=10)
    model, opt, first16, final16 = _train("swimglu", float16, scaler=scaler, clip=5.0)
    # the float16 loss cannot carry 2**16 (> 65504): the first step overflows and is skipped; later
    # growths back to 2**16 overflow again and are undone
    assert scaler.get_scale() < 2.0 ** 16
    assert 1 <= scaler.skipped_steps <= STEPS // 10 + 1
    assert opt.state[id(model.up.W)]["step"] == STEPS - scaler.skipped_steps
    for p in model.parameters():
        assert np.isfinite(p.data.astype(np.float32)).all()
    assert abs(final16 - final32) <= 0.05 * final32, (final16, final32)


def test_unscale_then_clip_reproduces_unscaled_training_bit_for_bit():
    plain, opt_plain, _, _ = _train("swimglu", np.float32, clip=0.5)
    scaler = DynamicLossScaler(init_scale=2.0 ** 10, growth_interval=10_000)
    scaled, opt_scaled, _, _ = _train("swimglu", np.float32, scaler=scaler, clip=0.5)
    assert scaler.skipped_steps == 0
    for p, q in zip(plain.parameters(), scaled.parameters()):
        assert p.data.tobytes() == q.data.tobytes()


def test_nonfinite_fp16_loss_is_skipped_and_lowers_the_scale():
    model = nn.FeedForward(D, H, kind="swimglu", n_masks=N_MASKS, dtype=float16, rng=0)
    opt = AdamW(model, lr=1e-3)
    scaler = DynamicLossScaler(init_scale=2.0 ** 8)
    x = np.random.default_rng(1).standard_normal((4, D)).astype(float16)
    out = model(x)
    scaler.scale((out * out).mean()).backward()
    assert scaler.step(opt)
    scaler.update()
    params = model.parameters()
    before = _snapshot(params, opt)
    x[2, 3] = np.nan                                  # a bad batch: the loss is NaN
    with np.errstate(invalid="ignore"):
        out = model(x)
        loss = (out * out).mean()
        assert math.isnan(float(loss.data))
        opt.zero_grad()
        scaler.scale(loss).backward()
        assert scaler.step(opt) is False
    scaler.update()
    assert _snapshot(params, opt) == before and scaler.get_scale() == 2.0 ** 7
    x[2, 3] = 0.5                                     # training goes on with the next good batch
    opt.zero_grad()
    out = model(x)
    scaler.scale((out * out).mean()).backward()
    assert scaler.step(opt)
    assert _snapshot(params, opt) != before


def test_input_dtype_mismatch_is_refused_before_any_change():
    model = nn.FeedForward(D, H, kind="swimglu", n_masks=N_MASKS, dtype=bfloat16, rng=0)
    opt = AdamW(model, lr=1e-3)
    scaler = DynamicLossScaler(init_scale=1.0)
    params = model.parameters()
    before = _snapshot(params, opt)
    with pytest.raises(TypeError, match="x: expected dtype bfloat16 .the layer's., got float32 array"):
        model(np.ones((2, D), dtype=np.float32))
    assert all(p.grad is None for p in params) and opt.state == {}
    assert _snapshot(params, opt) == before and scaler.state_dict()["scale"] == 1.0


def test_backward_twice_through_a_layer_raises_graph_freed():
    model = nn.FeedForward(D, H, kind="swimglu", n_masks=N_MASKS, rng=0)
    x = np.random.default_rng(2).standard_normal((4, D)).astype(np.float32)
    scaled = DynamicLossScaler(init_scale=4.0).scale(model(x).mean())
    scaled.backward()
    grads = [p.grad.copy() for p in model.parameters()]
    with pytest.raises(GraphFreedError, match="retain_graph=True"):
        scaled.backward()
    for p, g in zip(model.parameters(), grads):
        np.testing.assert_array_equal(p.grad, g)  # the failed second pass added nothing
