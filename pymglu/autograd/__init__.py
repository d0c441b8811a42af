"""A small define-by-run autograd tape: Tensor, Function, no_grad, check_grads and the ops."""
from pymglu.autograd.function import Function, grad_enabled, no_grad
from pymglu.autograd.grad_check import GradientCheckError, check_grads
from pymglu.autograd.tensor import GraphFreedError, Tensor

__all__ = [
    "Function",
    "GradientCheckError",
    "GraphFreedError",
    "Tensor",
    "check_grads",
    "grad_enabled",
    "no_grad",
]
