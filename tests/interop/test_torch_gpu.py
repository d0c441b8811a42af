"""CUDA: zero-copy DLPack between torch and CuPy (bfloat16 included), the DLPack stream protocol with
side streams in both directions, pymglu.torch on CUDA tensors (gradients, torch's current stream) and
FlashMGLU for eval decode calls with its packed-weight cache."""
import numpy as np
import pytest

pytestmark = pytest.mark.gpu

cp = pytest.importorskip("cupy")
torch = pytest.importorskip("torch")
if not torch.cuda.is_available():  # a CPU build of torch on a GPU machine
    pytest.skip("needs a CUDA build of torch", allow_module_level=True)

import pymglu  # noqa: E402
import pymglu.torch as pt  # noqa: E402
from pymglu.backend import DeviceMismatchError  # noqa: E402
from pymglu.dtypes import bfloat16  # noqa: E402
from pymglu.torch import _flash  # noqa: E402
from pymglu.torch._bridge import external_stream  # noqa: E402
from _torch_reference import reference_mglu  # noqa: E402

_SPIN = r"""
extern "C" __global__ void spin_then_fill(unsigned short* out, long long n, long long cycles,
                                          unsigned short bits) {
    long long start = clock64();
    while (clock64() - start < cycles) { }
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        out[i] = bits;
}
"""
_CYCLES = 200_000_000  # ~0.1 s on an H200: long enough for a missing wait to show


def _spin_fill(a, bits):
    """On CuPy's current stream: wait ~0.1 s on the GPU, then write ``bits`` into every uint16 of ``a``."""
    kernel = cp.RawKernel(_SPIN, "spin_then_fill")
    kernel((8,), (256,), (a, np.int64(a.size), np.int64(_CYCLES), np.uint16(bits)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cuda_tensors_cross_without_copies(dtype):
    t = torch.randn(64, 48, device="cuda").to(dtype)
    a = pymglu.from_dlpack(t).data
    assert isinstance(a, cp.ndarray) and a.data.ptr == t.data_ptr() and a.shape == (64, 48)
    if dtype == torch.bfloat16:
        assert a.dtype == bfloat16
    back = pt.to_torch(a)
    assert back.data_ptr() == t.data_ptr() and back.dtype == dtype and torch.equal(back, t)


def test_consumer_stream_waits_for_the_torch_producer_stream():
    """torch writes on a side stream after a long spin; pymglu consumes on another non-blocking CuPy
    stream. DLPack's stream argument makes that stream wait, so the sum sees every write."""
    x = torch.zeros(1 << 20, dtype=torch.uint16, device="cuda")
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        with external_stream(cp, side.cuda_stream, torch.cuda.current_device()):
            _spin_fill(cp.from_dlpack(x), 0x3F80)  # bfloat16 1.0, queued on the side stream
        with cp.cuda.Stream(non_blocking=True):
            t = pymglu.from_dlpack(x.view(torch.bfloat16))  # export while `side` is torch's current stream
            assert t.dtype == bfloat16
            written = int((t.data.view(cp.uint16) == 0x3F80).sum())
    assert written == x.numel()


def test_torch_consumer_waits_for_pymglu_work_on_a_cupy_stream():
    a = cp.zeros(1 << 20, dtype=cp.uint16)
    cp.cuda.Device().synchronize()
    with cp.cuda.Stream(non_blocking=True):
        _spin_fill(a, 0x3F80)
        t = pt.to_torch(a.view(bfloat16))  # torch passes its current (default) stream; CuPy makes it wait
    assert t.dtype == torch.bfloat16
    assert t.float().sum().item() == a.size


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-4)], ids=str)
def test_gradients_on_cuda_match_the_torch_reference(dtype, tol):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(3, 5, 64, device="cuda", dtype=dtype, generator=g).requires_grad_()
    W = (torch.randn(96, 64, device="cuda", dtype=dtype, generator=g) / 8).requires_grad_()
    L = (0.01 * torch.randn(4, 96, 64, device="cuda", generator=g)).requires_grad_()
    dy = torch.randn(3, 5, 96, device="cuda", dtype=dtype, generator=g)
    pt.mglu(x, W, L, "silu").backward(dy)
    got = [t.grad.clone() for t in (x, W, L)]
    for t in (x, W, L):
        t.grad = None
    reference_mglu(x, W, L, "silu").backward(dy)
    for name, a, t in zip(("x", "W", "mask_logits"), got, (x, W, L)):
        assert a.device == t.device
        torch.testing.assert_close(a, t.grad, rtol=tol, atol=tol, msg=name)


def test_function_runs_on_torchs_current_side_stream():
    """Inputs written on a side stream right before the call: the forward (queued on that stream)
    must see them, with no synchronization by the caller."""
    layer = pt.SwiMGLU(64, 128, 2, device="cuda")
    x = torch.zeros(40, 64, device="cuda")
    source = torch.randn(40, 64, device="cuda")
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(_CYCLES)
        x.copy_(source)
        y = layer(x)
    torch.cuda.synchronize()
    torch.testing.assert_close(y, reference_mglu(source, layer.W, layer.mask_logits, "silu").detach(),
                               rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 3e-3), (torch.float32, 1e-4)],
                         ids=str)
def test_eval_decode_uses_flashmglu_and_matches_the_function(dtype, tol):
    layer = pt.SwiMGLU(256, 512, 4, device="cuda", dtype=dtype).eval()
    x = torch.randn(2, 8, 256, device="cuda").to(dtype)  # 16 tokens
    with torch.no_grad():
        y_flash = layer(x)
    assert layer.flash_cache.weights is not None
    y_ref = pt.mglu(x, layer.W, layer.mask_logits.detach(), "silu")  # W requires grad: the Function
    rel = ((y_flash.float() - y_ref.float()).norm() / y_ref.float().norm()).item()
    assert y_flash.dtype == dtype and y_flash.shape == (2, 8, 512) and rel < tol


def test_flash_cache_follows_parameter_updates():
    layer = pt.SwiMGLU(128, 256, 2, device="cuda", dtype=torch.bfloat16).eval()
    x = torch.randn(4, 128, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        layer(x)
        first = layer.flash_cache.weights
        layer(x)
        assert layer.flash_cache.weights is first  # unchanged parameters: no repacking
        layer.mask_logits.neg_()  # every mask flips
        y = layer(x)
    assert layer.flash_cache.weights is not first
    y_ref = pt.mglu(x, layer.W, layer.mask_logits.detach(), "silu")
    assert ((y.float() - y_ref.float()).norm() / y_ref.float().norm()).item() < 2e-2


def test_more_than_16_tokens_or_autograd_take_the_function():
    layer = pt.SwiMGLU(64, 128, 2, device="cuda", dtype=torch.bfloat16).eval()
    with torch.no_grad():
        layer(torch.randn(17, 64, device="cuda", dtype=torch.bfloat16))
    assert layer.flash_cache.weights is None
    y = layer(torch.randn(3, 64, device="cuda", dtype=torch.bfloat16))  # grad mode on, W requires grad
    assert y.grad_fn is not None and layer.flash_cache.weights is None
    assert _flash.applies(torch.ones(3, 64, device="cuda"), 2, 3)


def test_cuda_and_cpu_tensors_mixed_raise_device_mismatch():
    with pytest.raises(DeviceMismatchError, match="x on cuda:0, W on cpu"):
        pt.mglu(torch.ones(2, 8, device="cuda"), torch.ones(4, 8), torch.ones(1, 4, 8))
