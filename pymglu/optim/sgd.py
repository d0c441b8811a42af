"""SGD with momentum."""
from __future__ import annotations

from typing import Any

import numpy as np

from pymglu import _checks
from pymglu.backend import get_array_module
from pymglu.cuda import optimizers as _fused
from pymglu.optim.optimizer import Optimizer, ParamsLike, _check_unit_interval, _state_dtype, _weight_decay


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

    def _update(self, p: Any, grad: Any, group: dict[str, Any]) -> Any:
        ct = _state_dtype(p.dtype)
        momentum = group["momentum"]
        st = self._state_for(p) if momentum or self._uses_master(p) else None
        master = None if st is None else st.get("master")
        buf = None if st is None else st.get("momentum_buffer")
        if _fused.supports(p.data, grad, master, buf):
            return self._fused_update(p, grad, group, st, master, buf)
        self._refuse_capture(p)
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
        return None

    def _fused_update(self, p: Any, grad: Any, group: dict[str, Any], st: dict[str, Any] | None, master: Any,
                      buf: Any) -> Any:
        """The same update in one kernel (:mod:`pymglu.cuda.optimizers`); returns the sign bit-planes of
        the new values when ``p`` wants them, else ``None``."""
        momentum = group["momentum"]
        first_step = False
        if momentum and buf is None:
            buf = st["momentum_buffer"] = get_array_module(p.data).empty(p.shape, dtype=_state_dtype(p.dtype))
            first_step = True
            if self._step_scalar_rows is not None and not self._rows_from_device:  # device rows say when it is first
                raise RuntimeError("SGD: a captured training step needs the momentum buffers from an earlier step")
        if st is not None:
            st["step"] += 1
        bits = self._sign_bits_buffer(p)
        _fused.sgd_step(p.data, grad, master, buf if momentum else None, lr=group["lr"], momentum=momentum,
                        weight_decay=_weight_decay(p, group), nesterov=group["nesterov"], first_step=first_step,
                        sign_bits=bits, step_scalars=self._captured_row(p))
        return bits

    hyper_width = 1
    step_scalar_width = 3

    def step_hyper(self, p: Any, group: dict[str, Any]) -> np.ndarray:
        return np.array([group["lr"]], dtype=np.float64)

    def _device_rows(self, hyper: Any, steps: Any, found: Any, rows: Any) -> None:
        _fused.sgd_device_rows(hyper, steps, found, rows)

    def step_scalars(self, p: Any, group: dict[str, Any], step: int) -> Any:
        return _fused.sgd_scalars(lr=group["lr"])


