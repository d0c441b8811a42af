"""FlashMGLU on the GPU against the float64 reference (pymglu.functional on float64 copies)."""
import numpy as np
import pytest

from pymglu import dtypes, functional, masks
from pymglu.cuda import flash_mglu as fm

pytestmark = pytest.mark.gpu

cp = pytest.importorskip("cupy")

TOLERANCE = {dtypes.bfloat16: 8e-3, dtypes.float16: 1.5e-3, dtypes.float32: 2e-5}


def _inputs(rng, tokens, d, h, n, dtype):
    x = cp.asarray(rng.standard_normal((tokens, d)).astype(dtype))
    W = cp.asarray((rng.standard_normal((h, d)) / np.sqrt(d)).astype(dtype))
    planes = masks.pack_masks(cp.asarray(rng.standard_normal((n, h, d)) > 0))
    return x, W, planes


def _reference(x, W, planes, activation):
    return functional.mglu(x.astype(cp.float64), W.astype(cp.float64), planes, activation)


def _rel_err(y, ref):
    y = y.astype(cp.float64)
    assert bool(cp.isfinite(y).all()), "output has non-finite values (unwritten or overflowed)"
    return float(cp.linalg.norm(y - ref) / cp.linalg.norm(ref))


def _run_checked(x, weights, activation, dtype, shape):
    out = cp.full(shape, np.nan, dtype=dtype)  # poison: every element must be written
    y = fm.flash_mglu(x, weights, activation=activation, out=out)
    assert y is out
    return y


@pytest.mark.parametrize("dtype", [dtypes.bfloat16, dtypes.float16, dtypes.float32], ids=lambda d: d.name)
@pytest.mark.parametrize("n", [1, 2, 3, 4, 8, 16])
@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 7, 8, 16])
def test_matches_float64_reference_small_ragged(dtype, n, tokens):
    rng = np.random.default_rng(1000 * n + tokens)
    d, h = 200, 77
    x, W, planes = _inputs(rng, tokens, d, h, n, dtype)
    weights = fm.pack_weights(W, planes)
    y = _run_checked(x, weights, "silu", dtype, (tokens, h))
    assert _rel_err(y, _reference(x, W, planes, "silu")) < TOLERANCE[dtype]


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh", "relu", "sigmoid"])
@pytest.mark.parametrize("dtype", [dtypes.bfloat16, dtypes.float16, dtypes.float32], ids=lambda d: d.name)
def test_every_activation(activation, dtype):
    rng = np.random.default_rng(7)
    x, W, planes = _inputs(rng, 5, 256, 96, 3, dtype)
    y = _run_checked(x, fm.pack_weights(W, planes), activation, dtype, (5, 96))
    assert _rel_err(y, _reference(x, W, planes, activation)) < TOLERANCE[dtype]


@pytest.mark.parametrize("d,h", [(1000, 777), (4095, 4097), (4096, 1024), (33, 17)])
@pytest.mark.parametrize("dtype", [dtypes.bfloat16, dtypes.float16, dtypes.float32], ids=lambda d: d.name)
@pytest.mark.parametrize("tokens,n", [(1, 1), (4, 4), (8, 8), (16, 16), (3, 5)])
def test_large_ragged_shapes(d, h, dtype, tokens, n):
    rng = np.random.default_rng(d + h + n)
    x, W, planes = _inputs(rng, tokens, d, h, n, dtype)
    y = _run_checked(x, fm.pack_weights(W, planes), "silu", dtype, (tokens, h))
    assert _rel_err(y, _reference(x, W, planes, "silu")) < TOLERANCE[dtype]


@pytest.mark.parametrize("d,h", [(4100, 95), (8192 + 40, 33)])
@pytest.mark.parametrize("dtype", [dtypes.bfloat16, dtypes.float16], ids=lambda d: d.name)
@pytest.mark.parametrize("tokens,n", [(1, 4), (8, 8), (5, 6), (9, 4), (2, 2)])
def test_wide_inputs_with_the_libraries_configuration(d, h, dtype, tokens, n):
    """d > 4096 selects eight warps per strip for 4 to 8 masks up to 8 tokens (``mma_config``), four
    otherwise: both against the reference on ragged wide inputs."""
    rng = np.random.default_rng(d + 7 * n + tokens)
    x, W, planes = _inputs(rng, tokens, d, h, n, dtype)
    assert fm.mma_config(n, d, tokens)[0] == (8 if 4 <= n <= 8 and tokens <= 8 else 4)
    y = _run_checked(x, fm.pack_weights(W, planes), "silu", dtype, (tokens, h))
    assert _rel_err(y, _reference(x, W, planes, "silu")) < TOLERANCE[dtype]


@pytest.mark.parametrize("warps,ahead", [(1, 1), (2, 1), (4, 1), (8, 1), (2, 2), (4, 3)])
@pytest.mark.parametrize("tokens,n", [(1, 8), (3, 1), (8, 4), (16, 16)])
def test_kernel_configurations_agree(warps, ahead, tokens, n, monkeypatch):
    """Every warps / groups-ahead configuration the benchmarks sweep gives the reference result, with
    strips of several groups per warp and a ragged last group."""
    rng = np.random.default_rng(warps * 100 + ahead * 10 + tokens)
    d, h = 64 * 37 + 24, 50
    x, W, planes = _inputs(rng, tokens, d, h, n, dtypes.bfloat16)
    monkeypatch.setattr(fm, "MMA_WARPS", warps)
    monkeypatch.setattr(fm, "MMA_AHEAD", ahead)
    y = _run_checked(x, fm.pack_weights(W, planes), "silu", dtypes.bfloat16, (tokens, h))
    assert _rel_err(y, _reference(x, W, planes, "silu")) < TOLERANCE[dtypes.bfloat16]


@pytest.mark.parametrize("paired", [True, False], ids=["paired", "one-column"])
@pytest.mark.parametrize("dtype", [dtypes.bfloat16, dtypes.float16], ids=lambda d: d.name)
@pytest.mark.parametrize("tokens,n", [(1, 1), (2, 3), (3, 8), (4, 16), (4, 2), (1, 8)])
def test_paired_and_one_column_instances(paired, dtype, tokens, n, monkeypatch):
    """Up to 4 tokens the library runs the paired-column instance (``token_block``: one mma.sp per mask
    gives s_i and t - s_i); the one-column instance it replaced must stay right too. Both against the
    reference, on a ragged layer of several groups per warp, under a non-SiLU activation as well."""
    rng = np.random.default_rng(tokens * 31 + n + (0 if paired else 7))
    d, h = 64 * 37 + 24, 45
    x, W, planes = _inputs(rng, tokens, d, h, n, dtype)
    monkeypatch.setattr(fm, "PAIRED_COLUMNS", paired)
    assert fm.token_block(tokens) == (4 if paired else 8)
    weights = fm.pack_weights(W, planes)
    for activation in ("silu", "gelu_tanh"):
        y = _run_checked(x, weights, activation, dtype, (tokens, h))
        assert _rel_err(y, _reference(x, W, planes, activation)) < TOLERANCE[dtype]


def test_no_instance_spills_with_this_devices_compiler():
    """The CI compile test checks spills with the NVRTC of the CI machine; the GPU's own toolkit can
    allocate registers differently (stop 18: 142 registers against 124 for one instance). Every instance
    the library can launch is built here as the library builds it and must use no local memory."""
    from pymglu import cuda as pymglu_cuda

    names = fm.kernel_names()
    module = pymglu_cuda.load_module(fm._SOURCE, tuple(n for n in names if "mma" in n), fm.compile_options())
    simt = pymglu_cuda.load_module(fm._SOURCE, tuple(n for n in names if "simt" in n), ())
    spilled = {}
    for name in names:
        attributes = (module if "mma" in name else simt).get_function(name).attributes
        if attributes["local_size_bytes"]:
            spilled[name] = (attributes["num_regs"], attributes["local_size_bytes"])
    assert not spilled, f"instances with local memory (registers, bytes): {spilled}"


def test_leading_dims_noncontiguous_and_misaligned_inputs_are_copied():
    rng = np.random.default_rng(3)
    d, h, n = 130, 50, 2
    x, W, planes = _inputs(rng, 6, d, h, n, dtypes.bfloat16)
    weights = fm.pack_weights(W, planes)
    ref = fm.flash_mglu(x, weights)
    y3 = fm.flash_mglu(x.reshape(2, 3, d), weights)
    assert y3.shape == (2, 3, h) and bool((y3.reshape(6, h) == ref).all())
    wide = cp.zeros((6, 2 * d), dtype=x.dtype)
    wide[:, ::2] = x
    assert bool((fm.flash_mglu(wide[:, ::2], weights) == ref).all())
    flat = cp.zeros(6 * d + 1, dtype=x.dtype)
    flat[1:] = x.ravel()
    misaligned = flat[1:].reshape(6, d)
    assert misaligned.data.ptr % 4 != 0
    assert bool((fm.flash_mglu(misaligned, weights) == ref).all())


def test_raw_arrays_pack_on_the_fly_and_results_are_deterministic():
    rng = np.random.default_rng(4)
    x, W, planes = _inputs(rng, 3, 512, 300, 4, dtypes.bfloat16)
    a = fm.flash_mglu(x, W, planes, activation="gelu")
    b = fm.flash_mglu(x, fm.pack_weights(W, planes), activation="gelu")
    assert bool((a.view(cp.uint16) == b.view(cp.uint16)).all())


def test_cuda_graph_capture_and_replay():
    rng = np.random.default_rng(5)
    x, W, planes = _inputs(rng, 2, 512, 256, 4, dtypes.bfloat16)
    weights = fm.pack_weights(W, planes)
    out = cp.full((2, 256), np.nan, dtype=x.dtype)
    fm.flash_mglu(x, weights, out=out)  # compile and load outside the capture
    out[...] = cp.nan
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        fm.flash_mglu(x, weights, out=out)
        graph = stream.end_capture()
    assert not bool(cp.isfinite(out.astype(cp.float32)).any()), "capture must not execute the kernel"
    for _ in range(2):
        x[...] = cp.asarray(rng.standard_normal(x.shape).astype(x.dtype))
        out[...] = cp.nan
        graph.launch(stream)
        stream.synchronize()
        assert _rel_err(out, _reference(x, W, planes, "silu")) < TOLERANCE[dtypes.bfloat16]


def test_bad_input_is_refused_before_launch():
    rng = np.random.default_rng(6)
    x, W, planes = _inputs(rng, 2, 64, 32, 2, dtypes.bfloat16)
    weights = fm.pack_weights(W, planes)
    with pytest.raises(TypeError, match="x: expected dtype bfloat16"):
        fm.flash_mglu(x.astype(cp.float16), weights)
    with pytest.raises(ValueError, match="last dim d = 64"):
        fm.flash_mglu(x[:, :32], weights)
    with pytest.raises(ValueError, match="1 to 16 tokens"):
        fm.flash_mglu(cp.concatenate([x] * 9), weights)
    with pytest.raises(TypeError, match="CuPy array"):
        fm.flash_mglu(cp.asnumpy(x), weights)
    with pytest.raises(ValueError, match="packed_masks"):
        fm.pack_weights(W, planes[:, :16])
    with pytest.raises(ValueError, match="1 to 16 masks"):
        fm.pack_weights(W, cp.concatenate([planes] * 9))
    with pytest.raises(ValueError, match="out"):
        fm.flash_mglu(x, weights, out=cp.empty((2, 31), dtype=x.dtype))


def test_sparse_mma_layouts_match_the_format():
    """The device's mma.sp B and metadata layouts are the ones the packed format and the CPU emulation
    (test_flash_mglu_layout.py) assume (read back with benchmarks/probe_sparse_mma.py)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "probe_sparse_mma.py"
    spec = importlib.util.spec_from_file_location("probe_sparse_mma", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    found = probe.run(cp)
    for lane in range(32):
        g, tg = divmod(lane, 4)
        for reg in range(4):
            for half in range(2):
                assert tuple(found["b"][f"{lane},{reg},{half}"]) == (2 * tg + 8 * reg + half, g)
    for sel in (0, 1):
        table = found["meta"][str(sel)]
        expected = {f"{4 * g + 2 * sel + r},{j}": (g + 8 * (j >> 2), 4 * r + (j & 3))
                    for g in range(8) for r in range(2) for j in range(8)}
        assert {k: tuple(v) for k, v in table.items()} == expected
