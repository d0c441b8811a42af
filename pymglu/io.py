"""Checkpoints as safetensors files, written atomically and loaded only after everything is checked.

File layout (one ``.safetensors`` file):

* one tensor per ``state_dict`` entry, under its dotted name (``"up.W"``, ``"up.mask_logits"`` or
  ``"up.packed_masks"``); bfloat16 arrays are stored as safetensors ``BF16``, read back as
  ``ml_dtypes.bfloat16``;
* with an optimizer: ``"optimizer/state/<index>/<name>"`` for each moment array;
* string metadata: ``pymglu.version``, ``pymglu.format`` (``"training"``: mask logits, or
  ``"inference"``: packed bit-planes in place of the logits of at least one MGLU layer),
  ``pymglu.module`` (class name, or ``"state_dict"`` for a bare mapping), ``pymglu.modules`` (JSON: dotted
  sub-module name -> class name and settings, e.g. ``SwiMGLU(d=8, h=4, n_masks=2, ...)``), ``pymglu.optimizer`` (JSON: class, hyper-parameters, step counts), and
  the caller's own ``metadata`` (``str -> str``; keys must not start with ``"pymglu."``).

CuPy arrays are copied to the host for saving; loading copies values onto each parameter's device.
"""
from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any, Mapping

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

from pymglu import __version__, dtypes as _dtypes
from pymglu.backend import to_numpy, unwrap
from pymglu.nn.module import Module, StateDictError

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "read_checkpoint"]

_OPT_PREFIX = "optimizer/state/"
_RESERVED_META = "pymglu."

#: safetensors dtype tags -> NumPy dtypes (safetensors.numpy itself has no BF16 reader).
_ST_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}


def _module_tree(module: Module) -> dict[str, str]:
    """Dotted sub-module name -> ``Class(settings)``: what a strict load compares besides the arrays, so that
    e.g. a SiLU layer's weights do not load silently into a GELU layer of the same shapes."""
    return {name: f"{type(m).__name__}({m.extra_repr()})" for name, m in module.named_modules()}


class CheckpointError(ValueError):
    """A checkpoint file cannot be read, or does not fit the module / optimizer it is loaded into."""


# --------------------------------------------------------------------------------------------- saving
def _format_of(keys: Any) -> str:
    return "inference" if any(k.rsplit(".", 1)[-1] == "packed_masks" for k in keys) else "training"


def _host_array(key: str, value: Any) -> np.ndarray:
    value = unwrap(value)
    if not hasattr(value, "shape") or not hasattr(value, "dtype"):
        raise TypeError(f"save_checkpoint: entry {key!r} is a {type(value).__name__}, not an array")
    arr = np.ascontiguousarray(to_numpy(value))
    if arr.dtype not in _ST_DTYPES.values():
        raise TypeError(f"save_checkpoint: entry {key!r} has dtype {_dtypes.name(arr.dtype)}, which cannot be saved")
    return arr


def _optimizer_payload(optimizer: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors: dict[str, np.ndarray] = {}
    steps: dict[str, int] = {}
    for idx, entry in sd["state"].items():
        for name, value in entry.items():
            if name == "step":
                steps[str(idx)] = int(value)
            else:
                tensors[f"{_OPT_PREFIX}{idx}/{name}"] = _host_array(f"optimizer state {idx} {name}", value)
    groups = []
    for g in sd["param_groups"]:
        groups.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()})
    return tensors, {"class": type(optimizer).__name__, "param_groups": groups, "steps": steps}


def _write_atomic(path: Path, payload: bytes) -> None:
    """Write ``payload`` to a temporary file beside ``path``, fsync it, then rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600 files; a checkpoint gets ordinary permissions
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def save_checkpoint(path: str | os.PathLike, module_or_state: Module | Mapping[str, Any],
                    metadata: Mapping[str, str] | None = None, optimizer: Any = None) -> None:
    """Save a module's ``state_dict`` (or a mapping of name -> array) to a safetensors file, atomically.

    Args:
        path: destination; its directory must exist. An existing file is replaced only once the new one
            is complete on disk (temporary file in the same directory, fsync, ``os.replace``).
        module_or_state: a :class:`pymglu.nn.Module` or a mapping of names to NumPy/CuPy arrays.
        metadata: extra ``str -> str`` entries for the header (keys must not start with ``"pymglu."``).
        optimizer: a :class:`pymglu.optim.Optimizer` whose state is saved alongside.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"save_checkpoint: directory {str(path.parent)!r} does not exist")
    if isinstance(module_or_state, Module):
        state = module_or_state.state_dict()
        module_name = type(module_or_state).__name__
        tree = _module_tree(module_or_state)
    elif isinstance(module_or_state, Mapping):
        state = module_or_state
        module_name, tree = "state_dict", {}
    else:
        raise TypeError(
            f"module_or_state: expected a pymglu.nn.Module or a mapping, got {type(module_or_state).__name__}"
        )
    tensors: dict[str, np.ndarray] = {}
    for key, value in state.items():
        if not isinstance(key, str) or not key or key.startswith(_OPT_PREFIX):
            raise ValueError(f"save_checkpoint: invalid state key {key!r}")
        tensors[key] = _host_array(key, value)
    meta: dict[str, str] = {}
    for k, v in dict(metadata or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"metadata: expected str -> str entries, got {k!r}: {type(v).__name__}")
        if k.startswith(_RESERVED_META):
            raise ValueError(f"metadata: keys starting with {_RESERVED_META!r} are reserved, got {k!r}")
        meta[k] = v
    meta.update({
        "pymglu.version": __version__,
        "pymglu.format": _format_of(tensors),
        "pymglu.module": module_name,
        "pymglu.modules": json.dumps(tree),
    })
    if optimizer is not None:
        opt_tensors, opt_meta = _optimizer_payload(optimizer)
        tensors.update(opt_tensors)
        meta["pymglu.optimizer"] = json.dumps(opt_meta)
    payload = safetensors.numpy.save(tensors, metadata=meta)
    _write_atomic(path, payload)


# --------------------------------------------------------------------------------------------- loading
def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read every tensor and the metadata of a safetensors file.

    Returns:
        ``(tensors, metadata)``: name -> NumPy array (bfloat16 as ``ml_dtypes.bfloat16``), and the header's
        ``str -> str`` metadata.
    Raises:
        FileNotFoundError: no such file. CheckpointError: not a complete, readable safetensors file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist or is not a file")
    data = path.read_bytes()
    try:
        if len(data) < 8:
            raise ValueError(f"{len(data)} bytes, too short for a header")
        (header_len,) = struct.unpack("<Q", data[:8])
        if header_len > len(data) - 8:
            raise ValueError(f"header of {header_len} bytes announced, the file has {len(data) - 8} after the size")
        header = json.loads(data[8:8 + header_len])
        metadata = header.get("__metadata__") or {}
        items = safetensors.deserialize(data)
    except Exception as e:  # json, struct and safetensors errors all mean the same to the caller
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a readable safetensors file (truncated or corrupt?): {e}"
        ) from None
    tensors: dict[str, np.ndarray] = {}
    for name, info in items:
        dtype = _ST_DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"checkpoint {str(path)!r}: tensor {name!r} has unsupported dtype {info['dtype']}")
        tensors[name] = np.frombuffer(info["data"], dtype=dtype).reshape(info["shape"])
    return tensors, dict(metadata)


def _optimizer_state_from(path: Path, tensors: Mapping[str, np.ndarray], meta: Mapping[str, str],
                          optimizer: Any) -> dict[str, Any]:
    if "pymglu.optimizer" not in meta:
        raise CheckpointError(f"checkpoint {str(path)!r} holds no optimizer state")
    try:
        info = json.loads(meta["pymglu.optimizer"])
        cls, groups, steps = info["class"], info["param_groups"], info["steps"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {str(path)!r}: unreadable optimizer metadata ({e})") from None
    if cls != type(optimizer).__name__:
        raise CheckpointError(f"checkpoint {str(path)!r}: optimizer state of a {cls}, loading into a "
                              f"{type(optimizer).__name__}")
    state: dict[int, dict[str, Any]] = {}
    for idx, step in steps.items():
        state[int(idx)] = {"step": step}
    for key, arr in tensors.items():
        if not key.startswith(_OPT_PREFIX):
            continue
        idx, _, name = key[len(_OPT_PREFIX):].partition("/")
        if not idx.isdigit() or int(idx) not in state:
            raise CheckpointError(f"checkpoint {str(path)!r}: optimizer tensor {key!r} has no step entry")
        state[int(idx)][name] = arr
    return {"state": state, "param_groups": groups}


def load_checkpoint(path: str | os.PathLike, module: Module, strict: bool = True,
                    optimizer: Any = None) -> dict[str, str]:
    """Load a checkpoint written by :func:`save_checkpoint` into ``module`` (and ``optimizer``).

    Everything is checked before anything changes: the file (exists, complete, readable), the module
    tree's class names (under ``strict``), every key, shape and dtype (all differences are named in one
    :class:`CheckpointError`), and the optimizer state when ``optimizer`` is given. On failure the module,
    the optimizer and the file are left unchanged.

    Args:
        path: the ``.safetensors`` file. module: the :class:`pymglu.nn.Module` to fill.
        strict: require exactly the module's keys and the same class tree; ``False`` tolerates missing
            and unexpected keys and other classes (shapes and dtypes must still match).
        optimizer: an optimizer over ``module``'s parameters whose state the file holds.
    Returns:
        the file's metadata (``str -> str``).
    """
    if not isinstance(module, Module):
        raise TypeError(f"module: expected a pymglu.nn.Module, got {type(module).__name__}")
    path = Path(path)
    tensors, meta = read_checkpoint(path)
    model_state = {k: v for k, v in tensors.items() if not k.startswith(_OPT_PREFIX)}
    problems = []
    saved_module = meta.get("pymglu.module")
    if strict and saved_module not in (None, "state_dict"):
        try:
            saved_tree = json.loads(meta.get("pymglu.modules", "{}"))
        except ValueError:
            saved_tree = {}
        tree = _module_tree(module)
        if saved_tree and saved_tree != tree:
            diffs = [f"{n or '<root>'}: file {saved_tree.get(n)}, module {tree.get(n)}"
                     for n in sorted(set(saved_tree) | set(tree)) if saved_tree.get(n) != tree.get(n)]
            problems.append("layer classes or settings differ (" + "; ".join(diffs) + ")")
        elif not saved_tree and saved_module != type(module).__name__:
            problems.append(f"saved from a {saved_module}, loading into a {type(module).__name__}")
    try:
        module.check_state_dict(model_state, strict=strict)
    except StateDictError as e:
        problems.append(e.details)
    opt_state = None
    if optimizer is not None:
        try:
            opt_state = _optimizer_state_from(path, tensors, meta, optimizer)
            optimizer.check_state_dict(opt_state)
        except (CheckpointError, ValueError, TypeError) as e:
            problems.append(f"optimizer: {e}")
    if problems:
        fmt = meta.get("pymglu.format", "unknown")
        raise CheckpointError(
            f"cannot load checkpoint {str(path)!r} ({fmt} format) into {type(module).__name__}; nothing was "
            "changed: " + " | ".join(problems)
        )
    module.load_state_dict(model_state, strict=strict)
    if optimizer is not None:
        optimizer.load_state_dict(opt_state)
    return meta
