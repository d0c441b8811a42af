"""Call pymglu on JAX arrays through DLPack and check the result against a jax.numpy MGLU.

    pip install -e ".[interop]"       # jax + jaxlib (CPU); pymglu itself never needs JAX
    python examples/jax_interop.py

JAX arrays become pymglu arrays without copies (``pymglu.from_dlpack``: read-only NumPy views of JAX's
CPU buffers, CuPy arrays over its GPU buffers). On the CPU the MGLU runs through
``pymglu.functional.mglu``; when JAX's arrays are on a GPU and CuPy sees one, the decode call runs the
FlashMGLU kernel (``pymglu.cuda.flash_mglu``) on JAX's memory. The output goes back to JAX with
``jnp.from_dlpack(pymglu.interop.export(y))``: zero-copy on the GPU, and on the CPU whenever the buffer
is 64-byte aligned (JAX copies other CPU buffers). bfloat16 crosses both ways as well.
"""
from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave GPU memory to CuPy as well

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import pymglu  # noqa: E402
from pymglu import functional  # noqa: E402
from pymglu.interop import export  # noqa: E402

TOLERANCE = {jnp.float32: 5e-5, jnp.bfloat16: 1e-2}  # relative, vs the float32 reference


def jax_mglu(x: jax.Array, W: jax.Array, masks: jax.Array) -> jax.Array:
    """Reference in float32: ``sum_i silu(x (M_i*W)^T) * x ((1-M_i)*W)^T``; x (T, d), W (h, d), masks (n, h, d)."""
    x, W = x.astype(jnp.float32), W.astype(jnp.float32)
    gates = jnp.einsum("td,nhd->nth", x, W * masks)
    values = jnp.einsum("td,nhd->nth", x, W * ~masks)
    return (jax.nn.silu(gates) * values).sum(axis=0)


def pymglu_on_jax(x: jax.Array, W: jax.Array, logits: jax.Array) -> tuple[jax.Array, str]:
    """MGLU of JAX arrays computed by pymglu, returned as a JAX array, and which path ran."""
    xa, Wa, la = (pymglu.from_dlpack(v).data for v in (x, W, logits))  # zero-copy views
    planes = pymglu.pack_masks(la > 0)  # (n, h, ceil(d/32)) uint32 bit-planes
    if not isinstance(xa, np.ndarray) and pymglu.gpu_available():
        from pymglu.cuda import flash_mglu

        y, path = flash_mglu.flash_mglu(xa, flash_mglu.pack_weights(Wa, planes), activation="silu"), "FlashMGLU"
    else:
        y, path = functional.mglu(xa, Wa, planes, activation="silu"), "pymglu.functional.mglu"
    return jnp.from_dlpack(export(y)), path


def main() -> None:
    device = jax.devices()[0]
    print(f"JAX {jax.__version__} on {device.platform} ({device})")
    key = jax.random.PRNGKey(0)
    kx, kw, kl = jax.random.split(key, 3)
    T, d, h, n = 8, 256, 512, 4
    for dtype in (jnp.float32, jnp.bfloat16):
        x = jax.random.normal(kx, (T, d)).astype(dtype)
        W = (jax.random.normal(kw, (h, d)) / np.sqrt(d)).astype(dtype)
        logits = 0.01 * jax.random.normal(kl, (n, h, d))
        shared = pymglu.from_dlpack(x).data
        address = shared.__array_interface__["data"][0] if isinstance(shared, np.ndarray) else shared.data.ptr
        assert address == x.unsafe_buffer_pointer(), "from_dlpack copied the JAX buffer"
        y, path = pymglu_on_jax(x, W, logits)
        ref = jax_mglu(x, W, logits > 0)
        err = float(jnp.linalg.norm(y.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
        print(f"{jnp.dtype(dtype).name:>8}: {path} on JAX arrays (zero-copy in), y {y.shape} {y.dtype}, "
              f"relative error vs jax.numpy {err:.2e}")
        if not err < TOLERANCE[dtype]:
            raise SystemExit(f"{jnp.dtype(dtype).name}: relative error {err:.2e} above {TOLERANCE[dtype]:.0e}")


if __name__ == "__main__":
    main()
