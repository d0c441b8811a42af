"""Mask logits -> binary masks -> bit-planes, and statistics of learned masks.

Layouts (DESIGN.md section 3):

* logits: ``(n, h, d)`` float32, one plane per mask; ``M_i = logits_i > 0`` marks gate elements.
* masks: ``(n, h, d)`` bool.
* bit-planes: ``(n, h, ceil(d / 32))`` uint32. Bit ``j`` of word ``k`` in row ``r`` of plane ``i`` is
  ``M_i[r, 32 k + j]``; padding bits past ``d`` are 0. Byte-for-byte this is
  ``np.packbits(M, axis=-1, bitorder="little")`` on ``d`` padded to a multiple of 32, viewed as ``<u4``.

NumPy arrays are packed here; CuPy arrays are packed on the device by the Numba CUDA kernel in
:mod:`pymglu.cuda.bitpack`, which produces identical bytes.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from pymglu import _checks
from pymglu.backend import get_array_module, is_cupy_array, unwrap

__all__ = [
    "words_per_row",
    "masks_from_logits",
    "pack_masks",
    "unpack_masks",
    "check_packed",
    "gate_fraction",
    "mask_overlap",
    "mask_statistics",
]


def words_per_row(d: int) -> int:
    """Number of uint32 words per bit-plane row for input width ``d``: ``ceil(d / 32)``."""
    return (int(d) + 31) // 32


def masks_from_logits(logits: Any) -> Any:
    """Boolean masks ``logits > 0`` (same shape, same array module)."""
    logits = unwrap(logits)
    _checks.check_min_ndim("logits", logits, 1)
    return logits > 0


def pack_masks(masks: Any) -> Any:
    """Pack boolean masks (or logits, thresholded at 0) of shape ``(..., d)`` into uint32 bit-planes.

    Args:
        masks: ``(n, h, d)`` bool masks, or float logits (packed as ``logits > 0``); NumPy or CuPy.
            Any number of leading dims is accepted.
    Returns:
        ``(..., ceil(d / 32))`` uint32 bit-planes on the same device.
    """
    masks = unwrap(masks)
    _checks.check_min_ndim("masks", masks, 1)
    if masks.dtype != np.bool_:
        if masks.dtype.kind != "f" and np.dtype(masks.dtype).name != "bfloat16":
            raise TypeError(f"masks: expected bool masks or float logits, got {_checks.describe(masks)}")
    if is_cupy_array(masks):
        from pymglu.cuda import bitpack

        return bitpack.pack_masks_device(masks)  # thresholds float logits (> 0) inside the kernel
    if masks.dtype != np.bool_:
        masks = masks > 0
    return _pack_numpy(masks)


def _pack_numpy(masks: np.ndarray) -> np.ndarray:
    d = masks.shape[-1]
    pad = (-d) % 32
    if pad:
        masks = np.concatenate([masks, np.zeros(masks.shape[:-1] + (pad,), dtype=bool)], axis=-1)
    packed = np.packbits(masks, axis=-1, bitorder="little")
    return np.ascontiguousarray(packed).view("<u4").astype(np.uint32, copy=False)


def unpack_masks(packed: Any, d: int) -> Any:
    """Inverse of :func:`pack_masks`: ``(..., ceil(d / 32))`` uint32 -> ``(..., d)`` bool."""
    packed = unwrap(packed)
    d = _checks.check_positive_int("d", d)
    _checks.check_dtype("packed", packed, (np.uint32,))
    _checks.check_min_ndim("packed", packed, 1)
    if packed.shape[-1] != words_per_row(d):
        raise ValueError(
            f"packed: expected last dim ceil(d/32) = {words_per_row(d)} for d = {d}, "
            f"got {_checks.describe(packed)}"
        )
    xp = get_array_module(packed)
    shifts = xp.arange(32, dtype=np.uint32)
    bits = (packed[..., :, None] >> shifts) & np.uint32(1)
    return bits.reshape(packed.shape[:-1] + (packed.shape[-1] * 32,))[..., :d].astype(bool)


def check_packed(packed: Any, n: int | None, h: int, d: int, name: str = "packed_masks") -> None:
    """Raise a clear error unless ``packed`` is ``(n, h, ceil(d/32))`` uint32 (``n=None``: any n >= 1)."""
    _checks.check_dtype(name, packed, (np.uint32,))
    _checks.check_shape(name, packed, (n, h, words_per_row(d)))
    if packed.shape[0] < 1:
        raise ValueError(f"{name}: expected at least one mask plane, got {_checks.describe(packed)}")


def gate_fraction(masks: Any) -> np.ndarray:
    """Fraction of elements assigned to the gate stream, per mask: ``(n,)`` float64 on the CPU.

    ``masks`` is ``(n, h, d)`` bool (logits are thresholded at 0).
    """
    masks = _as_bool(masks)
    xp = get_array_module(masks)
    frac = masks.reshape(masks.shape[0], -1).mean(axis=1, dtype=np.float64)
    return frac.get() if xp is not np else np.asarray(frac)


_OVERLAP_CHUNK = 1 << 20


def mask_overlap(masks: Any) -> dict[str, np.ndarray]:
    """Pairwise overlap of ``n`` masks, as ``(n, n)`` float64 matrices on the CPU.

    Returns:
        ``{"agreement": P[M_i == M_j], "jaccard": |M_i & M_j| / |M_i | M_j|}``; the Jaccard index of two
        empty masks is defined as 1.
    """
    masks = _as_bool(masks)
    xp = get_array_module(masks)
    flat = masks.reshape(masks.shape[0], -1)
    size = flat.shape[1]
    # Pairwise |M_i & M_j| by float32 products over column chunks (exact: a chunk's counts stay below
    # 2^24), summed in float64; memory stays at n x _OVERLAP_CHUNK floats whatever h * d is.
    both = xp.zeros((flat.shape[0], flat.shape[0]), dtype=np.float64)
    for start in range(0, size, _OVERLAP_CHUNK):
        part = flat[:, start:start + _OVERLAP_CHUNK].astype(np.float32)
        both += part @ part.T
    counts = xp.diagonal(both).copy()
    union = counts[:, None] + counts[None, :] - both
    neither = size - union
    agreement = (both + neither) / size
    jaccard = xp.where(union > 0, both / xp.maximum(union, 1), 1.0)
    to_host = (lambda a: a.get()) if xp is not np else np.asarray
    return {"agreement": to_host(agreement).astype(np.float64), "jaccard": to_host(jaccard).astype(np.float64)}


def mask_statistics(masks: Any) -> dict[str, Any]:
    """Gate fraction per mask, its mean, and the pairwise overlap matrices of :func:`mask_overlap`."""
    frac = gate_fraction(masks)
    stats: dict[str, Any] = {"gate_fraction": frac, "mean_gate_fraction": float(frac.mean())}
    stats.update(mask_overlap(masks))
    return stats


def _as_bool(masks: Any) -> Any:
    masks = unwrap(masks)
    _checks.check_ndim("masks", masks, 3)
    return masks if masks.dtype == np.bool_ else masks > 0
