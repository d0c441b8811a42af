"""Fixtures of the language-model tests."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    """A 9 kB repetitive English text (an easy target: the loss falls within a few dozen steps)."""
    path = tmp_path / "text.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    return path
