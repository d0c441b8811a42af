"""Generation: greedy decoding with and without the KV cache, the cache itself, sampling."""
import numpy as np
import pytest

from pymglu import no_grad
from pymglu.models import KVCache, Transformer, choose_next

from lm_helpers import tiny_config


@pytest.mark.parametrize("kind, dtype", [("swiglu", "float64"), ("swimglu", "float64"), ("swimglu", "float32"),
                                         ("gemglu", "float32")])
@pytest.mark.parametrize("prompt_len, new", [(3, 4), (5, 20), (12, 6)])
def test_greedy_tokens_same_with_and_without_cache(kind, dtype, prompt_len, new):
    """Inside the window, and past max_seq_len = 8 (prompt cropped, window sliding)."""
    model = Transformer(tiny_config(ffn_kind=kind, dtype=dtype, tie_embeddings=kind != "gemglu"), rng=7)
    prompt = np.random.default_rng(prompt_len).integers(0, 16, (2, prompt_len))
    cached = model.generate(prompt, new, temperature=0.0, use_kv_cache=True)
    fresh = model.generate(prompt, new, temperature=0.0, use_kv_cache=False)
    assert cached.shape == (2, prompt_len + new) and cached.dtype == np.int64
    np.testing.assert_array_equal(cached[:, :prompt_len], prompt)
    np.testing.assert_array_equal(cached, fresh)
    if new >= 6:  # the comparison is not between two constant outputs
        assert len(set(cached[:, prompt_len:].ravel().tolist())) > 1


def test_cached_logits_equal_full_forward():
    model = Transformer(tiny_config(ffn_kind="swimglu"), rng=8).eval()
    ids = np.random.default_rng(0).integers(0, 16, (3, 8))
    with no_grad():
        full = model(ids).data
        cache = model.new_cache(3)
        steps = [model(ids[:, :3], cache=cache).data]
        for t in range(3, 8):
            steps.append(model(ids[:, t:t + 1], cache=cache).data)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=1e-12, atol=1e-12)
    assert cache.length == 8 and cache.remaining == 0


def test_cache_decodes_one_token_per_step(monkeypatch):
    """With the cache each step feeds one token until the window is full, then the last window once."""
    model = Transformer(tiny_config(), rng=9)
    fed = []
    forward = Transformer.forward

    def recording(self, ids, cache=None, last_only=False):
        fed.append((ids.shape[1], cache.length if cache is not None else None))
        return forward(self, ids, cache, last_only)

    monkeypatch.setattr(Transformer, "forward", recording)
    model.generate([1, 2, 3], 7, temperature=0.0)
    # prompt of 3, then single tokens at positions 3..7; the cache is then full (8) and the window of
    # the last 8 tokens is computed afresh
    assert fed == [(3, 0), (1, 3), (1, 4), (1, 5), (1, 6), (1, 7), (8, 0)]
    fed.clear()
    model.generate([1, 2, 3], 3, temperature=0.0, use_kv_cache=False)
    assert fed == [(3, None), (4, None), (5, None)]


def test_generate_restores_training_mode_and_accepts_1d():
    model = Transformer(tiny_config(ffn_kind="swimglu"), rng=10)
    assert model.training
    out = model.generate(np.array([4, 5]), 3, temperature=0.0)
    assert out.shape == (5,) and model.training
    model.eval()
    model.generate([4, 5], 1)
    assert not model.training
    assert model.generate([4], 0).tolist() == [4]


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    model = Transformer(tiny_config(), rng=11)
    a = model.generate([1, 2], 10, temperature=1.0, rng=3)
    b = model.generate([1, 2], 10, temperature=1.0, rng=np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)
    greedy = model.generate([1, 2], 10, temperature=0.0)
    np.testing.assert_array_equal(model.generate([1, 2], 10, temperature=2.0, top_k=1, rng=5), greedy)


def test_choose_next_distribution():
    rng = np.random.default_rng(0)
    logits = np.log(np.array([[0.1, 0.2, 0.3, 0.4]]))
    draws = np.array([choose_next(logits, 1.0, None, rng)[0] for _ in range(20000)])
    np.testing.assert_allclose(np.bincount(draws, minlength=4) / draws.size, [0.1, 0.2, 0.3, 0.4], atol=0.015)
    top2 = np.array([choose_next(logits, 1.0, 2, rng)[0] for _ in range(4000)])
    assert set(top2.tolist()) == {2, 3}
    assert abs((top2 == 3).mean() - 0.4 / 0.7) < 0.03
    cold = np.array([choose_next(logits, 0.05, None, rng)[0] for _ in range(200)])
    assert (cold == 3).mean() > 0.95
    assert choose_next(np.array([[0.0, 5.0, 5.0], [9.0, 1.0, 2.0]]), 0.0, None, rng).tolist() == [1, 0]


def test_bad_generation_input():
    model = Transformer(tiny_config(), rng=0)
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        model.generate([1, 16], 2)
    with pytest.raises(ValueError, match="non-empty"):
        model.generate([], 2)
    with pytest.raises(TypeError, match="integer"):
        model.generate([1.0, 2.0], 2)
    with pytest.raises(ValueError, match="temperature"):
        model.generate([1], 2, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        model.generate([1], 2, top_k=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate([1], -1)


def test_use_graph_choices_on_the_cpu():
    """The graph decoder needs a GPU model: asked for on a NumPy model it says why; the default decodes
    eagerly; bad values of ``use_graph`` are refused before any work."""
    model = Transformer(tiny_config(dtype="float32"), rng=0)
    with pytest.raises(ValueError, match="use_graph=True: the graph decoder cannot serve this model"):
        model.generate([1, 2], 2, use_graph=True)
    with pytest.raises(ValueError, match="use_kv_cache"):
        model.generate([1, 2], 2, use_graph=True, use_kv_cache=False)
    with pytest.raises(TypeError, match="use_graph"):
        model.generate([1, 2], 2, use_graph="yes")
    default = model.generate([1, 2], 4, temperature=0.0)
    np.testing.assert_array_equal(default, model.generate([1, 2], 4, temperature=0.0, use_graph=False))
    assert "_graph_decoder" not in model.__dict__


def test_kv_cache_bounds():
    cache = KVCache(n_layers=2, batch=1, n_heads=2, head_dim=4, capacity=5, dtype=np.float32)
    k = np.ones((1, 2, 3, 4), dtype=np.float32)
    keys, values = cache.update(0, k, 2 * k)
    assert keys.shape == (1, 2, 3, 4) and values[0, 0, 0, 0] == 2.0 and cache.length == 0
    cache.advance(3)
    np.testing.assert_array_equal(cache.positions(2), [3, 4])
    with pytest.raises(ValueError, match="capacity"):
        cache.update(1, k, k)
    with pytest.raises(ValueError, match="layer"):
        cache.update(2, k[:, :, :1], k[:, :, :1])
    with pytest.raises(ValueError, match="k"):
        cache.update(0, np.ones((1, 3, 1, 4), dtype=np.float32), k)
    cache.reset()
    assert cache.length == 0 and cache.remaining == 5
