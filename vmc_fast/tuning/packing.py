"""Packing: K videos share one frozen UNet and go through one forward and backward pass, each with its own
temporal Q/K/V.

Surgery (`install_packing`) replaces every tuned ``nn.Linear`` with a `PackedLinear` holding the K videos' weight
slices as one (K, out, in) parameter under the same name; its forward splits the batch by video (batch-major: the
temporal layers reshape (B, C, F, H, W) to (B*H*W, F, C), so rows [k*n, (k+1)*n) belong to video k) and applies
one batched matmul. The model code knows nothing of it.

Why packed equals one at a time: every layer of the UNet acts on each sample on its own (group norm, attention,
convolutions), so video k's loss depends only on its own slice, and the gradient of the pack's summed loss with
respect to slice k is exactly the gradient of video k's loss. AdamW is elementwise, so one optimizer over the
(K, out, in) tensors updates each slice as K separate optimizers would. Only gradient clipping looks across
elements: `clip_per_video` clips each video's slices by that video's own norm (torch's `clip_grad_norm_` formula).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from vmc_fast.errors import VmcError

MAX_PACK = 256
"""Largest --pack."""
BYTES_PER_TRAINED_PARAM = 16
"""fp32 weight + fp32 gradient + AdamW's two fp32 moments."""
MEMORY_HEADROOM = 0.85
"""--pack auto uses this share of free memory (allocator fragmentation, temporaries of the optimizer step)."""


def video_generator(seed: int, name: str, rank: int = 0) -> torch.Generator:
    """The CPU generator of one video's timesteps and noise: seeded by the run seed, the video's name and (under
    --strategy zero) the rank, so a video draws the same whichever pack or position it lands in."""
    digest = hashlib.sha256(f"{seed}\0{name}\0{rank}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") >> 1)


@dataclass
class PackState:
    """Shared by all PackedLinear modules of one UNet: how many videos the current pack holds (the last pack of a
    run may hold fewer than `num_slots`)."""

    num_slots: int
    """K: weight slices held by every packed layer."""
    num_active: int
    """Videos in the current pack (1..K): the batch holds this many samples, slices beyond it are idle."""


class PackedLinear(nn.Module):
    """A Linear with K weight slices: x (K'*N, ..., in) -> (K'*N, ..., out), rows of video k through slice k.

    weight: (K, out, in) trainable parameter (fp32 master, as surgery left the Linear's); bias (out,), frozen and
    shared, or None. K' = `state.num_active`.
    """

    def __init__(self, linear: nn.Linear, state: PackState):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().unsqueeze(0).repeat(state.num_slots, 1, 1).contiguous(),
                                   requires_grad=linear.weight.requires_grad)
        self.bias = linear.bias
        self.state = state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        num_videos = self.state.num_active
        assert x.shape[0] % num_videos == 0, f"batch {x.shape[0]} does not split into {num_videos} videos"
        weight = self.weight[:num_videos]
        per_video = x.reshape(num_videos, -1, self.in_features)
        out = torch.bmm(per_video, weight.transpose(1, 2))  # autocast casts bmm as it casts F.linear
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"videos={self.state.num_slots}, in_features={self.in_features}, out_features={self.out_features}"


def install_packing(unet: nn.Module, num_videos: int) -> PackState:
    """Replace every Linear whose weight is trainable with a PackedLinear of `num_videos` slices (names kept).

    Raises VmcError naming the tensor when a trainable tensor is not the weight of an nn.Linear.
    """
    state = PackState(num_slots=num_videos, num_active=num_videos)
    for name, param in list(unet.named_parameters()):
        if not param.requires_grad:
            continue
        path, _, leaf = name.rpartition(".")
        module = unet.get_submodule(path)
        if leaf != "weight" or type(module) is not nn.Linear:
            raise VmcError(f"--pack: the tuned tensor {name} is not the weight of a Linear layer, so it cannot be "
                           f"packed; use --pack 1 or a --trainable pattern of Linear weights")
        parent, _, child = path.rpartition(".")
        setattr(unet.get_submodule(parent) if parent else unet, child, PackedLinear(module, state))
    return state


def video_state(unet: nn.Module, index: int) -> dict[str, torch.Tensor]:
    """Video `index`'s tuned tensors under the base model's names: detached CPU copies of its slices."""
    return {name: p[index].detach().to("cpu", copy=True).contiguous()
            for name, p in unet.named_parameters() if p.requires_grad}


def clip_per_video(params: list[torch.Tensor], max_norm: float, num_videos: int) -> torch.Tensor:
    """Clip each video's gradient slices (index k of every (K, ...) gradient) by that video's own global norm, as
    `torch.nn.utils.clip_grad_norm_` would one video at a time: g_k *= min(1, max_norm / (||g_k|| + 1e-6)).

    Returns the (num_videos,) float32 norms before clipping (a video with a NaN or inf norm is left unscaled: the
    caller drops it). max_norm inf: no clipping.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(num_videos)
    squares = torch.stack([g[:num_videos].float().flatten(1).norm(dim=1) for g in grads]).square().sum(0)
    norms = squares.sqrt()
    if math.isinf(max_norm):
        return norms.cpu()
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    coef = torch.where(torch.isfinite(norms), coef, torch.ones_like(coef))
    for grad in grads:
        grad[:num_videos].mul_(coef.to(grad.dtype).view(-1, *([1] * (grad.dim() - 1))))
    return norms.cpu()


def drop_videos(params: list[torch.Tensor], videos: list[int]) -> None:
    """Zero the gradient slices of `videos` (failed ones: nothing of theirs is used any more)."""
    for p in params:
        if p.grad is not None:
            for k in videos:
                p.grad[k].zero_()


# --------------------------------------------------------------------------------------------- --pack auto


@dataclass(frozen=True)
class PackEstimate:
    """How many videos fit, and why."""

    num_videos: int
    """K chosen."""
    free_bytes: int
    """Free accelerator memory (CUDA) or available RAM (CPU) when measured."""
    adapter_bytes: int
    """Per video: trained parameters x 16 bytes (fp32 weight, gradient, two AdamW moments)."""
    activation_bytes: int
    """Per video: bytes of every layer's output in one forward of one sample (what backward keeps, roughly)."""

    def __str__(self) -> str:
        gib = 2 ** 30
        per = self.adapter_bytes + self.activation_bytes
        return (f"--pack auto: {self.free_bytes / gib:.2f} GiB free; per video {per / gib:.3f} GiB (adapter "
                f"{self.adapter_bytes / gib:.3f} GiB = trained params x {BYTES_PER_TRAINED_PARAM} B, activations "
                f"~{self.activation_bytes / gib:.3f} GiB); {MEMORY_HEADROOM:.0%} of free memory fits "
                f"{self.num_videos} video(s) per pack")


def free_memory_bytes(device: torch.device) -> int:
    """CUDA: torch.cuda.mem_get_info's free bytes; CPU: the kernel's MemAvailable (psutil)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)


@torch.no_grad()
def activation_bytes(unet: nn.Module, sample: torch.Tensor, timestep: torch.Tensor, states: torch.Tensor) -> int:
    """Bytes of all leaf modules' outputs in one forward of `sample` (1, C, F, H, W): an estimate of what autograd
    keeps for backward for one video."""
    total = 0

    def count(_module, _inputs, output) -> None:
        nonlocal total
        if torch.is_tensor(output):
            total += output.numel() * output.element_size()

    handles = [m.register_forward_hook(count) for m in unet.modules() if not list(m.children())]
    try:
        unet(sample, timestep, states)
    finally:
        for handle in handles:
            handle.remove()
    return total


def estimate_pack(num_trainable: int, activations: int, free_bytes: int, limit: int) -> PackEstimate:
    """K = how many (adapter + activations) fit in MEMORY_HEADROOM of `free_bytes`, between 1 and `limit`."""
    adapter = num_trainable * BYTES_PER_TRAINED_PARAM
    fits = int(free_bytes * MEMORY_HEADROOM // max(adapter + activations, 1))
    return PackEstimate(max(1, min(fits, limit, MAX_PACK)), free_bytes, adapter, activations)
