"""FlashMGLU time against the number of 16-row strips (T = 1, bf16): a staircase with steps at multiples
of the resident-block capacity means the last partial wave costs a whole wave.

    python benchmarks/wave_probe.py [d]        # d defaults to 4096; prints strips, waves, µs, ns per strip
"""
import math
import sys
from pathlib import Path

import cupy as cp

from pymglu import dtypes, masks
from pymglu.cuda import flash_mglu as fm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import L2_BYTES, time_graph  # noqa: E402


def main():
    stream = cp.cuda.Stream(non_blocking=True)
    sms = cp.cuda.runtime.getDeviceProperties(0)["multiProcessorCount"]
    d = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
    print("| n | strips | waves (at the kernel's occupancy) | us | ns per strip |\n|---|---|---|---|---|")
    for n in (4, 8):
        warps, ahead = fm.mma_config(n, d)
        name = fm._mma_name(dtypes.bfloat16, n, fm.token_block(1), warps, ahead)
        regs = fm._cuda.load_module(fm._SOURCE, (name,)).get_function(name).attributes["num_regs"]
        regs = -(-regs // 8) * 8  # allocation granularity
        per_sm = min(65536 // (regs * 32 * warps), 32)  # resident blocks per SM (64K registers)
        for strips in range(264, 1849, 66):
            h = 16 * strips
            n_sets = max(2, math.ceil(3 * L2_BYTES / (2 * h * d)))
            sets = []
            for _ in range(n_sets):
                W = (cp.random.standard_normal((h, d), dtype=cp.float32) / 64).astype(dtypes.bfloat16)
                planes = masks.pack_masks(cp.random.random((n, h, d), dtype=cp.float32) < 0.5)
                sets.append(fm.pack_weights(W, planes))
            x = cp.random.standard_normal((1, d), dtype=cp.float32).astype(dtypes.bfloat16)
            out = cp.empty((1, h), dtype=dtypes.bfloat16)
            t = time_graph([lambda k=k: fm.flash_mglu(x, sets[k % n_sets], out=out) for k in range(30)], 15, stream)
            print(f"| {n} | {strips} | {strips / (per_sm * sms):.2f} ({per_sm}/SM) | {t * 1e6:.1f} | {t * 1e9 / strips:.1f} |",
                  flush=True)
            del sets
            cp.get_default_memory_pool().free_all_blocks()


if __name__ == "__main__":
    main()
