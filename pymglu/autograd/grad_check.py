"""Finite-difference gradient checks for Functions and compositions of them.

:func:`check_grads` compares the tape's vector-Jacobian product with a central-difference directional
derivative along random directions (HIPS autograd's scheme): for a random output cotangent ``u`` and
input direction ``v``, ``<u, J v>`` from the tape must equal ``<u, (f(x + eps v) - f(x - eps v)) / 2 eps>``.
Run it in float64.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from pymglu.autograd.function import no_grad
from pymglu.autograd.tensor import Tensor
from pymglu.backend import get_array_module, to_numpy, unwrap


class GradientCheckError(AssertionError):
    """The analytic and numerical directional derivatives disagree."""


def check_grads(
    fn: Callable[..., Tensor],
    inputs: Sequence[Any],
    wrt: Sequence[int] | None = None,
    eps: float = 1e-6,
    rtol: float = 1e-5,
    atol: float = 1e-8,
    n_directions: int = 3,
    seed: int = 0,
) -> None:
    """Check the gradients of ``fn(*tensors)`` with respect to ``inputs[i]`` for ``i`` in ``wrt``.

    Args:
        fn: takes one Tensor per input and returns a Tensor (any shape).
        inputs: arrays (float64 for those checked); non-float inputs (indices) are passed unchanged.
        wrt: positions of the inputs to differentiate; default: every floating-point input.
        eps, rtol, atol: step and tolerances of the comparison.
        n_directions: random directions tried (each costs two extra forward passes).
    Raises:
        GradientCheckError: naming the direction and both derivatives, when they disagree.
    """
    arrays = [unwrap(a) for a in inputs]
    xp = get_array_module(*arrays)
    if wrt is None:
        wrt = [i for i, a in enumerate(arrays) if hasattr(a, "dtype") and np.dtype(a.dtype).kind == "f"]
    for i in wrt:
        if np.dtype(arrays[i].dtype) != np.float64:
            raise TypeError(f"check_grads: input {i} must be float64, got {arrays[i].dtype}")
    rng = np.random.default_rng(seed)

    def run(values: list[Any], requires_grad: bool) -> tuple[Tensor, list[Tensor]]:
        tensors = [Tensor(v, requires_grad=requires_grad and k in wrt) for k, v in enumerate(values)]
        return fn(*tensors), tensors

    out, tensors = run(arrays, True)
    for direction in range(n_directions):
        u = xp.asarray(rng.standard_normal(out.shape))
        vs = {i: xp.asarray(rng.standard_normal(arrays[i].shape)) for i in wrt}
        for t in tensors:
            t.grad = None
        out.backward(u, retain_graph=True)
        analytic = sum(float(to_numpy((tensors[i].grad * vs[i]).sum())) for i in wrt
                       if tensors[i].grad is not None)
        with no_grad():
            plus = run([a + eps * vs[k] if k in vs else a for k, a in enumerate(arrays)], False)[0].data
            minus = run([a - eps * vs[k] if k in vs else a for k, a in enumerate(arrays)], False)[0].data
        numeric = float(to_numpy(((plus - minus) / (2 * eps) * u).sum()))
        if not abs(analytic - numeric) <= atol + rtol * max(abs(analytic), abs(numeric)):
            raise GradientCheckError(
                f"direction {direction}: tape gives {analytic!r}, finite differences give {numeric!r} "
                f"(rtol={rtol}, atol={atol})"
            )
