"""The VMC training loop: one clip and one prompt embedding in, tuned temporal Q/K/V out.

The loop knows nothing of DeepSpeed: an `OptimizerStep` (`vmc_fast.tuning.steps`) does backward, clipping and
the update, with a plain torch optimizer or a DeepSpeed engine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from vmc_fast.config import TrainConfig
from vmc_fast.runtime import autocast
from vmc_fast.tuning.losses import motion_distillation_loss
from vmc_fast.tuning.steps import OptimizerStep


@dataclass
class StepStats:
    """What one step reports to the progress display."""

    step: int
    """1-based step index."""
    num_steps: int
    """Steps in this run."""
    loss: float
    """The step's loss."""
    grad_norm: float
    """Global gradient norm before clipping."""
    seconds: float
    """Wall-clock since the loop started."""


@dataclass
class TuneResult:
    """A finished tuning run."""

    losses: list[float] = field(default_factory=list)
    """Loss of every step."""
    seconds: float = 0.0
    """Wall-clock of the loop."""

    @property
    def final_loss(self) -> float:
        """Mean of the last 10% of steps (a single step's loss is too noisy to report)."""
        tail = self.losses[-max(1, len(self.losses) // 10):]
        return sum(tail) / len(tail)


def tune(
    unet: nn.Module,
    alphas_cumprod: torch.Tensor,
    clip: torch.Tensor,
    text_states: torch.Tensor,
    cfg: TrainConfig,
    optimizer_step: OptimizerStep,
    on_step: Callable[[StepStats], None] | None = None,
) -> TuneResult:
    """Run `cfg.steps` VMC steps on one clip.

    clip: (1, C, F, H, W) model-space input (pixels in [-1, 1] or latents), on the UNet's device.
    text_states: (1, L, D) prompt embedding, on the UNet's device.
    alphas_cumprod: (T,) float the noise schedule's cumulative alphas.
    """
    device = clip.device
    generator = torch.Generator(device="cpu").manual_seed(cfg.seed)
    lo, hi = cfg.timestep_range or (0, len(alphas_cumprod))
    abar = alphas_cumprod.to(device=device, dtype=torch.float32)
    result, start = TuneResult(), time.perf_counter()
    unet.train()
    for step in range(1, cfg.steps + 1):
        t = torch.randint(lo, hi, (clip.shape[0],), generator=generator)
        noise = torch.randn(clip.shape, generator=generator).to(device)
        loss = vmc_loss(unet, clip, noise, t.to(device), abar, text_states, cfg)
        grad_norm = optimizer_step(loss)
        result.losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(StepStats(step, cfg.steps, result.losses[-1], grad_norm, time.perf_counter() - start))
    unet.eval()
    result.seconds = time.perf_counter() - start
    return result


def vmc_loss(unet: nn.Module, clip: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, abar: torch.Tensor,
             text_states: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """Noise the clip at timestep t (B,), predict the noise, and score it with the configured loss."""
    a = abar[t].reshape(-1, 1, 1, 1, 1)
    noisy = a.sqrt() * clip + (1 - a).sqrt() * noise
    with autocast(cfg.precision, device=clip.device):
        output = unet(noisy, t, text_states)
    eps_pred = output.sample if hasattr(output, "sample") else output
    weight = ((1 - a) / a).reshape(-1) if cfg.loss_weight == "snr" else None  # eq. 16's weight
    return motion_distillation_loss(eps_pred, noise, kind=cfg.loss, stride=cfg.loss_stride, weight=weight)
