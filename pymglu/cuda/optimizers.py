"""One-kernel optimizer updates on CuPy arrays, and the mask bit-planes written in the same pass.

:mod:`pymglu.optim`'s ``AdamW`` and ``SGD`` call these for a parameter whose data, gradient and state are
CuPy arrays (when :data:`ENABLED` and :func:`supports` says so); they compute what the optimizers'
array-expression path computes, rounding each operation alone in the same order, so that float32
parameters get the same bits (``optimizers.cu``). The difference is the traffic: each element of the
parameter, the gradient and the state is read and written once, where the expression path runs about a
dozen passes over float32 arrays per parameter.

For a parameter that asks for them (:attr:`pymglu.nn.Parameter.wants_sign_bits`, set by the MGLU layers
on their mask logits), the same kernel writes the sign bit-planes of the new values, ``(..., ceil(d/32))``
uint32 in the layout of :func:`pymglu.masks.pack_masks`, so that the next forward need not pack the
logits again.

Shapes: every array has the parameter's shape, C-contiguous; dtypes: parameter float32, float16 or
bfloat16; gradient the parameter's dtype or float32; state float32.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Any

import numpy as np

from pymglu import cuda as _cuda
from pymglu.backend import is_cupy_array
from pymglu.cuda.capture import upload
from pymglu.dtypes import float32, gradient_dtype_ok

__all__ = ["ENABLED", "disabled", "supports", "kernel_names", "new_sign_bits", "adamw_scalars", "sgd_scalars",
           "adamw_step", "sgd_step", "clip_supports", "clip_grads", "adamw_device_rows", "sgd_device_rows",
           "loss_scale_update"]

#: Whether :mod:`pymglu.optim` uses these kernels for CuPy parameters.
ENABLED = True

_SOURCE = "optimizers.cu"
_CUDA_TYPES = _cuda.CUDA_TYPE_NAMES
_THREADS = 256


def disabled() -> contextlib.AbstractContextManager:
    """Within the block, :mod:`pymglu.optim` runs its array-expression path on CuPy arrays too."""
    return _cuda.switched_off(sys.modules[__name__])


def supports(param: Any, grad: Any, *state: Any) -> bool:
    """True when the kernels serve this update: enabled; ``param``, ``grad`` and every non-``None``
    state array CuPy and C-contiguous on one device; ``param`` float32/float16/bfloat16; ``grad`` of
    a dtype :func:`pymglu.dtypes.gradient_dtype_ok` allows (the parameter's, float32 for a 16-bit
    parameter, 16 bits for a float32 one); the state float32; shapes equal."""
    if not ENABLED:
        return False
    arrays = [param, grad, *(s for s in state if s is not None)]
    if not all(is_cupy_array(a) and a.flags.c_contiguous for a in arrays):
        return False
    pdt = np.dtype(param.dtype)
    if pdt not in _CUDA_TYPES or not gradient_dtype_ok(pdt, grad.dtype):  # implies a float32/16-bit grad
        return False
    if any(np.dtype(s.dtype) != float32 for s in arrays[2:]):
        return False
    device = param.device.id
    return all(a.shape == param.shape and a.device.id == device for a in arrays)


def _name(kernel: str, param_dtype: Any, grad_dtype: Any, bits: bool) -> str:
    return (f"pymglu::{kernel}<{_CUDA_TYPES[np.dtype(param_dtype)]}, {_CUDA_TYPES[np.dtype(grad_dtype)]}, "
            f"{'true' if bits else 'false'}>")


def kernel_names() -> list[str]:
    """Every template instance this module can launch (for compile checks)."""
    names = []
    for kernel in ("adamw_step", "sgd_step"):
        for pdt in _CUDA_TYPES:
            for gdt in sorted((g for g in _CUDA_TYPES if gradient_dtype_ok(pdt, g)), key=str):
                names += [_name(kernel, pdt, gdt, bits) for bits in (False, True)]
    for kernel in ("sum_squares", "scaled_copies"):
        names += [f"pymglu::{kernel}<{_CUDA_TYPES[dt]}>" for dt in _CUDA_TYPES]
    return names + [f"pymglu::{k}" for k in _PLAIN_KERNELS]


#: the kernels of ``optimizers.cu`` that are not templates
_PLAIN_KERNELS = ("adamw_device_rows", "sgd_device_rows", "loss_scale_update")


#: blocks per gradient of the clipping kernels (each walks its gradient with this stride)
_CLIP_BLOCKS = 32


def _by_dtype(grads: list) -> dict:
    groups: dict = {}
    for i, g in enumerate(grads):
        groups.setdefault(np.dtype(g.dtype), []).append(i)
    return groups


def clip_supports(grads: list) -> bool:
    """True when :func:`clip_grads` serves these gradients: enabled, all CuPy and C-contiguous on one
    device, float32/float16/bfloat16."""
    if not ENABLED or not grads:
        return False
    if not all(is_cupy_array(g) and g.flags.c_contiguous and np.dtype(g.dtype) in _CUDA_TYPES for g in grads):
        return False
    return len({g.device.id for g in grads}) == 1


def clip_grads(grads: list, max_norm: float, eps: float) -> tuple[list, Any]:
    """Scaled copies of ``grads`` (each in its dtype) with global L2 norm at most ``max_norm``, and the
    norm before clipping (0-d float32 CuPy array), in one launch per dtype and pass: per-block float32
    sums of squares, their sum, then every copy multiplied by ``min(1, max_norm / (norm + eps))`` read
    on the device."""
    import cupy as cp

    groups = _by_dtype(grads)
    partials = []
    tables = {}
    for dt, idx in groups.items():
        ptrs = upload(np.array([grads[i].data.ptr for i in idx], dtype=np.uint64))
        sizes = upload(np.array([grads[i].size for i in idx], dtype=np.int64))
        tables[dt] = (ptrs, sizes)
        partial = cp.empty((len(idx), _CLIP_BLOCKS), dtype=np.float32)
        name = f"pymglu::sum_squares<{_CUDA_TYPES[dt]}>"
        _cuda.get_function(_SOURCE, name)((_CLIP_BLOCKS, len(idx)), (256,), (ptrs, sizes, partial))
        partials.append(partial.ravel())
    total_sq = cp.concatenate(partials).sum() if len(partials) > 1 else partials[0].sum()
    out = [cp.empty_like(g) for g in grads]
    for dt, idx in groups.items():
        ptrs, sizes = tables[dt]
        dst = upload(np.array([out[i].data.ptr for i in idx], dtype=np.uint64))
        name = f"pymglu::scaled_copies<{_CUDA_TYPES[dt]}>"
        _cuda.get_function(_SOURCE, name)(
            (_CLIP_BLOCKS, len(idx)), (256,), (ptrs, dst, sizes, total_sq, np.float32(max_norm), np.float32(eps)))
    return out, cp.sqrt(total_sq)


def new_sign_bits(param: Any) -> Any:
    """An uninitialised uint32 array ``(..., ceil(d/32))`` for the sign bit-planes of ``param (..., d)``."""
    import cupy as cp

    if param.ndim < 1 or param.shape[-1] == 0:
        raise ValueError(f"param: sign bit-planes need a last dimension of at least 1, got shape {param.shape}")
    return cp.empty(param.shape[:-1] + (-(-param.shape[-1] // 32),), dtype=np.uint32)


def _layout(param: Any, bits: Any) -> tuple[int, int]:
    """``(row_len, words)`` of the bit-planes of ``param``; checks ``bits``."""
    if bits is None:
        return 1, 1
    row_len = int(param.shape[-1])
    words = -(-row_len // 32)
    want = param.shape[:-1] + (words,)
    if not is_cupy_array(bits) or bits.dtype != np.uint32 or bits.shape != want or not bits.flags.c_contiguous \
            or bits.device.id != param.device.id:
        raise ValueError(f"sign_bits: expected a C-contiguous uint32 CuPy array of shape {want} on device "
                         f"{param.device.id}, got {type(bits).__name__} {getattr(bits, 'dtype', None)} "
                         f"{getattr(bits, 'shape', None)}")
    return row_len, words


def _launch(kernel: str, param: Any, grad: Any, bits: Any, work_items: int, args: tuple) -> None:
    if work_items == 0:
        return
    name = _name(kernel, param.dtype, grad.dtype, bits is not None)
    fn = _cuda.get_function(_SOURCE, name)
    sms = _cuda.multiprocessor_count()
    blocks = min(-(-work_items // _THREADS), sms * 16)
    fn((blocks,), (_THREADS,), args)


def _ptr(a: Any) -> Any:
    """The array, or a null pointer for ``None``."""
    return np.uintp(0) if a is None else a


def _work_items(param: Any, bits: Any, row_len: int, words: int) -> int:
    if bits is None:
        return int(param.size)
    return (int(param.size) // row_len) * words * 32


def adamw_scalars(*, lr: float, beta1: float, beta2: float, weight_decay: float, step: int) -> np.ndarray:
    """The AdamW kernel's step-dependent scalars ``[step_size, bias_correction2, decay_factor, skip]``
    (float32): ``lr / (1 - beta1^step)``, ``1 - beta2^step``, ``1 - lr weight_decay``, and 0 (the kernel
    leaves everything unchanged when the last is nonzero; :func:`adamw_device_rows` sets it)."""
    return np.array([lr / (1.0 - beta1 ** step), 1.0 - beta2 ** step, 1.0 - lr * weight_decay, 0.0],
                    dtype=np.float32)


def sgd_scalars(*, lr: float, first_step: bool = False) -> np.ndarray:
    """The SGD kernel's step-dependent scalars ``[lr, skip, first_step]`` (float32; skip 0)."""
    return np.array([lr, 0.0, 1.0 if first_step else 0.0], dtype=np.float32)


def _check_step_scalars(step_scalars: Any, count: int, param: Any) -> None:
    if step_scalars is None:
        return
    if not is_cupy_array(step_scalars) or step_scalars.dtype != np.float32 or step_scalars.shape != (count,) \
            or not step_scalars.flags.c_contiguous or step_scalars.device.id != param.device.id:
        raise ValueError(f"step_scalars: expected a C-contiguous float32 CuPy array of shape ({count},) on device "
                         f"{param.device.id}, got {type(step_scalars).__name__} {getattr(step_scalars, 'dtype', None)} "
                         f"{getattr(step_scalars, 'shape', None)}")


def adamw_step(param: Any, grad: Any, master: Any, exp_avg: Any, exp_avg_sq: Any, *, lr: float,
               beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
               sign_bits: Any = None, step_scalars: Any = None) -> None:
    """One AdamW update in place (the formula of :class:`pymglu.optim.AdamW`, step count ``step`` >= 1).

    ``master`` is the float32 master of a 16-bit parameter or ``None`` (then ``param`` itself is
    updated, in float32 arithmetic). ``sign_bits``: ``None`` or the array of :func:`new_sign_bits`,
    filled with ``param > 0`` of the new values. ``step_scalars``: ``None``, or a float32 CuPy array of
    the 4 values of :func:`adamw_scalars` that the kernel reads when it runs instead of those of
    ``lr``, ``step`` and ``weight_decay`` given here (what a captured CUDA graph replays with new
    values), and whose last, when nonzero, makes the update change nothing; whether weight decay
    applies still follows ``weight_decay != 0``.
    """
    row_len, words = _layout(param, sign_bits)
    _check_step_scalars(step_scalars, 4, param)
    f = np.float32
    step_size, bias2, decay, _ = adamw_scalars(lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, step=step)
    args = (param, _ptr(master), exp_avg, exp_avg_sq, grad, _ptr(sign_bits), np.int64(param.size),
            np.int32(row_len), np.int32(words), f(beta1), f(1.0 - beta1), f(beta2), f(1.0 - beta2),
            bias2, f(eps), step_size, decay, np.int32(1 if weight_decay else 0), _ptr(step_scalars))
    _launch("adamw_step", param, grad, sign_bits, _work_items(param, sign_bits, row_len, words), args)


def sgd_step(param: Any, grad: Any, master: Any, momentum_buffer: Any, *, lr: float, momentum: float,
             weight_decay: float, nesterov: bool, first_step: bool, sign_bits: Any = None,
             step_scalars: Any = None) -> None:
    """One SGD update in place (the formula of :class:`pymglu.optim.SGD`).

    ``momentum_buffer`` is ``None`` without momentum; on the ``first_step`` it is written with the
    (decayed) gradient and its old contents are not read. ``master``, ``sign_bits``: as in
    :func:`adamw_step`; ``step_scalars``: ``None`` or the 3 values of :func:`sgd_scalars`, read by the
    kernel instead of ``lr`` and ``first_step`` (and a nonzero second skips the update).
    """
    row_len, words = _layout(param, sign_bits)
    _check_step_scalars(step_scalars, 3, param)
    f = np.float32
    args = (param, _ptr(master), _ptr(momentum_buffer), grad, _ptr(sign_bits), np.int64(param.size),
            np.int32(row_len), np.int32(words), sgd_scalars(lr=lr)[0], f(momentum), f(weight_decay),
            np.int32(1 if weight_decay else 0), np.int32(1 if first_step else 0), np.int32(1 if nesterov else 0),
            _ptr(step_scalars))
    _launch("sgd_step", param, grad, sign_bits, _work_items(param, sign_bits, row_len, words), args)


def _check_device_rows(hyper: Any, steps: Any, found: Any, rows: Any, width: int, row_width: int) -> None:
    count = steps.shape[0] if getattr(steps, "ndim", 0) == 1 else -1
    want = (("hyper", hyper, np.float64, (count, width)), ("steps", steps, np.int64, (count,)),
            ("found", found, np.int32, (1,)), ("rows", rows, float32, (count, row_width)))
    for name, a, dtype, shape in want:
        if not (is_cupy_array(a) and a.dtype == dtype and a.shape == shape and a.flags.c_contiguous):
            raise ValueError(f"{name}: expected a C-contiguous {np.dtype(dtype)} CuPy array of shape {shape}, got "
                             f"{type(a).__name__} {getattr(a, 'dtype', None)} {getattr(a, 'shape', None)}")
    if len({a.device.id for a in (hyper, steps, found, rows)}) != 1:
        raise ValueError("hyper, steps, found, rows: expected arrays on one device")


def _launch_rows(kernel: str, hyper: Any, steps: Any, found: Any, rows: Any) -> None:
    count = steps.shape[0]
    if count:
        _cuda.get_function(_SOURCE, f"pymglu::{kernel}")((-(-count // _THREADS),), (_THREADS,),
                                                         (hyper, steps, found, rows, np.int32(count)))


def adamw_device_rows(hyper: Any, steps: Any, found: Any, rows: Any) -> None:
    """The rows of :func:`adamw_scalars` for ``count`` parameters, computed on the device.

    ``hyper`` ``(count, 4)`` float64 ``[lr, beta1, beta2, weight_decay]`` per parameter; ``steps``
    ``(count,)`` int64, each parameter's step count, incremented in place unless ``found`` ``(1,)`` int32
    holds a nonzero value; ``rows`` ``(count, 4)`` float32, written for the new counts with the skip flag
    ``found != 0``. Nothing is read on the host, so a captured graph replays it with the device's values.
    """
    _check_device_rows(hyper, steps, found, rows, 4, 4)
    _launch_rows("adamw_device_rows", hyper, steps, found, rows)


def sgd_device_rows(hyper: Any, steps: Any, found: Any, rows: Any) -> None:
    """The rows of :func:`sgd_scalars` computed on the device, as :func:`adamw_device_rows`: ``hyper``
    ``(count, 1)`` float64 ``[lr]``, ``rows`` ``(count, 3)``; ``first_step`` is set where the count goes
    from 0 to 1."""
    _check_device_rows(hyper, steps, found, rows, 1, 3)
    _launch_rows("sgd_device_rows", hyper, steps, found, rows)


def loss_scale_update(found: Any, scale: Any, tracker: Any, *, growth_factor: float, backoff_factor: float,
                      growth_interval: int, min_scale: float, max_scale: float) -> None:
    """The scale update of :meth:`pymglu.amp.DynamicLossScaler.update` on device values, in place:
    ``found`` ``(1,)`` int32 (nonzero: the step was skipped), ``scale`` ``(1,)`` float64, ``tracker``
    ``(1,)`` int64 (the clean steps in a row). One thread, double arithmetic, as on the host."""
    for name, a, dtype in (("found", found, np.int32), ("scale", scale, np.float64), ("tracker", tracker, np.int64)):
        if not (is_cupy_array(a) and a.dtype == dtype and a.shape == (1,)):
            raise ValueError(f"{name}: expected a {np.dtype(dtype)} CuPy array of shape (1,), got "
                             f"{type(a).__name__} {getattr(a, 'dtype', None)} {getattr(a, 'shape', None)}")
    _cuda.get_function(_SOURCE, "pymglu::loss_scale_update")(
        (1,), (1,), (found, scale, tracker, np.float64(growth_factor), np.float64(backoff_factor),
                     np.int64(growth_interval), np.float64(min_scale), np.float64(max_scale)))
