"""Probe for issue 4: the mask applied inside a tensor-core GEMM (probe_masked_gemm.cu) against cuBLAS.

The fused training step builds each masked weight ``M_i * W`` with ``apply_mask`` and hands it to cuBLAS
(pymglu.cuda.training). This probe times, on an sm_90 GPU, one masked product ``X (M * W)^T`` (bfloat16,
float32 accumulation, bfloat16 out) done four ways in the same run:

* ``cublas dense``: cuBLAS on ``W`` without a mask (the ceiling);
* ``apply_mask + cublas``: what the training path does now;
* ``rs dense`` / ``rs masked``: the hand-written kernel (TMA, warp-specialised, ``W`` as wgmma's register
  operand, the mask an AND on its fragments), without and with the mask, one block per tile;
* ``ps dense`` / ``ps masked``: the same kernel persistent, one block per SM taking every grid-th tile,
  so that the producer loads the next tile's stages while the consumers store the last one;
* ``ps ... tma store``: persistent, 3 stages instead of 4, and the tile stored by TMA without the
  consumers waiting for it; ``ps dense no store``: persistent, nothing stored (the main loop's time);
* ``ps ... direct store``: persistent, each thread stores its accumulators to C itself (no staging);
  ``ps ... chunk store``: persistent, the tile staged 32 rows at a time in two 8 KB buffers, TMA stores;
* ``pair ...``: persistent, in clusters of two blocks on neighbouring ``W`` tiles that share the ``X``
  tile, each loading half of it and multicasting it to both (a third less read from L2 per block);
* ``rs mask arithmetic only`` / ``rs mask loads only``: the two halves of the mask's cost.

Every variant's result is checked first: against a float64 NumPy product at small shapes (the persistent
variants also on a grid of 3 blocks, so that each block takes several tiles), against cuBLAS
with a float32 output at the timed ones (outputs poisoned with NaN before each check). Timing: three sets
of inputs rotated (together about three times the 50 MB L2 or more at the default shapes), 30 back-to-back
calls between CUDA events, median of ``--rounds`` rounds that interleave the variants.

Usage on an H100/H200: ``python benchmarks/probe_masked_gemm.py [--shapes 4096x14336x4096,...]
[--variants "ps masked,ps masked chunk store"]`` (T x H x K; results of stop 32 in
``benchmarks/results_masked_gemm_h200.md``). Needs CuPy, ``cuda.core`` (to compile for sm_90a) and the driver's ``cuTensorMapEncodeTiled``.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import tempfile

import numpy as np

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "probe_masked_gemm.cu")
#: label -> (kernel, persistent)
KERNELS = {"rs dense": ("rs_dense", False), "rs masked": ("rs_masked", False),
           "rs mask arithmetic only": ("rs_alu_only", False), "rs mask loads only": ("rs_loads_only", False),
           "ps dense": ("rs_dense", True), "ps masked": ("rs_masked", True),
           "ps dense tma store": ("rs_dense_tma_store", True), "ps masked tma store": ("rs_masked_tma_store", True),
           "ps dense no store": ("rs_dense_no_store", True),
           "ps dense direct store": ("rs_dense_direct_store", True),
           "ps masked direct store": ("rs_masked_direct_store", True),
           "ps dense chunk store": ("rs_dense_chunk_store", True), "ps masked chunk store": ("rs_masked_chunk_store", True),
           "pair dense": ("rs_dense_pair", True), "pair masked": ("rs_masked_pair", True),
           "pair dense no store": ("rs_dense_pair_no_store", True)}
#: dynamic shared memory: 4 stages of a 128 x 64 W tile and a 256 x 64 X tile, the mask words, the output
#: staging (64 rows of X by 128 + 8 columns), alignment
SMEM = 4 * (128 * 64 * 2 + 256 * 64 * 2) + 4 * 128 * 8 + 64 * 136 * 2 + 1024
#: the variants whose output is checked (all but the one that stores nothing)
CHECKED = [label for label in KERNELS if not label.endswith("no store")
           and label not in ("rs mask arithmetic only", "rs mask loads only")]


def compile_kernels(cp):
    from cuda import core
    import cuda.pathfinder

    from pymglu import cuda as pymglu_cuda

    include = cuda.pathfinder.find_nvidia_header_directory("cudart")
    options = core.ProgramOptions(arch="sm_90a", std="c++17", include_path=[include, str(pymglu_cuda.source_dir())])
    cubin = core.Program(open(SOURCE).read(), "c++", options=options).compile("cubin")
    path = os.path.join(tempfile.mkdtemp(), "probe_masked_gemm.cubin")
    with open(path, "wb") as f:
        f.write(bytes(cubin.code))
    module = cp.RawModule(path=path)
    kernels = {}
    for label, (name, persistent) in KERNELS.items():
        fn = module.get_function(name)
        fn.max_dynamic_shared_size_bytes = SMEM
        kernels[label] = (fn, persistent)
    return kernels


def tensor_map(array, box_rows: int) -> np.ndarray:
    """The 128-byte CUtensorMap of a row-major bfloat16 ``(rows, K)`` CuPy array: boxes of 64 x ``box_rows``,
    128-byte swizzle (cuTensorMapEncodeTiled through ctypes)."""
    rows, K = array.shape
    encode = ctypes.CDLL("libcuda.so.1").cuTensorMapEncodeTiled
    encode.restype = ctypes.c_int
    buf = np.zeros(256, dtype=np.uint8)
    off = (-buf.ctypes.data) % 64  # CUtensorMap is 64-byte aligned
    status = encode(ctypes.c_void_p(buf.ctypes.data + off), 9, 2, ctypes.c_void_p(array.data.ptr),
                    (ctypes.c_uint64 * 2)(K, rows), (ctypes.c_uint64 * 1)(K * 2),
                    (ctypes.c_uint32 * 2)(64, box_rows), (ctypes.c_uint32 * 2)(1, 1), 0, 3, 3, 0)
    if status != 0:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed with status {status}")
    return buf[off:off + 128].copy()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="4096x14336x4096,4096x8192x2048", help="T x H x K, comma separated")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--variants", default="", help="comma-separated labels of the kernel variants to check and "
                   "time (default: all); cuBLAS and apply_mask + cuBLAS always run")
    args = p.parse_args(argv)
    chosen = [v for v in args.variants.split(",") if v] or list(KERNELS)
    unknown = sorted(set(chosen) - set(KERNELS))
    if unknown:
        p.error(f"--variants: unknown {unknown}; known: {sorted(KERNELS)}")
    checked = [label for label in CHECKED if label in chosen]
    import cupy as cp

    from pymglu import masks as mask_ops
    from pymglu.cuda import training
    from pymglu.cuda.gemm import gemm
    from pymglu.dtypes import bfloat16

    kernels = compile_kernels(cp)
    rng = np.random.default_rng(0)

    def maps(X, W, C):
        return cp.asarray(np.concatenate([tensor_map(W, 128), tensor_map(X, 256), tensor_map(C, 256),
                                          tensor_map(X, 128), tensor_map(C, 32)]))

    sms = cp.cuda.Device().attributes["MultiProcessorCount"]

    def run(label, tmaps, bits, out, grid=None):
        T, H = out.shape
        K = bits.shape[1] * 32
        fn, persistent = kernels[label]
        tiles = (H // 128) * (T // 256)
        blocks = grid or (min(tiles, sms) if persistent else tiles)
        if label.startswith("pair"):
            blocks -= blocks % 2  # whole clusters
        fn((blocks,), (384,), (tmaps, bits, out, np.int32(T), np.int32(H), np.int32(K)), shared_mem=SMEM)

    def case(T, H, K):
        X = rng.standard_normal((T, K), dtype=np.float32).astype(bfloat16)
        W = (rng.standard_normal((H, K), dtype=np.float32) * K ** -0.5).astype(bfloat16)
        logits = rng.standard_normal((H, K), dtype=np.float32)
        return X, W, logits

    def rel(got, want):
        got = cp.asarray(got, dtype=cp.float64)
        want = cp.asarray(want, dtype=cp.float64)
        assert bool(cp.isfinite(got).all()), "non-finite output"
        return float(cp.linalg.norm(got - want) / cp.linalg.norm(want))

    # correctness at small and ragged-K shapes, against float64
    for T, H, K in [(256, 128, 64), (512, 384, 320), (1024, 512, 192), (512, 768, 320)]:
        X, W, logits = case(T, H, K)
        mask = logits > 0
        Xg, Wg = cp.asarray(X), cp.asarray(W)
        bits = mask_ops.pack_masks(cp.asarray(logits))
        W64 = W.astype(np.float64)
        for label in checked:
            Wref = W64 if "dense" in label else W64 * mask
            out = cp.full((T, H), np.nan, dtype=bfloat16)
            if label.startswith("pair") and H % 256:
                continue
            run(label, maps(Xg, Wg, out), bits, out, 3 if label.startswith("ps") else 4 if label.startswith("pair") else None)
            err = rel(out, X.astype(np.float64) @ Wref.T)
            assert err < 4e-3, (label, T, H, K, err)
            print(f"check {label} {T}x{H}x{K}: relative error {err:.2e} against float64")

    print("| T x H x K | variant | ms | TFLOP/s | x apply_mask + cublas |")
    print("|---|---|---:|---:|---:|")
    for shape in args.shapes.split(","):
        T, H, K = (int(v) for v in shape.split("x"))
        sets = []
        out = cp.empty((T, H), dtype=bfloat16)
        for _ in range(3):
            X, W, logits = case(T, H, K)
            Xg, Wg = cp.asarray(X), cp.asarray(W)
            sets.append((Xg, Wg, mask_ops.pack_masks(cp.asarray(logits)), maps(Xg, Wg, out)))
        masked = cp.empty((H, K), dtype=bfloat16)
        Xg, Wg, bits, tmaps = sets[0]
        for label in checked:  # against cuBLAS at this shape
            ref_w = Wg if "dense" in label else training.apply_mask(Wg, bits, masked)
            want = gemm(Xg, ref_w, cp.empty((T, H), dtype=np.float32), trans_b=True)
            out.fill(np.nan)
            run(label, tmaps, bits, out)
            err = rel(out, want)
            assert err < 4e-3, (label, shape, err)
        variants = {
            "cublas dense": lambda s: gemm(s[0], s[1], out, trans_b=True),
            "apply_mask + cublas": lambda s: gemm(s[0], training.apply_mask(s[1], s[2], masked), out, trans_b=True),
        }
        for label in chosen:
            variants[label] = lambda s, label=label: run(label, s[3], s[2], out)
        times = {k: [] for k in variants}
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        for _ in range(args.rounds):
            for label, fn in variants.items():
                for s in sets:
                    fn(s)
                start.record()
                for r in range(30):
                    fn(sets[r % 3])
                stop.record()
                stop.synchronize()
                times[label].append(cp.cuda.get_elapsed_time(start, stop) / 30)
        base = float(np.median(times["apply_mask + cublas"]))
        for label, ts in times.items():
            ms = float(np.median(ts))
            print(f"| {shape} | {label} | {ms:.3f} | {2.0 * T * H * K / ms / 1e9:.0f} | {ms / base:.3f} |")


if __name__ == "__main__":
    main()
