"""pymglu.torch.mglu (the autograd Function) against a plain PyTorch MGLU: values and gradients of x, W
and the mask logits (straight-through estimator), on CPU tensors; bad input."""
import pytest

torch = pytest.importorskip("torch")

import pymglu.torch as pt  # noqa: E402
from pymglu.backend import DeviceMismatchError  # noqa: E402
from pymglu.torch import _flash  # noqa: E402
from _torch_reference import GATES, reference_mglu  # noqa: E402  (tests/interop is on sys.path)


def _inputs(dtype, shape=(2, 3), d=24, h=40, n=3, seed=0, logits_dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, d, generator=g, dtype=torch.float64).to(dtype)
    W = (torch.randn(h, d, generator=g, dtype=torch.float64) * d ** -0.5).to(dtype)
    logits = (0.01 * torch.randn(n, h, d, generator=g, dtype=torch.float64)).to(logits_dtype)
    return [t.requires_grad_() for t in (x, W, logits)]


def _run(fn, x, W, logits, activation, dy):
    leaves = [t.detach().clone().requires_grad_() for t in (x, W, logits)]
    y = fn(*leaves, activation)
    y.backward(dy)
    return y.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("activation", sorted(GATES))
def test_float64_values_and_gradients_match_the_torch_reference(activation):
    x, W, logits = _inputs(torch.float64, logits_dtype=torch.float64)
    dy = torch.randn(2, 3, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    y, grads = _run(pt.mglu, x, W, logits, activation, dy)
    y_ref, grads_ref = _run(reference_mglu, x, W, logits, activation, dy)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for name, g, g_ref in zip(("x", "W", "mask_logits"), grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12, msg=name)
    assert [g.dtype for g in grads] == [torch.float64] * 3


@pytest.mark.parametrize("activation", ["silu", "gelu", "sigmoid"])
def test_float32_matches_the_torch_reference(activation):
    x, W, logits = _inputs(torch.float32, shape=(7,))
    dy = torch.randn(7, 40, generator=torch.Generator().manual_seed(6))
    y, grads = _run(pt.mglu, x, W, logits, activation, dy)
    y_ref, grads_ref = _run(reference_mglu, x, W, logits, activation, dy)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for name, g, g_ref in zip(("x", "W", "mask_logits"), grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5, msg=name)
        assert g.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_is_within_its_rounding_of_a_float64_reference(dtype):
    """pymglu computes in float32 and rounds once; compare with the float64 reference of the same
    (rounded) inputs, allowing a few ulps of the output dtype relative to the largest magnitude."""
    x, W, logits = _inputs(dtype)
    dy = torch.randn(2, 3, 40, generator=torch.Generator().manual_seed(7)).to(dtype)
    y, grads = _run(pt.mglu, x, W, logits, "silu", dy)
    wide = [t.detach().double() for t in (x, W, logits)]
    y_ref, grads_ref = _run(reference_mglu, *wide, "silu", dy.double())
    eps = torch.finfo(dtype).eps
    assert y.dtype == dtype and [g.dtype for g in grads] == [dtype, dtype, torch.float32]
    for name, got, want in zip(("y", "x", "W", "mask_logits"), [y, *grads], [y_ref, *grads_ref]):
        err = (got.double() - want).abs().max().item()
        assert err <= 4 * eps * want.abs().max().item(), (name, err)


def test_batch_shapes_non_contiguous_inputs_and_expanded_gradients():
    """Strided x and W (a slice and a transpose) are read in place; sum() hands backward an expanded
    (stride 0) gradient."""
    g = torch.Generator().manual_seed(1)
    x_big = torch.randn(4, 24, 3, dtype=torch.float64, generator=g)
    W_t = torch.randn(24, 40, dtype=torch.float64, generator=g) * 0.2
    logits = 0.01 * torch.randn(2, 40, 24, dtype=torch.float64, generator=g)
    x = x_big[:, :, 1].requires_grad_()      # (4, 24) non-contiguous view
    W = W_t.t().requires_grad_()             # (40, 24) transposed view
    assert not x.is_contiguous() and not W.is_contiguous()
    logits.requires_grad_()
    pt.mglu(x, W, logits, "gelu").sum().backward()
    grads = [t.grad for t in (x, W, logits)]
    ref_leaves = [t.detach().clone().requires_grad_() for t in (x, W, logits)]
    reference_mglu(*ref_leaves, "gelu").sum().backward()
    for g_, r in zip(grads, ref_leaves):
        torch.testing.assert_close(g_, r.grad, rtol=1e-10, atol=1e-12)


def test_only_requested_gradients_and_no_graph_without_grad():
    x, W, logits = _inputs(torch.float64)
    W.requires_grad_(False)
    logits.requires_grad_(False)
    y = pt.mglu(x, W, logits, "relu")
    assert y.grad_fn is not None and type(y.grad_fn).__name__ == "MGLUFunctionBackward"
    y.sum().backward()
    assert x.grad is not None and W.grad is None and logits.grad is None
    with torch.no_grad():
        z = pt.mglu(x, W, logits, "relu")
    assert z.grad_fn is None and not z.requires_grad
    torch.testing.assert_close(z, y.detach())


def test_flash_path_is_cpu_free():
    x = torch.ones(1, 8)
    assert not _flash.applies(x, 2, 1)  # FlashMGLU is CUDA-only: CPU tensors always take the Function


def test_in_place_change_between_forward_and_backward_is_detected():
    x, W, logits = _inputs(torch.float64)
    y = pt.mglu(x, W, logits, "silu")
    with torch.no_grad():
        W.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_outputs_and_gradients_live_in_pymglu_memory_without_extra_copies():
    x, W, logits = _inputs(torch.float32, shape=(5,))
    y = pt.mglu(x, W, logits, "silu")
    a = pt.as_array(y)
    assert a.__array_interface__["data"][0] == y.data_ptr()
    assert y.is_contiguous() and y.shape == (5, 40)


def test_gradcheck_in_x_and_w():
    """torch.autograd.gradcheck (finite differences) for x and W; the logits' STE gradient is not a
    derivative of the forward (the masks are piecewise constant), so it is checked against the
    reference above instead."""
    x, W, logits = _inputs(torch.float64, shape=(3,), d=6, h=5, n=2)
    logits = logits.detach()
    assert torch.autograd.gradcheck(lambda a, b: pt.mglu(a, b, logits, "gelu_tanh"), (x, W))


def test_bad_input_is_refused_with_clear_errors():
    x, W, logits = (t.detach() for t in _inputs(torch.float32, shape=(2,)))
    with pytest.raises(TypeError, match=r"W: expected a torch.Tensor of dtype torch.float64, torch.float32, "
                                        r"torch.float16, torch.bfloat16, got torch.int8 tensor of shape \(40, 24\)"):
        pt.mglu(x, W.to(torch.int8), logits)
    with pytest.raises(TypeError, match="x and W must share a dtype"):
        pt.mglu(x.double(), W, logits)
    with pytest.raises(TypeError, match="x: expected a torch.Tensor, got ndarray"):
        pt.mglu(x.numpy(), W, logits)
    with pytest.raises(BufferError, match=r"x: torch.float32 tensor of shape \(2, 24\) on meta: pymglu.torch runs "
                                          r"on 'cpu' and 'cuda' tensors .*x.to\('cpu'\)"):
        pt.mglu(x.to("meta"), W, logits)
    with pytest.raises(ValueError, match=r"mask_logits: expected shape \(n_masks >= 1, 40, 24\)"):
        pt.mglu(x, W, logits[:, :, :23])
    with pytest.raises(ValueError, match=r"x: expected last dim d = 24"):
        pt.mglu(x[:, :23], W, logits)
    with pytest.raises(ValueError, match="activation: expected one of"):
        pt.mglu(x, W, logits, "swish")


def test_device_mismatch_names_every_tensor():
    """Two supported devices need a GPU (tests/interop/test_torch_gpu.py); here the check itself."""
    from pymglu.torch._bridge import check_same_device

    with pytest.raises(DeviceMismatchError, match="expected tensors on one device, got x on cpu, W on meta"):
        check_same_device({"x": torch.ones(1), "W": torch.ones(1, device="meta")})


def test_backward_twice_with_retain_graph_accumulates():
    x, W, logits = _inputs(torch.float64)
    y = pt.mglu(x, W, logits, "silu").sum()
    y.backward(retain_graph=True)
    first = [t.grad.clone() for t in (x, W, logits)]
    y.backward()
    for g1, t in zip(first, (x, W, logits)):
        torch.testing.assert_close(t.grad, 2 * g1)
