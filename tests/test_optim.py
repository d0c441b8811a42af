"""Optimizers against hand-written float64 formulas, validation, state round trips, clipping, schedule."""
from __future__ import annotations

import math

import numpy as np
import pytest

from pymglu.dtypes import bfloat16
from pymglu.nn import FeedForward, Module, Parameter, RMSNorm
from pymglu.optim import SGD, AdamW, WarmupCosine, clip_grad_norm, param_groups_no_decay


def make_params(rng, shapes, dtype=np.float64):
    return [Parameter(rng.standard_normal(s).astype(dtype)) for s in shapes]


def grads_for(rng, params, steps):
    return [[rng.standard_normal(p.shape).astype(p.dtype) for p in params] for _ in range(steps)]


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_momentum_matches_formula(nesterov):
    rng = np.random.default_rng(0)
    params = make_params(rng, [(3, 4), (5,)])
    lr, mu, wd = 0.1, 0.9, 0.01
    opt = SGD(params, lr=lr, momentum=mu, weight_decay=wd, nesterov=nesterov)
    ref = [p.data.copy() for p in params]
    bufs = [None, None]
    for step_grads in grads_for(rng, params, 3):
        for i, (p, g) in enumerate(zip(params, step_grads)):
            p.grad = g
            d = g + wd * ref[i]
            bufs[i] = d if bufs[i] is None else mu * bufs[i] + d
            upd = d + mu * bufs[i] if nesterov else bufs[i]
            ref[i] = ref[i] - lr * upd
        opt.step()
        for p, r in zip(params, ref):
            np.testing.assert_allclose(p.data, r, rtol=1e-13, atol=1e-15)


def test_plain_sgd_has_no_state():
    rng = np.random.default_rng(1)
    (p,) = make_params(rng, [(4,)])
    start = p.data.copy()
    g = rng.standard_normal(4)
    p.grad = g
    opt = SGD([p], lr=0.5)
    opt.step()
    np.testing.assert_allclose(p.data, start - 0.5 * g, rtol=1e-14)
    assert opt.state == {}


def test_adamw_groups_match_formula():
    rng = np.random.default_rng(2)
    decayed = make_params(rng, [(4, 3)])
    kept = make_params(rng, [(2, 4, 3)])
    lr, b1, b2, eps = 1e-2, 0.8, 0.95, 1e-6
    opt = AdamW([{"params": decayed, "weight_decay": 0.1}, {"params": kept, "weight_decay": 0.0, "lr": 2e-2}],
                lr=lr, betas=(b1, b2), eps=eps)
    params = decayed + kept
    settings = [(lr, 0.1), (2e-2, 0.0)]
    ref = [p.data.copy() for p in params]
    m = [np.zeros(p.shape) for p in params]
    v = [np.zeros(p.shape) for p in params]
    for t, step_grads in enumerate(grads_for(rng, params, 3), start=1):
        for i, (p, g) in enumerate(zip(params, step_grads)):
            p.grad = g
            plr, wd = settings[i]
            ref[i] = ref[i] * (1 - plr * wd)
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            mhat, vhat = m[i] / (1 - b1 ** t), v[i] / (1 - b2 ** t)
            ref[i] = ref[i] - plr * mhat / (np.sqrt(vhat) + eps)
        opt.step()
        for p, r in zip(params, ref):
            np.testing.assert_allclose(p.data, r, rtol=1e-12, atol=1e-14)
    assert opt.state[id(kept[0])]["step"] == 3


def test_low_precision_params_keep_float32_state():
    rng = np.random.default_rng(3)
    p16 = Parameter(rng.standard_normal((8,)).astype(bfloat16))
    p32 = Parameter(rng.standard_normal((8,)).astype(np.float32))
    opt = AdamW([p16, p32], lr=0.1)
    p16.grad = np.ones(8, dtype=bfloat16)
    p32.grad = np.ones(8, dtype=np.float32)
    start = p16.data.astype(np.float32)
    opt.step()
    assert p16.dtype == bfloat16 and p32.dtype == np.float32
    for p in (p16, p32):
        st = opt.state[id(p)]
        assert st["exp_avg"].dtype == np.float32 and st["exp_avg_sq"].dtype == np.float32
    want = (start * (1 - 0.1 * 0.01) - 0.1).astype(bfloat16)
    np.testing.assert_array_equal(p16.data, want)


def test_param_groups_no_decay_splits_by_name_and_owner():
    class Net(Module):
        def __init__(self):
            super().__init__()
            self.ln = RMSNorm(6)
            self.ffn = FeedForward(6, 12, kind="swimglu", n_masks=2, rng=0)
            self.bias = Parameter(np.zeros(6, dtype=np.float32))

    groups = param_groups_no_decay(Net(), weight_decay=0.1)
    assert groups[0]["names"] == ["ffn.up.W", "ffn.down.weight"] and groups[0]["weight_decay"] == 0.1
    assert groups[1]["names"] == ["bias", "ln.weight", "ffn.up.mask_logits"]
    assert groups[1]["weight_decay"] == 0.0
    opt = AdamW(groups, lr=1e-3)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    only = param_groups_no_decay(Net(), 0.1, no_decay=("ln",))
    assert only[1]["names"] == ["ln.weight"]
    with pytest.raises(ValueError, match="weight_decay"):
        param_groups_no_decay(Net(), -0.1)
    with pytest.raises(ValueError, match="no_decay"):
        param_groups_no_decay(Net(), 0.1, no_decay=("",))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda ps: SGD(ps, lr=float("nan")), "lr"),
        (lambda ps: SGD(ps, lr=-1.0), "lr"),
        (lambda ps: SGD(ps, lr="fast"), "lr"),
        (lambda ps: SGD(ps, lr=0.1, momentum=1.0), "momentum"),
        (lambda ps: SGD(ps, lr=0.1, momentum=-0.1), "momentum"),
        (lambda ps: SGD(ps, lr=0.1, weight_decay=float("inf")), "weight_decay"),
        (lambda ps: SGD(ps, lr=0.1, nesterov=True), "nesterov"),
        (lambda ps: SGD(ps, lr=0.1, momentum=0.9, nesterov="yes"), "nesterov"),
        (lambda ps: AdamW(ps, lr=float("inf")), "lr"),
        (lambda ps: AdamW(ps, betas=(1.0, 0.9)), r"betas\[0\]"),
        (lambda ps: AdamW(ps, betas=(0.9, float("nan"))), r"betas\[1\]"),
        (lambda ps: AdamW(ps, betas=(0.9,)), "betas"),
        (lambda ps: AdamW(ps, eps=0.0), "eps"),
        (lambda ps: AdamW(ps, weight_decay=-0.01), "weight_decay"),
        (lambda ps: AdamW([{"params": ps, "weight_decy": 0.1}]), "weight_decy"),
        (lambda ps: AdamW([{"params": ps, "lr": -1}]), "lr"),
        (lambda ps: AdamW([{"lr": 0.1}]), "params"),
        (lambda ps: AdamW([]), "empty"),
        (lambda ps: AdamW(ps + ps[:1]), "more than once"),
        (lambda ps: AdamW([Parameter(np.zeros(2), requires_grad=False)]), "gradient"),
        (lambda ps: AdamW([np.zeros(2)]), "Parameter"),
    ],
)
def test_constructor_validation(make, match):
    ps = make_params(np.random.default_rng(4), [(2,), (3,)])
    with pytest.raises((ValueError, TypeError), match=match):
        make(ps)


def test_set_lr_and_hyperparameters_validated():
    ps = make_params(np.random.default_rng(5), [(2,), (3,)])
    opt = AdamW([{"params": ps[:1]}, {"params": ps[1:]}], lr=0.1)
    for bad in (float("nan"), -0.5, float("inf")):
        with pytest.raises(ValueError, match="lr"):
            opt.set_lr(bad)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.1]
    opt.set_lr(0.05, group=1)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.05]
    with pytest.raises(ValueError, match="group"):
        opt.set_lr(0.05, group=2)
    with pytest.raises(ValueError, match="betas"):
        opt.set_hyperparameter("betas", (0.9, 1.5))
    opt.set_hyperparameter("weight_decay", 0.2)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.2, 0.2]
    sgd = SGD(ps, lr=0.1, momentum=0.9, nesterov=True)
    with pytest.raises(ValueError, match="nesterov"):
        sgd.set_hyperparameter("momentum", 0.0)
    assert sgd.param_groups[0]["momentum"] == 0.9


@pytest.mark.parametrize("opt_cls", [SGD, AdamW])
def test_failed_step_changes_nothing(opt_cls):
    rng = np.random.default_rng(6)
    ps = make_params(rng, [(3,), (4, 2), (5,)], dtype=np.float32)
    opt = opt_cls(ps, lr=0.1, momentum=0.9) if opt_cls is SGD else opt_cls(ps, lr=0.1)
    for p in ps:
        p.grad = rng.standard_normal(p.shape).astype(np.float32)
    opt.step()
    data = [p.data.copy() for p in ps]
    state = {k: {n: (v.copy() if hasattr(v, "copy") else v) for n, v in st.items()} for k, st in opt.state.items()}
    versions = [p.version for p in ps]
    ps[1].grad = np.ones((2, 4), dtype=np.float32)   # wrong shape
    ps[2].grad = np.ones(5, dtype=np.float64)        # wrong dtype
    with pytest.raises(ValueError) as info:
        opt.step()
    assert "(2, 4)" in str(info.value) and "float64" in str(info.value) and "group 0 param 2" in str(info.value)
    for p, d, v in zip(ps, data, versions):
        np.testing.assert_array_equal(p.data, d)
        assert p.version == v
    for k, st in opt.state.items():
        for n, v in st.items():
            np.testing.assert_array_equal(v, state[k][n])


def test_params_without_grad_are_skipped():
    rng = np.random.default_rng(7)
    a, b = make_params(rng, [(3,), (3,)])
    start_b = b.data.copy()
    a.grad = np.ones(3)
    opt = AdamW([a, b], lr=0.1)
    opt.step()
    np.testing.assert_array_equal(b.data, start_b)
    assert id(b) not in opt.state
    opt.zero_grad()
    assert a.grad is None


def _train(opt, params, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g
        opt.step()


@pytest.mark.parametrize("opt_cls", [SGD, AdamW])
def test_state_dict_round_trip_continues_identically(opt_cls):
    rng = np.random.default_rng(8)
    kw = {"lr": 0.05, "momentum": 0.9} if opt_cls is SGD else {"lr": 0.05}
    ps = make_params(rng, [(3, 2), (4,)])
    twin = [Parameter(p.data.copy()) for p in ps]
    grads = grads_for(rng, ps, 5)
    opt = opt_cls(ps, **kw)
    _train(opt, ps, grads[:2])
    other = opt_cls(twin, **dict(kw, lr=0.5))
    for p, q in zip(ps, twin):
        q.data = p.data.copy()
    other.load_state_dict(opt.state_dict())
    assert other.param_groups[0]["lr"] == 0.05
    _train(opt, ps, grads[2:])
    _train(other, twin, grads[2:])
    for p, q in zip(ps, twin):
        np.testing.assert_array_equal(p.data, q.data)


def test_bad_optimizer_state_is_rejected_without_change():
    rng = np.random.default_rng(9)
    ps = make_params(rng, [(3,), (2,)])
    opt = AdamW(ps, lr=0.1)
    _train(opt, ps, grads_for(rng, ps, 1))
    good = opt.state_dict()
    before = {k: {n: np.array(v, copy=True) for n, v in st.items()} for k, st in opt.state.items()}
    bad = {"state": {0: dict(good["state"][0]), 1: dict(good["state"][1])},
           "param_groups": [dict(good["param_groups"][0], lr=float("nan"))]}
    bad["state"][1]["exp_avg"] = np.zeros(5)
    bad["state"][0]["step"] = -1
    with pytest.raises(ValueError) as info:
        opt.load_state_dict(bad)
    msg = str(info.value)
    assert "lr" in msg and "exp_avg" in msg and "step" in msg
    with pytest.raises(ValueError, match="param groups"):
        opt.load_state_dict({"state": {}, "param_groups": []})
    with pytest.raises(ValueError, match="keys"):
        SGD(ps, lr=0.1, momentum=0.5).load_state_dict(good)
    assert opt.param_groups[0]["lr"] == 0.1
    for k, st in opt.state.items():
        for n, v in st.items():
            np.testing.assert_array_equal(v, before[k][n])


def test_clip_grad_norm():
    rng = np.random.default_rng(10)
    ps = make_params(rng, [(3, 4), (5,), (2,)], dtype=np.float32)
    grads = [rng.standard_normal(p.shape).astype(np.float32) * 3 for p in ps[:2]]
    for p, g in zip(ps, grads):
        p.grad = g
    held = ps[0].grad
    want = math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads))
    total = clip_grad_norm(ps, max_norm=1.0)
    assert float(total) == pytest.approx(want, rel=1e-5)
    after = math.sqrt(sum(float((p.grad.astype(np.float64) ** 2).sum()) for p in ps[:2]))
    assert after == pytest.approx(1.0, rel=1e-4)
    np.testing.assert_allclose(ps[1].grad, grads[1] / (want + 1e-6), rtol=1e-5)
    np.testing.assert_array_equal(held, grads[0])  # the caller's array was not written through
    assert ps[2].grad is None
    small = [g.copy() for g in (ps[0].grad, ps[1].grad)]
    total = clip_grad_norm(ps, max_norm=10.0)
    assert float(total) == pytest.approx(1.0, rel=1e-4)
    np.testing.assert_allclose(ps[0].grad, small[0], rtol=1e-6)
    for bad in (float("nan"), float("inf"), 0.0, -1.0):
        with pytest.raises(ValueError, match="max_norm"):
            clip_grad_norm(ps, bad)


def test_warmup_cosine_values():
    ps = make_params(np.random.default_rng(11), [(2,), (2,)])
    opt = AdamW([{"params": ps[:1], "lr": 1.0}, {"params": ps[1:], "lr": 0.5}])
    sched = WarmupCosine(opt, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    assert [g["lr"] for g in opt.param_groups] == [0.25, 0.125]  # step 0 set at construction
    expect = {0: 0.25, 3: 1.0, 4: 1.0, 9: 0.1 + 0.9 * 0.5, 14: 0.1, 20: 0.1}
    for step, f in expect.items():
        assert sched.factor(step) == pytest.approx(f, rel=1e-12)
        assert sched.lr_at(step) == pytest.approx([f, 0.5 * f], rel=1e-12)
    for _ in range(9):
        sched.step()
    assert sched.last_step == 9
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.55, 0.275], rel=1e-12)
    lrs = [sched.factor(s) for s in range(4, 15)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    restored = WarmupCosine(opt, 4, 14)
    restored.base_lrs = [9.0, 9.0]
    restored.load_state_dict(sched.state_dict())
    assert restored.get_last_lr() == pytest.approx([0.55, 0.275])
    assert WarmupCosine(SGD(ps, lr=2.0), 0, 10, 0.0).factor(0) == 1.0


@pytest.mark.parametrize(
    "kwargs, match",
    [({"warmup_steps": -1, "total_steps": 10}, "warmup_steps"),
     ({"warmup_steps": 11, "total_steps": 10}, "warmup_steps"),
     ({"warmup_steps": 1, "total_steps": 0}, "total_steps"),
     ({"warmup_steps": 1, "total_steps": 2.5}, "total_steps"),
     ({"warmup_steps": 1, "total_steps": 10, "min_lr_ratio": 1.5}, "min_lr_ratio"),
     ({"warmup_steps": 1, "total_steps": 10, "min_lr_ratio": float("nan")}, "min_lr_ratio")],
)
def test_warmup_cosine_validation(kwargs, match):
    opt = SGD(make_params(np.random.default_rng(12), [(2,)]), lr=0.1)
    with pytest.raises(ValueError, match=match):
        WarmupCosine(opt, **kwargs)
    with pytest.raises(TypeError, match="optimizer"):
        WarmupCosine(object(), 1, 2)


def test_adamw_on_cupy_matches_numpy(xp):
    rng = np.random.default_rng(13)
    host = make_params(rng, [(6, 5), (7,)], dtype=np.float32)
    dev = [Parameter(xp.asarray(p.data)) for p in host]
    grads = grads_for(rng, host, 3)
    opt_h, opt_d = AdamW(host, lr=0.01), AdamW(dev, lr=0.01)
    for step_grads in grads:
        for p, q, g in zip(host, dev, step_grads):
            p.grad, q.grad = g, xp.asarray(g)
        clip_grad_norm(host, 1.0)
        clip_grad_norm(dev, 1.0)
        opt_h.step()
        opt_d.step()
    for p, q in zip(host, dev):
        got = q.data.get() if hasattr(q.data, "get") else q.data
        np.testing.assert_allclose(got, p.data, rtol=1e-5, atol=1e-6)
    assert type(opt_d.state[id(dev[0])]["exp_avg"]) is type(dev[0].data)


def test_read_only_parameter_array_is_replaced_not_written():
    raw = np.arange(4, dtype=np.float32)
    frozen = np.frombuffer(raw.tobytes(), dtype=np.float32)
    assert not frozen.flags.writeable
    p = Parameter(frozen)
    p.grad = np.ones(4, dtype=np.float32)
    SGD([p], lr=0.5).step()
    np.testing.assert_array_equal(p.data, raw - 0.5)
    np.testing.assert_array_equal(frozen, raw)


@pytest.mark.parametrize("make", [
    lambda layer: AdamW(layer.parameters(), lr=0.1, weight_decay=0.5),
    lambda layer: SGD(layer.parameters(), lr=0.1, weight_decay=0.5),
])
def test_mask_logits_and_norm_weights_are_not_decayed_by_default(make):
    from pymglu.nn import SwiMGLU

    layer = SwiMGLU(8, 6, n_masks=2, rng=0)
    norm = RMSNorm(8)
    for p in list(layer.parameters()) + list(norm.parameters()):
        p.grad = np.zeros_like(p.data)
    W0, L0 = layer.W.data.copy(), layer.mask_logits.data.copy()
    make(layer).step()
    assert np.allclose(layer.W.data, W0 * (1 - 0.1 * 0.5))
    np.testing.assert_array_equal(layer.mask_logits.data, L0)
    assert layer.mask_logits.decay is False and norm.weight.decay is False
    layer.mask_logits.decay = True  # the documented opt-in
    make(layer).step()
    assert np.allclose(layer.mask_logits.data, L0 * (1 - 0.1 * 0.5))


@pytest.mark.parametrize("group", [2, -1, True, "0"])
def test_set_hyperparameter_checks_the_group_index(group):
    p = Parameter(np.ones(3))
    opt = AdamW([{"params": [p]}, {"params": [Parameter(np.ones(2))]}], lr=0.1)
    with pytest.raises(ValueError, match=r"group: expected an index in \[0, 2\)"):
        opt.set_hyperparameter("eps", 1e-6, group=group)
    with pytest.raises(ValueError, match="group: expected an index"):
        opt.set_lr(0.5, group=group)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.1]


# ---------------------------------------------------------------------------------- fp32 master weights
_MASTER_OPTS = [
    pytest.param(lambda ps: AdamW(ps, lr=0.05, weight_decay=0.1), id="adamw"),
    pytest.param(lambda ps: SGD(ps, lr=0.05, momentum=0.9), id="sgd-momentum"),
    pytest.param(lambda ps: SGD(ps, lr=0.05), id="sgd"),
]


@pytest.mark.parametrize("dtype", [bfloat16, np.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("make", _MASTER_OPTS)
@pytest.mark.parametrize("order", ["module-first", "optimizer-first"])
def test_master_weight_state_round_trip_continues_identically(make, dtype, order):
    rng = np.random.default_rng(20)
    ps = make_params(rng, [(3, 2), (4,)], dtype=dtype)
    grads = grads_for(rng, ps, 6)
    opt = make(ps)
    _train(opt, ps, grads[:3])
    sd = opt.state_dict()
    assert all(sd["state"][i]["master"].dtype == np.float32 for i in (0, 1))
    twin = [Parameter(np.zeros(p.shape, dtype=dtype)) for p in ps]
    other = make(twin)
    _train(other, twin, grads[:1])  # state of its own, overwritten by the load
    if order == "module-first":
        for p, q in zip(ps, twin):
            q.data = p.data.copy()
        other.load_state_dict(sd)
    else:
        other.load_state_dict(sd)
        for p, q in zip(ps, twin):
            q.data = p.data.copy()
    _train(opt, ps, grads[3:])
    _train(other, twin, grads[3:])
    for p, q in zip(ps, twin):
        assert p.data.tobytes() == q.data.tobytes()
        assert opt.state[id(p)]["master"].tobytes() == other.state[id(q)]["master"].tobytes()


def test_loaded_master_yields_to_parameters_it_does_not_round_to():
    rng = np.random.default_rng(21)
    (p,) = make_params(rng, [(6,)], dtype=bfloat16)
    opt = SGD([p], lr=1e-3)
    _train(opt, [p], grads_for(rng, [p], 2))
    foreign = {"state": {0: {"step": 5, "master": np.full(6, 9.0, dtype=np.float32)}},
               "param_groups": opt.state_dict()["param_groups"]}
    foreign["state"][0]["master"][0] = float(p.data[0].astype(np.float32)) + 1e-4  # rounds to p[0]
    kept = p.data.copy()
    opt.load_state_dict(foreign)
    p.grad = np.zeros(6, dtype=bfloat16)
    opt.step()
    master = opt.state[id(p)]["master"]
    assert master[0] == foreign["state"][0]["master"][0]              # agrees with p: kept, bits and all
    np.testing.assert_array_equal(master[1:], kept[1:].astype(np.float32))  # disagrees: p wins
    np.testing.assert_array_equal(p.data, kept)


def test_master_weight_state_is_validated():
    rng = np.random.default_rng(22)
    low = make_params(rng, [(3,)], dtype=bfloat16)
    full = make_params(rng, [(2,)], dtype=np.float32)
    opt = AdamW(low + full, lr=0.1)
    _train(opt, low + full, grads_for(rng, low + full, 1))
    good = opt.state_dict()
    before = {k: {n: np.array(v, copy=True) for n, v in st.items()} for k, st in opt.state.items()}

    def variant(idx, **changes):
        state = {i: dict(st) for i, st in good["state"].items()}
        state[idx].update(changes)
        for k, v in changes.items():
            if v is None:
                del state[idx][k]
        return {"state": state, "param_groups": good["param_groups"]}

    cases = [
        (variant(0, master=None), r"state entry 0: expected keys \['exp_avg', 'exp_avg_sq', 'master', 'step'\]"),
        (variant(0, master=np.zeros(3, dtype=bfloat16)), r"state entry 0 'master': expected float32 of shape \(3,\)"),
        (variant(0, master=np.zeros(4, dtype=np.float32)), r"state entry 0 'master': expected float32"),
        (variant(1, master=np.zeros(2, dtype=np.float32)), r"state entry 1: expected keys .* float32 parameter"),
    ]
    for bad, match in cases:
        with pytest.raises(ValueError, match=match):
            opt.load_state_dict(bad)
    with pytest.raises(ValueError, match=r"master_weights=False"):
        AdamW(low + full, lr=0.1, master_weights=False).load_state_dict(good)
    for k, st in opt.state.items():
        for n, v in st.items():
            np.testing.assert_array_equal(v, before[k][n])


def test_master_weights_survive_a_checkpoint(tmp_path):
    from pymglu import load_checkpoint, save_checkpoint
    from pymglu.nn import SwiMGLU

    def run(model, opt, xs):
        for x in xs:
            opt.zero_grad()
            y = model(x)
            (y * y).mean().backward()
            opt.step()

    rng = np.random.default_rng(23)
    xs = [rng.standard_normal((4, 8)).astype(bfloat16) for _ in range(5)]
    model = SwiMGLU(8, 12, n_masks=2, dtype=bfloat16, rng=0)
    opt = AdamW(model, lr=1e-3)
    run(model, opt, xs[:3])
    save_checkpoint(tmp_path / "ckpt.safetensors", model, optimizer=opt)
    fresh = SwiMGLU(8, 12, n_masks=2, dtype=bfloat16, rng=1)
    fresh_opt = AdamW(fresh, lr=1e-3)
    load_checkpoint(tmp_path / "ckpt.safetensors", fresh, optimizer=fresh_opt)
    assert fresh_opt.state[id(fresh.W)]["master"].dtype == np.float32
    assert "master" not in fresh_opt.state[id(fresh.mask_logits)]  # float32 logits need none
    run(model, opt, xs[3:])
    run(fresh, fresh_opt, xs[3:])
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert p.data.tobytes() == q.data.tobytes()
    assert opt.state[id(model.W)]["master"].tobytes() == fresh_opt.state[id(fresh.W)]["master"].tobytes()
