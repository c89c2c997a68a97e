"""The VMC training loop: one clip and one prompt embedding in, tuned temporal Q/K/V out.

The loop knows nothing of DeepSpeed: an `OptimizerStep` (`vmc_fast.tuning.steps`) does backward, clipping and
the update, with a plain torch optimizer or a DeepSpeed engine.

A NaN or inf loss (checked before backward) or gradient (checked by the step, before the update) stops the run
with a `NonFiniteError` naming the step, the value and what to change: nothing non-finite is ever trained into
the weights.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from vmc_fast.config import RECIPE, TrainConfig
from vmc_fast.errors import NonFiniteError
from vmc_fast.runtime import autocast, resolve_precision
from vmc_fast.tuning.losses import motion_distillation_loss
from vmc_fast.tuning.steps import NonFiniteGradient, OptimizerStep


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
    lr: float = float("nan")
    """Learning rate of the step's update (the optimizer's first parameter group)."""


@dataclass
class TuneResult:
    """A finished tuning run."""

    losses: list[float] = field(default_factory=list)
    """Loss of every step."""
    seconds: float = 0.0
    """Wall-clock of the loop."""
    skipped_steps: int = 0
    """fp16: steps whose loss-scaled gradients overflowed, so no update was applied (the scale was halved)."""

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
    Raises NonFiniteError (a VmcError) at the first step whose loss or gradient is NaN or inf, before that step's
    update is applied; `.step` is that step.
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
        loss_value = float(loss.detach())
        if not _all_finite(optimizer_step, math.isfinite(loss_value)):  # before backward: nothing reaches weights
            what = f"the loss became {loss_value}" if not math.isfinite(loss_value) else \
                "the loss became NaN or inf on another rank"
            raise NonFiniteError(_stopped(f"{what} at step {step} of {cfg.steps}", cfg, device), step=step)
        try:
            grad_norm = optimizer_step(loss)
        except NonFiniteGradient as exc:
            raise NonFiniteError(_gradient_message(exc, step, loss_value, cfg, device), step=step) from None
        result.losses.append(loss_value)
        if on_step is not None:
            on_step(StepStats(step, cfg.steps, result.losses[-1], grad_norm, time.perf_counter() - start,
                              lr=_learning_rate(optimizer_step, cfg)))
    unet.eval()
    _check_finite_weights(unet, cfg, device)
    result.seconds = time.perf_counter() - start
    result.skipped_steps = int(getattr(optimizer_step, "skipped_steps", 0))
    return result


def _learning_rate(optimizer_step: OptimizerStep, cfg: TrainConfig) -> float:
    """The rate the optimizer applied (its first parameter group; DeepSpeed's wrappers keep param_groups too),
    else the configured one."""
    groups = getattr(getattr(optimizer_step, "optimizer", None), "param_groups", None)
    return float(groups[0]["lr"]) if groups else cfg.learning_rate


def _all_finite(optimizer_step: OptimizerStep, finite: bool) -> bool:
    """Whether every rank's loss is finite: a step whose ranks share a backward (ZeRO) offers ``agree(ok) ->
    all ranks ok``, so all of them stop at the same step instead of the others waiting in a collective."""
    agree = getattr(optimizer_step, "agree", None)
    return agree(finite) if agree is not None else finite


def _gradient_message(exc: NonFiniteGradient, step: int, loss: float, cfg: TrainConfig, device) -> str:
    if exc.consecutive_overflows:
        first = step - exc.consecutive_overflows + 1
        return _stopped(f"fp16 gradients overflowed in {exc.consecutive_overflows} consecutive steps even with "
                        f"loss scaling (steps {first}-{step} of {cfg.steps}, loss {loss:.4g})", cfg, device)
    return _stopped(f"the gradient became {exc.norm} at step {step} of {cfg.steps} (loss {loss:.4g})", cfg, device)


def _stopped(what: str, cfg: TrainConfig, device) -> str:
    """`what` happened, then what to change: the learning rate and, below fp32, the precision."""
    precision = resolve_precision(cfg.precision, device)
    fixes = [f"lower --lr (now {cfg.learning_rate:g}; the paper uses {RECIPE.learning_rate:g})"]
    if precision != "fp32":
        fixes.append(f"use --precision {'bf16 or fp32' if precision == 'fp16' else 'fp32'} (now {precision})")
    if cfg.grad_clip == 0:
        fixes.append(f"clip gradients (--grad-clip {RECIPE.grad_clip:g})")
    if cfg.loss_weight != "none":
        fixes.append(f"drop --loss-weight {cfg.loss_weight}")
    return f"{what}; training stopped and no adapter was written. To fix: {', or '.join(fixes)}"


def _check_finite_weights(unet: nn.Module, cfg: TrainConfig, device) -> None:
    """The tuned tensors after the last update (an update from finite gradients can still overflow them)."""
    bad = [name for name, p in unet.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
    if bad:
        raise NonFiniteError(_stopped(f"{len(bad)} tuned tensors hold NaN or inf after step {cfg.steps} "
                                      f"(e.g. {bad[0]})", cfg, device), step=cfg.steps)


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
