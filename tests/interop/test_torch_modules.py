"""pymglu.torch layers: parameters, initialisation, training, and agreement with pymglu.nn layers."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import pymglu  # noqa: E402
import pymglu.torch as pt  # noqa: E402


@pytest.mark.parametrize("cls,activation", [(pt.SwiMGLU, "silu"), (pt.ReMGLU, "relu"), (pt.GeMGLU, "gelu"),
                                            (pt.MGLU, "sigmoid")])
def test_parameters_shapes_dtypes_and_activation(cls, activation):
    layer = cls(16, 48, 3, dtype=torch.float64)
    assert layer.activation == activation
    params = dict(layer.named_parameters())
    assert list(params) == ["W", "mask_logits"]
    assert params["W"].shape == (48, 16) and params["W"].dtype == torch.float64
    assert params["mask_logits"].shape == (3, 48, 16) and params["mask_logits"].dtype == torch.float32
    assert layer(torch.randn(2, 5, 16, dtype=torch.float64)).shape == (2, 5, 48)
    assert "d=16, h=48, n_masks=3" in repr(layer)


def test_gemglu_tanh_and_bad_arguments():
    assert pt.GeMGLU(4, 8, approximate="tanh").activation == "gelu_tanh"
    with pytest.raises(ValueError, match="approximate: expected 'none' or 'tanh'"):
        pt.GeMGLU(4, 8, approximate="erf")
    with pytest.raises(ValueError, match="n_masks: expected an integer >= 1"):
        pt.SwiMGLU(4, 8, 0)
    with pytest.raises(TypeError, match="dtype: expected one of torch.float64"):
        pt.SwiMGLU(4, 8, dtype=torch.int8)
    layer = pt.SwiMGLU(4, 8)
    with pytest.raises(TypeError, match="x and W must share a dtype"):
        layer(torch.ones(2, 4, dtype=torch.float64))


def test_initialisation_statistics():
    layer = pt.SwiMGLU(256, 512, 2, generator=torch.Generator().manual_seed(0))
    assert abs(layer.W.std().item() - 256 ** -0.5) < 0.002
    assert abs(layer.mask_logits.std().item() - 0.01) < 0.0002
    assert abs(layer.masks().float().mean().item() - 0.5) < 0.01
    again = pt.SwiMGLU(256, 512, 2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(layer.W, again.W) and torch.equal(layer.mask_logits, again.mask_logits)


def test_same_outputs_and_gradients_as_the_pymglu_layer_with_the_same_state_dict():
    torch_layer = pt.SwiMGLU(12, 20, 2, dtype=torch.float64)
    np_layer = pymglu.nn.SwiMGLU(12, 20, 2, dtype=np.float64)
    np_layer.load_state_dict({k: v.detach().numpy() for k, v in torch_layer.state_dict().items()})
    x = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(3, 20, dtype=torch.float64)
    torch_layer(x).backward(dy)
    xt = pymglu.from_dlpack(x.detach(), requires_grad=True)
    y_np = np_layer(xt)
    y_np.backward(dy.numpy())
    np.testing.assert_allclose(torch_layer(x).detach().numpy(), y_np.data, rtol=1e-12)
    np.testing.assert_allclose(x.grad.numpy(), xt.grad, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(torch_layer.W.grad.numpy(), np_layer.W.grad, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(torch_layer.mask_logits.grad.numpy(), np_layer.mask_logits.grad, rtol=1e-6,
                               atol=1e-9)


def test_a_few_adam_steps_fit_a_small_target_and_flip_masks():
    """Regression onto a fixed random MGLU: the loss falls by 5x and the STE moves some masks."""
    gen = torch.Generator().manual_seed(3)
    teacher = pt.SwiMGLU(8, 16, 2, generator=gen)
    student = pt.SwiMGLU(8, 16, 2, generator=gen)
    x = torch.randn(64, 8, generator=gen)
    with torch.no_grad():
        target = teacher(x)
    masks0 = student.masks().clone()
    opt = torch.optim.Adam([{"params": [student.W]}, {"params": [student.mask_logits], "lr": 3e-3}], lr=1e-2)
    losses = []
    for _ in range(150):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(student(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]
    assert (student.masks() != masks0).any()


def test_eval_and_no_grad_give_the_training_output_on_the_cpu():
    layer = pt.SwiMGLU(8, 16, 2)
    x = torch.randn(4, 8)
    y_train = layer(x)
    layer.eval()
    with torch.no_grad():
        y_eval = layer(x)
    torch.testing.assert_close(y_eval, y_train.detach(), rtol=0, atol=0)
    assert layer.flash_cache.weights is None  # FlashMGLU is for CUDA tensors only


def test_inference_mode_calls_work_and_flash_cache_keys_follow_versions():
    from pymglu.torch import _flash

    layer = pt.SwiMGLU(8, 16, 2)
    x = torch.randn(3, 8)
    with torch.inference_mode():
        y = layer(x)
        assert _flash._key(torch.ones(2, 3), torch.ones(1, 2, 3)) is None  # inference tensors: no versions
    torch.testing.assert_close(y, layer(x).detach())
    key = _flash._key(layer.W, layer.mask_logits)
    assert key is not None and key == _flash._key(layer.W, layer.mask_logits)
    with torch.no_grad():
        layer.mask_logits.add_(0.0)  # any in-place write bumps the version, so the cache would repack
    assert _flash._key(layer.W, layer.mask_logits) != key
