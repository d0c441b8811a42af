"""The optimizer base class: parameter groups, validated hyper-parameters, gradients and state,
and the fp32 master weights of 16-bit parameters (see :mod:`pymglu.optim`)."""
from __future__ import annotations

from typing import Any

import numpy as np

from pymglu import _checks, dtypes as _dtypes
from pymglu.autograd.function import no_grad
from pymglu.autograd.tensor import Tensor
from pymglu.backend import device_of, get_array_module, unwrap
from pymglu.optim.device_steps import DeviceSteps
from pymglu.optim.state_dict import StateDictMixin
from pymglu.optim.step_scalars import StepScalarsMixin


ParamsLike = Any  # a Module, an iterable of Tensors, or an iterable of group dicts


#: parameter dtypes that get an fp32 master copy in the optimizer state.
LOW_PRECISION_DTYPES = _dtypes.LOW_PRECISION_DTYPES


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


class Optimizer(StepScalarsMixin, StateDictMixin):
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
        #: ``id(parameter) -> uint32 array``: where the fused update writes the sign bit-planes of a
        #: parameter that wants them, reused every step (so a captured step writes where it reads).
        self._sign_bits: dict[int, Any] = {}
        #: ``id(parameter) -> (data array, version)`` when its bit-planes were last offered.
        self._sign_bits_keys: dict[int, tuple[Any, Any]] = {}
        #: while a training step is being captured: ``id(parameter) -> float32 device array`` of the
        #: step-dependent scalars its fused kernel reads (see :meth:`step_scalars`); else ``None``.
        self._step_scalar_rows: dict[int, Any] | None = None
        #: the step counts of updates whose skip is decided on the device (:meth:`step` with ``skip``),
        #: else ``None``; copied back into :attr:`state` by :meth:`settle_steps`.
        self._device_steps: DeviceSteps | None = None
        #: a float64 device table of :meth:`step_hyper` rows that :meth:`step` with ``skip`` reads instead
        #: of uploading its own (set by a captured step, which refreshes the table before each replay).
        self._hyper_table: Any = None
        self._rows_from_device = False

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
                pdt = np.dtype(p.dtype)
                if not _dtypes.gradient_dtype_ok(pdt, grad.dtype):
                    problems.append(
                        f"{label}: gradient dtype {_dtypes.name(grad.dtype)} != parameter dtype "
                        f"{_dtypes.name(p.dtype)}"
                        + (" (or float32)" if _is_low_precision(pdt) else "")
                        + (" (or float16, bfloat16)" if pdt == _dtypes.float32 else "")
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

    def step(self, skip: Any = None) -> None:
        """Update every parameter that has a gradient (validated first; see the module docstring).

        Args:
            skip: ``None``, or a CuPy int32 array of shape ``(1,)`` on the parameters' device, read by the
                update kernels when they run: nonzero leaves every parameter, state array, bit-plane and
                step count as it was (a float16 step with an overflow, decided on the device by
                :meth:`pymglu.amp.DynamicLossScaler.step` without a host read). With ``skip`` the step
                counts live on the device (:meth:`settle_steps` copies them back; :meth:`state_dict`
                does) and every update must run on the fused kernels (:mod:`pymglu.cuda.optimizers`).
        """
        self._validate_grads()
        with no_grad():
            saved = self._step_scalar_rows, self._rows_from_device
            if skip is None:
                self.settle_steps(drop=True)  # the host counts are the ones the updates advance
            else:
                self._step_scalar_rows, self._rows_from_device = self._rows_on_device(skip), True
            try:
                for p, g in self._with_grads():
                    self._record_update(p, self._update(p, unwrap(p.grad), g))
            finally:
                self._step_scalar_rows, self._rows_from_device = saved

    def _record_update(self, p: Any, sign_bits: Any) -> None:
        """The host side of an update of ``p`` once its kernels are queued: ``p`` is marked modified, the
        sign bit-planes the update wrote (if any) are offered, the master key is renewed."""
        if hasattr(p, "mark_modified"):
            p.mark_modified()
        if sign_bits is not None:
            p.offer_sign_bits(sign_bits)
            self._sign_bits_keys[id(p)] = (p.data, getattr(p, "version", None))
        st = self.state.get(id(p))
        if st is not None and "master" in st:
            self._master_keys[id(p)] = (p.data, getattr(p, "version", None))

    def _sign_bits_buffer(self, p: Any) -> Any:
        """The array the fused update of ``p`` writes its sign bit-planes into (``None`` unless ``p``
        wants them); made on first use and whenever ``p``'s shape or device changed.

        When the update may be skipped on the device (:meth:`step` with ``skip``), a skipped update leaves
        the buffer as it is and it is still offered as the bit-planes of ``p``: so it must already hold
        those of ``p``'s current values. A new buffer is therefore packed from them, and so is an old one
        when ``p`` changed outside this optimizer since the buffer was last offered (a loaded checkpoint).
        """
        if not getattr(p, "wants_sign_bits", False):
            return None
        from pymglu.cuda import optimizers as _fused

        buf = self._sign_bits.get(id(p))
        words = -(-p.shape[-1] // 32) if p.ndim else 0
        fresh = buf is None or buf.shape != tuple(p.shape[:-1]) + (words,) or buf.device.id != p.data.device.id
        if fresh:
            buf = self._sign_bits[id(p)] = _fused.new_sign_bits(p.data)
        if self._rows_from_device:
            key = self._sign_bits_keys.get(id(p))
            if fresh or key is None or key[0] is not p.data or key[1] != getattr(p, "version", None):
                from pymglu.masks import pack_masks

                buf[...] = pack_masks(p.data)
        return buf

    def _update(self, p: Any, grad: Any, group: dict[str, Any]) -> Any:  # pragma: no cover - abstract
        """Update ``p`` in place from ``grad``. Returns the sign bit-planes of the new values when the
        update wrote them in the same pass (for a parameter that :attr:`wants_sign_bits`), else ``None``."""
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

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}("]
        for gi, g in enumerate(self.param_groups):
            hp = ", ".join(f"{k}={g[k]!r}" for k in self.hyperparameters)
            lines.append(f"  group {gi}: {len(g['params'])} params, {hp}")
        return "\n".join(lines) + "\n)"


def _weight_decay(p: Any, group: dict[str, Any]) -> float:
    """The group's weight decay, or 0 for a parameter created with ``decay=False`` (mask logits, norms)."""
    return group["weight_decay"] if getattr(p, "decay", True) else 0.0


