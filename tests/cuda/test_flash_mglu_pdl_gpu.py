"""FlashMGLU launched with programmatic dependent launch (``flash_mglu(..., pdl=True)``) on the GPU.

The results must be the bits of the normal launch, and the kernel must wait for the kernel before it
before it reads ``x``: a slow kernel that writes ``x`` only at its end comes first, and a kernel that
read ``x`` early would see the poison that was there before.
"""
import numpy as np
import pytest

from pymglu import dtypes, functional, masks
from pymglu.cuda import flash_mglu as fm
from pymglu.cuda import launch

pytestmark = pytest.mark.gpu

cp = pytest.importorskip("cupy")

# Lets the next kernel launch at once (griddepcontrol.launch_dependents), spins for `cycles` clock cycles,
# then copies src into dst (n 16-bit words): a producer of x that finishes long after the kernel launched
# after it with PDL has started.
_SLOW_COPY = r"""
extern "C" __global__ void slow_copy(const unsigned short* src, unsigned short* dst, int n, long long cycles) {
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  const long long start = clock64();
  while (clock64() - start < cycles) { }
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) dst[i] = src[i];
}
"""


def _inputs(rng, tokens, d, h, n, dtype):
    x = cp.asarray(rng.standard_normal((tokens, d)).astype(dtype))
    W = cp.asarray((rng.standard_normal((h, d)) / np.sqrt(d)).astype(dtype))
    planes = masks.pack_masks(cp.asarray(rng.standard_normal((n, h, d)) > 0))
    return x, W, planes


def _bits(a):
    return a.view(cp.uint16) if a.dtype.itemsize == 2 else a.view(cp.uint32)


def _requires_pdl():
    if not launch.pdl_supported(cp.cuda.Device().id):
        pytest.skip("programmatic dependent launch needs compute capability 9.0 or newer")


@pytest.mark.parametrize("dtype", [dtypes.bfloat16, dtypes.float16, dtypes.float32], ids=lambda d: d.name)
@pytest.mark.parametrize("tokens,n", [(1, 1), (3, 4), (8, 8), (16, 16)])
def test_pdl_gives_the_bits_of_the_normal_launch(dtype, tokens, n):
    rng = np.random.default_rng(100 * n + tokens)
    x, W, planes = _inputs(rng, tokens, 1000, 777, n, dtype)
    weights = fm.pack_weights(W, planes)
    cp.cuda.get_current_stream().synchronize()  # the packing is done before any PDL launch reads W
    plain = fm.flash_mglu(x, weights)
    out = cp.full((tokens, 777), np.nan, dtype=dtype)
    y = fm.flash_mglu(x, weights, out=out, pdl=True)
    assert y is out
    assert bool((_bits(y) == _bits(plain)).all())
    ref = functional.mglu(x.astype(cp.float64), W.astype(cp.float64), planes, "silu")
    err = float(cp.linalg.norm(y.astype(cp.float64) - ref) / cp.linalg.norm(ref))
    assert err < {dtypes.bfloat16: 8e-3, dtypes.float16: 1.5e-3, dtypes.float32: 2e-5}[dtype]


@pytest.mark.parametrize("use_graph", [False, True], ids=["eager", "graph"])
@pytest.mark.parametrize("dtype", [dtypes.bfloat16, dtypes.float32], ids=lambda d: d.name)
def test_pdl_waits_for_the_kernel_that_writes_x(dtype, use_graph):
    _requires_pdl()
    rng = np.random.default_rng(11)
    tokens, d, h, n = 4, 4096, 2048, 4
    x_new, W, planes = _inputs(rng, tokens, d, h, n, dtype)
    weights = fm.pack_weights(W, planes)
    expected = fm.flash_mglu(x_new, weights)
    slow_copy = cp.RawKernel(_SLOW_COPY, "slow_copy")
    words = x_new.nbytes // 2
    cycles = np.int64(2_000_000)  # about a millisecond: far longer than the flash kernel's start-up
    stream = cp.cuda.Stream(non_blocking=True)
    x = cp.full(x_new.shape, 1e4, dtype=dtype)  # poison a premature read would use
    out = cp.full((tokens, h), np.nan, dtype=dtype)
    fm.flash_mglu(x, weights, out=out, pdl=True)  # compile and load outside any capture
    cp.cuda.Device().synchronize()

    def step():
        slow_copy((4,), (256,), (x_new, x, np.int32(words), cycles))
        fm.flash_mglu(x, weights, out=out, pdl=True)

    for _ in range(2):
        x[...] = 1e4
        out[...] = cp.nan
        cp.cuda.Device().synchronize()
        with stream:
            if use_graph:
                stream.begin_capture()
                step()
                graph = stream.end_capture()
                graph.launch(stream)
            else:
                step()
        stream.synchronize()
        assert bool((_bits(out) == _bits(expected)).all())


def test_back_to_back_pdl_calls_in_a_graph_match_eager_calls():
    _requires_pdl()
    rng = np.random.default_rng(12)
    d, h, n = 2048, 1536, 8
    layers = [fm.pack_weights(*_inputs(rng, 1, d, h, n, dtypes.bfloat16)[1:]) for _ in range(3)]
    cp.cuda.Device().synchronize()
    xs = [cp.asarray(rng.standard_normal((2, d)).astype(dtypes.bfloat16)) for _ in range(6)]
    expected = [fm.flash_mglu(x, layers[k % 3]) for k, x in enumerate(xs)]
    outs = [cp.full((2, h), np.nan, dtype=dtypes.bfloat16) for _ in xs]
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        for k, x in enumerate(xs):
            fm.flash_mglu(x, layers[k % 3], out=outs[k], pdl=True)
        graph = stream.end_capture()
        for _ in range(3):
            graph.launch(stream)
    stream.synchronize()
    for y, e in zip(outs, expected):
        assert bool((_bits(y) == _bits(e)).all())

