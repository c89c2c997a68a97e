"""The one place where attention is computed, and the switch that picks its kernel for the temporal layers.

Every attention layer of every backbone projects its own q/k/v and then calls `attention`; faster kernels are
backends here, so swapping them never touches model code:

- ``sdpa`` (default): torch's fused `scaled_dot_product_attention`.
- ``xformers``: `xformers.ops.memory_efficient_attention` (CUDA only, optional dependency).
- ``triton``: our temporal kernel `vmc_fast.kernels.temporal_attention` (few frames, huge batch of pixels).
- ``math``: plain PyTorch, the reference for tests.

`set_temporal_attention_backend` points the temporal attention of a Show-1, diffusers UNet3D or AnimateDiff UNet at
one of them.
"""

from __future__ import annotations

import re
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from vmc_fast.errors import VmcError

BACKENDS = ("sdpa", "math", "xformers", "triton")
"""Backends `attention` knows; ``math`` is the test reference and not offered by ``--attention``."""

TEMPORAL_BACKENDS = ("sdpa", "xformers", "triton")
"""Choices of ``--attention`` (the kernel of the temporal attention layers)."""

MAX_FUSED_BATCH = 65_535
"""Most batch * heads one fused-kernel call (SDPA, xformers) may see; larger batches are chunked.

Their CUDA kernels put the batch (and heads) on grid axes limited to 65,535 blocks and fail with "invalid
configuration argument" from 65,536 on (pytorch#142228, xformers#845). Temporal attention hits it easily: the
batch is every pixel of every video. Tests lower it to exercise the chunked path cheaply."""

_TEMPORAL_NAME = re.compile(r"(^|\.)(temp_attentions|motion_modules)\.")  # UNet3D, AnimateDiff
_xformers_ops = None  # xformers.ops once imported successfully


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: str = "sdpa",
              scale: float | None = None) -> torch.Tensor:
    """Softmax attention without mask or dropout.

    q: (batch, heads, seq_q, head_dim); k, v: (batch, heads, seq_kv, head_dim), same dtype and device, any
    strides. scale: logit scale, None means 1/sqrt(head_dim). Returns (batch, heads, seq_q, head_dim) in q's dtype.
    The ``triton`` backend needs seq_q == seq_kv <= 32 and head_dim <= 128 (temporal attention).
    """
    if backend == "sdpa":
        return _in_batch_chunks(_sdpa, q, k, v, scale)
    if backend == "xformers":
        return _in_batch_chunks(_xformers, q, k, v, scale)
    if backend == "triton":
        return _triton_kernels().temporal_attention(q, k, v, scale)
    if backend == "math":
        return math_attention(q, k, v, scale)
    raise ValueError(f"attention backend {backend!r} is not known; use one of {', '.join(BACKENDS)}")


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Reference implementation of `attention`; the softmax runs in float32 so half precision stays stable."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    weights = scores.softmax(dim=-1).to(v.dtype)
    return torch.matmul(weights, v)


def _in_batch_chunks(fn, q, k, v, scale):
    """fn(q, k, v, scale) on slices of the batch so that no call sees more than MAX_FUSED_BATCH batch * heads.

    Every (batch, head) pair is independent, so the result equals one unchunked call exactly.
    """
    num_batch, num_heads = q.shape[:2]
    step = max(1, MAX_FUSED_BATCH // num_heads)
    if num_batch <= step:
        return fn(q, k, v, scale)
    return torch.cat([fn(q[i:i + step], k[i:i + step], v[i:i + step], scale)
                      for i in range(0, num_batch, step)])


def _sdpa(q, k, v, scale):
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def _xformers(q, k, v, scale):
    """xformers wants (batch, seq, heads, head_dim); our heads-split tensors are transposed views of exactly that."""
    if q.device.type != "cuda":
        raise VmcError(f"--attention xformers runs on CUDA only, but the tensors are on {q.device}; "
                       f"use --attention sdpa")
    out = _import_xformers().memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)


def _import_xformers():
    """xformers.ops, or VmcError naming the fix (it is an optional, CUDA-only dependency)."""
    global _xformers_ops
    if _xformers_ops is None:
        try:
            import xformers.ops
        except ImportError as exc:
            raise VmcError("--attention xformers needs xformers, which is not installed (`pip install xformers`; "
                           "it runs on CUDA only); use --attention sdpa") from exc
        _xformers_ops = xformers.ops
    return _xformers_ops


def _triton_kernels():
    """vmc_fast.kernels, imported on first use so that importing the models never imports triton."""
    from vmc_fast import kernels

    return kernels


# ------------------------------------------------------------------------------------------- backend switch


class SelectableBackend:
    """Mixin for our own attention modules whose kernel `set_temporal_attention_backend` may switch."""

    backend: str = "sdpa"


def set_temporal_attention_backend(unet: nn.Module, backend: str) -> int:
    """Route every temporal attention layer of `unet` through `attention(backend=...)`; returns how many.

    Show-1 `TemporalSelfAttention` modules get their ``backend`` attribute set; the diffusers `Attention` modules
    under ``temp_attentions.*`` of a `UNet3DConditionModel` and ``motion_modules.*`` of a `UNetMotionModel` get a
    `TemporalAttnProcessor` (spatial attention and ``transformer_in`` keep their processors). Nothing is rebuilt: parameter names and the module tree stay.
    ValueError for an unknown backend, VmcError when the backend cannot run here (missing package, no CUDA).
    """
    check_backend(backend, unet)
    num_switched = 0
    for name, module in unet.named_modules():
        if isinstance(module, SelectableBackend):
            module.backend = backend
            num_switched += 1
        elif _TEMPORAL_NAME.search(name) and _is_diffusers_attention(module):
            _check_processor_fits(name, module)
            module.set_processor(TemporalAttnProcessor(backend))
            num_switched += 1
    if num_switched == 0:
        warnings.warn(f"--attention {backend}: {type(unet).__name__} has no temporal attention layer "
                      f"(temp_attentions.*, motion_modules.*); the option is ignored", stacklevel=2)
    return num_switched


def check_backend(backend: str, unet: nn.Module | None = None) -> None:
    """ValueError naming ``--attention`` for an unknown backend; VmcError when it cannot run (here / on unet)."""
    if backend not in TEMPORAL_BACKENDS and backend != "math":
        raise ValueError(f"--attention {backend!r} is not known; use one of {', '.join(TEMPORAL_BACKENDS)}")
    param = next(unet.parameters(), None) if unet is not None else None
    if backend == "xformers":
        _import_xformers()
        if param is not None and param.device.type != "cuda":
            raise VmcError(f"--attention xformers runs on CUDA only, but the UNet is on {param.device}; "
                           f"use --attention sdpa")
    if backend == "triton" and not _triton_kernels().TRITON_AVAILABLE:
        raise VmcError("--attention triton needs triton, which is not installed (`pip install triton`); "
                       "use --attention sdpa")


def _is_diffusers_attention(module: nn.Module) -> bool:
    return type(module).__module__.startswith("diffusers.") and hasattr(module, "set_processor") \
        and hasattr(module, "to_q")


def _check_processor_fits(name: str, attn: nn.Module) -> None:
    """TemporalAttnProcessor covers the plain (B, L, C) token path; refuse modules that need more."""
    unsupported = [feature for feature in ("spatial_norm", "group_norm", "norm_q", "norm_k")
                   if getattr(attn, feature, None) is not None]
    if unsupported:
        raise VmcError(f"{name}: this attention layer uses {', '.join(unsupported)}, "
                       f"which the temporal attention backends do not support; use --attention sdpa")


class TemporalAttnProcessor:
    """diffusers attention processor that computes attention with `attention(backend=...)`.

    Same math as diffusers' default `AttnProcessor2_0` for layers without spatial/group norm: q/k/v from
    attn.to_q/to_k/to_v on (B, L, C) tokens, heads split as (B, L, heads, C/heads) -> (B, heads, L, C/heads).
    """

    def __init__(self, backend: str = "sdpa"):
        self.backend = backend

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """hidden_states (B, L, C) -> (B, L, C)."""
        context = hidden_states
        if encoder_hidden_states is not None:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross \
                else encoder_hidden_states
        q = split_heads(attn.to_q(hidden_states), attn.heads)
        k = split_heads(attn.to_k(context), attn.heads)
        v = split_heads(attn.to_v(context), attn.heads)
        if attention_mask is None:
            out = attention(q, k, v, backend=self.backend, scale=attn.scale)
        else:  # no fused temporal kernel takes a mask; temporal layers never pass one
            mask = attn.prepare_attention_mask(attention_mask, k.shape[2], q.shape[0])
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.view(q.shape[0], attn.heads, -1,
                                                                                 mask.shape[-1]), scale=attn.scale)
        out = attn.to_out[1](attn.to_out[0](merge_heads(out).to(q.dtype)))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


# ------------------------------------------------------------------------------------------------- layouts


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(batch, seq, heads * head_dim) -> (batch, heads, seq, head_dim)."""
    batch, seq, width = x.shape
    return x.view(batch, seq, num_heads, width // num_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(batch, heads, seq, head_dim) -> (batch, seq, heads * head_dim)."""
    batch, heads, seq, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, seq, heads * head_dim)
