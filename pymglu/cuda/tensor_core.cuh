// Tensor-core helpers shared by FlashMGLU (flash_mglu.cu) and the fused decode step (decode_fused.cu):
// the dense mma.m16n8k16 wrapper, and the sparse mma.m16n8k32 that applies bit-packed masks as metadata.
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

__device__ __forceinline__ uint4 load_stream(const uint4* p) { return __ldcs(p); }
__device__ __forceinline__ uint32_t load_stream(const uint32_t* p) { return __ldcs(reinterpret_cast<const unsigned int*>(p)); }

// ---------------------------------------------------------------------------------------------
// Masked products on the sparse tensor cores (the packed MGLU format of flash_mglu.py).
//
// mma.sp m16n8k32 reads A as a 16x32 matrix with two stored values per 4-wide chunk of a row; 2-bit
// indices in a metadata register say where in the chunk each stored value sits. A 16x16 tile of W is
// stored as that compressed A: chunk c of a row holds W[row, perm(c, 0)] and W[row, perm(c, 1)]
// (perm(c, e) = 8 (c & 1) + 4 e + (c >> 1), a fixed column order within the tile). B puts x at
// positions 1 and 3 of every chunk and zeros at 0 and 2, so an index picks x (element on) or zero
// (element off): the mask becomes the metadata, first index = bit, second = 2 + bit. One 32-bit mask
// word per lane carries 16 elements of two tiles; two logic operations make a tile's metadata.
// ---------------------------------------------------------------------------------------------

// D (fp32, 16x8) += A (16x32, 2:4 sparse, stored as a 16x16 fragment) * B (32x8); SEL: the sparsity
// selector (lanes with lane % 4 in {2 SEL, 2 SEL + 1} provide the metadata).
#define PYMGLU_MMA_SP_16832(TYPE)                                                                       \
  template <int SEL>                                                                                    \
  static __device__ __forceinline__ void run(float (&c)[4], const uint4& a, const uint4& b, uint32_t e) { \
    asm volatile("mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32." TYPE "." TYPE            \
                 ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, %13;\n"        \
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                       \
                 : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b.x), "r"(b.y), "r"(b.z), "r"(b.w),       \
                   "r"(e), "n"(SEL));                                                                   \
  }

template <typename T> struct SparseMma;
template <> struct SparseMma<__nv_bfloat16> { PYMGLU_MMA_SP_16832("bf16") };
template <> struct SparseMma<__half> { PYMGLU_MMA_SP_16832("f16") };
#undef PYMGLU_MMA_SP_16832

// Metadata with every element on (indices 1 and 3 of every chunk): the unmasked product t.
constexpr uint32_t ALL_ON_METADATA = 0xDDDDDDDDu;

// Metadata of tile q (0..3 within a group) from the lane's mask word: lanes with lane % 4 < 2 hold
// tiles 0 (even bits) and 1 (odd bits), the others tiles 2 and 3; nibble j of a metadata register is
// 0b1000 | bit(second) << 2 | bit(first), and word bit 4 j + (q & 1) + 2 e is element e's bit.
__device__ __forceinline__ uint32_t mask_metadata(uint32_t word, int q) {
  return (((q & 1) ? word >> 1 : word) & 0x55555555u) | 0x88888888u;
}

// The lane's B fragment from its four x values x[4 tg + j] of a tile (one 8-byte load, low element
// first): value j in the high half of register j (odd chunk positions, picked by a mask bit of 1),
// zeros in the low halves.
__device__ __forceinline__ uint4 sparse_b_fragment(uint2 v) {
  return make_uint4(v.x << 16, v.x & 0xFFFF0000u, v.y << 16, v.y & 0xFFFF0000u);
}

// __byte_perm selectors for sparse_b_fragment with a per-lane choice of half (byte 4 of the pair is 0):
// the even / odd value of a 32-bit word to the high half, or to the low half (even chunk positions,
// picked by a mask bit of 0: the product over the elements a mask leaves off).
constexpr uint32_t B_HIGH_EVEN = 0x1044u, B_HIGH_ODD = 0x3244u;
constexpr uint32_t B_LOW_EVEN = 0x4410u, B_LOW_ODD = 0x4432u;

__device__ __forceinline__ uint4 sparse_b_fragment(uint2 v, uint32_t sel_even, uint32_t sel_odd) {
  return make_uint4(__byte_perm(v.x, 0u, sel_even), __byte_perm(v.x, 0u, sel_odd),
                    __byte_perm(v.y, 0u, sel_even), __byte_perm(v.y, 0u, sel_odd));
}

// acc += (M ⊙ W_tile) x for tile q of a group, M given by the lane's mask word (all on: ALL_ON_METADATA
// through masked_mma_metadata).
template <typename T>
__device__ __forceinline__ void masked_mma_metadata(float (&acc)[4], const uint4& w, const uint4& b, uint32_t meta, int q) {
  if (q < 2) SparseMma<T>::template run<0>(acc, w, b, meta);
  else SparseMma<T>::template run<1>(acc, w, b, meta);
}

template <typename T>
__device__ __forceinline__ void masked_mma(float (&acc)[4], const uint4& w, const uint4& b, uint32_t word, int q) {
  masked_mma_metadata<T>(acc, w, b, mask_metadata(word, q), q);
}

}  // namespace pymglu
