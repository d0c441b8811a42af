"""Transformer: output shapes, float64 gradient checks through the whole model, causality, statistics."""
import numpy as np
import pytest

from pymglu import check_grads, no_grad, nn
from pymglu.models import Transformer

from lm_helpers import tiny_config

IDS = np.array([[1, 5, 3, 15, 0, 7], [2, 2, 9, 4, 11, 6]])


def forward_with(model, names, ids):
    """``fn(*tensors)``: the model's logits with the parameters ``names`` replaced by the given Tensors,
    so that check_grads can differentiate with respect to them (the registry entries are restored)."""
    modules = dict(model.named_modules())
    owners = [(modules[n.rpartition(".")[0]], n.rpartition(".")[2]) for n in names]

    def fn(*tensors):
        saved = [(mod, attr, mod._parameters[attr]) for mod, attr in owners]
        try:
            for (mod, attr), t in zip(owners, tensors):
                mod._parameters[attr] = t
            return model(ids)
        finally:
            for mod, attr, p in saved:
                mod._parameters[attr] = p

    return fn


@pytest.mark.parametrize("kind, tie", [("swiglu", True), ("swimglu", False)])
def test_gradients_of_every_weight(kind, tie):
    """Finite differences in float64 along random directions of all weights at once; for SwiMGLU the
    mask logits are inputs that are not differentiated (their gradient is a straight-through estimate)."""
    model = Transformer(tiny_config(ffn_kind=kind, n_masks=2 if kind == "swimglu" else None, tie_embeddings=tie),
                        rng=0)
    named = model.named_parameters()
    names = [n for n, _ in named]
    arrays = [p.data for _, p in named]
    wrt = [i for i, n in enumerate(names) if not n.endswith("mask_logits")]
    assert len(wrt) == len(names) - (2 if kind == "swimglu" else 0)
    check_grads(forward_with(model, names, IDS), arrays, wrt=wrt)


def test_gradient_check_catches_a_wrong_gradient(monkeypatch):
    """The helper really routes gradients: a 1% error in the RoPE backward makes check_grads fail."""
    from pymglu.autograd import GradientCheckError
    from pymglu.autograd.ops.rope import Rope

    model = Transformer(tiny_config(), rng=1)
    names = [n for n, _ in model.named_parameters()]
    check_grads(forward_with(model, names, IDS), [p.data for _, p in model.named_parameters()])
    original = Rope.backward
    monkeypatch.setattr(Rope, "backward", lambda self, g: (original(self, g)[0] * 1.01, None))
    with pytest.raises(GradientCheckError):
        check_grads(forward_with(model, names, IDS), [p.data for _, p in model.named_parameters()])


def test_mask_logits_get_straight_through_gradients():
    model = Transformer(tiny_config(ffn_kind="swimglu", n_masks=3, dtype="float32"), rng=2)
    model.loss(IDS[:, :-1], IDS[:, 1:]).backward()
    for layer in model.mglu_layers():
        assert layer.mask_logits.grad.shape == (3, 12, 8) and np.abs(layer.mask_logits.grad).sum() > 0


def test_recompute_reaches_every_mglu_layer_and_keeps_the_gradients():
    grads = {}
    for recompute in (False, True):
        model = Transformer(tiny_config(ffn_kind="swimglu", n_masks=2), rng=4)
        model.set_recompute(recompute)
        assert [layer.recompute for layer in model.mglu_layers()] == [recompute] * 2
        model.loss(IDS[:, :-1], IDS[:, 1:]).backward()
        grads[recompute] = {name: p.grad for name, p in model.named_parameters()}
    for name, g in grads[False].items():
        np.testing.assert_allclose(grads[True][name], g, rtol=1e-12, atol=1e-15, err_msg=name)
    Transformer(tiny_config(), rng=0).set_recompute(True)  # no MGLU layers: nothing to set


@pytest.mark.parametrize("kind", ["swiglu", "swimglu", "gemglu", "remglu", "geglu", "gelu"])
def test_shapes_and_dtypes(kind):
    config = tiny_config(ffn_kind=kind, dtype="float32", tie_embeddings=kind != "gelu")
    model = Transformer(config, rng=3)
    logits = model(IDS)
    assert logits.shape == (2, 6, 16) and logits.dtype == np.float32
    last = model(IDS, last_only=True)
    assert last.shape == (2, 1, 16)
    np.testing.assert_allclose(last.data[:, 0], logits.data[:, -1], rtol=1e-5, atol=1e-6)
    loss = model.loss(IDS[:, :-1], IDS[:, 1:])
    assert loss.shape == () and np.isfinite(loss.item())
    assert 2.0 < loss.item() < 4.5      # about log(16) = 2.77 at initialisation


def test_parameter_names_and_counts():
    model = Transformer(tiny_config(ffn_kind="swimglu", n_masks=2, tie_embeddings=False), rng=0)
    names = [n for n, _ in model.named_parameters()]
    assert names[:2] == ["embed.weight", "layers.0.attn_norm.weight"]
    assert "layers.1.ffn.up.mask_logits" in names and names[-1] == "head.weight"
    d, h, V, L = 8, 12, 16, 2
    per_layer = 4 * d * d + 2 * d + h * d + h * d           # attention, two norms, W, down
    assert model.num_weights() == V * d + L * per_layer + d + V * d
    assert model.num_mask_bits() == L * 2 * h * d
    glu = Transformer(tiny_config(ffn_kind="swiglu"), rng=0)
    assert glu.num_weights() == V * d + L * (per_layer + h * d) + d
    assert glu.num_mask_bits() == 0 and glu.gate_fractions() == []
    fractions = model.gate_fractions()
    assert len(fractions) == 2 and all(0.2 < f < 0.8 for f in fractions)


def test_causality():
    """Changing later tokens never changes the logits of earlier positions."""
    model = Transformer(tiny_config(ffn_kind="swimglu"), rng=4)
    other = IDS.copy()
    other[:, 4:] = (other[:, 4:] + 5) % 16
    a, b = model(IDS).data, model(other).data
    np.testing.assert_array_equal(a[:, :4], b[:, :4])
    assert not np.allclose(a[:, 4:], b[:, 4:])


def test_eval_mode_gives_training_mode_outputs():
    """Eval-mode MGLU layers run on packed bit-planes: the same logits."""
    model = Transformer(tiny_config(ffn_kind="swimglu", dtype="float32"), rng=5)
    with no_grad():
        train_logits = model(IDS).data
        model.eval()
        eval_logits = model(IDS).data
    np.testing.assert_array_equal(train_logits, eval_logits)
    assert all(layer.packed_masks is not None for layer in model.mglu_layers())


def test_bad_input():
    model = Transformer(tiny_config(), rng=0)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(np.zeros((1, 9), dtype=np.int64))
    with pytest.raises(ValueError, match="ids"):
        model(np.zeros(4, dtype=np.int64))
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        model(np.array([[3, 16]]))
    with pytest.raises(RuntimeError, match="no_grad"):
        model(IDS, cache=model.new_cache(2))
    with pytest.raises(TypeError, match="TransformerConfig"):
        Transformer({"d_model": 8})


def test_state_dict_round_trip_between_models():
    a, b = Transformer(tiny_config(ffn_kind="swimglu"), rng=0), Transformer(tiny_config(ffn_kind="swimglu"), rng=1)
    assert not np.array_equal(a(IDS).data, b(IDS).data)
    b.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(a(IDS).data, b(IDS).data)
    with pytest.raises(nn.StateDictError):
        Transformer(tiny_config(ffn_kind="swiglu"), rng=0).load_state_dict(a.state_dict())
