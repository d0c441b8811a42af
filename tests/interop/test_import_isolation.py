"""torch and JAX stay optional: ``import pymglu`` never imports them, and ``pymglu.torch`` says what to
install when torch is missing. Each check runs in a fresh interpreter."""
import subprocess
import sys

import pytest


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_import_pymglu_imports_neither_torch_nor_jax():
    code = (
        "import sys, pymglu, pymglu.interop, pymglu.functional, pymglu.nn, pymglu.optim\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'jax', 'jaxlib') "
        "or m == 'pymglu.torch')\n"
        "print(bad)\n"
        "assert not bad, bad\n"
    )
    result = _python(code)
    assert result.returncode == 0, result.stdout + result.stderr


def test_pymglu_torch_without_torch_raises_a_clear_import_error():
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # as if torch were not installed\n"
        "import numpy as np, pymglu\n"
        "t = pymglu.from_dlpack(np.ones(3))  # the rest of pymglu works\n"
        "assert t.shape == (3,)\n"
        "try:\n"
        "    import pymglu.torch\n"
        "except ImportError as e:\n"
        "    print('ImportError:', e)\n"
        "else:\n"
        "    raise SystemExit('pymglu.torch imported without torch')\n"
    )
    result = _python(code)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "pymglu.torch needs PyTorch, which pymglu does not install" in result.stdout
    assert "pip install 'pymglu[interop]'" in result.stdout


def test_pymglu_torch_imports_when_torch_is_installed():
    pytest.importorskip("torch")
    result = _python("import pymglu.torch as pt; import torch; print(issubclass(pt.SwiMGLU, torch.nn.Module))")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"
