"""The MatMul tape op's cuBLAS path for float32/float16/bfloat16 CuPy operands (gpu-marked).

Fresh random operands rounded to the dtype; the forward and both gradients are compared by relative
error with float64 NumPy products of the same rounded values, for every layout the path handles:
``b`` C-contiguous or a transposed view (a ``Linear`` weight), ``a`` 2-d, a transposed view, or with
leading dims. A spy on :func:`pymglu.cuda.gemm.gemm` checks that the path ran.
"""
import numpy as np
import pytest

from pymglu.autograd import Tensor, ops
from pymglu.backend import gpu_available
from pymglu.dtypes import bfloat16, float16, float32

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a usable CUDA device"),
]

#: relative error of a 16-bit result rounded once from a float32 sum
TOL = {np.dtype(float16): 2e-3, np.dtype(bfloat16): 1.2e-2, np.dtype(float32): 1e-5}


def rel_err(got, want):
    import cupy as cp

    got = cp.asnumpy(got).astype(np.float64)
    assert got.shape == want.shape and np.all(np.isfinite(got))
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.fixture
def gemm_calls(monkeypatch):
    from pymglu.cuda import gemm as gemm_module

    calls = []
    real = gemm_module.gemm

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(gemm_module, "gemm", spy)
    return calls


@pytest.mark.parametrize("dtype", [float32, float16, bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("a_layout", ["2d", "2d-transposed", "3d"])
@pytest.mark.parametrize("b_layout", ["contiguous", "transposed"])
def test_cublas_matmul_matches_float64(dtype, a_layout, b_layout, gemm_calls):
    import cupy as cp

    rng = np.random.default_rng(7 * len(a_layout) + len(b_layout))
    k, n = 72, 40
    a_shape = {"2d": (37, k), "2d-transposed": (k, 37), "3d": (3, 11, k)}[a_layout]
    a_host = rng.standard_normal(a_shape).astype(dtype)
    b_host = (rng.standard_normal((k, n) if b_layout == "contiguous" else (n, k)) / np.sqrt(k)).astype(dtype)
    a_dev, b_dev = cp.asarray(a_host), cp.asarray(b_host)
    a64, b64 = a_host.astype(np.float64), b_host.astype(np.float64)
    if a_layout == "2d-transposed":
        a64 = a64.T
    if b_layout == "transposed":
        b64 = b64.T
    ta, tb = Tensor(a_dev, requires_grad=True), Tensor(b_dev, requires_grad=True)
    a_op = ops.transpose(ta) if a_layout == "2d-transposed" else ta
    b_op = ops.transpose(tb) if b_layout == "transposed" else tb
    out = ops.matmul(a_op, b_op)
    g_host = rng.standard_normal(out.shape).astype(dtype)
    out.backward(cp.asarray(g_host))
    assert len(gemm_calls) == 3  # forward, da, db

    want = a64 @ b64
    g64 = g_host.astype(np.float64)
    want_da = g64 @ b64.T
    want_db = a64.reshape(-1, k).T @ g64.reshape(-1, n)
    if a_layout == "2d-transposed":
        want_da = want_da.T
    if b_layout == "transposed":
        want_db = want_db.T
    tol = TOL[np.dtype(dtype)]
    assert out.dtype == dtype and ta.grad.dtype == dtype and tb.grad.dtype == dtype
    assert rel_err(out.data, want) < tol
    assert rel_err(ta.grad, want_da) < tol
    assert rel_err(tb.grad, want_db) < tol
    assert tb.grad.flags.c_contiguous  # a weight's gradient comes back in the weight's own layout


def test_linear_layer_weight_gradient_is_contiguous_for_the_optimizer(gemm_calls):
    import cupy as cp

    from pymglu.nn import Linear

    layer = Linear(48, 20, dtype=bfloat16, rng=0).to("cuda")
    x = Tensor(cp.asarray(np.random.default_rng(1).standard_normal((2, 5, 48)).astype(bfloat16)))
    y = layer(x)
    (y * y).sum().backward()
    assert len(gemm_calls) == 2  # forward and the weight gradient (x needs none)
    assert layer.weight.grad.shape == (20, 48) and layer.weight.grad.flags.c_contiguous


def test_float64_and_batched_products_keep_the_expression_path(gemm_calls):
    import cupy as cp

    rng = np.random.default_rng(2)
    a = Tensor(cp.asarray(rng.standard_normal((4, 8))))
    b = Tensor(cp.asarray(rng.standard_normal((8, 3))))
    ops.matmul(a, b)
    a16 = Tensor(cp.asarray(rng.standard_normal((2, 4, 8)).astype(bfloat16)))
    b16 = Tensor(cp.asarray(rng.standard_normal((2, 8, 3)).astype(bfloat16)))
    ops.matmul(a16, b16)
    assert gemm_calls == []
