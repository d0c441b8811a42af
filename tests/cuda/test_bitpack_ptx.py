"""Ahead-of-time compile check of the Numba packer kernels, with no GPU: ``numba.cuda.compile_ptx``
uses the CUDA toolkit's NVVM only. Catches typing errors the simulator cannot see."""
from __future__ import annotations

import re

import pytest

from pymglu.cuda import bitpack

SIGNATURES = bitpack.kernel_signatures()


@pytest.mark.parametrize("name, py_func, argtypes", SIGNATURES, ids=[s[0] for s in SIGNATURES])
def test_compiles_for_sm90(name, py_func, argtypes):
    from numba import cuda

    ptx, restype = cuda.compile_ptx(py_func, argtypes, cc=(9, 0))
    assert ".target sm_90" in ptx
    entries = re.findall(r"\.entry\s+(\w+)", ptx)
    assert len(entries) == 1 and py_func.__name__ in entries[0], entries
    assert str(restype) == "none"
    assert ".local" not in ptx, "kernel uses local memory (spills or a local array)"


@pytest.mark.parametrize("cc", [(8, 0), (12, 0)])
def test_general_kernel_compiles_for_other_archs(cc):
    from numba import cuda

    name, py_func, argtypes = next(s for s in SIGNATURES if s[0].startswith("pack_nibbles"))
    ptx, _ = cuda.compile_ptx(py_func, argtypes, cc=cc)
    assert f".target sm_{cc[0]}{cc[1]}" in ptx
