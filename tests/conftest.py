"""Shared pytest setup: skip ``gpu``-marked tests without a usable CUDA device; the ``xp`` fixture.

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
