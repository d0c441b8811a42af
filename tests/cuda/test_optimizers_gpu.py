"""The one-kernel optimizer updates (pymglu.cuda.optimizers) against the array-expression path and float64.

Every check starts from fresh random parameters, gradients and state (never zeros), runs the same
steps on two copies, once through the kernels and once with :func:`pymglu.cuda.optimizers.disabled`,
and compares every array. The kernel rounds each operation alone in the expression path's order, so
float32 arrays must agree to the last bit or nearly; a float64 NumPy run of the documented formula
bounds both. Bit-planes are poisoned before the kernel writes them.
"""
import numpy as np
import pytest

from pymglu import masks as mask_ops
from pymglu.backend import gpu_available
from pymglu.dtypes import bfloat16, float16, float32
from pymglu.nn import FeedForward, Parameter, SwiMGLU
from pymglu.optim import SGD, AdamW

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a usable CUDA device"),
]

DTYPES = [float32, float16, bfloat16]
IDS = ["fp32", "fp16", "bf16"]
#: one unit in the last place of each dtype near 1, relative
ULP = {np.dtype(float32): 2.0 ** -23, np.dtype(float16): 2.0 ** -10, np.dtype(bfloat16): 2.0 ** -7}
POISON = np.uint32(0xA5A5A5A5)


def host(a):
    import cupy as cp

    return cp.asnumpy(a).astype(np.float64)


def make_params(rng, shapes, dtype, grad_dtype):
    import cupy as cp

    params = []
    for shape in shapes:
        p = Parameter(cp.asarray(rng.standard_normal(shape).astype(dtype)))
        p.grad = cp.asarray((rng.standard_normal(shape) * 0.1).astype(grad_dtype))
        params.append(p)
    return params


def clone(params):
    import cupy as cp

    out = []
    for p in params:
        q = Parameter(cp.array(p.data, copy=True), decay=p.decay)
        q.grad = cp.array(p.grad, copy=True)
        q.wants_sign_bits = p.wants_sign_bits
        out.append(q)
    return out


def run(opt_factory, params, steps, fused, rng_grads):
    from pymglu.cuda import optimizers

    opt = opt_factory(params)
    for k in range(steps):
        if fused:
            opt.step()
        else:
            with optimizers.disabled():
                opt.step()
        for p, g in zip(params, rng_grads[k]):
            p.grad = g.copy()
    return opt


def compare(opt_a, params_a, opt_b, params_b, dtype):
    """Parameters within one unit of their dtype (rounding of float32 values that agree), float32 state
    within a few float32 units."""
    for pa, pb in zip(params_a, params_b):
        a, b = host(pa.data), host(pb.data)
        scale = np.maximum(np.abs(b), 1e-3)
        assert np.max(np.abs(a - b) / scale) <= 1.01 * ULP[np.dtype(dtype)], "parameter differs"
        sa, sb = opt_a.state.get(id(pa), {}), opt_b.state.get(id(pb), {})  # plain SGD keeps none
        assert sorted(sa) == sorted(sb)
        for key in sa:
            if key == "step":
                assert sa[key] == sb[key]
                continue
            x, y = host(sa[key]), host(sb[key])
            assert np.max(np.abs(x - y) / np.maximum(np.abs(y), 1e-6)) <= 4 * ULP[np.dtype(float32)], key


def grads_for(rng, params, steps, grad_dtype):
    import cupy as cp

    return [[cp.asarray((rng.standard_normal(p.shape) * 0.1).astype(grad_dtype)) for p in params]
            for _ in range(steps)]


SHAPES = [(33, 70), (5, 7, 40), (257,)]


#: (parameter dtype, gradient dtype): each dtype with its own gradients and float32 ones, and float32
#: parameters with 16-bit gradients (the mask logits of a 16-bit MGLU layer on the GPU)
DTYPE_PAIRS = [(dt, gdt) for dt in DTYPES for gdt in dict.fromkeys((dt, float32))] + [
    (float32, float16), (float32, bfloat16)]
PAIR_IDS = [f"{np.dtype(p).name}-grad-{np.dtype(g).name}" for p, g in DTYPE_PAIRS]


@pytest.mark.parametrize("dtype, grad_dtype", DTYPE_PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("master", [True, False], ids=["master", "no-master"])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adamw_kernel_matches_the_expression_path(dtype, grad_dtype, master, wd):
    rng = np.random.default_rng(1)
    params = make_params(rng, SHAPES, dtype, grad_dtype)
    twins = clone(params)
    start = host(params[0].data)
    grads = grads_for(rng, params, 3, grad_dtype)

    def factory(ps):
        return AdamW(ps, lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=wd, master_weights=master)

    opt_a = run(factory, params, 3, True, grads)
    opt_b = run(factory, twins, 3, False, grads)
    compare(opt_a, params, opt_b, twins, dtype)
    assert np.abs(host(params[0].data) - start).max() > 0.05  # the steps did move the parameter


@pytest.mark.parametrize("dtype, grad_dtype", DTYPE_PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("momentum, nesterov", [(0.0, False), (0.9, False), (0.9, True)])
@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_sgd_kernel_matches_the_expression_path(dtype, grad_dtype, momentum, nesterov, wd):
    rng = np.random.default_rng(2)
    params = make_params(rng, SHAPES, dtype, grad_dtype)
    twins = clone(params)
    grads = grads_for(rng, params, 3, grad_dtype)

    def factory(ps):
        return SGD(ps, lr=0.05, momentum=momentum, nesterov=nesterov, weight_decay=wd)

    opt_a = run(factory, params, 3, True, grads)
    opt_b = run(factory, twins, 3, False, grads)
    compare(opt_a, params, opt_b, twins, dtype)


def test_adamw_kernel_follows_the_float64_formula():
    """Three steps of a float32 parameter against AdamW written out in float64 on the host."""
    import cupy as cp

    rng = np.random.default_rng(3)
    p0 = rng.standard_normal((64, 129)).astype(np.float32)
    gs = [(rng.standard_normal(p0.shape) * 0.1).astype(np.float32) for _ in range(3)]
    p = Parameter(cp.asarray(p0))
    opt = AdamW([p], lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    ref, m, v = p0.astype(np.float64), np.zeros(p0.shape), np.zeros(p0.shape)
    for t, g in enumerate(gs, start=1):
        p.grad = cp.asarray(g)
        opt.step()
        m = 0.9 * m + 0.1 * g
        v = 0.99 * v + 0.01 * g.astype(np.float64) ** 2
        ref = ref * (1 - 1e-2 * 0.1) - 1e-2 * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.99 ** t)) + 1e-8)
    err = np.linalg.norm(host(p.data) - ref) / np.linalg.norm(ref)
    assert err < 1e-6


@pytest.mark.parametrize("d", [1, 31, 32, 33, 70, 96])
@pytest.mark.parametrize("kind", ["adamw", "sgd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("narrow_grad", [False, True], ids=["grad-fp32", "grad-16bit"])
def test_sign_bits_are_the_packed_new_values(d, kind, dtype, narrow_grad):
    """16-bit gradients: float32 logits of a bfloat16 MGLU layer get bfloat16 ones from the GPU path."""
    import cupy as cp

    from pymglu.cuda import optimizers

    rng = np.random.default_rng(d)
    shape = (3, 5, d)
    grad_dtype = (bfloat16 if dtype == float32 else dtype) if narrow_grad else float32
    param = cp.asarray(rng.standard_normal(shape).astype(dtype))
    grad = cp.asarray(rng.standard_normal(shape).astype(grad_dtype))
    bits = optimizers.new_sign_bits(param)
    bits.fill(POISON)
    if kind == "adamw":
        m = cp.asarray(rng.standard_normal(shape).astype(np.float32))
        v = cp.asarray(rng.random(shape).astype(np.float32))
        master = cp.asarray(param, dtype=np.float32) if dtype != float32 else None
        optimizers.adamw_step(param, grad, master, m, v, lr=0.5, beta1=0.9, beta2=0.99, eps=1e-8,
                              weight_decay=0.0, step=2, sign_bits=bits)
    else:
        optimizers.sgd_step(param, grad, None, None, lr=1.0, momentum=0.0, weight_decay=0.0, nesterov=False,
                            first_step=True, sign_bits=bits)
    want = mask_ops.pack_masks(param)
    assert bits.shape == want.shape == (3, 5, -(-d // 32))
    assert bool(cp.all(bits == want))
    assert 0.2 < float((cp.asarray(param, dtype=np.float32) > 0).mean()) < 0.8  # both signs present


def test_bad_sign_bits_are_refused_before_any_write():
    import cupy as cp

    from pymglu.cuda import optimizers

    param = cp.ones((4, 40), dtype=np.float32)
    grad, m, v = cp.ones_like(param), cp.zeros_like(param), cp.ones_like(param)
    before = param.copy()
    with pytest.raises(ValueError, match=r"sign_bits: expected .*\(4, 2\)"):
        optimizers.adamw_step(param, grad, None, m, v, lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0,
                              step=1, sign_bits=cp.zeros((4, 1), dtype=np.uint32))
    assert bool(cp.all(param == before)) and bool(cp.all(m == 0))


def test_float64_parameters_take_the_expression_path():
    import cupy as cp

    from pymglu.cuda import optimizers

    p = Parameter(cp.ones((8, 8), dtype=np.float64))
    assert not optimizers.supports(p.data, p.data)
    p.grad = cp.full((8, 8), 0.5)
    AdamW([p], lr=0.1).step()
    assert float(p.data[0, 0]) < 1.0


def test_mglu_layer_takes_the_bits_the_optimizer_wrote(monkeypatch):
    """After a fused step the training forward reads the optimizer's bit-planes (no pack), and they
    equal the packed new logits; after an in-place edit marked with mark_modified it packs again."""
    import cupy as cp

    from pymglu.autograd import Tensor, ops

    rng = np.random.default_rng(4)
    layer = SwiMGLU(40, 24, n_masks=3, dtype=bfloat16, rng=5).to("cuda")
    assert layer.mask_logits.wants_sign_bits
    x = Tensor(cp.asarray(rng.standard_normal((6, 40)).astype(bfloat16)))
    opt = AdamW(layer.parameters(), lr=5e-3)
    layer(x).sum().backward()
    opt.step()
    offered = layer.mask_logits.sign_bits()
    assert offered is not None
    assert bool(cp.all(offered == mask_ops.pack_masks(layer.mask_logits.data)))

    def refuse(*a, **k):
        raise AssertionError("pack_masks called although the optimizer wrote the bit-planes")

    monkeypatch.setattr(mask_ops, "pack_masks", refuse)
    y = layer(x)
    assert layer.packed_masks is offered
    monkeypatch.undo()
    want = ops.mglu(x, layer.W, layer.mask_logits, activation=layer.activation)  # packs the logits itself
    assert bool(cp.all(want.data == y.data))

    layer.mask_logits.data[0] *= -1.0
    layer.mask_logits.mark_modified()
    assert layer.mask_logits.sign_bits() is None
    assert bool(cp.all(layer._current_packed() == mask_ops.pack_masks(layer.mask_logits.data)))


def test_training_a_block_with_fused_and_unfused_steps_agrees():
    """Five AdamW steps of a bfloat16 SwiMGLU block, kernels against the expression path (fresh pack
    each forward): the losses agree to float32 rounding of the same bits."""
    import cupy as cp

    from pymglu.autograd import Tensor
    from pymglu.cuda import optimizers

    rng = np.random.default_rng(6)
    xs = [cp.asarray(rng.standard_normal((16, 48)).astype(bfloat16)) for _ in range(5)]
    losses = {}
    for fused in (True, False):
        block = FeedForward(48, 64, kind="swimglu", n_masks=2, dtype=bfloat16, rng=7).to("cuda")
        opt = AdamW(block.parameters(), lr=1e-2)
        out = []
        for x in xs:
            y = block(Tensor(x))
            loss = (y * y).mean()
            opt.zero_grad()
            loss.backward()
            if fused:
                opt.step()
            else:
                with optimizers.disabled():
                    opt.step()
            out.append(float(loss.data))
        losses[fused] = out
    assert np.allclose(losses[True], losses[False], rtol=1e-2, atol=0)
    assert losses[True][-1] < losses[True][0]


@pytest.mark.parametrize("max_norm", [0.5, 1e6], ids=["clipped", "unclipped"])
def test_clip_grad_norm_over_mixed_dtypes_matches_float64(max_norm, monkeypatch):
    import cupy as cp

    from pymglu.cuda import optimizers
    from pymglu.optim import clip_grad_norm

    calls = []
    real = optimizers.clip_grads
    monkeypatch.setattr(optimizers, "clip_grads", lambda *a, **k: calls.append(1) or real(*a, **k))
    rng = np.random.default_rng(8)
    shapes_dtypes = [((33, 70), bfloat16), ((3, 5, 41), float32), ((7,), float16), ((4096, 3), bfloat16)]
    params, originals = [], []
    for shape, dt in shapes_dtypes:
        p = Parameter(cp.zeros(shape, dtype=dt))
        g = cp.asarray((rng.standard_normal(shape) * 0.1).astype(dt))
        p.grad = g
        params.append(p)
        originals.append(g)
    kept = [host(g) for g in originals]
    total = clip_grad_norm(params, max_norm)
    assert calls == [1]
    want = np.sqrt(sum(float((k * k).sum()) for k in kept))
    assert abs(float(total) - want) / want < 1e-5
    scale = min(1.0, max_norm / (want + 1e-6))
    for p, g, k, (_, dt) in zip(params, originals, kept, shapes_dtypes):
        assert p.grad is not g and p.grad.dtype == dt
        np.testing.assert_array_equal(host(g), k)  # the caller's arrays are not written through
        err = np.abs(host(p.grad) - k * scale).max() / (np.abs(k).max() * scale)
        assert err <= ULP[np.dtype(dt)]


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_step_scalars_in_device_memory_replace_the_arguments(kind):
    """With ``step_scalars`` the kernels take learning rate, bias corrections and decay from the device
    array (what a captured step replays with new values): wrong arguments, right table, right result."""
    import cupy as cp

    from pymglu.cuda import optimizers

    rng = np.random.default_rng(11)
    shape = (37, 70)
    start = cp.asarray(rng.standard_normal(shape).astype(np.float32))
    results = []
    for args, table in (("right", None), ("wrong", "right")):
        param = start.copy()
        grad = cp.asarray(np.random.default_rng(12).standard_normal(shape).astype(np.float32))
        state = [cp.asarray(np.random.default_rng(13).random(shape).astype(np.float32)) for _ in range(2)]
        lr, step = (3e-3, 7) if args == "right" else (0.9, 1)
        if kind == "adamw":
            scalars = optimizers.adamw_scalars(lr=3e-3, beta1=0.9, beta2=0.99, weight_decay=0.1, step=7)
            optimizers.adamw_step(param, grad, None, state[0], state[1], lr=lr, beta1=0.9, beta2=0.99, eps=1e-8,
                                  weight_decay=0.1, step=step, step_scalars=cp.asarray(scalars) if table else None)
        else:
            scalars = optimizers.sgd_scalars(lr=3e-3)
            optimizers.sgd_step(param, grad, None, state[0], lr=lr, momentum=0.9, weight_decay=0.1, nesterov=False,
                                first_step=False, step_scalars=cp.asarray(scalars) if table else None)
        results.append(param)
    assert not bool(cp.all(results[0] == start))
    assert bool(cp.all(results[0] == results[1]))
    with pytest.raises(ValueError, match=r"step_scalars: expected .*float32 CuPy array of shape \(4,\)"):
        optimizers.adamw_step(param, grad, None, state[0], state[1], lr=lr, beta1=0.9, beta2=0.99, eps=1e-8,
                              weight_decay=0.1, step=1, step_scalars=cp.zeros(3, dtype=np.float32))
