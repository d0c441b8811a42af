"""Optimizers (SGD, AdamW), gradient clipping and a warmup + cosine learning-rate schedule.

Every update runs on the array module of its parameter (NumPy or CuPy) with no host round-trip:
hyper-parameters and step counts are Python numbers, moments live beside the parameter. Optimizer
state is float32 for float32, float16 and bfloat16 parameters (float64 for float64 ones).

**fp32 master weights** (automatic; ``master_weights=False`` opts out). For every float16 or bfloat16
parameter the optimizer keeps a float32 copy, ``state["master"]`` (same shape), created from the
parameter on its first update. Each step updates the master in float32 and writes the master rounded to
the parameter's dtype back into the parameter, so updates smaller than half a unit in the last place of
the 16-bit value accumulate in the master instead of being rounded away. The master is saved and
restored by :meth:`Optimizer.state_dict` / :meth:`Optimizer.load_state_dict` (and so by checkpoints).
It costs 4 bytes per 16-bit parameter. float32 and float64 parameters have no master and their update is
unchanged. Gradients of a 16-bit parameter may come in its own dtype or in float32 (what
:meth:`pymglu.amp.DynamicLossScaler.unscale_` produces).

The master follows changes made to the parameter outside the optimizer: the optimizer remembers the
parameter's data array and :attr:`pymglu.nn.Parameter.version` after each of its own writes, and when
either differs on the next update (an assignment to ``.data``, ``Module.load_state_dict``,
``Module.to``, or an in-place edit followed by ``mark_modified()``), every element whose master no longer
rounds to the parameter's value is reset to that value, elementwise on the device (no host read). After
:meth:`Optimizer.load_state_dict` the same elementwise rule runs once, so a loaded master survives a
model load in either order as long as the model holds the rounded master. An in-place edit of ``.data``
*without* ``mark_modified()`` is not seen and is overwritten by the next update.

``step()`` first checks every gradient (shape, dtype, device) and the existing state, and only then
updates, so a bad gradient raises before any parameter or moment changes. ``load_state_dict`` likewise
validates everything before it touches the optimizer.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from pymglu import _checks, dtypes as _dtypes
from pymglu.autograd.function import no_grad
from pymglu.autograd.tensor import Tensor
from pymglu.backend import cupy_or_none, device_of, get_array_module, is_cupy_array, unwrap

__all__ = [
    "Optimizer",
    "SGD",
    "AdamW",
    "param_groups_no_decay",
    "clip_grad_norm",
    "WarmupCosine",
]

ParamsLike = Any  # a Module, an iterable of Tensors, or an iterable of group dicts


#: parameter dtypes that get an fp32 master copy in the optimizer state.
LOW_PRECISION_DTYPES = (_dtypes.float16, _dtypes.bfloat16)


def _state_dtype(param_dtype: Any) -> np.dtype:
    return _dtypes.compute_dtype(param_dtype)


def _is_low_precision(dtype: Any) -> bool:
    return np.dtype(dtype) in LOW_PRECISION_DTYPES


def _check_lr(value: Any) -> float:
    return _checks.check_finite("lr", value, minimum=0.0)


def _check_unit_interval(name: str, value: Any) -> float:
    f = _checks.check_finite(name, value, minimum=0.0)
    if f >= 1.0:
        raise ValueError(f"{name}: expected a number in [0, 1), got {value!r}")
    return f


def _collect_params(params: ParamsLike) -> list[Any]:
    if hasattr(params, "parameters") and callable(params.parameters):
        params = params.parameters()
    if isinstance(params, (Tensor, dict)):
        params = [params]
    try:
        return list(params)
    except TypeError:
        raise TypeError(
            f"params: expected a Module, an iterable of Parameters or of group dicts, got {type(params).__name__}"
        ) from None


class Optimizer:
    """Base class over parameter groups.

    Args:
        params: a Module, an iterable of Parameters (Tensors with ``requires_grad``), or an iterable of
            group dicts ``{"params": [...], <hyper-parameter overrides>, "names": [...] (optional)}``.
        defaults: the hyper-parameters every group starts from.
        master_weights: keep a float32 master copy of every float16/bfloat16 parameter in its state
            (default ``True``; see the module docstring). ``False`` updates a 16-bit parameter from its
            own rounded value, so updates below its resolution are lost.
    """

    #: hyper-parameter names a group may override (besides "params" and "names").
    hyperparameters: tuple[str, ...] = ("lr",)
    #: names of the per-parameter arrays every state entry has (besides the integer "step", and the
    #: float32 "master" of a 16-bit parameter under ``master_weights``).
    state_arrays: tuple[str, ...] = ()
    #: names of per-parameter arrays a state entry may have (created on first use).
    optional_state_arrays: tuple[str, ...] = ()

    def __init__(self, params: ParamsLike, defaults: dict[str, Any], master_weights: bool = True) -> None:
        if not isinstance(master_weights, (bool, np.bool_)):
            raise TypeError(f"master_weights: expected a bool, got {master_weights!r}")
        #: whether float16/bfloat16 parameters get an fp32 master copy in their state.
        self.master_weights = bool(master_weights)
        self.defaults = self._validate_hparams(dict(defaults), where="defaults")
        items = _collect_params(params)
        if not items:
            raise ValueError("params: the optimizer got an empty parameter list")
        if all(isinstance(it, dict) for it in items):
            groups = items
        elif any(isinstance(it, dict) for it in items):
            raise TypeError("params: mix of group dicts and Parameters; pass one kind")
        else:
            groups = [{"params": items}]
        self.param_groups: list[dict[str, Any]] = []
        seen: set[int] = set()
        for gi, group in enumerate(groups):
            self.param_groups.append(self._make_group(group, gi, seen))
        #: per-parameter state, keyed by ``id(parameter)`` (the groups keep the parameters alive).
        self.state: dict[int, dict[str, Any]] = {}
        #: ``id(parameter) -> (data array, version)`` after this optimizer's last write of a parameter
        #: with a master copy; a difference on the next update means the parameter changed outside.
        self._master_keys: dict[int, tuple[Any, Any]] = {}

    # ----------------------------------------------------------------- groups and hyper-parameters
    def _validate_hparams(self, hp: dict[str, Any], where: str) -> dict[str, Any]:
        """Check the hyper-parameters in ``hp`` (a subset of :attr:`hyperparameters`); return them cleaned."""
        unknown = [k for k in hp if k not in self.hyperparameters]
        if unknown:
            raise ValueError(
                f"{where}: unknown hyper-parameter(s) {unknown} for {type(self).__name__}; "
                f"expected some of {self.hyperparameters}"
            )
        out = dict(hp)
        if "lr" in hp:
            out["lr"] = _check_lr(hp["lr"])
        return out

    def _make_group(self, group: dict[str, Any], index: int, seen: set[int]) -> dict[str, Any]:
        if "params" not in group:
            raise ValueError(f"param group {index}: missing the 'params' entry")
        params = _collect_params(group["params"])
        names = group.get("names")
        if names is not None and len(names) != len(params):
            raise ValueError(f"param group {index}: 'names' has {len(names)} entries for {len(params)} params")
        for pi, p in enumerate(params):
            if not isinstance(p, Tensor):
                raise TypeError(f"param group {index}: entry {pi} is a {type(p).__name__}, expected a Parameter")
            if not p.requires_grad:
                raise ValueError(f"param group {index}: entry {pi} ({p!r}) does not require a gradient")
            if id(p) in seen:
                raise ValueError(f"param group {index}: entry {pi} appears more than once in the optimizer")
            seen.add(id(p))
        overrides = {k: v for k, v in group.items() if k not in ("params", "names")}
        hp = dict(self.defaults)
        hp.update(self._validate_hparams(overrides, where=f"param group {index}"))
        self._check_group(hp, where=f"param group {index}")
        out = {"params": params, "names": list(names) if names is not None else None}
        out.update(hp)
        return out

    def _check_group(self, hp: dict[str, Any], where: str) -> None:
        """Cross-argument checks on a complete group (e.g. nesterov needs momentum)."""

    def _param_label(self, gi: int, pi: int) -> str:
        names = self.param_groups[gi].get("names")
        return repr(names[pi]) if names else f"group {gi} param {pi}"

    def set_lr(self, lr: float, group: int | None = None) -> None:
        """Set the learning rate of every group (or of group ``group``); validated like the constructor."""
        self.set_hyperparameter("lr", lr, group)

    def _groups(self, group: int | None) -> list[dict[str, Any]]:
        """Every group (``None``) or the one at index ``group``, checked."""
        if group is None:
            return self.param_groups
        if isinstance(group, bool) or not isinstance(group, int) or not 0 <= group < len(self.param_groups):
            raise ValueError(f"group: expected an index in [0, {len(self.param_groups)}), got {group!r}")
        return [self.param_groups[group]]

    def set_hyperparameter(self, name: str, value: Any, group: int | None = None) -> None:
        """Set a hyper-parameter (validated) on every group or on group ``group``."""
        cleaned = self._validate_hparams({name: value}, where="set_hyperparameter")[name]
        groups = self._groups(group)
        for g in groups:
            trial = {k: g[k] for k in self.hyperparameters}
            trial[name] = cleaned
            self._check_group(trial, where="set_hyperparameter")
        for g in groups:
            g[name] = cleaned

    # ----------------------------------------------------------------- stepping
    def zero_grad(self) -> None:
        """Drop the gradient of every parameter."""
        for g in self.param_groups:
            for p in g["params"]:
                p.grad = None

    def _validate_grads(self) -> None:
        problems = []
        for gi, g in enumerate(self.param_groups):
            for pi, p in enumerate(g["params"]):
                grad = p.grad
                if grad is None:
                    continue
                label = self._param_label(gi, pi)
                grad = unwrap(grad)
                if not hasattr(grad, "shape") or not hasattr(grad, "dtype"):
                    problems.append(f"{label}: gradient is a {type(grad).__name__}, not an array")
                    continue
                if tuple(grad.shape) != tuple(p.shape):
                    problems.append(f"{label}: gradient shape {tuple(grad.shape)} != parameter shape {p.shape}")
                gdt, pdt = np.dtype(grad.dtype), np.dtype(p.dtype)
                if gdt != pdt and not (_is_low_precision(pdt) and gdt == _dtypes.float32):
                    problems.append(
                        f"{label}: gradient dtype {_dtypes.name(grad.dtype)} != parameter dtype "
                        f"{_dtypes.name(p.dtype)}"
                        + (" (or float32)" if _is_low_precision(pdt) else "")
                    )
                if device_of(grad) != device_of(p.data):
                    problems.append(f"{label}: gradient on {device_of(grad)}, parameter on {device_of(p.data)}")
                problems.extend(self._state_problems(p, label))
        if problems:
            raise ValueError(
                f"{type(self).__name__}.step: nothing was updated; bad gradients: " + "; ".join(problems)
            )

    def _state_problems(self, p: Any, label: str) -> list[str]:
        """What no longer fits between ``p`` and its existing state (device, shape, dtype, master)."""
        st = self.state.get(id(p))
        if not st:
            return []
        problems = []
        want = _state_dtype(p.dtype)
        for key, value in st.items():
            if not hasattr(value, "shape"):
                continue
            if device_of(value) != device_of(p.data):
                problems.append(
                    f"{label}: optimizer state {key!r} on {device_of(value)}, parameter on "
                    f"{device_of(p.data)} (move the optimizer state with load_state_dict)"
                )
            elif tuple(value.shape) != tuple(p.shape) or np.dtype(value.dtype) != want:
                problems.append(
                    f"{label}: optimizer state {key!r} is {_checks.describe(value)}, the parameter needs "
                    f"{_dtypes.name(want)} of shape {tuple(p.shape)} (the parameter changed since its state "
                    "was created)"
                )
        if ("master" in st) != self._uses_master(p):
            problems.append(
                f"{label}: the optimizer state {'has' if 'master' in st else 'lacks'} an fp32 master copy, "
                f"which a {_dtypes.name(p.dtype)} parameter "
                f"{'does not take' if 'master' in st else 'needs'} (the parameter changed dtype)"
            )
        return problems

    def step(self) -> None:
        """Update every parameter that has a gradient (validated first; see the module docstring)."""
        self._validate_grads()
        with no_grad():
            for g in self.param_groups:
                for p in g["params"]:
                    if p.grad is None:
                        continue
                    self._update(p, unwrap(p.grad), g)
                    if hasattr(p, "mark_modified"):
                        p.mark_modified()
                    st = self.state.get(id(p))
                    if st is not None and "master" in st:
                        self._master_keys[id(p)] = (p.data, getattr(p, "version", None))

    def _update(self, p: Any, grad: Any, group: dict[str, Any]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _uses_master(self, p: Any) -> bool:
        """Whether ``p`` gets an fp32 master copy (a float16/bfloat16 parameter under ``master_weights``)."""
        return self.master_weights and _is_low_precision(p.dtype)

    def _new_state(self, p: Any) -> dict[str, Any]:
        xp = get_array_module(p.data)
        st: dict[str, Any] = {"step": 0}
        for key in self.state_arrays:
            st[key] = xp.zeros(p.shape, dtype=_state_dtype(p.dtype))
        if self._uses_master(p):
            st["master"] = p.data.astype(_dtypes.float32, copy=True)
        return st

    def _state_for(self, p: Any) -> dict[str, Any]:
        """The state of ``p``, created on first use; its master (if any) brought up to date."""
        st = self.state.get(id(p))
        if st is None:
            st = self.state[id(p)] = self._new_state(p)
        elif "master" in st:
            self._sync_master(p, st)
        return st

    def _sync_master(self, p: Any, st: dict[str, Any]) -> None:
        """Reset the master where the parameter was changed outside this optimizer (module docstring)."""
        key = self._master_keys.get(id(p))
        if key is not None and key[0] is p.data and key[1] == getattr(p, "version", None):
            return
        xp = get_array_module(p.data)
        master = st["master"]
        stale = master.astype(p.dtype) != p.data
        xp.copyto(master, p.data.astype(master.dtype), where=stale)

    @staticmethod
    def _write(p: Any, new_value: Any) -> None:
        """Store ``new_value`` (compute dtype) into ``p.data``, rounding to ``p``'s dtype; in place unless
        the array is read-only (e.g. a NumPy view of a file)."""
        if not getattr(getattr(p.data, "flags", None), "writeable", True):  # CuPy flags have no "writeable"
            p.data = new_value.astype(p.dtype, copy=True)
        else:
            p.data[...] = new_value.astype(p.dtype, copy=False)

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """``{"state": {index: {"step": int, <arrays>}}, "param_groups": [{hyper-parameters, "params":
        [indices]}]}``; indices number the parameters across groups in order. Arrays are not copied."""
        index = 0
        groups = []
        state: dict[int, dict[str, Any]] = {}
        for g in self.param_groups:
            idx = []
            for p in g["params"]:
                if id(p) in self.state:
                    state[index] = dict(self.state[id(p)])
                idx.append(index)
                index += 1
            entry = {k: g[k] for k in self.hyperparameters}
            entry["params"] = idx
            groups.append(entry)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; every group, index, hyper-parameter, array shape and dtype is
        checked first and nothing changes on failure. Arrays are copied onto each parameter's device."""
        staged, new_hparams, params_by_index = self._stage_state_dict(state_dict)
        new_state = {}
        for idx, st in staged.items():
            p = params_by_index[idx]
            new_state[id(p)] = {k: (_copy_to(v, p.data) if k != "step" else v) for k, v in st.items()}
        for g, hp in zip(self.param_groups, new_hparams):
            g.update(hp)
        self.state = new_state
        self._master_keys.clear()  # the next update reconciles each master with its parameter

    def check_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` naming every problem unless :meth:`load_state_dict` would accept it."""
        self._stage_state_dict(state_dict)

    def _stage_state_dict(self, state_dict: Mapping[str, Any]) -> tuple[dict, list, dict]:
        if not isinstance(state_dict, Mapping) or set(state_dict) != {"state", "param_groups"}:
            raise ValueError("optimizer state: expected a mapping with exactly the keys 'state' and 'param_groups'")
        groups = list(state_dict["param_groups"])
        problems = []
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"optimizer state: {len(groups)} param groups, this optimizer has {len(self.param_groups)}"
            )
        params_by_index: dict[int, Any] = {}
        new_hparams = []
        index = 0
        for gi, (saved, mine) in enumerate(zip(groups, self.param_groups)):
            expected_idx = list(range(index, index + len(mine["params"])))
            for p in mine["params"]:
                params_by_index[index] = p
                index += 1
            if not isinstance(saved, Mapping):
                problems.append(f"param group {gi}: expected a mapping, got {type(saved).__name__}")
                continue
            saved_idx = [int(i) for i in saved.get("params", [])] if _all_ints(saved.get("params", [])) else None
            if saved_idx != expected_idx:
                problems.append(
                    f"param group {gi}: saved parameter indices {saved.get('params')!r}, expected {expected_idx}"
                )
            missing = [k for k in self.hyperparameters if k not in saved]
            if missing:
                problems.append(f"param group {gi}: missing hyper-parameters {missing}")
            else:
                try:
                    hp = self._validate_hparams({k: saved[k] for k in self.hyperparameters}, f"param group {gi}")
                    self._check_group(hp, f"param group {gi}")
                    new_hparams.append(hp)
                except (TypeError, ValueError) as e:
                    problems.append(str(e))
        staged: dict[int, dict[str, Any]] = {}
        saved_state = state_dict["state"]
        if not isinstance(saved_state, Mapping):
            raise ValueError(f"optimizer state: 'state' must be a mapping, got {type(saved_state).__name__}")
        for key, entry in saved_state.items():
            try:
                idx = int(key)
            except (TypeError, ValueError):
                problems.append(f"state key {key!r} is not a parameter index")
                continue
            if idx not in params_by_index:
                problems.append(f"state entry {idx}: no parameter with that index (0..{index - 1})")
                continue
            p = params_by_index[idx]
            required = {"step", *self.state_arrays} | ({"master"} if self._uses_master(p) else set())
            allowed = required | set(self.optional_state_arrays)
            if not isinstance(entry, Mapping) or not required <= set(entry) <= allowed:
                got = sorted(entry) if isinstance(entry, Mapping) else type(entry).__name__
                optional = f" (optional: {sorted(self.optional_state_arrays)})" if self.optional_state_arrays else ""
                problems.append(
                    f"state entry {idx}: expected keys {sorted(required)}{optional} for a "
                    f"{_dtypes.name(p.dtype)} parameter (master_weights={self.master_weights}), got {got}"
                )
                continue
            step = entry["step"]
            if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
                problems.append(f"state entry {idx}: 'step' must be an integer >= 0, got {step!r}")
                continue
            st: dict[str, Any] = {"step": int(step)}
            want_dtype = _state_dtype(p.dtype)
            for name in sorted(set(entry) - {"step"}):
                arr = unwrap(entry[name])
                if not hasattr(arr, "shape") or tuple(arr.shape) != p.shape or np.dtype(arr.dtype) != want_dtype:
                    problems.append(
                        f"state entry {idx} {name!r}: expected {_dtypes.name(want_dtype)} of shape {p.shape}, "
                        f"got {_checks.describe(arr)}"
                    )
                    continue
                st[name] = arr
            staged[idx] = st
        if problems:
            raise ValueError(f"cannot load {type(self).__name__} state (nothing was changed): " + "; ".join(problems))
        return staged, new_hparams, params_by_index

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}("]
        for gi, g in enumerate(self.param_groups):
            hp = ", ".join(f"{k}={g[k]!r}" for k in self.hyperparameters)
            lines.append(f"  group {gi}: {len(g['params'])} params, {hp}")
        return "\n".join(lines) + "\n)"


def _all_ints(values: Any) -> bool:
    try:
        return all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values)
    except TypeError:
        return False


def _copy_to(value: Any, like: Any) -> Any:
    if is_cupy_array(like):
        cp = cupy_or_none()
        with cp.cuda.Device(like.device.id):
            return cp.array(value, copy=True)
    if is_cupy_array(value):
        return value.get()
    return np.array(value, copy=True)


def _weight_decay(p: Any, group: dict[str, Any]) -> float:
    """The group's weight decay, or 0 for a parameter created with ``decay=False`` (mask logits, norms)."""
    return group["weight_decay"] if getattr(p, "decay", True) else 0.0


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum, Nesterov momentum and L2 weight decay.

    Per parameter ``p`` with gradient ``g``: ``g += weight_decay * p``; with momentum,
    ``b = momentum * b + g`` (``b = g`` on the first step) and ``g = g + momentum * b`` (Nesterov) or
    ``g = b``; then ``p -= lr * g``. For a float16/bfloat16 parameter ``p`` is its fp32 master copy
    (module docstring). State: ``momentum_buffer`` once momentum is used, ``master`` for 16-bit
    parameters; plain SGD on float32/float64 parameters keeps no state.
    """

    hyperparameters = ("lr", "momentum", "weight_decay", "nesterov")
    optional_state_arrays = ("momentum_buffer",)

    def __init__(self, params: ParamsLike, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False, master_weights: bool = True) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                                  "nesterov": nesterov}, master_weights=master_weights)

    def _validate_hparams(self, hp: dict[str, Any], where: str) -> dict[str, Any]:
        out = super()._validate_hparams(hp, where)
        if "momentum" in hp:
            out["momentum"] = _check_unit_interval("momentum", hp["momentum"])
        if "weight_decay" in hp:
            out["weight_decay"] = _checks.check_finite("weight_decay", hp["weight_decay"], minimum=0.0)
        if "nesterov" in hp:
            if not isinstance(hp["nesterov"], (bool, np.bool_)):
                raise TypeError(f"nesterov: expected a bool, got {hp['nesterov']!r}")
            out["nesterov"] = bool(hp["nesterov"])
        return out

    def _check_group(self, hp: dict[str, Any], where: str) -> None:
        if hp["nesterov"] and hp["momentum"] == 0.0:
            raise ValueError(f"{where}: nesterov=True needs momentum > 0")

    def _update(self, p: Any, grad: Any, group: dict[str, Any]) -> None:
        ct = _state_dtype(p.dtype)
        momentum = group["momentum"]
        st = self._state_for(p) if momentum or self._uses_master(p) else None
        master = None if st is None else st.get("master")
        g = grad.astype(ct, copy=True)
        value = p.data.astype(ct, copy=False) if master is None else master
        wd = _weight_decay(p, group)
        if wd:
            g += wd * value
        if st is not None:
            st["step"] += 1
        if momentum:
            buf = st.get("momentum_buffer")
            if buf is None:
                buf = st["momentum_buffer"] = g.copy()
            else:
                buf *= momentum
                buf += g
            if group["nesterov"]:
                g += momentum * buf
            else:
                g = buf
        if master is None:
            self._write(p, value - group["lr"] * g)
        else:
            master -= group["lr"] * g
            self._write(p, master)


class AdamW(Optimizer):
    """Adam with decoupled weight decay (Loshchilov and Hutter).

    Per parameter, with step count ``t`` (from 1): ``p *= 1 - lr * weight_decay``;
    ``m = b1 m + (1 - b1) g``; ``v = b2 v + (1 - b2) g^2``;
    ``p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)``, all in float32 (float64 for float64
    parameters); for a float16/bfloat16 parameter ``p`` is its fp32 master copy, rounded into the
    parameter after the update (module docstring).
    Parameters created with ``decay=False`` (mask logits, norm weights) are never decayed; use
    :func:`param_groups_no_decay` to keep further parameters (e.g. biases) out of the decay by name.
    State: ``exp_avg``, ``exp_avg_sq`` (and ``master`` for 16-bit parameters), shaped like the parameter.
    """

    hyperparameters = ("lr", "betas", "eps", "weight_decay")
    state_arrays = ("exp_avg", "exp_avg_sq")

    def __init__(self, params: ParamsLike, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, master_weights: bool = True) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay},
                         master_weights=master_weights)

    def _validate_hparams(self, hp: dict[str, Any], where: str) -> dict[str, Any]:
        out = super()._validate_hparams(hp, where)
        if "betas" in hp:
            betas = hp["betas"]
            if isinstance(betas, (str, bytes)) or not isinstance(betas, Sequence) or len(betas) != 2:
                raise ValueError(f"betas: expected a pair (beta1, beta2), got {betas!r}")
            out["betas"] = (_check_unit_interval("betas[0]", betas[0]), _check_unit_interval("betas[1]", betas[1]))
        if "eps" in hp:
            out["eps"] = _checks.check_finite("eps", hp["eps"], minimum=0.0, strict_min=True)
        if "weight_decay" in hp:
            out["weight_decay"] = _checks.check_finite("weight_decay", hp["weight_decay"], minimum=0.0)
        return out

    def _update(self, p: Any, grad: Any, group: dict[str, Any]) -> None:
        xp = get_array_module(p.data)
        ct = _state_dtype(p.dtype)
        st = self._state_for(p)
        st["step"] += 1
        t = st["step"]
        b1, b2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], _weight_decay(p, group)
        g = grad.astype(ct, copy=False)
        m, v = st["exp_avg"], st["exp_avg_sq"]
        m *= b1
        m += (1.0 - b1) * g
        v *= b2
        v += (1.0 - b2) * (g * g)
        bc1 = 1.0 - b1 ** t
        bc2 = 1.0 - b2 ** t
        denom = xp.sqrt(v / bc2)
        denom += eps
        master = st.get("master")
        if master is not None:
            if wd:
                master *= 1.0 - lr * wd
            master -= (lr / bc1) * (m / denom)
            self._write(p, master)
            return
        value = p.data.astype(ct, copy=True) if p.dtype != ct else p.data
        if wd:
            value = value * (1.0 - lr * wd)
        self._write(p, value - (lr / bc1) * (m / denom))


def param_groups_no_decay(
    module: Any,
    weight_decay: float,
    no_decay: Sequence[str] = ("mask_logits", "norm", "bias"),
) -> list[dict[str, Any]]:
    """Split a module's parameters into a decayed group and a group with ``weight_decay = 0``.

    A parameter goes to the no-decay group when one of the ``no_decay`` patterns is a substring of its
    dotted name (``"layers.0.ffn.up.mask_logits"``) or of the lower-cased class name of the module
    that owns it (so an ``RMSNorm``'s ``weight`` matches ``"norm"`` whatever the attribute is called).

    Returns:
        a list of one or two group dicts ``{"params", "names", "weight_decay"}`` (empty groups dropped),
        to pass to :class:`AdamW` or :class:`SGD`.
    """
    weight_decay = _checks.check_finite("weight_decay", weight_decay, minimum=0.0)
    if isinstance(no_decay, str):
        no_decay = (no_decay,)
    patterns = tuple(no_decay)
    if not all(isinstance(s, str) and s for s in patterns):
        raise ValueError(f"no_decay: expected non-empty strings, got {no_decay!r}")
    if not hasattr(module, "named_modules"):
        raise TypeError(f"module: expected a pymglu.nn.Module, got {type(module).__name__}")
    decay: dict[str, list] = {"params": [], "names": []}
    keep: dict[str, list] = {"params": [], "names": []}
    seen: set[int] = set()
    for mod_name, mod in module.named_modules():
        owner = type(mod).__name__.lower()
        for name, p in mod._parameters.items():
            if id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{mod_name}.{name}" if mod_name else name
            target = keep if any(s in full or s in owner for s in patterns) else decay
            target["params"].append(p)
            target["names"].append(full)
    groups = []
    if decay["params"]:
        groups.append({**decay, "weight_decay": weight_decay})
    if keep["params"]:
        groups.append({**keep, "weight_decay": 0.0})
    if not groups:
        raise ValueError(f"module: {type(module).__name__} has no parameters")
    return groups


def clip_grad_norm(params: ParamsLike, max_norm: float, eps: float = 1e-6) -> Any:
    """Scale all gradients in place so that their global L2 norm is at most ``max_norm``.

    The norm is computed over every parameter that has a gradient, in float32 (float64 when any
    gradient is float64), without leaving the device. Gradients are multiplied by
    ``min(1, max_norm / (norm + eps))``.

    Each ``p.grad`` is replaced by a scaled copy (no gradient array is written through), so arrays the
    caller still holds keep their values.

    Returns:
        the norm before clipping, as a 0-d array on the gradients' device (``float(...)`` reads it).
    """
    max_norm = _checks.check_finite("max_norm", max_norm, minimum=0.0, strict_min=True)
    tensors = []
    for it in _collect_params(params):
        group_params = it["params"] if isinstance(it, dict) else [it]
        for p in _collect_params(group_params):
            if not isinstance(p, Tensor):
                raise TypeError(f"params: expected Parameters, got a {type(p).__name__}")
            if p.grad is not None:
                tensors.append(p)
    if not tensors:
        return np.zeros((), dtype=np.float32)
    grads = [unwrap(p.grad) for p in tensors]
    xp = get_array_module(*grads)
    acc = _dtypes.float64 if any(np.dtype(g.dtype) == _dtypes.float64 for g in grads) else _dtypes.float32
    total_sq = xp.zeros((), dtype=acc)
    for g in grads:
        gc = g.astype(acc, copy=False)
        total_sq = total_sq + xp.vdot(gc.ravel(), gc.ravel())
    total = xp.sqrt(total_sq)
    scale = xp.minimum(xp.asarray(1.0, dtype=acc), max_norm / (total + eps))
    for p, g in zip(tensors, grads):
        p.grad = (g.astype(acc, copy=False) * scale).astype(g.dtype, copy=False)
    return total


class WarmupCosine:
    """Linear warmup then cosine decay of every group's learning rate.

    With base rate ``lr0`` (each group's ``lr`` when the schedule is created), at step ``s`` (0-based):

    * ``s < warmup_steps``: ``lr0 * (s + 1) / warmup_steps``;
    * ``warmup_steps <= s < total_steps``: ``lr0 * (r + (1 - r) * (1 + cos(pi * q)) / 2)`` with
      ``q = (s - warmup_steps) / (total_steps - warmup_steps)`` and ``r = min_lr_ratio``;
    * ``s >= total_steps``: ``lr0 * r``.

    The constructor sets the rate of step 0; call :meth:`step` after each ``optimizer.step()``.
    """

    def __init__(self, optimizer: Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer: expected a pymglu.optim.Optimizer, got {type(optimizer).__name__}")
        self.warmup_steps = _checks.check_positive_int("warmup_steps", warmup_steps, minimum=0)
        self.total_steps = _checks.check_positive_int("total_steps", total_steps, minimum=1)
        if self.warmup_steps > self.total_steps:
            raise ValueError(
                f"warmup_steps: expected at most total_steps = {self.total_steps}, got {warmup_steps!r}"
            )
        self.min_lr_ratio = _checks.check_finite("min_lr_ratio", min_lr_ratio, minimum=0.0, maximum=1.0)
        self.optimizer = optimizer
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.last_step = 0
        self._apply()

    def factor(self, step: int) -> float:
        """Multiplier of the base rates at ``step`` (an integer >= 0)."""
        step = _checks.check_positive_int("step", step, minimum=0)
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if step >= self.total_steps:
            return self.min_lr_ratio
        q = (step - self.warmup_steps) / (self.total_steps - self.warmup_steps)
        r = self.min_lr_ratio
        return r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * q))

    def lr_at(self, step: int) -> list[float]:
        """The learning rate of each group at ``step``."""
        f = self.factor(step)
        return [lr0 * f for lr0 in self.base_lrs]

    def get_last_lr(self) -> list[float]:
        return self.lr_at(self.last_step)

    def _apply(self) -> None:
        lrs = self.lr_at(self.last_step)
        for lr in lrs:
            _check_lr(lr)
        for gi, lr in enumerate(lrs):
            self.optimizer.set_lr(lr, group=gi)

    def step(self) -> None:
        """Advance one step and set the optimizer's rates."""
        self.last_step += 1
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (validated first) and set the optimizer's rates."""
        if not isinstance(state, Mapping) or set(state) != {"last_step", "base_lrs"}:
            raise ValueError("schedule state: expected a mapping with the keys 'last_step' and 'base_lrs'")
        last = _checks.check_positive_int("last_step", state["last_step"], minimum=0)
        base = list(state["base_lrs"])
        if len(base) != len(self.optimizer.param_groups):
            raise ValueError(
                f"base_lrs: {len(base)} values for {len(self.optimizer.param_groups)} param groups"
            )
        base = [_check_lr(b) for b in base]
        self.last_step, self.base_lrs = last, base
        self._apply()

