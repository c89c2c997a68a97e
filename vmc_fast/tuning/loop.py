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
from typing import Callable, Protocol

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
    videos: list[tuple[float, float] | None] | None = None
    """A pack's step (`tune_pack`): per video, its own (loss, gradient norm), None once it failed; `loss` and
    `grad_norm` are then the pack's mean loss and largest norm. None for one video."""


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
    generator: torch.Generator | None = None,
) -> TuneResult:
    """Run `cfg.steps` VMC steps on one clip.

    clip: (1, C, F, H, W) model-space input (pixels in [-1, 1] or latents), on the UNet's device.
    text_states: (1, L, D) prompt embedding, on the UNet's device.
    alphas_cumprod: (T,) float the noise schedule's cumulative alphas.
    generator: the CPU generator of timesteps and noise (a session passes the video's own,
    `vmc_fast.tuning.packing.video_generator`); default: seeded by cfg.seed alone.
    Raises NonFiniteError (a VmcError) at the first step whose loss or gradient is NaN or inf, before that step's
    update is applied; `.step` is that step.
    """
    device = clip.device
    generator = generator or torch.Generator(device="cpu").manual_seed(cfg.seed)
    lo, hi = cfg.timestep_range or (0, len(alphas_cumprod))
    abar = alphas_cumprod.to(device=device, dtype=torch.float32)
    result, start = TuneResult(), time.perf_counter()
    unet.train()
    for step in range(1, cfg.steps + 1):
        t, noise = draw(generator, clip.shape, lo, hi)
        loss = vmc_loss(unet, clip, noise.to(device), t.to(device), abar, text_states, cfg)
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
def draw(generator: torch.Generator, shape: torch.Size, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One step's timestep (B,) int64 in [lo, hi) and noise `shape` float32, both on the CPU, in this order."""
    t = torch.randint(lo, hi, (shape[0],), generator=generator)
    return t, torch.randn(shape, generator=generator)


def tune_pack(
    unet: nn.Module,
    alphas_cumprod: torch.Tensor,
    clips: torch.Tensor,
    text_states: torch.Tensor,
    cfg: TrainConfig,
    optimizer_step: PackStep,
    generators: list[torch.Generator],
    on_step: Callable[[StepStats], None] | None = None,
) -> list[TuneResult | NonFiniteError]:
    """Run `cfg.steps` VMC steps on K clips at once, through a UNet whose tuned layers hold K slices
    (`vmc_fast.tuning.packing`).

    clips: (K, C, F, H, W) and text_states (K, L, D) on the UNet's device; generators: K, one per video, each
    drawing as `tune` draws for its video alone. The step's loss is the sum of the videos' own losses, so each
    slice gets exactly its own video's gradient. A video whose loss or gradient becomes NaN or inf fails alone
    (its slice is no longer trained) and the others go on. Returns, per video, its TuneResult or the
    NonFiniteError that stopped it.
    """
    device, num_videos = clips.device, clips.shape[0]
    lo, hi = cfg.timestep_range or (0, len(alphas_cumprod))
    abar = alphas_cumprod.to(device=device, dtype=torch.float32)
    results, failed = [TuneResult() for _ in range(num_videos)], {}
    start = time.perf_counter()
    unet.train()
    for step in range(1, cfg.steps + 1):
        draws = [draw(g, (1, *clips.shape[1:]), lo, hi) for g in generators]
        t = torch.cat([d[0] for d in draws]).to(device)
        noise = torch.cat([d[1] for d in draws]).to(device)
        losses = vmc_losses(unet, clips, noise, t, abar, text_states, cfg)
        values = [float(v) for v in losses.detach()]
        finite = optimizer_step.agree_videos([math.isfinite(v) for v in values])  # under ZeRO: on every rank
        for k, value in enumerate(values):
            if k not in failed and not finite[k]:
                what = f"the loss became {value}" if not math.isfinite(value) else \
                    "the loss became NaN or inf on another rank"
                failed[k] = NonFiniteError(_stopped(f"{what} at step {step} of {cfg.steps}", cfg, device), step=step)
        active = [k for k in range(num_videos) if k not in failed]
        if not active:
            break
        norms = optimizer_step(losses, active)
        for k in active:
            if not math.isfinite(norms[k]):
                failed[k] = NonFiniteError(_gradient_message(NonFiniteGradient(norms[k]), step, values[k], cfg,
                                                             device), step=step)
            else:
                results[k].losses.append(values[k])
        if on_step is not None and len(failed) < num_videos:
            kept = [values[k] for k in range(num_videos) if k not in failed]
            kept_norms = [norms[k] for k in range(num_videos) if k not in failed]
            own = [(values[k], norms[k]) if k not in failed else None for k in range(num_videos)]
            on_step(StepStats(step, cfg.steps, sum(kept) / len(kept), max(kept_norms), time.perf_counter() - start,
                              lr=_learning_rate(optimizer_step, cfg), videos=own))
    unet.eval()
    seconds = time.perf_counter() - start
    for k in range(num_videos):
        results[k].seconds = seconds
        if k not in failed:
            failed.update(_nonfinite_slice(unet, k, cfg, device))
    return [failed.get(k, results[k]) for k in range(num_videos)]


class PackStep(Protocol):
    """Backward of the pack's summed loss, per-video clipping and the update of the `active` videos' slices."""

    def __call__(self, losses: torch.Tensor, active: list[int]) -> list[float]:
        """losses (K,) float32; returns each video's gradient norm before clipping (NaN or inf: that video's
        slices were not updated with it)."""
        ...

    def agree_videos(self, finite: list[bool]) -> list[bool]:
        """Per video, whether its flag holds on every rank (one process: the flags)."""
        ...


def _nonfinite_slice(unet: nn.Module, k: int, cfg: TrainConfig, device) -> dict[int, NonFiniteError]:
    # (ZeRO-3 leaves empty placeholders in the module: nothing to look at there, as in `_check_finite_weights`)
    bad = [name for name, p in unet.named_parameters()
           if p.requires_grad and p.shape[0] > k and not torch.isfinite(p[k]).all()]
    if not bad:
        return {}
    return {k: NonFiniteError(_stopped(f"{len(bad)} tuned tensors hold NaN or inf after step {cfg.steps} "
                                       f"(e.g. {bad[0]})", cfg, device), step=cfg.steps)}


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
    eps_pred, weight = _predict(unet, clip, noise, t, abar, text_states, cfg)
    return motion_distillation_loss(eps_pred, noise, kind=cfg.loss, stride=cfg.loss_stride, weight=weight)


def _predict(unet: nn.Module, clips: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, abar: torch.Tensor,
             text_states: torch.Tensor, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the UNet's noise prediction for the clips (B, C, F, H, W) noised at t (B,), the per-sample loss weight:
    (1 - abar_t) / abar_t with --loss-weight snr (eq. 16's weight), else None)."""
    a = abar[t].reshape(-1, 1, 1, 1, 1)
    noisy = a.sqrt() * clips + (1 - a).sqrt() * noise
    with autocast(cfg.precision, device=clips.device):
        output = unet(noisy, t, text_states)
    eps_pred = output.sample if hasattr(output, "sample") else output
    return eps_pred, ((1 - a) / a).reshape(-1) if cfg.loss_weight == "snr" else None


def vmc_losses(unet: nn.Module, clips: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, abar: torch.Tensor,
               text_states: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """`vmc_loss` of each sample on its own, from one forward of the whole batch: (B,) float32."""
    eps_pred, weight = _predict(unet, clips, noise, t, abar, text_states, cfg)
    return torch.stack([
        motion_distillation_loss(eps_pred[k:k + 1], noise[k:k + 1], kind=cfg.loss, stride=cfg.loss_stride,
                                 weight=None if weight is None else weight[k:k + 1])
        for k in range(clips.shape[0])])
