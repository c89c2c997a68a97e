"""The one place where attention is computed.

Every attention layer of every backbone projects its own q/k/v and then calls `attention`; faster kernels
(xformers, Triton) are added here as further backends so that swapping them never touches model code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "math")
"""Known backends: ``sdpa`` (torch's fused kernels) and ``math`` (plain PyTorch, the reference for tests)."""


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: str = "sdpa") -> torch.Tensor:
    """Softmax attention without mask or dropout, scale 1/sqrt(head_dim).

    q: (batch, heads, seq_q, head_dim); k, v: (batch, heads, seq_kv, head_dim), same dtype and device.
    Returns (batch, heads, seq_q, head_dim) in q's dtype.
    """
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if backend == "math":
        return math_attention(q, k, v)
    raise ValueError(f"attention backend {backend!r} is not known; use one of {', '.join(BACKENDS)}")


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Reference implementation of `attention`; the softmax runs in float32 so half precision stays stable."""
    scale = q.shape[-1] ** -0.5
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    weights = scores.softmax(dim=-1).to(v.dtype)
    return torch.matmul(weights, v)


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(batch, seq, heads * head_dim) -> (batch, heads, seq, head_dim)."""
    batch, seq, width = x.shape
    return x.view(batch, seq, num_heads, width // num_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(batch, heads, seq, head_dim) -> (batch, seq, heads * head_dim)."""
    batch, heads, seq, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, seq, heads * head_dim)
