"""A plain PyTorch MGLU (Algorithm 2 of Tajima et al., arXiv 2506.23225), the reference of the
pymglu.torch tests; torch ops only, no pymglu code."""
import torch

GATES = {
    "silu": torch.nn.functional.silu,
    "gelu": torch.nn.functional.gelu,
    "gelu_tanh": lambda s: torch.nn.functional.gelu(s, approximate="tanh"),
    "relu": torch.relu,
    "sigmoid": torch.sigmoid,
}


def reference_mglu(x, W, mask_logits, activation):
    """For each mask, gate = x (W*M)^T and value = x (W*(1-M))^T, summed over masks, with the
    straight-through estimator M = (logits > 0) + logits - logits.detach() (the value of the hard
    mask, the gradient of the logits). x (..., d), W (h, d), mask_logits (n, h, d) -> (..., h)."""
    logits = mask_logits.to(W.dtype)
    M = (logits > 0).to(W.dtype) + logits - logits.detach()
    y = 0
    for i in range(M.shape[0]):
        gate = x @ (W * M[i]).T
        value = x @ (W * (1 - M[i])).T
        y = y + GATES[activation](gate) * value
    return y
