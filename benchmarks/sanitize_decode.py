"""A representative set of graph-decoder launches (pymglu.models.GraphDecoder) for compute-sanitizer.

Ragged widths (d_model 96 in 3 heads of 32, d_ff 136, vocab 97), every dtype, a GLU and an MGLU kind,
the multi-launch step and (16-bit dtypes) the fused step; the cache is filled over three attention chunks
(67 of its 72 positions). The steps run eagerly (``_record_step``) and as replayed graphs, greedy and
sampling (``GraphDecoder.sample``, with and without top-k).
``python benchmarks/sanitize_decode.py fused`` runs the fused-step cases only.
"""
import sys

import numpy as np

from pymglu.cuda import decode_fused
from pymglu.models import GraphDecoder, Transformer, TransformerConfig

# the fused step merges the attention chunks in the o product's staging up to 2 chunks (the greedy steps at
# positions 4 to 10) and in the attention phase after (the step at position 67): both paths run
decode_fused.STAGED_MERGE_CHUNKS = 2

CASES = (("bfloat16", False), ("float16", False), ("float32", False), ("bfloat16", True), ("float16", True))
for dtype, fused in [c for c in CASES if c[1] or sys.argv[1:] != ["fused"]]:
    for kind, n in (("swiglu", None), ("swimglu", 5)):  # 5 masks: a chunk of four and a leftover
        cfg = TransformerConfig(vocab_size=97, d_model=96, n_layers=2, n_heads=3, d_ff=136, ffn_kind=kind,
                                n_masks=n, max_seq_len=72, dtype=dtype)
        model = Transformer(cfg, rng=0).to("cuda").eval()
        decoder = GraphDecoder(model, 2, fused=fused)
        logits = decoder.prefill(np.arange(8).reshape(2, 4))
        with decoder.stream:
            decoder._record_step("greedy")  # an eager step: the sanitizer sees each launch on its own
        decoder.cache.advance(1)
        tokens = decoder.greedy(logits.argmax(-1), 6)
        draws = np.random.default_rng(0).random((4, 2))
        sampled = decoder.sample(tokens[:, -1], 4, 0.8, 13, draws)  # the device sampler, top-k by radix select
        decoder.sample(sampled[:, -1], 2, 1.5, None, draws[:2])  # every token kept
        decoder.prefill(np.arange(132).reshape(2, 66) % 97)  # 67 positions: three attention chunks
        step_logits = decoder.step([1, 2])
        decoder.stream.synchronize()
        assert tokens.shape == (2, 6) and sampled.shape == (2, 4) and np.all((sampled >= 0) & (sampled < 97))
        assert np.all(np.isfinite(step_logits.astype(np.float32)))
        assert decoder.cache.length == 67
print("sanitize_decode: all launches done")
