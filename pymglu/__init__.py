"""pymglu: Masked Gated Linear Units (MGLU) on NumPy and CuPy, with FlashMGLU CUDA kernels.

Public API (re-exported here): the array-level reference :mod:`pymglu.functional`, masks and bit-planes
(:mod:`pymglu.masks`), the autograd tape (:mod:`pymglu.autograd`), layers (:mod:`pymglu.nn`), optimizers
(:mod:`pymglu.optim`), loss scaling for mixed precision (:mod:`pymglu.amp`), checkpoints
(:mod:`pymglu.io`) and the FlashMGLU decode kernel (:func:`flash_mglu`, from :mod:`pymglu.cuda.flash_mglu`;
importing it does not import CuPy).
"""
__version__ = "0.1.0"

from pymglu.backend import DeviceMismatchError, get_array_module, gpu_available
from pymglu.functional import glu, mglu
from pymglu.masks import mask_statistics, masks_from_logits, pack_masks, unpack_masks
from pymglu.autograd import Tensor, check_grads, no_grad
from pymglu import amp, io, nn, optim
from pymglu.io import load_checkpoint, save_checkpoint
from pymglu.interop import from_dlpack
from pymglu.cuda.flash_mglu import flash_mglu

__all__ = [
    "__version__",
    "DeviceMismatchError",
    "amp",
    "flash_mglu",
    "Tensor",
    "check_grads",
    "from_dlpack",
    "get_array_module",
    "glu",
    "gpu_available",
    "io",
    "load_checkpoint",
    "mask_statistics",
    "masks_from_logits",
    "mglu",
    "nn",
    "no_grad",
    "optim",
    "pack_masks",
    "save_checkpoint",
    "unpack_masks",
]
