"""Language models built from pymglu layers: a Llama-style decoder, a byte tokenizer, KV-cache
generation, and the training loop shared by ``examples/train_lm.py`` and ``examples/compare_ffn.py``.

``import pymglu.models`` needs NumPy only; the model runs on CuPy after ``model.to("cuda")``.
"""
from pymglu.models.attention import Attention
from pymglu.models.block import TransformerBlock
from pymglu.models.config import MGLU_KINDS, TransformerConfig
from pymglu.models.generation import choose_next, generate
from pymglu.models.graph_decoder import GraphDecoder
from pymglu.models.graph_step import GraphTrainStep
from pymglu.models.kv_cache import KVCache
from pymglu.models.tokenizer import ByteTokenizer
from pymglu.models.transformer import Transformer

__all__ = [
    "MGLU_KINDS",
    "Attention",
    "ByteTokenizer",
    "GraphDecoder",
    "GraphTrainStep",
    "KVCache",
    "Transformer",
    "TransformerBlock",
    "TransformerConfig",
    "choose_next",
    "generate",
]
