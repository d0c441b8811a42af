"""Mixed precision: dynamic loss scaling for float16 training.

pymglu has no autocast. A model is built in one dtype (``FeedForward(..., dtype=float16)``); its
forward and backward run in that dtype with float32 accumulation inside the ops, gradients arrive in
each parameter's dtype, and the optimizers keep an fp32 master copy of every float16/bfloat16 parameter
(:mod:`pymglu.optim`). What is left is the float16 range: gradients below ``2**-24`` flush to zero and
above 65504 overflow. :class:`DynamicLossScaler` multiplies the loss by a scale ``S`` so that small
gradients survive the backward pass, divides ``S`` out again in float32 before the update, skips the
update when a gradient overflowed, and adapts ``S``:

.. code-block:: python

    scaler = DynamicLossScaler()
    for x, y in batches:
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)                  # optional: only needed before clipping
        clip_grad_norm(model.parameters(), 1.0)
        scaler.step(opt)                      # skipped when a gradient is inf or NaN
        scaler.update()

bfloat16 has float32's exponent range, so it normally needs no scaling: run it with
``DynamicLossScaler(init_scale=1.0, growth_factor=1.0, backoff_factor=1.0)`` (a constant scale of 1
that still skips steps with non-finite gradients) or without a scaler.

Costs per step: :meth:`~DynamicLossScaler.unscale_` makes one float32 pass over the gradients (they are
written, unscaled, into one flat buffer per device and dtype family) and one ``isfinite(...).all()``
reduction over that buffer; :meth:`~DynamicLossScaler.step` reads the resulting flag on the host once
(a one-byte device-to-host copy, the only synchronisation; for a model on one device it is one read per
step). The scale itself is a Python number kept on the host, so scaling the loss and unscaling the
gradients upload nothing.

**On the device** (:meth:`~DynamicLossScaler.hold_on_device`): the scale and the counts move into device
memory and a step reads nothing back. :meth:`~DynamicLossScaler.scale` multiplies by the device scale,
:meth:`~DynamicLossScaler.unscale_` divides by it, :meth:`~DynamicLossScaler.step` hands the found-inf
flag to the optimizer's fused kernels (``Optimizer.step(skip=...)``: they leave everything unchanged
when it is set, and count steps on the device) and returns ``None``, and :meth:`~DynamicLossScaler.update`
backs off or grows the scale in a one-thread kernel. Such a step can be captured in a CUDA graph
(:class:`pymglu.models.GraphTrainStep` does this for float16 trainers). Reading the scale or the counts
on the host (:meth:`~DynamicLossScaler.get_scale`, :attr:`~DynamicLossScaler.skipped_steps`,
:meth:`~DynamicLossScaler.state_dict`) copies them back first, which waits for the queued steps.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Mapping

import numpy as np

from pymglu import _checks, dtypes as _dtypes
from pymglu.autograd import ops
from pymglu.autograd.function import no_grad
from pymglu.autograd.tensor import Tensor
from pymglu.backend import device_of, get_array_module, is_cupy_array, unwrap
from pymglu.optim import Optimizer

__all__ = ["DynamicLossScaler", "MIN_SCALE", "MAX_SCALE"]

#: the scale stays within these bounds: both and their reciprocals are finite normal float32 numbers.
MIN_SCALE = 2.0 ** -126
MAX_SCALE = 2.0 ** 127

# per-optimizer progress between two update() calls
_UNSCALED = "unscaled"
_STEPPED = "stepped"


class DynamicLossScaler:
    """Dynamic loss scaling (the float16 recipe of Micikevicius et al., "Mixed Precision Training").

    Args:
        init_scale: the first scale ``S`` (finite, in ``[MIN_SCALE, MAX_SCALE]``; default ``2**16``).
        growth_factor: ``S`` is multiplied by this after ``growth_interval`` consecutive steps with
            finite gradients (finite, ``>= 1``; ``1`` never grows).
        backoff_factor: ``S`` is multiplied by this after a step with a non-finite gradient (finite, in
            ``(0, 1]``; ``1`` never lowers, which with ``growth_factor=1`` gives a constant scale).
        growth_interval: number of consecutive clean steps before growing (integer ``>= 1``).

    Invalid values raise ``ValueError`` (``TypeError`` for non-numbers) naming the argument.

    Per step, for each optimizer: :meth:`scale` the loss and back-propagate it, optionally
    :meth:`unscale_` (needed before gradient clipping or inspecting gradients), :meth:`step`; then one
    :meth:`update` for the step. The scale is clamped to ``[MIN_SCALE, MAX_SCALE]``.

    A float16 loss carries the scale into the graph in float16, whose largest value is 65504: with a
    float16 loss the default ``2**16`` overflows on the first step, that step is skipped and the scale
    drops to ``2**15``. Losses computed in float32 (``ops.softmax_cross_entropy`` returns float32) have no
    such limit.

    On NumPy, overflowing float16 arithmetic in the backward pass emits NumPy ``RuntimeWarning``s
    (``overflow``, ``invalid value``); they are expected under loss scaling and can be silenced with
    ``numpy.errstate(over="ignore", invalid="ignore")`` around the step. CuPy does not warn.
    """

    def __init__(self, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000) -> None:
        hp = _validate_hparams({"init_scale": init_scale, "growth_factor": growth_factor,
                                "backoff_factor": backoff_factor, "growth_interval": growth_interval})
        self._scale: float = hp["init_scale"]
        self.growth_factor: float = hp["growth_factor"]
        self.backoff_factor: float = hp["backoff_factor"]
        self.growth_interval: int = hp["growth_interval"]
        self._growth_tracker = 0
        self._skipped_steps = 0
        # id(optimizer) -> {"stage": _UNSCALED | _STEPPED, "flags": [0-d device bool arrays],
        #                   "found": bool (on the host) or a (1,) int32 device array (held on the device)}
        self._per_optimizer: dict[int, dict[str, Any]] = {}
        # the scale and the counts in device memory (hold_on_device), else None
        self._device: _DeviceState | None = None

    # ----------------------------------------------------------------- values read on the host
    def get_scale(self) -> float:
        """The current scale ``S`` (a Python float; copied back from the device when held there)."""
        self._settle()
        return self._scale

    @property
    def growth_tracker(self) -> int:
        """Consecutive clean steps since the scale last changed."""
        self._settle()
        return self._growth_tracker

    @growth_tracker.setter
    def growth_tracker(self, value: int) -> None:
        self._set_counts(tracker=_checks.check_positive_int("growth_tracker", value, minimum=0))

    @property
    def skipped_steps(self) -> int:
        """Number of optimizer steps skipped because of non-finite gradients, since construction."""
        self._settle()
        return self._skipped_steps

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self._set_counts(skipped=_checks.check_positive_int("skipped_steps", value, minimum=0))

    def _set_counts(self, tracker: int | None = None, skipped: int | None = None) -> None:
        self._settle()
        if tracker is not None:
            self._growth_tracker = tracker
        if skipped is not None:
            self._skipped_steps = skipped
        if self._device is not None:
            self._device.write(self._scale, self._growth_tracker, self._skipped_steps)

    # ----------------------------------------------------------------- state on the device
    @property
    def on_device(self) -> bool:
        """Whether the scale and the counts are held in device memory (:meth:`hold_on_device`)."""
        return self._device is not None

    def hold_on_device(self, like: Any) -> None:
        """Keep the scale and the counts in the memory of ``like``'s device (a CuPy array) from now on,
        so that a step reads nothing back (module docstring, "On the device"). Nothing changes when they
        are held there already; refused between :meth:`unscale_`/:meth:`step` and :meth:`update`.
        """
        if not is_cupy_array(like):
            raise TypeError(f"like: expected a CuPy array on the device to use, got {_checks.describe(like)}")
        if self._per_optimizer:
            raise RuntimeError("hold_on_device: a step is in progress (unscale_() or step() without update())")
        if self._device is not None and self._device.device_id == like.device.id:
            return
        self.release_device()
        self._device = _DeviceState(like, self._scale, self._growth_tracker, self._skipped_steps)

    def release_device(self) -> None:
        """Copy the scale and the counts back to the host (waiting for the queued steps) and keep them
        there from now on. Nothing happens when they are on the host."""
        if self._per_optimizer:
            raise RuntimeError("release_device: a step is in progress (unscale_() or step() without update())")
        self._settle()
        self._device = None

    def _settle(self) -> None:
        if self._device is not None:
            self._scale, self._growth_tracker, self._skipped_steps = self._device.read()

    def scale(self, loss: Any) -> Tensor:
        """``loss * S``, a Tensor of ``loss``'s shape, dtype and device, recorded on the tape.

        Args:
            loss: a float Tensor (normally a single-element loss) that requires a gradient.
        Returns:
            the scaled loss; call ``.backward()`` on it. Gradients then hold ``S`` times their true value.
        """
        if not isinstance(loss, Tensor):
            raise TypeError(f"loss: expected a pymglu Tensor, got {type(loss).__name__}")
        if not _dtypes.is_float(loss.dtype):
            raise TypeError(f"loss: expected a float Tensor, got {_checks.describe(loss.data)}")
        if not loss.requires_grad:
            raise ValueError(f"loss: the Tensor does not require a gradient, nothing to scale ({loss!r})")
        if self._device is not None:  # the device's scale, rounded to the loss dtype there
            self._device.check_device("loss", loss.data)
            return ops.mul(loss, self._device.scale.astype(loss.dtype).reshape(()))
        # a NumPy scalar of the loss dtype: a kernel argument on CuPy (no upload), and the product keeps
        # the loss dtype (a Python float would promote bfloat16 to float32). S beyond the dtype's range
        # becomes inf, so that step's gradients are non-finite and the step is skipped.
        with np.errstate(over="ignore"):
            factor = np.asarray(self._scale, dtype=loss.dtype)[()]
        return ops.mul(loss, factor)

    # ----------------------------------------------------------------- gradients
    def unscale_(self, optimizer: Optimizer) -> None:
        """Divide the gradients of ``optimizer``'s parameters by ``S`` and check them for inf/NaN.

        The gradients are checked first (``optimizer``'s own shape, dtype and device checks: a bad
        gradient raises ``ValueError`` and nothing changes). Then every ``p.grad`` is replaced by its
        unscaled value in the compute dtype: float32 for float16, bfloat16 and float32 gradients (so a
        float16 gradient that is tiny after unscaling does not flush to zero), float64 for float64 ones.
        The new gradients are views into one flat buffer per (device, compute dtype); the arrays the
        caller held are not written. Non-finite values are detected by one ``isfinite(...).all()``
        reduction over each buffer, kept on the device until :meth:`step` reads it.

        Call at most once per optimizer between two :meth:`update` calls, after the backward pass and
        before :func:`pymglu.optim.clip_grad_norm`.
        """
        _check_optimizer(optimizer)
        record = self._per_optimizer.get(id(optimizer))
        if record is not None:
            what = "unscale_()" if record["stage"] == _UNSCALED else "step()"
            raise RuntimeError(f"unscale_: {what} was already called for this optimizer since the last update()")
        try:
            optimizer._validate_grads()
        except ValueError as e:
            raise ValueError(f"unscale_: {e}") from None
        device = self._device
        inv_scale = 1.0 / self._scale if device is None else None
        buckets: dict[tuple[str, np.dtype], list[Any]] = defaultdict(list)
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    grad = unwrap(p.grad)
                    if device is not None:
                        device.check_device("a gradient", grad)
                    buckets[(device_of(grad), _dtypes.compute_dtype(grad.dtype))].append((p, grad))
        flags = []
        with no_grad():
            for (_, ct), items in buckets.items():
                flat = _empty_like_device(items[0][1], sum(int(g.size) for _, g in items), ct)
                offset = 0
                for p, grad in items:
                    view = flat[offset:offset + grad.size].reshape(grad.shape)
                    view[...] = grad
                    offset += grad.size
                    p.grad = view
                if device is not None:
                    flat *= device.inverse_scale(ct)  # a (1,) device array: the division happens there
                elif inv_scale != 1.0:
                    flat *= inv_scale
                flags.append(get_array_module(flat).isfinite(flat).all())
        self._per_optimizer[id(optimizer)] = {"stage": _UNSCALED, "flags": flags, "found": None}

    def step(self, optimizer: Optimizer) -> bool | None:
        """Unscale (unless :meth:`unscale_` ran already) and run ``optimizer.step()`` unless a gradient is
        inf or NaN.

        A skipped step changes nothing: no parameter, no optimizer state array, no step counter. This is
        where the host reads the found-inf flag (once per device and dtype family; once for a model on one
        device). Returns ``True`` when the optimizer stepped, ``False`` when the step was skipped (advance
        a learning-rate schedule only on ``True`` if its steps should count updates). Held on the device
        (:meth:`hold_on_device`) nothing is read: the flag goes to ``optimizer.step(skip=...)``, whose
        kernels skip the update there, and ``None`` is returned.
        """
        _check_optimizer(optimizer)
        record = self._per_optimizer.get(id(optimizer))
        if record is None:
            self.unscale_(optimizer)
            record = self._per_optimizer[id(optimizer)]
        elif record["stage"] == _STEPPED:
            raise RuntimeError("step: step() was already called for this optimizer since the last update()")
        if self._device is not None:
            found = self._device.found(record["flags"])
            optimizer.step(skip=found)  # first: a refused step leaves the scaler's record as it was
            record["stage"], record["found"], record["flags"] = _STEPPED, found, []
            self._device.skipped += found  # int64 += int32, on the device
            return None
        found = not all(bool(flag) for flag in record["flags"])
        record["stage"], record["found"], record["flags"] = _STEPPED, found, []
        if found:
            self._skipped_steps += 1
            return False
        optimizer.step()
        return True

    def update(self) -> None:
        """Adapt the scale after this step's :meth:`step` calls: multiply it by ``backoff_factor`` if any
        optimizer found a non-finite gradient (and restart the growth count), else count a clean step and
        multiply by ``growth_factor`` after ``growth_interval`` of them in a row."""
        if not self._per_optimizer:
            raise RuntimeError("update: no unscale_() or step() since the last update(); nothing to update from")
        pending = [r for r in self._per_optimizer.values() if r["stage"] != _STEPPED]
        if pending:
            raise RuntimeError(f"update: unscale_() was called for {len(pending)} optimizer(s) without step()")
        records = list(self._per_optimizer.values())
        self._per_optimizer.clear()
        if self._device is not None:
            self._device.update([r["found"] for r in records], self.growth_factor, self.backoff_factor,
                                self.growth_interval)
            return
        found = any(r["found"] for r in records)
        if found:
            self._scale = max(self._scale * self.backoff_factor, MIN_SCALE)
            self._growth_tracker = 0
            return
        self._growth_tracker += 1
        if self._growth_tracker >= self.growth_interval:
            self._scale = min(self._scale * self.growth_factor, MAX_SCALE)
            self._growth_tracker = 0

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """``{"scale", "growth_factor", "backoff_factor", "growth_interval", "growth_tracker",
        "skipped_steps"}`` as Python numbers (copied back from the device when held there)."""
        self._settle()
        return {"scale": self._scale, "growth_factor": self.growth_factor, "backoff_factor": self.backoff_factor,
                "growth_interval": self.growth_interval, "growth_tracker": self._growth_tracker,
                "skipped_steps": self._skipped_steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`. Every entry is validated first (``ValueError`` naming each bad
        one; nothing changes on failure). Refused between :meth:`unscale_`/:meth:`step` and
        :meth:`update`, where the gradients were unscaled with the old scale."""
        if self._per_optimizer:
            raise RuntimeError("load_state_dict: a step is in progress (unscale_() or step() without update())")
        keys = {"scale", "growth_factor", "backoff_factor", "growth_interval", "growth_tracker", "skipped_steps"}
        if not isinstance(state, Mapping) or set(state) != keys:
            got = sorted(state) if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"loss scaler state: expected the keys {sorted(keys)}, got {got}")
        problems = []
        hp: dict[str, Any] = {}
        for src, dst in (("scale", "init_scale"), ("growth_factor", "growth_factor"),
                         ("backoff_factor", "backoff_factor"), ("growth_interval", "growth_interval")):
            try:
                hp.update(_validate_hparams({dst: state[src]}))
            except (TypeError, ValueError) as e:
                problems.append(str(e).replace("init_scale", "scale", 1))
        counters = {}
        for name in ("growth_tracker", "skipped_steps"):
            try:
                counters[name] = _checks.check_positive_int(name, state[name], minimum=0)
            except ValueError as e:
                problems.append(str(e))
        if problems:
            raise ValueError("cannot load loss scaler state (nothing was changed): " + "; ".join(problems))
        self._scale = hp["init_scale"]
        self.growth_factor, self.backoff_factor = hp["growth_factor"], hp["backoff_factor"]
        self.growth_interval = hp["growth_interval"]
        self._growth_tracker, self._skipped_steps = counters["growth_tracker"], counters["skipped_steps"]
        if self._device is not None:  # in place: a captured step keeps reading the same arrays
            self._device.write(self._scale, self._growth_tracker, self._skipped_steps)

    def __repr__(self) -> str:
        self._settle()
        where = ", on the device" if self._device is not None else ""
        return (f"DynamicLossScaler(scale={self._scale!r}, growth_factor={self.growth_factor!r}, "
                f"backoff_factor={self.backoff_factor!r}, growth_interval={self.growth_interval}, "
                f"growth_tracker={self._growth_tracker}{where})")


class _DeviceState:
    """The scale (float64), the growth count and the skipped-step count (int64) of a loss scaler, each a
    ``(1,)`` CuPy array on one device, and the device side of its step."""

    def __init__(self, like: Any, scale: float, tracker: int, skipped: int) -> None:
        import cupy as cp

        self.device_id = like.device.id
        with like.device:
            self.scale = cp.asarray(np.array([scale], dtype=np.float64))
            self.tracker = cp.asarray(np.array([tracker], dtype=np.int64))
            self.skipped = cp.asarray(np.array([skipped], dtype=np.int64))

    def check_device(self, name: str, a: Any) -> None:
        if not is_cupy_array(a) or a.device.id != self.device_id:
            raise ValueError(f"{name}: expected a CuPy array on device {self.device_id}, where the loss scaler is "
                             f"held, got {_checks.describe(a)} on {device_of(a)}")

    def inverse_scale(self, dtype: Any) -> Any:
        """``1 / S`` rounded to ``dtype``, as the host's ``flat *= 1 / S`` rounds its Python float."""
        return (1.0 / self.scale).astype(dtype)

    def found(self, flags: list) -> Any:
        """``(1,)`` int32: 1 when any ``isfinite(...).all()`` flag is false."""
        import cupy as cp

        with cp.cuda.Device(self.device_id):
            if not flags:
                return cp.zeros(1, dtype=np.int32)
            ok = flags[0]
            for flag in flags[1:]:
                ok = ok & flag
            return cp.logical_not(ok).astype(np.int32).reshape(1)

    def update(self, founds: list, growth_factor: float, backoff_factor: float, growth_interval: int) -> None:
        import cupy as cp

        from pymglu.cuda import optimizers as _fused

        with cp.cuda.Device(self.device_id):
            found = founds[0]
            for other in founds[1:]:
                found = found | other
            _fused.loss_scale_update(found, self.scale, self.tracker, growth_factor=growth_factor,
                                     backoff_factor=backoff_factor, growth_interval=growth_interval,
                                     min_scale=MIN_SCALE, max_scale=MAX_SCALE)

    def read(self) -> tuple[float, int, int]:
        """The values on the host (waits for the queued steps)."""
        return float(self.scale.get()[0]), int(self.tracker.get()[0]), int(self.skipped.get()[0])

    def write(self, scale: float, tracker: int, skipped: int) -> None:
        self.scale.set(np.array([scale], dtype=np.float64))
        self.tracker.set(np.array([tracker], dtype=np.int64))
        self.skipped.set(np.array([skipped], dtype=np.int64))


def _validate_hparams(hp: dict[str, Any]) -> dict[str, Any]:
    """Check the given subset of the constructor's arguments; return them cleaned."""
    out: dict[str, Any] = {}
    if "init_scale" in hp:
        out["init_scale"] = _checks.check_finite("init_scale", hp["init_scale"], minimum=MIN_SCALE, maximum=MAX_SCALE)
    if "growth_factor" in hp:
        out["growth_factor"] = _checks.check_finite("growth_factor", hp["growth_factor"], minimum=1.0)
    if "backoff_factor" in hp:
        out["backoff_factor"] = _checks.check_finite("backoff_factor", hp["backoff_factor"], minimum=0.0,
                                                     maximum=1.0, strict_min=True)
    if "growth_interval" in hp:
        out["growth_interval"] = _checks.check_positive_int("growth_interval", hp["growth_interval"], minimum=1)
    return out


def _check_optimizer(optimizer: Any) -> None:
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer: expected a pymglu.optim.Optimizer, got {type(optimizer).__name__}")


def _empty_like_device(like: Any, size: int, dtype: np.dtype) -> Any:
    """An uninitialised 1-d array of ``size`` elements of ``dtype`` on ``like``'s device."""
    if is_cupy_array(like):
        import cupy

        with like.device:
            return cupy.empty(size, dtype=dtype)
    return np.empty(size, dtype=dtype)
