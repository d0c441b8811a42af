"""Helpers of the language-model tests: tiny configs, and the example scripts loaded as modules.

A plain module (not conftest.py), so that ``from lm_helpers import ...`` cannot pick up the conftest of
another test directory.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from pymglu.models import TransformerConfig

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load_example(name: str) -> ModuleType:
    """``examples/<name>.py`` imported as a module (the examples are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_config(**overrides) -> TransformerConfig:
    """A model small enough for float64 finite differences: 2 layers, d_model 8, 2 heads of width 4."""
    values = dict(vocab_size=16, d_model=8, n_layers=2, n_heads=2, d_ff=12, ffn_kind="swiglu",
                  max_seq_len=8, dtype="float64")
    values.update(overrides)
    return TransformerConfig(**values)
