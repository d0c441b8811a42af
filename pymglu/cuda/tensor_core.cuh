// Tensor-core helpers shared by FlashMGLU (flash_mglu.cu) and the fused decode step (decode_fused.cu):
// the mma.m16n8k16 wrapper and the mask-bit expansion of the packed inference format (flash_mglu.py).
#pragma once

#include "common.cuh"

namespace pymglu {

// D (fp32, 16x8) += A (16x16, row) * B (16x8, col) on the tensor cores; TYPE is the PTX operand type.
#define PYMGLU_MMA_16816(TYPE)                                                                          \
  static __device__ __forceinline__ void run(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,       \
                                             uint32_t a3, uint32_t b0, uint32_t b1) {                   \
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." TYPE "." TYPE                                 \
                 ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"                          \
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                       \
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));                               \
  }

template <typename T> struct Mma;
template <> struct Mma<__nv_bfloat16> { PYMGLU_MMA_16816("bf16") };
template <> struct Mma<__half> { PYMGLU_MMA_16816("f16") };
#undef PYMGLU_MMA_16816

// Two 0x0000/0xFFFF halfwords from the MSBs of bytes 0 and 1 (sel 0x9988) or 2 and 3 (sel 0xBBAA).
__device__ __forceinline__ uint32_t halfword_mask(uint32_t word, uint32_t selector) {
  uint32_t r;
  asm("prmt.b32 %0, %1, 0, %2;" : "=r"(r) : "r"(word), "r"(selector));
  return r;
}

__device__ __forceinline__ uint4 load_stream(const uint4* p) { return __ldcs(p); }
__device__ __forceinline__ uint32_t load_stream(const uint32_t* p) { return __ldcs(reinterpret_cast<const unsigned int*>(p)); }

// Mask i of one 16x16 tile (register q of a group) applied to the lane's A fragment `w`: the lane's mask
// word `m` holds the bits of its 8 elements of all 4 tiles (flash_mglu.py, "mask_words").
__device__ __forceinline__ uint4 masked_fragment(const uint4& w, uint32_t m, int q) {
  const uint32_t s0 = m << (2 * q);
  const uint32_t s1 = s0 << 1;
  return make_uint4(w.x & halfword_mask(s0, 0x9988u), w.y & halfword_mask(s0, 0xBBAAu),
                    w.z & halfword_mask(s1, 0x9988u), w.w & halfword_mask(s1, 0xBBAAu));
}

}  // namespace pymglu
