"""Optional CUDA support: device checks, the ``.cu`` sources shipped with the package, and their loader.

Importing this package never imports CuPy or ``numba.cuda`` and never fails on a machine without a GPU:
CuPy is looked up through :func:`pymglu.backend.cupy_or_none` only when a function here needs it, and the
Numba mask packer lives in :mod:`pymglu.cuda.bitpack`, which is imported only on demand.

Kernel sources are ``pymglu/cuda/*.cu`` (and ``*.cuh`` headers), installed as package data.
:func:`load_module` compiles one of them into a ``cupy.RawModule`` the first time it is needed on a device
and caches it per ``(device, source, options, name_expressions)``; CuPy itself compiles for the current
device's architecture and keeps its own on-disk cache of the binaries.
"""
from __future__ import annotations

import contextlib
import hashlib
import threading
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from pymglu.backend import cupy_or_none, gpu_available
from pymglu.dtypes import bfloat16, float16, float32

__all__ = [
    "available",
    "require_gpu",
    "source_dir",
    "source_path",
    "list_sources",
    "read_source",
    "load_module",
    "get_function",
    "module_code",
    "headers_digest",
    "clear_module_cache",
    "multiprocessor_count",
    "switched",
    "switched_off",
    "CUDA_TYPE_NAMES",
    "ACTIVATION_CODES",
]

_SOURCE_DIR = Path(__file__).resolve().parent
_SOURCE_SUFFIXES = (".cu", ".cuh")

#: C++ type of each storage dtype the kernels are instantiated for (keys: NumPy dtypes).
CUDA_TYPE_NAMES: dict[np.dtype, str] = {bfloat16: "__nv_bfloat16", float16: "__half", float32: "float"}

#: ``pymglu::Activation`` code (``common.cuh``) of each activation name of :mod:`pymglu.activations`.
ACTIVATION_CODES: dict[str, int] = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3, "sigmoid": 4}

#: Options put before the caller's options for every module.
BASE_OPTIONS: tuple[str, ...] = ("-std=c++17",)

_modules: dict[tuple[int, str, tuple[str, ...], tuple[str, ...]], Any] = {}
_modules_lock = threading.Lock()


def available() -> bool:
    """True when CuPy imports and a CUDA device is usable (same as :func:`pymglu.backend.gpu_available`)."""
    return gpu_available()


def require_gpu(what: str) -> None:
    """Raise a clear ``RuntimeError`` unless CuPy imports and a CUDA device is usable.

    Args:
        what: what needs the GPU, for the message (e.g. ``"FlashMGLU decode"``).
    """
    if gpu_available():
        return
    if cupy_or_none() is None:
        reason = "CuPy is not installed or does not import (install pymglu[cuda12] or pymglu[cuda13])"
    else:
        reason = "CuPy imports but finds no usable CUDA device (no GPU, or no/too old a driver)"
    raise RuntimeError(f"{what} needs a CUDA GPU: {reason}; use NumPy arrays for the CPU path")


def source_dir() -> Path:
    """The directory that holds the package's CUDA sources (``pymglu/cuda``)."""
    return _SOURCE_DIR


def list_sources() -> list[str]:
    """File names of the ``.cu`` sources shipped in ``pymglu/cuda``, sorted (headers not included)."""
    return sorted(p.name for p in _SOURCE_DIR.glob("*.cu") if p.is_file())


def source_path(name: str) -> Path:
    """Absolute path of the CUDA source (or header) ``name`` shipped in ``pymglu/cuda``.

    ``name`` is a bare file name such as ``"flash_mglu.cu"``; paths and other suffixes are rejected.
    Raises ``FileNotFoundError`` listing the available sources when there is no such file.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"source_name: expected a file name such as 'flash_mglu.cu', got {name!r}")
    if Path(name).name != name or name in (".", ".."):
        raise ValueError(f"source_name: expected a bare file name inside pymglu/cuda, got {name!r}")
    if not name.endswith(_SOURCE_SUFFIXES):
        raise ValueError(f"source_name: expected a .cu or .cuh file, got {name!r}")
    path = _SOURCE_DIR / name
    if not path.is_file():
        raise FileNotFoundError(
            f"source_name: no CUDA source {name!r} in {_SOURCE_DIR}; available: {list_sources()}"
        )
    return path


def read_source(name: str) -> str:
    """Text of the CUDA source ``name`` (see :func:`source_path`)."""
    return source_path(name).read_text(encoding="utf-8")


def load_module(source_name: str, name_expressions: tuple[str, ...],
                options: tuple[str, ...] = ()) -> Any:
    """Compile-once loader for a kernel source: a ``cupy.RawModule`` for the current CuPy device.

    Args:
        source_name: a ``.cu`` file in ``pymglu/cuda`` (e.g. ``"flash_mglu.cu"``).
        name_expressions: the kernel names (template instantiations included, e.g.
            ``"flash_mglu_fwd<__nv_bfloat16, 4>"``) to fetch later with ``module.get_function(expr)``.
        options: extra NVRTC options, appended after ``-std=c++17``. ``-I<pymglu/cuda>`` is appended as
            well so that sources can include the sibling ``.cuh`` headers.
    Returns:
        The cached ``cupy.RawModule`` for ``(current device, source_name, options, name_expressions)``;
        the source is read and the module built on the first call only (CuPy compiles it, for the
        device's architecture, at the first ``get_function``).
    Raises:
        RuntimeError: no usable CUDA device / CuPy (see :func:`require_gpu`).
        FileNotFoundError, ValueError: bad ``source_name``.
    """
    names = tuple(str(n) for n in name_expressions)
    opts = tuple(str(o) for o in options)
    cp = cupy_or_none()
    if cp is not None:  # the steady state: one dict lookup (launch paths call this for every kernel)
        module = _modules.get((cp.cuda.Device().id, source_name, opts, names))
        if module is not None:
            return module
    if not names:
        raise ValueError(f"name_expressions: expected at least one kernel name for {source_name!r}, got ()")
    path = source_path(source_name)  # validate the name before asking for a GPU: clearer errors
    require_gpu(f"kernel source {source_name!r}")
    cp = cupy_or_none()
    assert cp is not None  # require_gpu checked it
    device = int(cp.cuda.Device().id)
    key = (device, source_name, opts, names)
    with _modules_lock:
        module = _modules.get(key)
        if module is None:
            code = module_code(path)
            module = cp.RawModule(
                code=code,
                options=(*BASE_OPTIONS, *opts, f"-I{_SOURCE_DIR}"),
                name_expressions=names,
            )
            _modules[key] = module
    return module


_functions: dict[tuple[int, str, tuple[str, ...], str], Any] = {}


def get_function(source_name: str, name: str, options: tuple[str, ...] = ()) -> Any:
    """The kernel ``name`` (a name expression) of ``source_name`` for the current device: the module
    of :func:`load_module` built with that one name, and the function fetched once and kept."""
    cp = cupy_or_none()
    if cp is not None:
        fn = _functions.get((cp.cuda.Device().id, source_name, tuple(options), name))
        if fn is not None:
            return fn
    fn = load_module(source_name, (name,), options).get_function(name)  # raises without a usable GPU
    _functions[(cupy_or_none().cuda.Device().id, source_name, tuple(options), name)] = fn
    return fn


def module_code(path: Path) -> str:
    """The text handed to NVRTC for the source ``path``: the file, then a comment with a digest of the
    ``.cuh`` headers beside it. CuPy's on-disk kernel cache keys on the code text and the options, not on
    the files the code includes, so without the digest an edited header could be served from a stale
    cached binary; with it, any header change gives new text and a fresh compile."""
    return path.read_text(encoding="utf-8") + f"\n// pymglu headers {headers_digest(path.parent)}\n"


def headers_digest(directory: Path) -> str:
    """SHA-256 over the names and contents of the ``.cuh`` files in ``directory`` (hex)."""
    digest = hashlib.sha256()
    for header in sorted(directory.glob("*.cuh")):
        digest.update(header.name.encode() + b"\0" + header.read_bytes() + b"\0")
    return digest.hexdigest()


def clear_module_cache() -> None:
    """Forget every module built by :func:`load_module` and every function of :func:`get_function`
    (e.g. after editing a ``.cu`` file in place)."""
    with _modules_lock:
        _modules.clear()
        _functions.clear()


_multiprocessors: dict[int, int] = {}


def multiprocessor_count() -> int:
    """Streaming multiprocessors of CuPy's current device, queried once per device (CuPy's
    ``Device().attributes`` reads every attribute of the device on each access)."""
    cp = cupy_or_none()
    if cp is None:
        require_gpu("multiprocessor_count")
    device = cp.cuda.Device().id
    count = _multiprocessors.get(device)
    if count is None:
        count = _multiprocessors[device] = int(cp.cuda.runtime.deviceGetAttribute(
            cp.cuda.runtime.cudaDevAttrMultiProcessorCount, device))
    return count


@contextlib.contextmanager
def switched(module: Any, flag: str, value: Any) -> Iterator[None]:
    """Within the block, ``module.<flag>`` is ``value``; its previous value comes back afterwards (the
    module-level switches: ``disabled()``, ``masked_gemm.dx_kernel()``, ``training.narrow_logit_grads()``)."""
    previous = getattr(module, flag)
    setattr(module, flag, value)
    try:
        yield
    finally:
        setattr(module, flag, previous)


def switched_off(module: Any, flag: str = "ENABLED") -> contextlib.AbstractContextManager:
    """Within the block, ``module.<flag>`` is ``False`` (:func:`switched`)."""
    return switched(module, flag, False)
