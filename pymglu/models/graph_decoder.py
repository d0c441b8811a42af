"""``GraphDecoder``: one-token decode steps of a :class:`Transformer` on the GPU, replayed as a CUDA graph.

The eager decode step (``model(ids, cache=cache)``) launches a few hundred kernels from Python per token
and allocates every intermediate; for a model whose step reads a few hundred megabytes that is more host
time than GPU time. The decoder records the whole step once (CUDA stream capture) and replays it: one
``cudaGraphLaunch`` per token, no allocation, no host synchronisation.

What one step does, for the ``B`` sequences, with every buffer allocated once by the decoder:

* embedding row of each sequence's last token (``ids``, an int32 device array);
* per block: RMSNorm; ``q, k, v`` in one cuBLAS product with the stacked ``[W_q; W_k; W_v]``; rotary
  embedding of ``q`` and ``k`` and the store of ``k, v`` into the :class:`KVCache` at the step's position;
  attention over the cached positions (split into chunks of 32 positions over the GPU, then merged); ``x += attn W_o^T`` (cuBLAS, accumulating); RMSNorm; the gated
  up layer: FlashMGLU (:func:`pymglu.cuda.flash_mglu.flash_mglu`) for the MGLU kinds, one cuBLAS product
  with the stacked ``[W_gate; W_value]`` and a fused activation kernel for the GLU kinds; ``x += u
  W_down^T``;
* final RMSNorm and the logits ``(B, vocab_size)`` in the model's dtype;
* greedy mode: the argmax of each row becomes the next ``ids`` and is stored in a token history;
  sampling mode: a token drawn with the temperature and top-k of the call
  (:class:`pymglu.cuda.decode_sample.Sampler`, from uniform draws uploaded once per call) does;
* the position (``state[0]``, read by the kernels from device memory) moves on by one.

The arithmetic is the eager model's: float32 inside each kernel and cuBLAS (float32 accumulation), one
rounding to the model dtype per stored value. Two roundings differ: the residual adds happen inside
cuBLAS (one rounding of ``x + y`` instead of rounding ``y`` first), so logits agree with the eager
path to the dtype's rounding, not bit for bit.

The stacked ``q, k, v`` and gate/value weights are copies (made once per decoder: 3 ``d^2`` and, for GLU
kinds, ``2 h d`` elements per block). A decoder reads the parameters as they were when it was built;
:meth:`is_current` says whether they (or the MGLU masks) changed since, and :func:`decoder_for` rebuilds
it then.

**Fused step.** For bfloat16 and float16 models of at most 8 sequences (and the other limits of
:func:`pymglu.cuda.decode_fused.unsupported_reason`) the recorded step is one launch of a persistent kernel
that runs every block (:class:`pymglu.cuda.decode_fused.FusedDecodeStep`) instead of the launches above;
``GraphDecoder(model, batch, fused=...)`` chooses (``None``: fused where served). Its arithmetic is the
same (float32 sums, one rounding per stored value; the residual adds round ``x + y`` once, like cuBLAS).

Served: models on CuPy in float32, float16 or bfloat16, with a gated feed-forward kind (GLU or MGLU
family, at most :data:`pymglu.cuda.flash_mglu.MAX_MASKS` masks) and attention heads of at most
:data:`pymglu.cuda.decode_step.MAX_HEAD_DIM` values. :func:`unsupported_reason`
names what rules a model out; :func:`pymglu.models.generation.generate` then decodes eagerly.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from pymglu.backend import is_cupy_array
from pymglu.models.kv_cache import KVCache
from pymglu.nn import GLU, MGLU

__all__ = ["GraphDecoder", "unsupported_reason", "decoder_for"]

_DTYPES = ("float32", "float16", "bfloat16")
_MODES = ("logits", "greedy", "sample")


def unsupported_reason(model: Any) -> str | None:
    """Why :class:`GraphDecoder` cannot serve ``model`` (a sentence), or ``None`` when it can."""
    from pymglu.backend import gpu_available

    c = model.config
    if not gpu_available():
        return "it needs a CUDA GPU with CuPy, and none is usable"
    if not is_cupy_array(model.embed.weight.data):
        return "the model's parameters are NumPy arrays (move the model with .to('cuda'))"
    if c.dtype not in _DTYPES:
        return f"the model's dtype is {c.dtype}, and the decode kernels serve {', '.join(_DTYPES)}"
    ups = [block.ffn.up for block in model.layers]
    if not all(isinstance(u, (GLU, MGLU)) for u in ups):
        return f"the feed-forward kind {c.ffn_kind!r} is not gated (the decoder serves the GLU and MGLU kinds)"
    from pymglu.cuda import decode_step, flash_mglu

    if c.is_mglu and c.n_masks > flash_mglu.MAX_MASKS:
        return f"n_masks = {c.n_masks} exceeds FlashMGLU's maximum of {flash_mglu.MAX_MASKS}"
    if c.head_dim > decode_step.MAX_HEAD_DIM:
        return (f"the attention heads are {c.head_dim} wide, and the decode attention kernel serves at most "
                f"{decode_step.MAX_HEAD_DIM}")
    return None


def _parameter_key(model: Any) -> tuple:
    """Identity and version of every parameter and MGLU bit-plane buffer the decoder copies or reads."""
    key = tuple((id(p.data), p.version) for p in model.parameters())
    packed = tuple(id(m._current_packed()) for m in model.mglu_layers())
    return key + packed


class _Block:
    """The arrays one transformer block's decode step reads."""

    def __init__(self, block: Any) -> None:
        import cupy as cp

        attn = block.attn
        self.attn_norm = block.attn_norm.weight.data
        self.wqkv = cp.concatenate([attn.wq.weight.data, attn.wk.weight.data, attn.wv.weight.data], axis=0)
        self.wo = attn.wo.weight.data
        self.ffn_norm = block.ffn_norm.weight.data
        up = block.ffn.up
        self.activation = up.activation
        self.mglu = isinstance(up, MGLU)
        if self.mglu:
            from pymglu.cuda import flash_mglu

            self.flash_weights = up._flash_weights(flash_mglu.pack_weights, up._current_packed())
            self.w_gate_value = None
        else:
            self.flash_weights = None
            self.w_gate_value = cp.concatenate([up.W_gate.data, up.W_value.data], axis=0)
        self.w_down = block.ffn.down.weight.data


class GraphDecoder:
    """Captured one-token decode steps of ``model`` for ``batch`` sequences.

    Args:
        model: a :class:`pymglu.models.Transformer` on CuPy that :func:`unsupported_reason` accepts.
        batch: number of sequences decoded together (>= 1).
        fused: record the step as one fused launch (``True``; ``ValueError`` when
            :func:`pymglu.cuda.decode_fused.unsupported_reason` names a reason), as the multi-launch step
            (``False``), or the fused step where it is served (``None``).

    Attributes:
        cache: the decoder's own :class:`KVCache` (``batch`` sequences, ``max_seq_len`` positions).
        fused: whether the step is the fused launch (and ``fused_step`` its :class:`FusedDecodeStep`).
        stream: the non-blocking CuPy stream every call of the decoder runs on.

    Use: :meth:`prefill` a window of tokens (eager model call that fills the cache), then
    :meth:`greedy` or :meth:`sample` (several steps per call, tokens chosen on the device) or :meth:`step`
    (one step, logits returned for a host-side choice). Every method synchronises its stream before returning host
    data; between calls the cache length and the device position agree.

    Raises:
        ValueError: a model the decoder does not serve (the message says why).
    """

    def __init__(self, model: Any, batch: int, fused: bool | None = None) -> None:
        import cupy as cp

        from pymglu import _checks
        from pymglu.cuda import decode_fused, decode_step
        from pymglu.cuda.decode_step import DecodeKernels

        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"model: GraphDecoder cannot decode this model: {reason}")
        self.batch = B = _checks.check_positive_int("batch", batch)
        if fused is not None and not isinstance(fused, bool):
            raise TypeError(f"fused: expected None, True or False, got {fused!r}")
        fused_reason = decode_fused.unsupported_reason(model.config, B)
        if fused and fused_reason is not None:
            raise ValueError(f"fused=True: the fused decode step cannot serve this model: {fused_reason}")
        self.fused = fused_reason is None if fused is None else fused
        self.model = model
        c = self.config = model.config
        dt = c.np_dtype
        self._key = _parameter_key(model)
        self.kernels = None if self.fused else DecodeKernels(dt)
        self.stream = cp.cuda.Stream(non_blocking=True)
        cp.cuda.Device().synchronize()  # parameters written on other streams are complete
        with self.stream:
            self.blocks = [] if self.fused else [_Block(b) for b in model.layers]
            self.embed_table = model.embed.weight.data
            self.final_norm = model.norm.weight.data
            self.head = model.embed.weight.data if c.tie_embeddings else model.head.weight.data
            self.cache: KVCache = model.new_cache(B)
            H, Dh, d, h = c.n_heads, c.head_dim, c.d_model, c.d_ff
            self.ids = cp.zeros((B,), dtype=np.int32)
            self.state = cp.zeros((2,), dtype=np.int32)
            self.history = cp.zeros((B, c.max_seq_len), dtype=np.int32)
            self.x = cp.empty((B, d), dtype=dt)
            self.x_norm = cp.empty((B, d), dtype=dt)
            self.qkv = cp.empty((B, 3 * d), dtype=dt)
            self.q = cp.empty((B, H, Dh), dtype=dt)
            self.attn = cp.empty((B, d), dtype=dt)
            self.gate_value = cp.empty((B, 2 * h), dtype=dt)
            self.hidden = cp.empty((B, h), dtype=dt)
            self.logits = cp.empty((B, c.vocab_size), dtype=dt)
            # sampling mode: one uniform draw per row and step, 1 / temperature, top_k (valid from the start:
            # the warm-up run before a capture reads them)
            self.uniforms = cp.full((c.max_seq_len, B), 0.5, dtype=np.float32)
            self.inv_temperature = cp.ones((1,), dtype=np.float32)
            self.top_k = cp.full((1,), c.vocab_size, dtype=np.int32)
            self._sampler = None
            self.attention_workspace = decode_step.attention_workspace(B, H, Dh, c.max_seq_len)
            self.fused_step = decode_fused.FusedDecodeStep(self) if self.fused else None
        self._graphs: dict[str, Any] = {}  # mode -> captured step

    # ------------------------------------------------------------------ the step
    def _record_step(self, mode: str) -> None:
        """Launch one decode step on the current stream (what the graphs capture). ``mode``: ``"logits"``
        (the logits only), ``"greedy"`` (and the argmax as the next ids) or ``"sample"`` (and a sampled
        token as the next ids)."""
        from pymglu.cuda.flash_mglu import flash_mglu
        from pymglu.cuda.gemm import gemm

        if mode not in _MODES:
            raise ValueError(f"mode: expected one of {_MODES}, got {mode!r}")
        if self.fused_step is not None:
            self.fused_step.launch(mode == "greedy")
            if mode == "sample":
                self._sample(after_advance=True)
            return
        k, c = self.kernels, self.config
        k.embed(self.ids, self.embed_table, self.x)
        for i, blk in enumerate(self.blocks):
            k.rms_norm(self.x, blk.attn_norm, self.x_norm, c.norm_eps)
            gemm(self.x_norm, blk.wqkv, self.qkv, trans_b=True)
            k.rope_store(self.qkv, self.q, self.cache.keys[i], self.cache.values[i], self.state, c.rope_base)
            k.attention(self.q, self.cache.keys[i], self.cache.values[i], self.attn, self.state,
                        self.attention_workspace)
            gemm(self.attn, blk.wo, self.x, trans_b=True, accumulate=True)
            k.rms_norm(self.x, blk.ffn_norm, self.x_norm, c.norm_eps)
            if blk.mglu:
                flash_mglu(self.x_norm, blk.flash_weights, None, blk.activation, out=self.hidden)
            else:
                gemm(self.x_norm, blk.w_gate_value, self.gate_value, trans_b=True)
                k.glu(self.gate_value, self.hidden, blk.activation)
            gemm(self.hidden, blk.w_down, self.x, trans_b=True, accumulate=True)
        k.rms_norm(self.x, self.final_norm, self.x_norm, c.norm_eps)
        gemm(self.x_norm, self.head, self.logits, trans_b=True)
        if mode == "greedy":
            k.argmax(self.logits, self.ids, self.history, self.state)
        elif mode == "sample":
            self._sample(after_advance=False)
        k.advance(self.state)

    def _sample(self, after_advance: bool) -> None:
        from pymglu.cuda.decode_sample import Sampler

        if self._sampler is None:
            self._sampler = Sampler(self.config.np_dtype)
        self._sampler(self.logits, self.uniforms, self.inv_temperature, self.top_k, self.ids, self.history,
                      self.state, after_advance)

    def _graph(self, mode: str) -> Any:
        """The captured step (built on first use): one eager run on the decoder's stream first, so that
        kernels are compiled and cuBLAS has its workspace and stream, then the capture. Both write only
        the cache position ``state[0]`` (rewritten by the next real step before anything reads it) and
        the decoder's buffers; ``state`` and ``ids`` are restored afterwards."""
        graph = self._graphs.get(mode)
        if graph is not None:
            return graph
        from pymglu.cuda.capture import record_graph

        with self.stream:
            saved_state, saved_ids = self.state.copy(), self.ids.copy()
            self._record_step(mode)
            graph, _ = record_graph(self.stream, lambda: self._record_step(mode))
            self.state[...] = saved_state
            self.ids[...] = saved_ids
            self.stream.synchronize()
        self._graphs[mode] = graph
        return graph

    # ------------------------------------------------------------------ public calls
    def is_current(self) -> bool:
        """True while no parameter (and no MGLU mask) of the model changed since the decoder was built."""
        return _parameter_key(self.model) == self._key

    def prefill(self, tokens: Any) -> Any:
        """Reset the cache and run the ``(B, T)`` host ``tokens`` through the model (eagerly, ``T <=
        max_seq_len``), filling cache positions ``0 .. T - 1``.

        Returns:
            ``(B, vocab_size)`` host NumPy logits of the last position (model dtype).
        """
        import cupy as cp

        from pymglu.autograd.function import no_grad

        tokens = np.asarray(tokens)
        if tokens.ndim != 2 or tokens.shape[0] != self.batch:
            raise ValueError(f"tokens: expected ({self.batch}, T) token ids, got shape {tokens.shape}")
        with self.stream, no_grad():
            self.cache.reset()
            logits = self.model(cp.asarray(tokens), cache=self.cache, last_only=True).data[:, -1]
            self.state[...] = cp.asarray([self.cache.length, 0], dtype=np.int32)
            return logits.get(stream=self.stream)

    def _check_room(self, steps: int) -> None:
        if self.cache.length == 0:
            raise RuntimeError("GraphDecoder: prefill() the prompt before decoding steps")
        if self.cache.length + steps > self.cache.capacity:
            raise ValueError(
                f"steps: {steps} steps after {self.cache.length} cached positions exceed max_seq_len = "
                f"{self.cache.capacity}; prefill() the last window again"
            )

    def step(self, last_ids: Any) -> Any:
        """One decode step: the ``(B,)`` ``last_ids`` sit at position ``cache.length``.

        Returns:
            ``(B, vocab_size)`` host NumPy logits (model dtype).
        """
        self._check_room(1)
        graph = self._graph("logits")
        with self.stream:
            self.ids.set(np.asarray(last_ids, dtype=np.int32).reshape(self.batch), stream=self.stream)
            graph.launch(self.stream)
            logits = self.logits.get(stream=self.stream)
        self.cache.advance(1)
        return logits

    def greedy(self, last_ids: Any, steps: int) -> np.ndarray:
        """``steps`` greedy decode steps back to back, starting from the ``(B,)`` ``last_ids`` at position
        ``cache.length``; each step's argmax is the next step's input.

        Returns:
            ``(B, steps)`` int64 host array of the chosen tokens.
        """
        self._check_room(steps)
        return self._replay_steps("greedy", last_ids, steps)

    def sample(self, last_ids: Any, steps: int, temperature: float, top_k: int | None, draws: Any) -> np.ndarray:
        """``steps`` sampled decode steps back to back, starting from the ``(B,)`` ``last_ids`` at position
        ``cache.length``; each step's token (drawn on the device as
        :func:`pymglu.models.generation.choose_next` draws it on the host) is the next step's input.

        Args:
            temperature: the softmax temperature (finite, > 0).
            top_k: sample among the ``top_k`` largest logits of each row (ties kept), ``None`` for all.
            draws: ``(steps, B)`` uniform draws in ``[0, 1)``, one per step and row, used in float32
                (``rng.random((steps, B))`` draws what ``choose_next`` would draw over these steps).
        Returns:
            ``(B, steps)`` int64 host array of the chosen tokens.
        """
        self._check_room(steps)
        draws = np.asarray(draws)
        if draws.shape != (steps, self.batch) or draws.dtype.kind != "f":
            raise ValueError(f"draws: expected ({steps}, {self.batch}) floats, got shape {draws.shape}, "
                             f"dtype {draws.dtype}")
        if not (np.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature: expected a finite number > 0, got {temperature!r}")
        V = self.config.vocab_size
        k = V if top_k is None else min(int(top_k), V)
        if k < 1:
            raise ValueError(f"top_k: expected None or an integer >= 1, got {top_k!r}")
        with self.stream:
            self.uniforms[:steps].set(np.ascontiguousarray(draws, dtype=np.float32), stream=self.stream)
            self.inv_temperature.set(np.array([1.0 / temperature], dtype=np.float32), stream=self.stream)
            self.top_k.set(np.array([k], dtype=np.int32), stream=self.stream)
        return self._replay_steps("sample", last_ids, steps)

    def _replay_steps(self, mode: str, last_ids: Any, steps: int) -> np.ndarray:
        """``steps`` replays of the ``mode`` graph back to back from ``last_ids``, each step's token feeding
        the next; the ``(B, steps)`` int64 tokens from the history columns ``0 .. steps - 1``."""
        graph = self._graph(mode)
        with self.stream:
            self.ids.set(np.asarray(last_ids, dtype=np.int32).reshape(self.batch), stream=self.stream)
            self.state[1:] = 0
            for _ in range(steps):
                graph.launch(self.stream)
            chosen = self.history[:, :steps].get(stream=self.stream)
            self.stream.synchronize()
        self.cache.advance(steps)
        return chosen.astype(np.int64)


def decoder_for(model: Any, batch: int) -> GraphDecoder:
    """The model's cached :class:`GraphDecoder` for ``batch`` sequences, rebuilt when its parameters
    changed (one decoder per model is kept; a new batch size replaces it)."""
    cached = model.__dict__.get("_graph_decoder")
    if cached is not None and cached.batch == batch and cached.is_current():
        return cached
    model.__dict__["_graph_decoder"] = None  # free the old decoder's buffers before building the new one
    decoder = GraphDecoder(model, batch)
    model.__dict__["_graph_decoder"] = decoder
    return decoder
