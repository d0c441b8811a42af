"""Differentiable ops on Tensors; each family lives in its own module."""
from pymglu.autograd.ops.activations import activation, gelu, gelu_tanh, relu, sigmoid, silu
from pymglu.autograd.ops.arithmetic import add, div, mul, neg, sub
from pymglu.autograd.ops.attention import causal_self_attention
from pymglu.autograd.ops.dropout import dropout
from pymglu.autograd.ops.elementwise import exp, log
from pymglu.autograd.ops.embedding import embedding
from pymglu.autograd.ops.gated import glu, mglu
from pymglu.autograd.ops.loss import softmax_cross_entropy
from pymglu.autograd.ops.matmul import matmul
from pymglu.autograd.ops.norm import rms_norm
from pymglu.autograd.ops.reductions import mean, sum
from pymglu.autograd.ops.rope import rope
from pymglu.autograd.ops.shape import concat, getitem, reshape, transpose

__all__ = [
    "activation",
    "add",
    "causal_self_attention",
    "concat",
    "div",
    "dropout",
    "embedding",
    "exp",
    "gelu",
    "gelu_tanh",
    "getitem",
    "glu",
    "log",
    "matmul",
    "mean",
    "mglu",
    "mul",
    "neg",
    "relu",
    "reshape",
    "rms_norm",
    "rope",
    "sigmoid",
    "silu",
    "softmax_cross_entropy",
    "sub",
    "sum",
    "transpose",
]
