"""``Parameter`` and ``Module``: the container machinery every layer builds on.

A :class:`Module` registers :class:`Parameter` objects, sub-modules and buffers through plain attribute
assignment (``self.W = Parameter(...)``, ``self.up = Linear(...)``, ``self.register_buffer(...)``) and
walks them in registration order, so that names and orders are deterministic. ``state_dict()`` maps dotted
names (``"up.W"``) to arrays; ``load_state_dict()`` validates every key, shape and dtype before it changes
anything, so a failed load leaves the module exactly as it was.
"""
from __future__ import annotations

from collections import OrderedDict
from types import ModuleType
from typing import Any, Iterator, Mapping

import numpy as np

from pymglu import _checks, dtypes as _dtypes
from pymglu.autograd.tensor import Tensor
from pymglu.backend import cupy_or_none, device_of, is_cupy_array, to_numpy, unwrap

__all__ = ["Parameter", "Module", "StateDictError"]


class StateDictError(ValueError):
    """A state dict does not fit a module: lists every missing, unexpected and mismatched key."""

    def __init__(self, owner: str, missing: list[str], unexpected: list[str], mismatched: list[str]) -> None:
        self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), list(mismatched)
        parts = []
        if missing:
            parts.append("missing keys: " + ", ".join(missing))
        if unexpected:
            parts.append("unexpected keys: " + ", ".join(unexpected))
        if mismatched:
            parts.append("mismatched: " + "; ".join(mismatched))
        #: the problems alone, without the leading sentence.
        self.details = " | ".join(parts)
        super().__init__(f"cannot load state into {owner} (nothing was changed): {self.details}")


def _as_array(data: Any) -> Any:
    data = unwrap(data)
    if isinstance(data, np.ndarray) or is_cupy_array(data):
        return data
    return np.asarray(data)


class Parameter(Tensor):
    """A trainable Tensor: float data, ``requires_grad=True`` by default.

    ``_version`` counts assignments to ``.data``; code that edits ``.data`` in place (the optimizers do)
    calls :meth:`mark_modified` so that caches derived from the parameter (an MGLU layer's packed
    bit-planes) can tell that they are stale.

    ``decay`` says whether the optimizers' weight decay applies to this parameter. Layers create mask
    logits and norm weights with ``decay=False`` (DESIGN.md: no decay on logits by default); set the
    attribute to ``True`` to decay them too.

    ``wants_sign_bits`` (set by the MGLU layers on their mask logits) asks an optimizer whose update
    kernel can write the bit-planes of ``data > 0`` in the same pass (:mod:`pymglu.cuda.optimizers`) to
    do so; it hands them over with :meth:`offer_sign_bits` and the layer takes them with
    :meth:`sign_bits` instead of packing the logits itself.
    """

    def __init__(self, data: Any, requires_grad: bool = True, decay: bool = True) -> None:
        data = _as_array(data)
        if not _dtypes.is_float(data.dtype):
            raise TypeError(f"Parameter: expected a float array, got {_checks.describe(data)}")
        self._version = 0
        self.decay = bool(decay)
        self.wants_sign_bits = False
        self._sign_bits: tuple[Any, Any, int] | None = None
        super().__init__(data, requires_grad=requires_grad)

    @property
    def data(self) -> Any:
        return self._data

    @data.setter
    def data(self, value: Any) -> None:
        value = _as_array(value)
        if not _dtypes.is_float(value.dtype):
            raise TypeError(f"Parameter.data: expected a float array, got {_checks.describe(value)}")
        self._data = value
        self._version += 1

    @property
    def version(self) -> int:
        """Bumped by every assignment to ``.data`` and by :meth:`mark_modified`."""
        return self._version

    def mark_modified(self) -> None:
        """Record an in-place change of ``.data``."""
        self._version += 1

    def offer_sign_bits(self, bits: Any) -> None:
        """Record ``bits``, uint32 ``(..., ceil(d/32))``, as the bit-planes of ``data > 0`` for the current
        data and version (layout of :func:`pymglu.masks.pack_masks`)."""
        self._sign_bits = (bits, self._data, self._version)

    def sign_bits(self) -> Any:
        """The bit-planes of :meth:`offer_sign_bits` while ``.data`` is the same array at the same version,
        else ``None``."""
        held = self._sign_bits
        if held is None or held[1] is not self._data or held[2] != self._version:
            return None
        return held[0]

    def __repr__(self) -> str:
        return f"Parameter({_checks.describe(self.data)}, requires_grad={self.requires_grad})"


def _check_attr_name(kind: str, name: Any) -> str:
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"{kind} name: expected a Python identifier without dots, got {name!r}")
    return name


class Module:
    """Base class of layers.

    Subclasses call ``super().__init__()`` first, then assign Parameters, Modules and buffers as
    attributes, and implement ``forward``. Calling the module calls ``forward``.
    """

    training: bool

    def __init__(self) -> None:
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_non_persistent", set())
        object.__setattr__(self, "training", True)

    # ----------------------------------------------------------------- registration
    def _registries(self) -> tuple[dict, dict, dict]:
        try:
            return self.__dict__["_parameters"], self.__dict__["_modules"], self.__dict__["_buffers"]
        except KeyError:
            raise RuntimeError(
                f"{type(self).__name__}.__init__ must call super().__init__() before assigning attributes"
            ) from None

    def __setattr__(self, name: str, value: Any) -> None:
        params, modules, buffers = self._registries()
        if isinstance(value, Parameter):
            modules.pop(name, None)
            buffers.pop(name, None)
            self.__dict__.pop(name, None)
            params[name] = value
        elif isinstance(value, Module):
            params.pop(name, None)
            buffers.pop(name, None)
            self.__dict__.pop(name, None)
            modules[name] = value
        elif name in params:
            if value is not None:
                raise TypeError(
                    f"{type(self).__name__}.{name} is a Parameter; assign a Parameter (or None to remove it), "
                    f"got {type(value).__name__}"
                )
            del params[name]
            object.__setattr__(self, name, None)
        elif name in buffers:
            buffers[name] = None if value is None else _as_array(value)
        elif name in modules:
            if value is not None:
                raise TypeError(f"{type(self).__name__}.{name} is a sub-module; assign a Module or None")
            del modules[name]
            object.__setattr__(self, name, None)
        else:
            object.__setattr__(self, name, value)

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails, i.e. for registered entries.
        d = self.__dict__
        for registry in ("_parameters", "_buffers", "_modules"):
            if registry in d and name in d[registry]:
                return d[registry][name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __delattr__(self, name: str) -> None:
        params, modules, buffers = self._registries()
        for registry in (params, modules, buffers):
            if name in registry:
                del registry[name]
                self.__dict__["_non_persistent"].discard(name)
                return
        object.__delattr__(self, name)

    def register_buffer(self, name: str, array: Any, persistent: bool = True) -> None:
        """Register a non-trainable array (NumPy or CuPy, or ``None``) under ``name``.

        Persistent buffers are part of :meth:`state_dict`; non-persistent ones are caches.
        """
        _check_attr_name("buffer", name)
        params, modules, buffers = self._registries()
        if name in params or name in modules or (name in self.__dict__ and name not in buffers):
            raise ValueError(f"register_buffer: {type(self).__name__} already has an attribute {name!r}")
        buffers[name] = None if array is None else _as_array(array)
        if persistent:
            self.__dict__["_non_persistent"].discard(name)
        else:
            self.__dict__["_non_persistent"].add(name)

    def set_buffer_persistent(self, name: str, persistent: bool) -> None:
        """Include (``True``) or exclude (``False``) the buffer ``name`` from :meth:`state_dict`."""
        if name not in self._registries()[2]:
            raise KeyError(f"{type(self).__name__} has no buffer {name!r}")
        if persistent:
            self.__dict__["_non_persistent"].discard(name)
        else:
            self.__dict__["_non_persistent"].add(name)

    # ----------------------------------------------------------------- traversal
    def named_children(self) -> Iterator[tuple[str, "Module"]]:
        """Direct sub-modules with their attribute names, in registration order."""
        yield from self._registries()[1].items()

    def children(self) -> Iterator["Module"]:
        for _, m in self.named_children():
            yield m

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, "Module"]]:
        """This module (name ``prefix``) and every descendant, depth first, each module once."""
        seen: set[int] = set()
        stack: list[tuple[str, Module]] = [(prefix, self)]
        while stack:
            name, mod = stack.pop()
            if id(mod) in seen:
                continue
            seen.add(id(mod))
            yield name, mod
            kids = [(f"{name}.{k}" if name else k, m) for k, m in mod.named_children()]
            stack.extend(reversed(kids))

    def modules(self) -> Iterator["Module"]:
        for _, m in self.named_modules():
            yield m

    def named_parameters(self, prefix: str = "") -> list[tuple[str, Parameter]]:
        """``(dotted name, Parameter)`` pairs: own parameters first, then each child's, in registration
        order; a Parameter shared by two modules is listed once, under its first name."""
        out: list[tuple[str, Parameter]] = []
        seen: set[int] = set()
        for mod_name, mod in self.named_modules(prefix):
            for name, p in mod._registries()[0].items():
                if id(p) in seen:
                    continue
                seen.add(id(p))
                out.append((f"{mod_name}.{name}" if mod_name else name, p))
        return out

    def parameters(self) -> list[Parameter]:
        """All Parameters, in the order of :meth:`named_parameters`."""
        return [p for _, p in self.named_parameters()]

    def named_buffers(self, persistent_only: bool = False) -> list[tuple[str, Any]]:
        """``(dotted name, array)`` for every registered buffer that is not ``None``."""
        out = []
        for mod_name, mod in self.named_modules():
            non_persistent = mod.__dict__["_non_persistent"]
            for name, b in mod._registries()[2].items():
                if b is None or (persistent_only and name in non_persistent):
                    continue
                out.append((f"{mod_name}.{name}" if mod_name else name, b))
        return out

    # ----------------------------------------------------------------- modes and gradients
    def train(self, mode: bool = True) -> "Module":
        """Set the ``training`` flag of this module and every descendant; returns ``self``."""
        mode = bool(mode)
        for m in self.modules():
            object.__setattr__(m, "training", mode)
        return self

    def eval(self) -> "Module":
        """Same as ``train(False)``."""
        return self.train(False)

    def zero_grad(self) -> None:
        """Drop the gradient of every Parameter."""
        for p in self.parameters():
            p.grad = None

    # ----------------------------------------------------------------- state
    def state_dict(self) -> "OrderedDict[str, Any]":
        """Dotted name -> array for every Parameter, then every persistent buffer.

        The arrays are the module's own (no copy): copy them to keep a snapshot across training steps.
        """
        return OrderedDict(
            (key, mod._state_entry(attr, kind)) for key, (mod, attr, kind) in self._state_targets().items()
        )

    def _state_targets(self) -> "OrderedDict[str, tuple[Module, str, str]]":
        """Dotted name -> (owning module, attribute, "parameter" | "buffer"), as in :meth:`state_dict`."""
        targets: OrderedDict[str, tuple[Module, str, str]] = OrderedDict()
        seen: set[int] = set()
        buffers = []
        for mod_name, mod in self.named_modules():
            params, _, bufs = mod._registries()
            for name, p in params.items():
                if id(p) not in seen:
                    seen.add(id(p))
                    targets[f"{mod_name}.{name}" if mod_name else name] = (mod, name, "parameter")
            for name, b in bufs.items():
                if b is not None and name not in mod.__dict__["_non_persistent"]:
                    buffers.append((f"{mod_name}.{name}" if mod_name else name, (mod, name, "buffer")))
        targets.update(buffers)
        return targets

    def check_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        """Raise :class:`StateDictError` unless ``state`` fits this module (see :meth:`load_state_dict`)."""
        if not isinstance(state, Mapping):
            raise TypeError(f"state: expected a mapping of names to arrays, got {type(state).__name__}")
        expected = self.state_dict()
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        mismatched = []
        for key, current in expected.items():
            if key not in state:
                continue
            value = unwrap(state[key])
            if not hasattr(value, "shape") or not hasattr(value, "dtype"):
                mismatched.append(f"{key}: expected an array, got {type(value).__name__}")
                continue
            problems = []
            if tuple(value.shape) != tuple(current.shape):
                problems.append(f"shape {tuple(value.shape)} != expected {tuple(current.shape)}")
            if np.dtype(value.dtype) != np.dtype(current.dtype):
                problems.append(f"dtype {_dtypes.name(value.dtype)} != expected {_dtypes.name(current.dtype)}")
            if problems:
                mismatched.append(f"{key}: " + ", ".join(problems))
        if not strict:
            missing, unexpected = [], []
        if missing or unexpected or mismatched:
            raise StateDictError(type(self).__name__, missing, unexpected, mismatched)

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> dict[str, list[str]]:
        """Copy arrays from ``state`` into this module's Parameters and persistent buffers.

        Every key, shape and dtype is checked first; on any problem a :class:`StateDictError` names all
        of them and the module is left unchanged. ``strict=False`` tolerates missing and unexpected keys
        (shape and dtype mismatches still fail). Values are copied (never aliased) onto the device of the
        array they replace, so a NumPy state loads into a module living on a GPU.

        Returns:
            ``{"missing": [...], "unexpected": [...]}`` (empty lists under ``strict=True``).
        """
        self.check_state_dict(state, strict=strict)
        targets = self._state_targets()
        staged = []
        for key, (mod, attr, kind) in targets.items():
            if key not in state:
                continue
            current = mod._state_entry(attr, kind)
            staged.append((mod, attr, kind, _copy_like(unwrap(state[key]), current)))
        for mod, attr, kind, value in staged:
            if kind == "parameter":
                mod._registries()[0][attr].data = value
            else:
                mod._registries()[2][attr] = value
        for mod in self.modules():
            mod._after_load()
        return {
            "missing": [k for k in targets if k not in state],
            "unexpected": [k for k in state if k not in targets],
        }

    def _state_entry(self, attr: str, kind: str) -> Any:
        """The array currently stored for an own parameter or buffer ``attr``."""
        params, _, buffers = self._registries()
        return params[attr].data if kind == "parameter" else buffers[attr]

    def _after_load(self) -> None:
        """Hook run on every module after a successful :meth:`load_state_dict` (no-op by default)."""

    # ----------------------------------------------------------------- devices
    def to(self, target: str | ModuleType) -> "Module":
        """Move every Parameter, gradient and buffer to ``target``: ``"cpu"``/``numpy`` or
        ``"cuda"``/``"cuda:<id>"``/``cupy`` (needs CuPy). Explicit transfer; returns ``self``."""
        mover = _mover(target)
        for p in self.parameters():
            p.data = mover(p.data)
            if p.grad is not None:
                p.grad = mover(p.grad)
        for mod in self.modules():
            bufs = mod._registries()[2]
            for name, b in list(bufs.items()):
                if b is not None:
                    bufs[name] = mover(b)
        return self

    # ----------------------------------------------------------------- calling
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} does not implement forward()")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        kids = list(self.named_children())
        head = f"{type(self).__name__}({self.extra_repr()}"
        if not kids:
            return head + ")"
        lines = [head]
        for name, m in kids:
            lines.append("  (" + name + "): " + repr(m).replace("\n", "\n  "))
        return "\n".join(lines) + "\n)"


def _copy_like(value: Any, like: Any) -> Any:
    """A fresh copy of ``value`` on the device of ``like``."""
    if is_cupy_array(like):
        cp = cupy_or_none()
        with cp.cuda.Device(like.device.id):
            return cp.array(value, copy=True)
    return np.array(to_numpy(value), copy=True)


def _mover(target: str | ModuleType) -> Any:
    name = getattr(target, "__name__", target)
    if name in ("cpu", "numpy"):
        return to_numpy
    if isinstance(name, str) and (name == "cupy" or name == "cuda" or name.startswith("cuda:")):
        cp = cupy_or_none()
        if cp is None:
            raise RuntimeError(f"to({target!r}): CuPy is not installed or no CUDA device is usable")
        device_id = int(name.split(":", 1)[1]) if name.startswith("cuda:") else None

        def move(a: Any) -> Any:
            if device_id is None:
                return cp.asarray(a)
            with cp.cuda.Device(device_id):
                return cp.asarray(a) if device_of(a) == f"cuda:{device_id}" else cp.array(a, copy=True)

        return move
    raise ValueError(f"to: expected 'cpu', 'numpy', 'cuda', 'cuda:<id>' or the cupy module, got {target!r}")

