"""The Numba CUDA mask packer on a real GPU (CuPy arrays): identical bytes to the NumPy packer.

Marked ``gpu``: skipped by tests/conftest.py without a usable device.
"""
from __future__ import annotations

import numpy as np
import pytest

from pymglu.masks import _pack_numpy, pack_masks, unpack_masks

pytestmark = pytest.mark.gpu

SHAPES = [(1, 1, 1), (2, 3, 31), (2, 3, 32), (3, 5, 33), (4, 7, 100), (2, 9, 1000), (2, 17, 4095), (3, 64, 4096),
          (5, 64), (4096,)]


@pytest.fixture(scope="module")
def cp():
    import cupy

    return cupy


def _random_bool(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    density = rng.uniform(0.05, 0.95)
    return rng.random(shape) < density


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bool_bytes_equal_numpy(cp, shape):
    from pymglu.cuda.bitpack import pack_masks_device

    rng = np.random.default_rng(abs(hash(shape)) % 2**32)
    m = _random_bool(rng, shape)
    got = pack_masks_device(cp.asarray(m))
    assert isinstance(got, cp.ndarray) and got.dtype == cp.uint32
    assert got.shape == shape[:-1] + ((shape[-1] + 31) // 32,)
    assert got.get().tobytes() == _pack_numpy(m).tobytes()


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("shape", [(2, 3, 33), (3, 17, 4095), (2, 16, 4096)], ids=lambda s: "x".join(map(str, s)))
def test_float_logits_bytes_equal_numpy(cp, dtype, shape):
    rng = np.random.default_rng(7)
    logits = rng.standard_normal(shape).astype(dtype)
    flat = logits.reshape(-1)
    flat[::7] = 0.0  # exact zeros and negative zeros are not gate elements
    flat[3::11] = -0.0
    flat[5::13] = np.nan
    got = pack_masks(cp.asarray(logits))  # pymglu.masks passes CuPy logits straight to the kernel
    assert got.get().tobytes() == _pack_numpy(logits > 0).tobytes()


def test_kernel_overwrites_poisoned_output_and_picks_paths(cp):
    from pymglu.cuda import bitpack

    rng = np.random.default_rng(3)
    for d, dtype, expected in [(4096, np.bool_, "pack_quads_flat"), (4095, np.bool_, "pack_nibbles"),
                               (64, np.float32, "pack_nibbles")]:
        m = rng.random((37, d)) < 0.5 if dtype == np.bool_ else rng.standard_normal((37, d)).astype(dtype)
        out = cp.full((37, (d + 31) // 32), 0xDEADBEEF, dtype=cp.uint32)
        name = bitpack.pack_kernel_launch(cp.asarray(m), out)
        cp.cuda.Device().synchronize()
        assert name == expected
        assert out.get().tobytes() == _pack_numpy(m > 0).tobytes()


def test_misaligned_and_noncontiguous_input(cp):
    from pymglu.cuda.bitpack import pack_masks_device

    rng = np.random.default_rng(11)
    m = rng.random((6, 64)) < 0.3
    buf = cp.zeros(m.size + 1, dtype=cp.bool_)
    buf[1:] = cp.asarray(m.reshape(-1))
    misaligned = buf[1:].reshape(6, 64)  # contiguous, data pointer not 4-byte aligned -> general kernel
    assert misaligned.data.ptr % 4 != 0
    assert pack_masks_device(misaligned).get().tobytes() == _pack_numpy(m).tobytes()
    big = rng.random((64, 6)) < 0.5
    assert pack_masks_device(cp.asarray(big).T).get().tobytes() == _pack_numpy(big.T).tobytes()
    assert pack_masks_device(cp.asarray(m)[:, 1::2]).get().tobytes() == _pack_numpy(m[:, 1::2]).tobytes()


def test_runs_on_current_stream_and_round_trips(cp):
    from pymglu.cuda.bitpack import unpack_masks_device

    rng = np.random.default_rng(5)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        logits = cp.random.standard_normal((4, 33, 4095), dtype=cp.float32)
        packed = pack_masks(logits)
        back = unpack_masks_device(packed, 4095)
    stream.synchronize()
    host = logits.get()
    assert packed.get().tobytes() == _pack_numpy(host > 0).tobytes()
    assert bool((back == (logits > 0)).all())
    assert bool((unpack_masks(packed, 4095) == back).all())
    empty = pack_masks(cp.zeros((0, 3, 40), dtype=cp.bool_))
    assert empty.shape == (0, 3, 2)
    del rng


def test_timing_8x14336x4096(cp, capsys):
    """Not asserted: prints the pack time of an 8 x 14336 x 4096 mask set (bool and float32 logits)."""
    from pymglu.cuda.bitpack import pack_masks_device

    shape = (8, 14336, 4096)
    masks = cp.random.random(shape, dtype=cp.float32) < 0.5
    lines = []
    for label, x in (("bool", masks), ("bool d=4095", masks[..., :4095].copy())):
        lines.append(_time(cp, pack_masks_device, x, label))
    del masks
    logits = cp.random.standard_normal(shape, dtype=cp.float32)
    lines.append(_time(cp, pack_masks_device, logits, "float32 logits"))
    # spot check of the big one
    row = logits[3, 1234].get()
    assert pack_masks_device(logits)[3, 1234].get().tobytes() == _pack_numpy(row > 0).tobytes()
    with capsys.disabled():
        print()
        for line in lines:
            print(line)


def _time(cp, fn, x, label: str, reps: int = 10) -> str:
    fn(x)  # compile + warm up
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    for _ in range(reps):
        fn(x)
    stop.record()
    stop.synchronize()
    ms = cp.cuda.get_elapsed_time(start, stop) / reps
    nbytes = x.nbytes + x.size // 8
    return f"pack {label} {tuple(x.shape)}: {ms:.3f} ms per call, {nbytes / ms / 1e6:.0f} GB/s (read + write)"
