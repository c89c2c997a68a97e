"""Model surgery: freeze the whole UNet, then unfreeze exactly the temporal attention Q/K/V projections.

Frozen weights stay in their storage/compute dtype (bf16 on GPU); trainable ones are upcast to fp32 master
precision so AdamW's small updates are not lost to rounding.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from vmc_fast.config import DEFAULT_TRAINABLE_PATTERN
from vmc_fast.errors import VmcError
from vmc_fast.tuning.lora import LoraSettings, adapter_key, base_name, init_lora, inject_lora, lora_targets


@dataclass(frozen=True)
class SurgeryReport:
    """What surgery unfroze."""

    num_tensors: int
    """Trainable tensors."""
    num_trainable: int
    """Trainable parameters."""
    num_total: int
    """All parameters of the UNet (LoRA factors included)."""
    lora_rank: int = 0
    """LoRA rank of the trainable factors; 0: the selected tensors themselves are tuned."""

    def __str__(self) -> str:
        share = 100.0 * self.num_trainable / max(self.num_total, 1)
        what = f"LoRA rank {self.lora_rank}: " if self.lora_rank else ""
        return (f"{what}{self.num_tensors} trainable tensors, {self.num_trainable:,} of {self.num_total:,} parameters "
                f"({share:.2f}%)")


def default_pattern(unet: nn.Module) -> str:
    """The temporal attention Q/K/V pattern of `unet`'s family, read from its parameter names: Show-1's and
    UNet3D's ``temp_attentions.*``, else AnimateDiff's ``motion_modules.*`` (a loaded backbone says its own:
    `Backbone.trainable_pattern`)."""
    from vmc_fast.models.animatediff import MOTION_QKV_PATTERN

    names = [name for name, _ in unet.named_parameters()]
    for pattern in (DEFAULT_TRAINABLE_PATTERN, MOTION_QKV_PATTERN):
        if any(re.search(pattern, name) for name in names):
            return pattern
    return DEFAULT_TRAINABLE_PATTERN


def temporal_qkv_parameters(unet: nn.Module, pattern: str | None = None) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) pairs whose name matches `pattern` (default: `default_pattern`, the temporal attention
    to_q/to_k/to_v of the UNet's family)."""
    regex = re.compile(pattern or default_pattern(unet))
    return [(name, param) for name, param in unet.named_parameters() if regex.search(name)]


def prepare_for_motion_tuning(unet: nn.Module, pattern: str | None = None,
                              master_dtype: torch.dtype = torch.float32) -> SurgeryReport:
    """Freeze everything, unfreeze the parameters whose names match `pattern` (default: `default_pattern`; a
    backbone's own is `Backbone.trainable_pattern`) in `master_dtype`; VmcError naming --trainable if nothing
    matches."""
    pattern = pattern or default_pattern(unet)
    unet.requires_grad_(False)
    trainable = temporal_qkv_parameters(unet, pattern)
    if not trainable:
        example = next((name for name, _ in unet.named_parameters() if ".to_q." in name), None)
        hint = f" (its attention layers are named like {example})" if example else ""
        raise VmcError(f"--trainable {pattern!r}: no parameter name matches it in this {type(unet).__name__}{hint}; "
                       f"leave --trainable unset to tune the model's own temporal attention Q/K/V")
    for _, param in trainable:
        param.data = param.data.to(master_dtype)
        param.requires_grad_(True)
    return SurgeryReport(
        num_tensors=len(trainable),
        num_trainable=sum(p.numel() for _, p in trainable),
        num_total=sum(p.numel() for p in unet.parameters()),
    )


def prepare_for_lora_tuning(unet: nn.Module, settings: LoraSettings, pattern: str | None = None, seed: int = 0,
                            master_dtype: torch.dtype = torch.float32) -> SurgeryReport:
    """Freeze everything, wrap the linear layers whose weights `pattern` selects (default: `default_pattern`) in
    PEFT LoRA layers of `settings` (`vmc_fast.tuning.lora.inject_lora`, initialised from `seed`) and make only
    their factors trainable, in `master_dtype`. VmcError naming --trainable if nothing matches, naming --lora-rank
    if a selected tensor is not a linear weight."""
    pattern = pattern or default_pattern(unet)
    unet.requires_grad_(False)
    selected = [name for name, _ in temporal_qkv_parameters(unet, pattern)]
    if not selected:
        prepare_for_motion_tuning(unet, pattern)  # raises the --trainable error
    inject_lora(unet, lora_targets(unet, selected), settings, seed)
    unet.requires_grad_(False)
    trainable = [(name, p) for name, p in unet.named_parameters() if base_name(name) is None]
    for _, param in trainable:
        param.data = param.data.to(master_dtype)
        param.requires_grad_(True)
    init_lora(unet, seed)  # again in master_dtype: PEFT made the factors in the base's dtype (bf16 rounds A)
    return SurgeryReport(
        num_tensors=len(trainable),
        num_trainable=sum(p.numel() for _, p in trainable),
        num_total=sum(p.numel() for p in unet.parameters()),
        lora_rank=settings.rank,
    )


def trainable_state(unet: nn.Module) -> dict[str, torch.Tensor]:
    """The tuned tensors, detached copies on the CPU, under the names adapter files use: the base model's own for
    full tuning, ``<module>.lora_A.weight`` / ``<module>.lora_B.weight`` for LoRA (`vmc_fast.tuning.lora`)."""
    return {adapter_key(name): p.detach().to("cpu", copy=True).contiguous()
            for name, p in unet.named_parameters() if p.requires_grad}
