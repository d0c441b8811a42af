"""The captured decode step (pymglu.models.GraphDecoder) against the eager cached model (gpu-marked).

Every model is initialised from a fresh seed and moved to the GPU; the eager path (``model(ids,
cache=...)`` one token at a time, the reference ops and FlashMGLU) is the reference. Buffers the graph
writes are poisoned before replays.
"""
import numpy as np
import pytest

from pymglu.backend import gpu_available
from pymglu.models import GraphDecoder, Transformer, TransformerConfig
from pymglu.models import graph_decoder

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a usable CUDA device"),
]

#: relative error of the logits of one step against the eager step
TOL = {"float32": 2e-5, "float16": 5e-3, "bfloat16": 3e-2}

KINDS = [("swiglu", None), ("swimglu", 3), ("gemglu", 1), ("reglu", None), ("mglu", 16)]


def make_model(kind, n_masks, dtype, seed, **overrides):
    values = dict(vocab_size=97, d_model=96, n_layers=2, n_heads=3, d_ff=136, ffn_kind=kind, n_masks=n_masks,
                  max_seq_len=20, dtype=dtype, tie_embeddings=True)
    values.update(overrides)
    model = Transformer(TransformerConfig(**values), rng=seed).to("cuda")
    import cupy as cp

    for m in model.mglu_layers():  # fresh random masks (assigning .data moves the version on)
        m.mask_logits.data = cp.asarray(np.random.default_rng(seed).standard_normal(m.mask_logits.shape),
                                        dtype=m.mask_logits.dtype)
    return model.eval()


def rel_err(got, want):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape and np.all(np.isfinite(got))
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


#: (dtype, fused): the multi-launch step for every dtype, the fused step for the 16-bit ones
STEPS = [("float32", False), ("float16", False), ("bfloat16", False), ("float16", True), ("bfloat16", True)]


@pytest.mark.parametrize("dtype, fused", STEPS, ids=[f"{d}-{'fused' if f else 'launches'}" for d, f in STEPS])
@pytest.mark.parametrize("kind, n_masks", KINDS, ids=[k for k, _ in KINDS])
def test_step_logits_match_eager_cached_steps(kind, n_masks, dtype, fused):
    import cupy as cp

    from pymglu import no_grad

    seed = 11 + KINDS.index((kind, n_masks))
    model = make_model(kind, n_masks, dtype, seed, tie_embeddings=kind != "reglu")
    rng = np.random.default_rng(seed)
    B, prompt = 3, rng.integers(0, 97, size=(3, 5))
    steps = rng.integers(0, 97, size=(B, 14))  # fill the cache up to max_seq_len = 20 (5 + 14 + 1)
    decoder = GraphDecoder(model, B, fused=fused)
    assert decoder.fused == fused
    with no_grad():
        cache = model.new_cache(B)
        want_first = cp.asnumpy(model(cp.asarray(prompt), cache=cache, last_only=True).data[:, -1])
        got_first = decoder.prefill(prompt)
        assert rel_err(got_first, want_first) < 1e-6  # the prefill is the eager model itself
        decoder.logits.fill(np.nan)
        for t in range(steps.shape[1]):
            want = cp.asnumpy(model(cp.asarray(steps[:, t:t + 1]), cache=cache, last_only=True).data[:, -1])
            got = decoder.step(steps[:, t])
            assert rel_err(got, want) < TOL[dtype], f"step {t}"
    assert decoder.cache.length == cache.length == 19
    # the cache the graph filled holds the eager cache's keys and values
    for mine, ref in zip(decoder.cache.keys + decoder.cache.values, cache.keys + cache.values):
        assert rel_err(cp.asnumpy(mine[:, :, :19]), cp.asnumpy(ref[:, :, :19])) < TOL[dtype]


@pytest.mark.parametrize("staged", [-1, 9, 2.0])
def test_fused_step_refuses_a_staged_merge_bound_out_of_range(staged, monkeypatch):
    from pymglu.cuda import decode_fused

    monkeypatch.setattr(decode_fused, "STAGED_MERGE_CHUNKS", staged)
    model = make_model("swimglu", 1, "bfloat16", 3, d_model=128, n_heads=2, max_seq_len=32)
    with pytest.raises(ValueError, match=r"STAGED_MERGE_CHUNKS: expected an integer from 0 to 8, got"):
        GraphDecoder(model, 1, fused=True)


@pytest.mark.parametrize("dtype, fused", [("float32", False), ("bfloat16", False), ("bfloat16", True)])
def test_long_context_spans_several_attention_chunks(dtype, fused, monkeypatch):
    """150 positions: the attention runs over five chunks of 32, a partial one last; heads of width 64. The
    fused step merges the chunks in the o product's staging up to 3 chunks, in the attention phase after."""
    import cupy as cp

    from pymglu import no_grad
    from pymglu.cuda import decode_fused

    monkeypatch.setattr(decode_fused, "STAGED_MERGE_CHUNKS", 3)

    model = make_model("swimglu", 2, dtype, 21, d_model=128, n_heads=2, max_seq_len=150)
    rng = np.random.default_rng(21)
    prompt, steps = rng.integers(0, 97, size=(2, 40)), rng.integers(0, 97, size=(2, 109))
    decoder = GraphDecoder(model, 2, fused=fused)
    with no_grad():
        cache = model.new_cache(2)
        model(cp.asarray(prompt), cache=cache, last_only=True)
        decoder.prefill(prompt)
        for t in range(steps.shape[1]):
            want = cp.asnumpy(model(cp.asarray(steps[:, t:t + 1]), cache=cache, last_only=True).data[:, -1])
            assert rel_err(decoder.step(steps[:, t]), want) < TOL[dtype], f"step {t}"
    assert decoder.cache.length == 149


@pytest.mark.parametrize("kind, n_masks", [("swiglu", None), ("swimglu", 4)])
def test_greedy_generation_equals_eager_across_a_full_cache(kind, n_masks):
    """float32, so that argmax ties between the paths are out of reach; 45 new tokens after a 7-token
    prompt in a 20-position window: two refills of a full cache."""
    model = make_model(kind, n_masks, "float32", 5)
    prompt = np.random.default_rng(5).integers(0, 97, size=(2, 7))
    eager = model.generate(prompt, 45, temperature=0.0, use_graph=False)
    graph = model.generate(prompt, 45, temperature=0.0, use_graph=True)
    np.testing.assert_array_equal(graph, eager)
    assert model.__dict__["_graph_decoder"] is not None


def test_sampling_follows_the_same_draws():
    model = make_model("swimglu", 2, "float32", 9)
    prompt = np.random.default_rng(9).integers(0, 97, size=(2, 4))
    eager = model.generate(prompt, 25, temperature=0.8, top_k=20, rng=3, use_graph=False)
    graph = model.generate(prompt, 25, temperature=0.8, top_k=20, rng=3, use_graph=True)
    np.testing.assert_array_equal(graph, eager)


class _Draws:
    """A stand-in for a numpy Generator in choose_next: hands out the rows of fixed draws in order."""

    def __init__(self, rows):
        self.rows = iter(rows)

    def random(self, n):
        row = next(self.rows)
        assert row.shape == (n,)
        return row.astype(np.float64)


@pytest.mark.parametrize("dtype, fused, top_k", [("float32", False, None), ("bfloat16", False, 9),
                                                  ("bfloat16", True, 30), ("float16", True, 1)])
def test_sampled_steps_choose_what_the_host_chooses_from_their_logits(dtype, fused, top_k):
    """decoder.sample draws on the device; decoder.step with choose_next on the host, from the same float32
    draws, must pick the same tokens (both paths compute the same logits)."""
    import cupy as cp

    from pymglu.models.generation import choose_next

    model = make_model("swimglu", 3, dtype, 31, tie_embeddings=False)
    B, steps, temperature = 2, 14, 0.9
    rng = np.random.default_rng(31)
    prompt = rng.integers(0, 97, size=(B, 5))
    draws = rng.random((steps, B)).astype(np.float32)
    decoder = GraphDecoder(model, B, fused=fused)
    first = decoder.prefill(prompt).argmax(-1)
    decoder.history.fill(-1)
    pool = cp.get_default_memory_pool()
    decoder.sample(first, 1, temperature, top_k, draws[:1])  # builds and captures the sampling graph
    decoder.prefill(prompt)
    used = pool.used_bytes()
    sampled = decoder.sample(first, steps, temperature, top_k, draws)
    assert pool.used_bytes() == used
    assert decoder.cache.length == 5 + steps and int(decoder.state[0].get()) == 5 + steps

    decoder.prefill(prompt)
    host_draws, previous, chosen = _Draws(draws), first, []
    for _ in range(steps):
        previous = choose_next(decoder.step(previous), temperature, top_k, host_draws)
        chosen.append(previous)
    np.testing.assert_array_equal(sampled, np.stack(chosen, axis=1))
    if top_k == 1:
        decoder.prefill(prompt)
        np.testing.assert_array_equal(sampled, decoder.greedy(first, steps))


def test_sample_refuses_bad_arguments_before_it_runs():
    decoder = GraphDecoder(make_model("swiglu", None, "float32", 6), 2)
    decoder.prefill(np.ones((2, 4), dtype=np.int64))
    draws = np.full((3, 2), 0.5)
    with pytest.raises(ValueError, match=r"draws: expected \(3, 2\) floats, got shape \(2, 3\)"):
        decoder.sample([1, 2], 3, 1.0, None, draws.T)
    with pytest.raises(ValueError, match="temperature: expected a finite number > 0, got 0.0"):
        decoder.sample([1, 2], 3, 0.0, None, draws)
    with pytest.raises(ValueError, match="top_k: expected None or an integer >= 1, got 0"):
        decoder.sample([1, 2], 3, 1.0, 0, draws)
    with pytest.raises(ValueError, match="exceed max_seq_len"):
        decoder.sample([1, 2], 17, 1.0, None, np.full((17, 2), 0.5))
    assert decoder.cache.length == 4 and "sample" not in decoder._graphs


def test_replays_allocate_nothing_and_history_is_written():
    import cupy as cp

    model = make_model("swimglu", 4, "bfloat16", 2)
    decoder = GraphDecoder(model, 1)
    first = decoder.prefill(np.array([[1, 2, 3]]))
    decoder.greedy([int(first.argmax())], 1)  # builds and captures the greedy graph
    decoder.prefill(np.array([[1, 2, 3]]))
    decoder.history.fill(-1)
    pool = cp.get_default_memory_pool()
    used = pool.used_bytes()
    tokens = decoder.greedy([int(first.argmax())], 10)
    assert pool.used_bytes() == used
    assert tokens.shape == (1, 10) and np.all((tokens >= 0) & (tokens < 97))
    assert decoder.cache.length == 13 and int(decoder.state[0].get()) == 13


def test_a_changed_parameter_rebuilds_the_decoder():
    import cupy as cp

    model = make_model("swiglu", None, "float32", 4)
    prompt = np.array([[3, 1, 4, 1, 5]])
    model.generate(prompt, 4, temperature=0.0, use_graph=True)
    first = model.__dict__["_graph_decoder"]
    assert first.is_current()
    w = model.layers[0].ffn.up.W_gate
    w.data = w.data + cp.asarray(np.random.default_rng(0).standard_normal(w.shape), dtype=w.dtype) * 0.5
    assert not first.is_current()
    graph = model.generate(prompt, 12, temperature=0.0, use_graph=True)
    assert model.__dict__["_graph_decoder"] is not first
    np.testing.assert_array_equal(graph, model.generate(prompt, 12, temperature=0.0, use_graph=False))


def test_models_the_decoder_does_not_serve():
    plain = make_model("gelu", None, "float32", 1)
    assert "not gated" in graph_decoder.unsupported_reason(plain)
    with pytest.raises(ValueError, match="not gated"):
        plain.generate(np.array([1, 2]), 3, use_graph=True)
    # the default picks the eager path for it and still decodes
    assert plain.generate(np.array([1, 2]), 3, temperature=0.0).shape == (5,)
    with pytest.raises(ValueError, match="heads are 288 wide"):
        make_model("swiglu", None, "float32", 1, d_model=576, n_heads=2).generate(np.array([1, 2]), 1, use_graph=True)
    decoder = GraphDecoder(make_model("swiglu", None, "float32", 1), 2)
    with pytest.raises(RuntimeError, match="prefill"):
        decoder.step([1, 2])
    decoder.prefill(np.ones((2, 19), dtype=np.int64))
    with pytest.raises(ValueError, match="exceed max_seq_len"):
        decoder.greedy([1, 2], 2)
    with pytest.raises(ValueError, match="tokens"):
        decoder.prefill(np.ones((3, 4), dtype=np.int64))


# ---------------------------------------------------------------------------------------------- fused step
#: the fused step's STAGED_MERGE_CHUNKS: 0 (the last chunk of each head merges), 1 (the o staging merges up to
#: position 31, the attention phase after), the default
STAGED = [0, 1, None]


def decode_both(fused, launches, prompt, steps, what="step"):
    """Prefill a fused and a multi-launch GraphDecoder with ``prompt`` (batch x length) and step both through
    the tokens ``steps`` (batch x n); every step's logits agree (the fused ones poisoned first)."""
    fused.prefill(prompt)
    launches.prefill(prompt)
    for t in range(steps.shape[1]):
        fused.logits.fill(np.nan)
        want = launches.step(steps[:, t])
        assert rel_err(fused.step(steps[:, t]), want) < 2e-3, f"{what} {t}"


def step_fused_against_launches(model, batch, prompt_len, n_steps, seed):
    """A fused and a multi-launch GraphDecoder of ``model`` fed the same random prompt and tokens
    (:func:`decode_both`). Returns both decoders, stepped."""
    rng = np.random.default_rng(seed)
    prompt, steps = rng.integers(0, 97, size=(batch, prompt_len)), rng.integers(0, 97, size=(batch, n_steps))
    fused, launches = GraphDecoder(model, batch, fused=True), GraphDecoder(model, batch, fused=False)
    decode_both(fused, launches, prompt, steps)
    return fused, launches


@pytest.mark.parametrize("staged", STAGED, ids=["merge-last", "staged-1", "staged-default"])
@pytest.mark.parametrize("kind, n_masks, batch", [("swiglu", None, 1), ("swimglu", 4, 8), ("swimglu", 5, 2),
                                                  ("remglu", 8, 1), ("geglu", None, 5)])
def test_fused_step_matches_the_multi_launch_step(kind, n_masks, batch, staged, monkeypatch):
    """Both steps on one model (float16: finer than bfloat16, so the two roundings orders stay close),
    ragged widths (d 160, h 200, vocab 97), heads of 32; every step's logits, and the caches; positions 6 to
    35 (one and two attention chunks), with the chunks merged in each of the fused step's two places."""
    from pymglu.cuda import decode_fused

    if staged is not None:
        monkeypatch.setattr(decode_fused, "STAGED_MERGE_CHUNKS", staged)
    model = make_model(kind, n_masks, "float16", 31, d_model=160, n_heads=5, d_ff=200, max_seq_len=40)
    fused, launches = step_fused_against_launches(model, batch, prompt_len=6, n_steps=30, seed=31)
    import cupy as cp

    for mine, ref in zip(fused.cache.keys + fused.cache.values, launches.cache.keys + launches.cache.values):
        assert rel_err(cp.asnumpy(mine[:, :, :36]), cp.asnumpy(ref[:, :, :36])) < 2e-3


@pytest.mark.parametrize("staged", [0, None], ids=["merge-last", "staged-default"])
@pytest.mark.parametrize("kind, n_masks, batch", [("swiglu", None, 2), ("swimglu", 4, 1)])
def test_fused_step_merges_more_than_four_chunks_like_the_multi_launch_step(kind, n_masks, batch, staged,
                                                                             monkeypatch):
    """Positions 130 to 165: 5 and 6 attention chunks per head, so the o staging's merge (four chunks' loads
    at a time) runs a second batch; also the last-chunk merge there. The o and down epilogues add the
    residual they read when their strip starts."""
    from pymglu.cuda import decode_fused

    if staged is not None:
        monkeypatch.setattr(decode_fused, "STAGED_MERGE_CHUNKS", staged)
    model = make_model(kind, n_masks, "float16", 37, d_model=160, n_heads=5, d_ff=200, max_seq_len=170)
    step_fused_against_launches(model, batch, prompt_len=130, n_steps=36, seed=37)


@pytest.mark.parametrize("kind, n_masks, d_ff", [("swiglu", None, 201), ("swimglu", 4, 202), ("swimglu", 6, 203)])
def test_fused_step_carries_x_and_hidden_in_flagged_packets(kind, n_masks, d_ff):
    """The o, up and down phases hand their rows on as flagged packets (two values and the launch's flag).
    Odd hidden widths leave the last packet half full (201, 203), and 202 / 203 pad each row to an even
    count of packets that no producer writes; three sequences, then a second prompt from position 0 into
    the same decoders, so that every packet set is rewritten at positions it held before."""
    model = make_model(kind, n_masks, "float16", 41, d_model=160, n_heads=5, d_ff=d_ff, max_seq_len=24)
    fused, launches = step_fused_against_launches(model, 3, prompt_len=4, n_steps=8, seed=41)
    import cupy as cp

    from pymglu.cuda.decode_fused import packet_row

    step = fused.fused_step
    assert step.grid_barriers == 2 * model.config.n_layers and step.barriers == 5 * model.config.n_layers
    # every packet that a producer writes carries the last launch's flag: the count of launches so far
    launched = int(step.sync[2].get())
    assert launched >= 8
    flags = (cp.asnumpy(step.hidden_packets) >> 32).reshape(model.config.n_layers, 3, packet_row(d_ff))
    assert np.all(flags[:, :, :-(-d_ff // 2)] == launched)
    x_flags = (cp.asnumpy(step.x_packets) >> 32).reshape(2 * model.config.n_layers + 1, 3, packet_row(160))
    assert np.all(x_flags == launched)
    rng = np.random.default_rng(43)
    prompt, steps = rng.integers(0, 97, size=(3, 5)), rng.integers(0, 97, size=(3, 6))
    decode_both(fused, launches, prompt, steps, "second prompt, step")


@pytest.mark.parametrize("kind, n_masks, d_ff", [("swiglu", None, 8200), ("swimglu", 6, 4100)])
def test_fused_step_stages_more_than_32_pairs_per_thread(kind, n_masks, d_ff):
    """Eight sequences and a wide hidden layer give every thread of the down product's staging more than 32
    pairs of packets (on the H200: GLU's 16-warp instance, 8 x 2050 pairs over 512 threads; the 8-mask
    instance, 8 warps, 8 x 1025 over 256), so each thread sweeps its pairs in two chunks of at most 32."""
    from pymglu.cuda.decode_fused import packet_row

    model = make_model(kind, n_masks, "float16", 51, d_model=96, n_heads=3, d_ff=d_ff, n_layers=1, max_seq_len=12)
    fused, _ = step_fused_against_launches(model, 8, prompt_len=3, n_steps=3, seed=51)
    assert 32 * 32 * fused.fused_step.warps < 8 * (packet_row(d_ff) // 2)


def test_fused_step_reads_the_flash_mglu_arrays_of_the_layer():
    """The MGLU up layer's tiles and lane-major mask words are the arrays FlashMGLU uses, not copies."""
    model = make_model("swimglu", 5, "bfloat16", 4, d_model=128, n_heads=4, d_ff=256, max_seq_len=16)
    decoder = GraphDecoder(model, 1, fused=True)
    for i, block in enumerate(model.layers):
        up = block.ffn.up
        flash = up._flash_weights(None, up._current_packed())  # cached by the decoder's packing
        row = decoder.fused_step.layers.get()[i]
        assert int(row[2]) == flash.w_tiles.data.ptr and int(row[3]) == flash.mask_words.data.ptr
        assert flash.mask_words.shape[-1] == 32 * 5


def test_fused_instances_do_not_spill_with_this_devices_compiler():
    """The CI compile test checks spills with the CI machine's NVRTC; the GPU's own toolkit allocates
    registers differently, and the 16-warp instances sit at the 128-register bound. Every instance the
    library launches here must keep its local memory to the 8-byte frame of the barrier's timeout printf."""
    from pymglu import cuda as pymglu_cuda
    from pymglu.cuda import decode_fused

    names = decode_fused.kernel_names(decode_fused._device_arch())
    module = pymglu_cuda.load_module(decode_fused._SOURCE, tuple(names))
    local = {name: (module.get_function(name).attributes["num_regs"],
                    module.get_function(name).attributes["local_size_bytes"]) for name in names}
    assert all(size <= 8 for _, size in local.values()), f"local memory (registers, bytes): {local}"


def test_fused_greedy_tokens_follow_their_own_logits():
    """Greedy replays back to back (no host sync between them) choose the argmax of each step's logits:
    the same tokens as one-step calls that return the logits; the counters of the grid barrier are
    back at zero after every launch, and the launch count moved on."""
    model = make_model("swimglu", 4, "bfloat16", 8, d_model=128, n_heads=4, d_ff=256, max_seq_len=64)
    prompt = np.random.default_rng(8).integers(0, 97, size=(2, 5))
    decoder = GraphDecoder(model, 2, fused=True)
    first = decoder.prefill(prompt).astype(np.float32).argmax(axis=-1)
    tokens = decoder.greedy(first, 40)
    decoder.prefill(prompt)
    last, stepped = first, []
    for _ in range(40):
        last = decoder.step(last).astype(np.float32).argmax(axis=-1)
        stepped.append(last)
    np.testing.assert_array_equal(tokens, np.stack(stepped, axis=1))
    arrivals, done, launched = decoder.fused_step.sync.get().tolist()
    assert (arrivals, done) == (0, 0) and launched >= 80  # sync[2] counts the launches (the packets' flags)
    assert not decoder.fused_step.head_count.get().any()


def test_fused_step_choice_and_refusals():
    big_batch = make_model("swiglu", None, "bfloat16", 3)
    decoder = GraphDecoder(big_batch, 9)  # more sequences than the fused step serves: the launches
    assert not decoder.fused and decoder.fused_step is None
    with pytest.raises(ValueError, match="at most 8 sequences"):
        GraphDecoder(big_batch, 9, fused=True)
    assert GraphDecoder(big_batch, 3).fused
    with pytest.raises(ValueError, match="dtype is float32"):
        GraphDecoder(make_model("swiglu", None, "float32", 3), 1, fused=True)
    narrow = make_model("swiglu", None, "bfloat16", 3, n_heads=4)  # heads of 24 values
    with pytest.raises(ValueError, match="multiple of 16"):
        GraphDecoder(narrow, 1, fused=True)
    assert not GraphDecoder(narrow, 1).fused
    with pytest.raises(TypeError, match="fused"):
        GraphDecoder(narrow, 1, fused="yes")
