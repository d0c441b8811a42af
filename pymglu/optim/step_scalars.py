"""The step-dependent scalars of the optimizers' fused kernels (:class:`StepScalarsMixin`, a base of
:class:`pymglu.optim.optimizer.Optimizer`).

Two users need them in device memory rather than as kernel arguments:

* a captured training step (:class:`pymglu.models.GraphTrainStep`): the host computes each parameter's row
  (:meth:`~StepScalarsMixin.step_scalars`: AdamW's bias-corrected step size, ...) and uploads the table
  before each replay;
* a step whose skip is decided on the device (``Optimizer.step(skip=...)``, the loss scaler held on the
  device): one kernel advances the device step counts (:class:`pymglu.optim.device_steps.DeviceSteps`)
  unless the step is skipped and writes the rows from a table of hyper-parameters
  (:meth:`~StepScalarsMixin.step_hyper`), so the host never needs the counts.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from pymglu import _checks, dtypes as _dtypes
from pymglu.backend import is_cupy_array, unwrap
from pymglu.optim.device_steps import DeviceSteps
from pymglu.optim.state_dict import StateDictMixin

__all__ = ["StepScalarsMixin"]


class StepScalarsMixin:
    """Step scalars for captured steps and device-decided skips. Uses the optimizer's ``param_groups``,
    ``state``, ``_sign_bits``, ``_record_update``, ``_step_scalar_rows``, ``_device_steps``,
    ``_hyper_table`` and ``_rows_from_device``."""

    def _with_grads(self) -> list[tuple[Any, dict[str, Any]]]:
        """``(parameter, group)`` of every parameter that has a gradient, in group order: the parameters a
        step updates, in the order of the step-scalar rows."""
        return [(p, g) for g in self.param_groups for p in g["params"] if p.grad is not None]

    # ----------------------------------------------------------------- captured steps
    def step_scalars(self, p: Any, group: dict[str, Any], step: int) -> np.ndarray:
        """The float32 values that change from step to step in the fused kernel of ``p``'s update at
        step count ``step`` (e.g. AdamW's bias-corrected step size). A captured step
        (:class:`pymglu.models.GraphTrainStep`) uploads them before each replay."""
        raise NotImplementedError(f"{type(self).__name__} cannot run in a captured training step")

    def next_step_scalars(self) -> list[tuple[Any, np.ndarray]]:
        """``(parameter, step_scalars)`` of every parameter with a gradient, for its next update (its
        step count + 1, its group's current hyper-parameters)."""
        return [(p, self.step_scalars(p, g, self.state.get(id(p), {}).get("step", 0) + 1))
                for p, g in self._with_grads()]

    # ----------------------------------------------------------------- skips decided on the device
    #: columns of :meth:`step_hyper`'s rows and of the step-scalar rows the device computes from them.
    hyper_width: int = 0
    step_scalar_width: int = 0

    def step_hyper(self, p: Any, group: dict[str, Any]) -> np.ndarray:
        """The float64 hyper-parameters of ``p``'s update (e.g. AdamW's ``[lr, beta1, beta2,
        weight_decay]``) from which :meth:`_device_rows` computes its step scalars on the device."""
        raise NotImplementedError(f"{type(self).__name__} cannot skip its steps on the device")

    def _device_rows(self, hyper: Any, steps: Any, found: Any, rows: Any) -> None:
        """Launch the kernel that advances ``steps`` unless ``found`` and writes the step-scalar ``rows``."""
        raise NotImplementedError(f"{type(self).__name__} cannot skip its steps on the device")

    def next_hyper_rows(self) -> list[tuple[Any, np.ndarray]]:
        """``(parameter, step_hyper)`` of every parameter with a gradient, in the order of the rows."""
        return [(p, self.step_hyper(p, g)) for p, g in self._with_grads()]

    def _rows_on_device(self, skip: Any) -> dict[int, Any]:
        """The step-scalar rows of this step computed on the device from the device step counts, which the
        same kernel advances unless ``skip``; ``id(parameter) -> row``."""
        import cupy as cp

        from pymglu.cuda.capture import upload

        if not (is_cupy_array(skip) and skip.dtype == np.int32 and skip.shape == (1,)):
            raise ValueError(f"skip: expected a CuPy int32 array of shape (1,), got {_checks.describe(skip)}")
        entries = self._with_grads()
        params = [p for p, _ in entries]
        devices = {unwrap(p.data).device.id if is_cupy_array(unwrap(p.data)) else None for p in params}
        if devices != {skip.device.id}:
            raise ValueError(f"skip: expected an array on the parameters' device, got one on device {skip.device.id} "
                             f"for parameters on {sorted(devices, key=str)}")
        from pymglu.cuda import optimizers as _fused

        for p in params:  # before the counts advance: every update must be able to read the skip
            if not _fused.supports(unwrap(p.data), unwrap(p.grad)):
                raise RuntimeError(
                    f"{type(self).__name__}: the update of a {_dtypes.name(p.dtype)} parameter of shape {p.shape} "
                    "cannot run on the fused kernels (pymglu.cuda.optimizers disabled, or its gradient not a "
                    "C-contiguous CuPy array of its dtype or float32), so it cannot skip a step on the device; "
                    "step without skip (a loss scaler on the host)")
        ds = self._device_steps
        if ds is None or not ds.matches(params):
            if cp.cuda.get_current_stream().is_capturing():
                raise RuntimeError(f"{type(self).__name__}: the step counts on the device must be made by an eager "
                                   "step with skip before a capture (the parameters with gradients changed)")
            self.settle_steps(drop=True)
            ds = self._device_steps = DeviceSteps(params, [self.state.get(id(p), {}).get("step", 0) for p in params],
                                                  like=skip)
        with skip.device:
            hyper = self._hyper_table
            if hyper is None:
                hyper = upload(np.stack([self.step_hyper(p, g) for p, g in entries]).astype(np.float64))
            if hyper.shape != (len(params), self.hyper_width):
                raise ValueError(f"{type(self).__name__}: the hyper-parameter table has shape {hyper.shape}, expected "
                                 f"({len(params)}, {self.hyper_width})")
            rows = cp.empty((len(params), self.step_scalar_width), dtype=np.float32)
            self._device_rows(hyper, ds.counts, skip, rows)
        return {id(p): rows[i] for i, p in enumerate(params)}

    def settle_steps(self, drop: bool = False) -> None:
        """Copy the step counts kept on the device (by :meth:`step` with ``skip``) into :attr:`state`; a
        device-to-host copy that waits for the queued steps. With ``drop`` the host counts are the only
        ones afterwards. Nothing happens when no counts are on the device."""
        ds = self._device_steps
        if ds is None:
            return
        for p, count in zip(ds.params, ds.read()):
            st = self.state.get(id(p))
            if st is not None:
                st["step"] = count
        if drop:
            self._device_steps = None

    def state_dict(self) -> dict[str, Any]:
        self.settle_steps()
        return super().state_dict()

    state_dict.__doc__ = StateDictMixin.state_dict.__doc__

    def load_state_dict(self, state_dict: Any) -> None:
        super().load_state_dict(state_dict)
        ds = self._device_steps
        if ds is not None:  # a captured step keeps reading the same array: the loaded counts go into it
            ds.write([self.state.get(id(p), {}).get("step", 0) for p in ds.params])

    load_state_dict.__doc__ = StateDictMixin.load_state_dict.__doc__

    def _captured_row(self, p: Any) -> Any:
        """The device row of step scalars for ``p`` while a step is captured (``None`` otherwise);
        raises when the update of ``p`` cannot be captured (it runs as array expressions)."""
        if self._step_scalar_rows is None:
            return None
        row = self._step_scalar_rows.get(id(p))
        if row is None:
            raise RuntimeError(f"{type(self).__name__}: no step scalars for a parameter of shape {p.shape} "
                               "in the captured step")
        return row

    def _refuse_capture(self, p: Any) -> None:
        """Called by the array-expression path: its scalars would be frozen into a captured graph, and it
        cannot read a skip decided on the device."""
        if self._rows_from_device:
            raise RuntimeError(
                f"{type(self).__name__}: the update of a {_dtypes.name(p.dtype)} parameter of shape {p.shape} runs "
                "as array expressions (no fused kernel serves it), which cannot skip a step on the device; "
                "step without skip (a loss scaler on the host)")
        if self._step_scalar_rows is not None:
            raise RuntimeError(
                f"{type(self).__name__}: the update of a {_dtypes.name(p.dtype)} parameter of shape {p.shape} runs "
                "as array expressions (no fused kernel serves it), which a captured training step cannot replay "
                "with new learning rates; train it without the graph (graph=False)")

    def replayed_step(self, count_steps: bool = True) -> None:
        """What :meth:`step` does on the host after its kernels, for a replay of a captured step: every
        parameter with a gradient counts one more step (unless ``count_steps`` is false: a step whose
        skip is decided on the device counts there), is marked modified, gets its sign bit-planes
        re-offered and its master key renewed."""
        for p, _ in self._with_grads():
            st = self.state.get(id(p))
            if st is not None and count_steps:
                st["step"] += 1
            bits = self._sign_bits.get(id(p)) if getattr(p, "wants_sign_bits", False) else None
            self._record_update(p, bits)
