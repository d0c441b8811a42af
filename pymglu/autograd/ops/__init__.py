"""Differentiable ops on Tensors; each family lives in its own module."""
from pymglu.autograd.ops.arithmetic import add, div, mul, neg, sub
from pymglu.autograd.ops.gated import glu, mglu
from pymglu.autograd.ops.matmul import matmul

__all__ = ["add", "div", "glu", "matmul", "mglu", "mul", "neg", "sub"]
