"""Probe for issue 4: how fast Hopper's 2:4-sparse wgmma runs when fed as docs/training.md's "2:4-sparse
route" would feed it, against the dense wgmma of the masked-GEMM kernel (probe_sparse_wgmma.cu).

The route would take the mask out of the masked products' main loop: ``W``'s tile as the compressed A
operand, the mask bits as its metadata, and a B of twice the K (each token's ``x`` with a zero after every
value). The sparse instruction does twice the K in the dense instruction's time, so the useful rate can
match the dense one, but every useful product needs twice the B bytes, in shared memory and through the
loads. Each variant runs a block per SM over ``--stages`` stages of one 128-row tile (64 real K per stage,
four wgmma per stage), timing only:

* ``*_smem``: the operands stay in shared memory (no loads): the instruction's own rate;
* ``*_loads``: each stage's A and B bytes (and the sparse form's metadata) come in by bulk copy from L2
  into a ring of stages, as in the real kernel (4 stages for the dense form and for the sparse form at N = 128, 2 for the sparse form at
  N = 256: its 80 KB stages leave room for no more).

Useful TFLOP/s count ``2 * 128 * N * 64`` per stage and block for both forms. A cuBLAS bf16 product of
the training shape (4096 x 14336 x 4096, pymglu.cuda.gemm) runs in the same rounds for scale.

Usage on an H100/H200: ``python benchmarks/probe_sparse_wgmma.py [--stages 4000] [--rounds 5]``;
``--compile-only`` compiles the probe (NVRTC, sm_90a) without a GPU.

Stop 37's answer on the H200 (benchmarks/results_stop37_probes_h200.md): the sparse form reached 0.756 of
the dense rate with its operands in shared memory, 0.562 with its stages loaded (N = 256) and 0.767 at
N = 128, so the route cannot bring the masked products to the dense rate and was not built.
"""
from __future__ import annotations

import argparse
import os
import statistics

import numpy as np

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "probe_sparse_wgmma.cu")
#: kernel -> (sparse, N, stages in the ring)
VARIANTS = {
    "dense_n256_smem": (False, 256, 4), "sparse_n256_smem": (True, 256, 2),
    "dense_n256_loads": (False, 256, 4), "sparse_n256_loads": (True, 256, 2),
    "dense_n128_loads": (False, 128, 4), "sparse_n128_loads": (True, 128, 4),
}
#: 2:4 metadata of every group: values at positions 0 and 2 (a valid pair of ordered indices)
META_BYTE = 0x88


def stage_bytes(sparse: bool, n: int) -> tuple[int, int, int]:
    """Bytes of A (128 x 64 values), B (N tokens by 64 values, twice that for the sparse form) and the
    sparse form's metadata (2 bits per value of A) in one stage."""
    return 128 * 64 * 2, n * 64 * 2 * (2 if sparse else 1), (128 * 64 // 4 if sparse else 0)


def smem_bytes(sparse: bool, n: int, ring: int) -> int:
    return ring * sum(stage_bytes(sparse, n)) + 1024


def source(cp, rng, sparse: bool, n: int):
    """Eight stages' bytes for the bulk copies: small bf16 values, valid metadata."""
    from pymglu.dtypes import bfloat16

    a, b, e = stage_bytes(sparse, n)
    stage = a + b + e
    values = (rng.standard_normal(8 * stage // 2, dtype=np.float32) * 0.01).astype(bfloat16).view(np.uint8)
    values = values.reshape(8, stage)
    values[:, a + b:] = META_BYTE
    return cp.asarray(values.ravel())


def compile_cubin() -> bytes:
    from cuda import core
    import cuda.pathfinder

    from pymglu import cuda as pymglu_cuda

    include = cuda.pathfinder.find_nvidia_header_directory("cudart")
    options = core.ProgramOptions(arch="sm_90a", std="c++17", include_path=[include, str(pymglu_cuda.source_dir())])
    return bytes(core.Program(open(SOURCE).read(), "c++", options=options).compile("cubin").code)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=5, help="launches between a pair of events")
    parser.add_argument("--compile-only", action="store_true")
    args = parser.parse_args(argv)
    cubin = compile_cubin()
    if args.compile_only:
        print(f"compiled {len(cubin)} bytes of sm_90a code")
        return 0

    import tempfile

    import cupy as cp

    from pymglu.cuda.gemm import gemm
    from pymglu.dtypes import bfloat16

    path = os.path.join(tempfile.mkdtemp(), "probe_sparse_wgmma.cubin")
    with open(path, "wb") as f:
        f.write(cubin)
    module = cp.RawModule(path=path)
    sms = cp.cuda.Device().attributes["MultiProcessorCount"]
    rng = np.random.default_rng(0)
    out = cp.zeros(sms, dtype=cp.float32)
    launches = {}
    for name, (sparse, n, ring) in VARIANTS.items():
        fn = module.get_function(name)
        fn.max_dynamic_shared_size_bytes = smem_bytes(sparse, n, ring)
        args_ = (source(cp, rng, sparse, n), out, np.int32(args.stages))
        launches[name] = (lambda fn=fn, nbytes=smem_bytes(sparse, n, ring), a=args_:
                          fn((sms,), (384,), a, shared_mem=nbytes))
    x = cp.asarray(rng.standard_normal((4096, 4096), dtype=np.float32).astype(bfloat16))
    W = cp.asarray(rng.standard_normal((14336, 4096), dtype=np.float32).astype(bfloat16))
    y = cp.empty((4096, 14336), dtype=bfloat16)
    launches["cublas 4096x14336x4096"] = lambda: gemm(x, W, y, trans_b=True)

    def flops(name: str) -> float:
        if name.startswith("cublas"):
            return 2.0 * 4096 * 14336 * 4096
        return 2.0 * 128 * VARIANTS[name][1] * 64 * args.stages * sms

    for fn in launches.values():
        fn()
    cp.cuda.Device().synchronize()
    times = {name: [] for name in launches}
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    for _ in range(args.rounds):
        for name, fn in launches.items():
            start.record()
            for _ in range(args.reps):
                fn()
            stop.record()
            stop.synchronize()
            times[name].append(cp.cuda.get_elapsed_time(start, stop) / args.reps)
    print(f"H200 probe, {sms} blocks x {args.stages} stages, median of {args.rounds} rounds of {args.reps} launches")
    print("| variant | ms per launch | useful TFLOP/s | x dense of the same N and feed |")
    print("|---|---:|---:|---:|")
    rates = {name: flops(name) / (statistics.median(t) * 1e-3) / 1e12 for name, t in times.items()}
    for name, t in times.items():
        dense = name.replace("sparse", "dense")
        ratio = f"{rates[name] / rates[dense]:.3f}" if name.startswith("sparse") and dense in rates else ""
        print(f"| {name} | {statistics.median(t):.3f} | {rates[name]:.0f} | {ratio} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
