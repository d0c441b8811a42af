"""TransformerConfig: defaults, validation, JSON round trip, differences."""
import pytest

from pymglu.models import MGLU_KINDS, TransformerConfig
from pymglu.nn import FEEDFORWARD_KINDS


def test_defaults_and_mask_counts():
    c = TransformerConfig()
    assert c.ffn_kind == "swimglu" and c.n_masks == 4 and c.head_dim == 32 and c.is_mglu
    assert TransformerConfig(ffn_kind="gemglu", n_masks=2).n_masks == 2
    g = TransformerConfig(ffn_kind="swiglu")
    assert g.n_masks is None and not g.is_mglu
    assert set(MGLU_KINDS) <= set(FEEDFORWARD_KINDS)


def test_json_round_trip_and_differences():
    c = TransformerConfig(ffn_kind="remglu", n_masks=8, d_model=64, n_heads=2, dtype="bfloat16")
    again = TransformerConfig.from_json(c.to_json())
    assert again == c and again.dtype == "bfloat16"
    other = TransformerConfig(ffn_kind="swiglu", d_model=64, n_heads=2, dtype="bfloat16")
    assert c.differences(other) == ["ffn_kind: 'remglu' != 'swiglu'", "n_masks: 8 != None"]
    assert c.differences(again) == []


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(ffn_kind="swishglu"), ValueError, "ffn_kind"),
    (dict(ffn_kind="swiglu", n_masks=2), ValueError, "only MGLU kinds"),
    (dict(n_masks=0), ValueError, "n_masks"),
    (dict(d_model=100, n_heads=3), ValueError, "must divide"),
    (dict(d_model=12, n_heads=4), ValueError, "even"),
    (dict(vocab_size=0), ValueError, "vocab_size"),
    (dict(dtype="int32"), TypeError, "dtype"),
    (dict(tie_embeddings="yes"), TypeError, "tie_embeddings"),
    (dict(rope_base=0.0), ValueError, "rope_base"),
])
def test_bad_values(kwargs, error, match):
    with pytest.raises(error, match=match):
        TransformerConfig(**kwargs)


def test_unknown_field_in_dict():
    with pytest.raises(ValueError, match="unknown fields"):
        TransformerConfig.from_dict({"d_model": 64, "heads": 2})
