"""Layers: ``Module``/``Parameter`` machinery, ``ModuleList``, ``Linear``, ``Embedding``, ``RMSNorm``, the GLU
and MGLU families and the ``FeedForward`` block. All layers are created on the CPU (NumPy); ``Module.to("cuda")``
moves them to a GPU.
"""
from pymglu.nn.container import ModuleList
from pymglu.nn.embedding import Embedding
from pymglu.nn.feedforward import FEEDFORWARD_KINDS, FeedForward
from pymglu.nn.glu import GLU, GeGLU, ReGLU, SwiGLU
from pymglu.nn.linear import Linear
from pymglu.nn.mglu import FLASH_MAX_TOKENS, MGLU, GeMGLU, ReMGLU, SwiMGLU
from pymglu.nn.module import Module, Parameter, StateDictError
from pymglu.nn.normalization import RMSNorm

__all__ = [
    "FEEDFORWARD_KINDS",
    "FLASH_MAX_TOKENS",
    "Embedding",
    "FeedForward",
    "GLU",
    "GeGLU",
    "GeMGLU",
    "Linear",
    "MGLU",
    "Module",
    "ModuleList",
    "Parameter",
    "RMSNorm",
    "ReGLU",
    "ReMGLU",
    "StateDictError",
    "SwiGLU",
    "SwiMGLU",
]
