"""Differentiable ops on Tensors; each family lives in its own module."""
from pymglu.autograd.ops.arithmetic import add, div, mul, neg, sub
from pymglu.autograd.ops.embedding import embedding
from pymglu.autograd.ops.gated import glu, mglu
from pymglu.autograd.ops.matmul import matmul
from pymglu.autograd.ops.norm import rms_norm

__all__ = ["add", "div", "embedding", "glu", "matmul", "mglu", "mul", "neg", "rms_norm", "sub"]
