"""pymglu.backend: array-module dispatch, device-mismatch errors, and life without CuPy."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import pymglu
import pymglu.cuda
from pymglu import backend
from pymglu.autograd import Tensor
from pymglu.backend import DeviceMismatchError, get_array_module


def test_get_array_module_numpy_none_and_scalars():
    a = np.zeros((2, 3), dtype=np.float32)
    assert get_array_module(a) is np
    assert get_array_module() is np
    assert get_array_module(None) is np
    assert get_array_module(None, 1, 2.5, True, 1j, np.float32(3.0), np.int64(2)) is np
    assert get_array_module(a, None, 3.0, a.T) is np
    assert get_array_module(Tensor(a)) is np


def test_device_of_and_to_numpy_on_cpu():
    a = np.arange(6.0).reshape(2, 3)
    assert backend.device_of(a) == "cpu"
    assert backend.device_of(3.0) == "cpu"
    assert backend.device_of(Tensor(a)) == "cpu"
    assert backend.to_numpy(a) is a
    np.testing.assert_array_equal(backend.to_numpy(Tensor(a)), a)
    np.testing.assert_array_equal(backend.to_numpy([1, 2]), np.array([1, 2]))
    assert backend.is_cupy_array(a) is False
    assert backend.unwrap(Tensor(a)) is a and backend.unwrap(a) is a


def _fake_devices(monkeypatch, placement: dict[int, str]) -> None:
    """Pretend the arrays whose id() is in ``placement`` live on the given device."""
    real = backend.device_of
    monkeypatch.setattr(backend, "device_of", lambda x: placement.get(id(backend.unwrap(x)), real(x)))


def test_mixing_two_gpus_raises_device_mismatch(monkeypatch):
    a, b = np.zeros(3), np.ones(3)
    _fake_devices(monkeypatch, {id(a): "cuda:0", id(b): "cuda:1"})
    with pytest.raises(DeviceMismatchError) as info:
        get_array_module(a, None, b)
    msg = str(info.value)
    assert "argument 0 on cuda:0" in msg and "argument 2 on cuda:1" in msg
    assert "never transfers data implicitly" in msg
    assert isinstance(info.value, ValueError)


def test_mixing_cpu_and_gpu_raises_device_mismatch(monkeypatch):
    a, b = np.zeros(3), np.ones(3)
    _fake_devices(monkeypatch, {id(b): "cuda:0"})
    with pytest.raises(DeviceMismatchError, match=r"argument 0 on cpu, argument 1 on cuda:0"):
        get_array_module(a, Tensor(b))


@pytest.mark.skipif(backend.gpu_available(), reason="checks the no-GPU machine")
def test_no_gpu_here():
    assert backend.gpu_available() is False
    assert pymglu.gpu_available() is False
    assert pymglu.cuda.available() is False


def _run_without_cupy(body: str) -> subprocess.CompletedProcess:
    """Run ``body`` in a fresh interpreter where ``import cupy`` raises ImportError (``sys.modules['cupy'] = None``)."""
    script = 'import sys\nsys.modules["cupy"] = None\n' + textwrap.dedent(body)
    env = dict(os.environ)
    root = str(Path(pymglu.__file__).resolve().parents[1])  # the pymglu under test, installed or not
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.run([sys.executable, "-W", "error", "-c", script], env=env, capture_output=True, text=True,
                          timeout=120)


def test_import_without_cupy_in_a_subprocess():
    """``import pymglu`` works with CuPy unimportable and imports neither CuPy nor numba.cuda."""
    proc = _run_without_cupy(
        """
        import pymglu, pymglu.cuda, pymglu.masks
        assert pymglu.backend.cupy_or_none() is None
        assert pymglu.backend.gpu_available() is False
        assert pymglu.cuda.available() is False
        try:
            pymglu.cuda.require_gpu("the test")
        except RuntimeError as e:
            assert "CuPy is not installed" in str(e), e
        else:
            raise AssertionError("require_gpu did not raise")
        loaded = sorted(m for m in sys.modules if m == "numba.cuda" or m.startswith(("numba.cuda.", "cupy.")))
        assert not loaded, loaded
        print("NO-CUPY-OK")
        """
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1:] == ["NO-CUPY-OK"], proc.stdout + proc.stderr


def test_arrays_work_without_cupy_in_a_subprocess():
    proc = _run_without_cupy(
        """
        import numpy as np
        import pymglu
        assert pymglu.get_array_module(np.zeros(2)) is np
        packed = pymglu.pack_masks(np.array([[True, False, True]]))
        assert packed.tolist() == [[5]], packed
        print("NO-CUPY-ARRAYS-OK")
        """
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1:] == ["NO-CUPY-ARRAYS-OK"], proc.stdout + proc.stderr
