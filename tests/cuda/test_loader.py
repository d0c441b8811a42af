"""pymglu.cuda: device checks, the shipped sources, and the cached RawModule loader (with a stand-in CuPy)."""
from __future__ import annotations

import types
from pathlib import Path

import pytest

import pymglu.cuda as pc
from pymglu.backend import gpu_available


def test_available_matches_backend():
    assert pc.available() is gpu_available()


@pytest.mark.skipif(gpu_available(), reason="checks the no-GPU path")
def test_require_gpu_raises_clearly_without_a_device():
    with pytest.raises(RuntimeError, match=r"FlashMGLU decode needs a CUDA GPU"):
        pc.require_gpu("FlashMGLU decode")


def test_sources_are_the_packages_cu_files():
    names = pc.list_sources()
    assert names == sorted(p.name for p in Path(pc.__file__).parent.glob("*.cu"))
    for name in names:
        assert pc.source_path(name).is_file()
        assert pc.source_path(name).parent == pc.source_dir()


@pytest.mark.parametrize("bad, error", [("../masks.py", ValueError), ("sub/x.cu", ValueError), ("x.py", ValueError),
                                        ("", TypeError), (None, TypeError), ("no_such_kernel.cu", FileNotFoundError)])
def test_source_path_rejects_bad_names(bad, error):
    with pytest.raises(error, match="source_name"):
        pc.source_path(bad)


class _FakeRawModule:
    built: list[dict] = []

    def __init__(self, code: str, options: tuple[str, ...], name_expressions: tuple[str, ...]) -> None:
        self.code, self.options, self.name_expressions = code, options, name_expressions
        _FakeRawModule.built.append({"options": options, "names": name_expressions})

    def get_function(self, name: str) -> tuple:
        return ("function", name, id(self))


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """A package dir with one source and a stand-in ``cupy`` whose current device can be switched."""
    (tmp_path / "k.cu").write_text('extern "C" __global__ void k() {}\n')
    (tmp_path / "k.cuh").write_text("// header\n")
    device = types.SimpleNamespace(id=0)
    fake_cp = types.SimpleNamespace(RawModule=_FakeRawModule,
                                    cuda=types.SimpleNamespace(Device=lambda: device))
    monkeypatch.setattr(pc, "_SOURCE_DIR", tmp_path)
    monkeypatch.setattr(pc, "gpu_available", lambda: True)
    monkeypatch.setattr(pc, "cupy_or_none", lambda: fake_cp)
    monkeypatch.setattr(pc, "_modules", {})
    monkeypatch.setattr(pc, "_functions", {})
    _FakeRawModule.built = []
    return device


def test_load_module_builds_once_per_device_options_and_names(fake_gpu, tmp_path):
    m1 = pc.load_module("k.cu", ("k",))
    assert pc.load_module("k.cu", ("k",)) is m1
    assert m1.code.startswith((tmp_path / "k.cu").read_text())
    assert pc.headers_digest(tmp_path) in m1.code
    assert m1.options == ("-std=c++17", f"-I{tmp_path}")
    assert m1.name_expressions == ("k",)
    m2 = pc.load_module("k.cu", ("k",), options=("-DN=4",))
    assert m2 is not m1 and m2.options == ("-std=c++17", "-DN=4", f"-I{tmp_path}")
    m3 = pc.load_module("k.cu", ("k", "k2"))
    assert m3 is not m1
    fake_gpu.id = 1
    m4 = pc.load_module("k.cu", ("k",))
    assert m4 is not m1
    fake_gpu.id = 0
    assert pc.load_module("k.cu", ["k"]) is m1  # a list of names is the same key
    assert len(_FakeRawModule.built) == 4
    assert pc.list_sources() == ["k.cu"]
    pc.clear_module_cache()
    assert pc.load_module("k.cu", ("k",)) is not m1


def test_get_function_is_fetched_once_per_device_and_options(fake_gpu):
    f1 = pc.get_function("k.cu", "k")
    assert f1[:2] == ("function", "k")
    assert pc.get_function("k.cu", "k") is f1
    assert len(_FakeRawModule.built) == 1
    assert pc.get_function("k.cu", "k", ("-DN=4",)) is not f1
    fake_gpu.id = 1
    assert pc.get_function("k.cu", "k") is not f1
    fake_gpu.id = 0
    assert pc.get_function("k.cu", "k") is f1
    pc.clear_module_cache()
    assert pc.get_function("k.cu", "k") is not f1


def test_module_code_changes_with_any_header(fake_gpu, tmp_path):
    """CuPy's disk cache keys on the code text: a header edit must change the text (stale binaries otherwise)."""
    source = tmp_path / "k.cu"
    before = pc.module_code(source)
    assert before.startswith(source.read_text()) and before.count("\n") == source.read_text().count("\n") + 2
    (tmp_path / "k.cuh").write_text("// header, edited\n")
    edited = pc.module_code(source)
    assert edited != before
    (tmp_path / "extra.cuh").write_text("// a new header\n")
    assert pc.module_code(source) not in (before, edited)
    (tmp_path / "notes.txt").write_text("not a header")
    assert pc.module_code(source) == pc.module_code(source)
    pc.clear_module_cache()
    m = pc.load_module("k.cu", ("k",))
    assert m.code == pc.module_code(source)


def test_load_module_argument_errors(fake_gpu):
    with pytest.raises(ValueError, match="name_expressions"):
        pc.load_module("k.cu", ())
    with pytest.raises(FileNotFoundError, match=r"available: \['k.cu'\]"):
        pc.load_module("missing.cu", ("k",))


def test_load_module_without_gpu_raises_runtime_error(monkeypatch, tmp_path):
    (tmp_path / "k.cu").write_text("// nothing\n")
    monkeypatch.setattr(pc, "_SOURCE_DIR", tmp_path)
    monkeypatch.setattr(pc, "gpu_available", lambda: False)
    monkeypatch.setattr(pc, "cupy_or_none", lambda: None)
    with pytest.raises(RuntimeError, match=r"kernel source 'k.cu' needs a CUDA GPU: CuPy is not installed"):
        pc.load_module("k.cu", ("k",))


def test_flash_mglu_is_public_and_importing_pymglu_loads_no_gpu_library():
    import subprocess
    import sys

    code = (
        "import sys, pymglu\n"
        "from pymglu.cuda import flash_mglu as fm\n"
        "assert pymglu.flash_mglu is fm.flash_mglu and 'flash_mglu' in pymglu.__all__\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('cupy', 'cupyx') or m.startswith('cuda.bindings'))\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_flash_mglu_refuses_numpy_arrays_with_a_clear_message():
    import numpy as np

    import pymglu

    with pytest.raises(TypeError, match=r"x: FlashMGLU needs a CuPy array on the GPU.*pymglu.functional.mglu"):
        pymglu.flash_mglu(np.ones((1, 64), np.float32), np.ones((32, 64), np.float32), np.ones((1, 32, 2), np.uint32))
