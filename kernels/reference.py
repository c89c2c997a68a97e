"""Plain PyTorch reference for the temporal attention kernel.

This is the ground truth that `temporal_attention.py` is tested against: the math runs in fp32 whatever the input
dtype, and the result is cast back to the input dtype, exactly like the Triton kernel.
"""

from __future__ import annotations

import math

import torch


def temporal_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """softmax(scale * Q K^T) V over the frame axis, no mask, math in fp32.

    Args:
        q, k, v: (N, H, F, D) tensors of one dtype (fp32, bf16 or fp16); N pixel positions (times batch),
            H heads, F frames, D head size.
        scale: logit scale; None means 1 / sqrt(D).

    Returns:
        (N, H, F, D) tensor in the dtype of `q`. Differentiable through plain autograd.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (N, H, F, F)
    probs = torch.softmax(logits, dim=-1)
    return torch.matmul(probs, v.float()).to(q.dtype)
