"""Shared pytest setup: skip ``gpu``-marked tests without a usable CUDA device; the ``xp`` and ``busy_gpu``
fixtures.

The markers themselves (``gpu``, ``slow``) are registered in setup.cfg.
"""
from __future__ import annotations

import functools
from types import ModuleType

import numpy as np
import pytest

from pymglu.backend import gpu_available


@functools.lru_cache(maxsize=1)
def _gpu_ok() -> bool:
    return gpu_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _gpu_ok():
        return
    skip = pytest.mark.skip(reason="needs a usable CUDA device and CuPy (pymglu.backend.gpu_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=[pytest.param("numpy", id="numpy"), pytest.param("cupy", id="cupy", marks=pytest.mark.gpu)])
def xp(request: pytest.FixtureRequest) -> ModuleType:
    """The array module to test with: ``numpy`` always, ``cupy`` as a ``gpu``-marked second case."""
    if request.param == "numpy":
        return np
    import cupy

    return cupy


@pytest.fixture
def busy_gpu():
    """``busy_gpu(seconds)`` queues a one-thread kernel that spins for about ``seconds`` on the current
    CuPy stream and returns an event recorded behind it: code that never waits for the device finishes
    its host work while ``not event.done``."""
    import cupy as cp

    spin = cp.RawKernel(r"""
    extern "C" __global__ void spin(long long cycles) {
        long long start = clock64();
        while (clock64() - start < cycles) { }
    }""", "spin")

    def keep_busy(seconds: float) -> "cp.cuda.Event":
        rate_khz = cp.cuda.runtime.deviceGetAttribute(cp.cuda.runtime.cudaDevAttrClockRate, cp.cuda.Device().id)
        spin((1,), (1,), (np.int64(seconds * 1000 * rate_khz),))
        event = cp.cuda.Event()
        event.record()
        return event

    return keep_busy
