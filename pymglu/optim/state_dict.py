"""Saving and restoring an optimizer's state (:class:`StateDictMixin`, a base of
:class:`pymglu.optim.optimizer.Optimizer`): the checkpoint layout, and the checks that make a failed load
change nothing."""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from pymglu import _checks, dtypes as _dtypes
from pymglu.backend import cupy_or_none, is_cupy_array, unwrap

__all__ = ["StateDictMixin"]


class StateDictMixin:
    """``state_dict`` / ``load_state_dict`` / ``check_state_dict`` of an optimizer. Uses the optimizer's
    ``param_groups``, ``state``, ``hyperparameters``, ``state_arrays``, ``optional_state_arrays``,
    ``master_weights``, ``_master_keys``, ``_validate_hparams``, ``_check_group`` and ``_uses_master``."""

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
            want_dtype = _dtypes.compute_dtype(p.dtype)  # the optimizer's state dtype
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
