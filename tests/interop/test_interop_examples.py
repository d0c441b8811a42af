"""The interop examples run end to end (the torch one for a few steps): exit code 0 and what they print."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _run(*args: str) -> str:
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_torch_swap_ffn_swaps_and_the_loss_falls():
    pytest.importorskip("torch")
    out = _run(str(EXAMPLES / "torch_swap_ffn.py"), "--steps", "12")
    assert "swapped 2 SwiGLU feed-forwards for SwiMGLU (n_masks=2)" in out
    first, last = (float(v) for v in re.search(r"validation loss ([\d.]+) -> ([\d.]+)", out).groups())
    assert last < first


def test_jax_interop_matches_jax_numpy():
    pytest.importorskip("jax")
    out = _run(str(EXAMPLES / "jax_interop.py"))
    assert re.search(r"float32: pymglu.functional.mglu on JAX arrays", out)
    assert re.search(r"bfloat16: pymglu.functional.mglu on JAX arrays .* bfloat16", out)
