"""The **CPU** snippets of docs/torch.md and docs/jax.md run, and print what their trailing ``# ...``
comment lines say."""
import contextlib
import io
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[2] / "docs"
_BLOCK = re.compile(r"\*\*CPU\*\*\s*\n\s*```python\n(.*?)```", re.S)


def _snippets(page: str) -> list[str]:
    return _BLOCK.findall((DOCS / page).read_text(encoding="utf-8"))


def _expected_output(code: str) -> list[str]:
    lines = code.rstrip("\n").split("\n")
    tail = []
    while lines and lines[-1].startswith("# "):
        tail.insert(0, lines.pop()[2:])
    return tail


@pytest.mark.parametrize("page,framework", [("torch.md", "torch"), ("jax.md", "jax")])
def test_cpu_snippets_run_and_print_what_they_say(page, framework):
    pytest.importorskip(framework)
    snippets = _snippets(page)
    assert len(snippets) >= 3, f"{page}: expected at least 3 CPU snippets, found {len(snippets)}"
    for i, code in enumerate(snippets):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, f"{page}[CPU snippet {i}]", "exec"), {"__name__": f"snippet_{i}"})
        expected = _expected_output(code)
        assert expected, f"{page} snippet {i}: no '# output' lines to compare with"
        assert out.getvalue().rstrip("\n").split("\n") == expected, f"{page} snippet {i}"
