"""``TransformerConfig``: the hyper-parameters of :class:`pymglu.models.Transformer`, validated once."""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

import numpy as np

from pymglu import _checks, dtypes as _dtypes
from pymglu.nn import FEEDFORWARD_KINDS

__all__ = ["TransformerConfig", "MGLU_KINDS"]

#: FeedForward kinds with masks (they take ``n_masks``).
MGLU_KINDS = ("swimglu", "gemglu", "remglu", "mglu")

#: default number of masks of an MGLU kind when ``n_masks`` is left ``None``.
DEFAULT_N_MASKS = 4


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Shape and kind of a Llama-style decoder.

    Attributes:
        vocab_size: number of token ids (256 for :class:`pymglu.models.ByteTokenizer`).
        d_model: model width ``d``; n_heads must divide it and ``d_model / n_heads`` must be even (RoPE).
        n_layers: number of blocks. n_heads: attention heads.
        d_ff: hidden width ``h`` of each block's :class:`pymglu.nn.FeedForward`.
        ffn_kind: any :data:`pymglu.nn.FEEDFORWARD_KINDS` entry (``"swiglu"``, ``"swimglu"``, ...).
        n_masks: masks of an MGLU kind (``None``: 4); must be ``None`` for other kinds.
        max_seq_len: context window: training windows and the prefix the model sees while generating.
        tie_embeddings: the output projection reuses the embedding table.
        dtype: parameter dtype name (``"float32"``, ``"float64"``, ``"float16"``, ``"bfloat16"``); MGLU
            mask logits are float32 whatever it is.
        rope_base: base of the rotary frequencies.
        norm_eps: epsilon of every RMSNorm.
    """

    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 384
    ffn_kind: str = "swimglu"
    n_masks: int | None = None
    max_seq_len: int = 64
    tie_embeddings: bool = True
    dtype: str = "float32"
    rope_base: float = 10000.0
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
            _checks.check_positive_int(name, getattr(self, name))
        if self.ffn_kind not in FEEDFORWARD_KINDS:
            raise ValueError(f"ffn_kind: expected one of {FEEDFORWARD_KINDS}, got {self.ffn_kind!r}")
        if self.ffn_kind in MGLU_KINDS:
            n = DEFAULT_N_MASKS if self.n_masks is None else _checks.check_positive_int("n_masks", self.n_masks)
            object.__setattr__(self, "n_masks", n)
        elif self.n_masks is not None:
            raise ValueError(
                f"n_masks: only MGLU kinds {MGLU_KINDS} take masks, got n_masks={self.n_masks!r} for "
                f"ffn_kind={self.ffn_kind!r}"
            )
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads: must divide d_model = {self.d_model}, got {self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(
                f"d_model / n_heads must be even for rotary embeddings, got {self.d_model} / {self.n_heads} "
                f"= {self.head_dim}"
            )
        if not isinstance(self.tie_embeddings, bool):
            raise TypeError(f"tie_embeddings: expected a bool, got {self.tie_embeddings!r}")
        try:
            dt = np.dtype(self.dtype)
        except TypeError:
            dt = None
        if dt is None or dt not in _dtypes.FLOAT_DTYPES:
            allowed = ", ".join(_dtypes.name(d) for d in _dtypes.FLOAT_DTYPES)
            raise TypeError(f"dtype: expected one of ({allowed}), got {self.dtype!r}")
        object.__setattr__(self, "dtype", _dtypes.name(dt))
        object.__setattr__(self, "rope_base", _checks.check_finite("rope_base", self.rope_base, minimum=0.0,
                                                                  strict_min=True))
        object.__setattr__(self, "norm_eps", _checks.check_finite("norm_eps", self.norm_eps, minimum=0.0))

    @property
    def head_dim(self) -> int:
        """Width of one attention head, ``d_model // n_heads``."""
        return self.d_model // self.n_heads

    @property
    def is_mglu(self) -> bool:
        """True for the masked kinds (``swimglu``, ``gemglu``, ``remglu``, ``mglu``)."""
        return self.ffn_kind in MGLU_KINDS

    @property
    def np_dtype(self) -> np.dtype:
        """``dtype`` as a NumPy dtype (``ml_dtypes.bfloat16`` for ``"bfloat16"``)."""
        return _dtypes.bfloat16 if self.dtype == "bfloat16" else np.dtype(self.dtype)

    def to_dict(self) -> dict[str, Any]:
        """Plain ``{field: value}`` (JSON-serialisable)."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """:meth:`to_dict` as a compact JSON string with sorted keys (stable across runs)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TransformerConfig":
        """Build a config from :meth:`to_dict` output; unknown keys raise ``ValueError``."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"TransformerConfig: unknown fields {unknown}")
        return cls(**dict(values))

    @classmethod
    def from_json(cls, text: str) -> "TransformerConfig":
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))

    def differences(self, other: "TransformerConfig") -> list[str]:
        """``["field: self_value != other_value", ...]`` for every field that differs."""
        a, b = self.to_dict(), other.to_dict()
        return [f"{k}: {a[k]!r} != {b[k]!r}" for k in a if a[k] != b[k]]
