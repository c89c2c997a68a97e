"""The VMC training loop: one clip and one prompt embedding in, tuned temporal Q/K/V out.

The loop knows nothing of DeepSpeed: an `OptimizerStep` does backward, clipping and the update, either with a
plain torch optimizer (`TorchStep`) or a DeepSpeed engine (vmc_fast.runs.launch).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import nn

from vmc_fast.config import TrainConfig
from vmc_fast.tuning.losses import motion_distillation_loss


class OptimizerStep(Protocol):
    """Backward + (clip) + update + zero-grad for one loss; returns the pre-clip gradient norm (or nan)."""

    def __call__(self, loss: torch.Tensor) -> float: ...

    def full_parameters(self, modify: bool = False) -> contextlib.AbstractContextManager:
        """Inside, the trained parameters are whole on this rank (ZeRO-3 partitions them across ranks); with
        `modify`, in-place changes made inside are kept."""
        ...


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


class TorchStep:
    """A plain torch optimizer over the trainable parameters, with global-norm clipping."""

    def __init__(self, params: list[nn.Parameter], cfg: TrainConfig):
        self.params = params
        self.grad_clip = cfg.grad_clip
        self.optimizer = build_optimizer(params, cfg)

    def __call__(self, loss: torch.Tensor) -> float:
        loss.backward()
        max_norm = self.grad_clip if self.grad_clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def full_parameters(self, modify: bool = False) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # never partitioned


def build_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with the recipe's hyper-parameters; ``adamw8bit`` keeps its moments in 8 bits (bitsandbytes)."""
    kwargs = dict(lr=cfg.learning_rate, betas=cfg.betas, eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


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
    weight = ((1 - a) / a).reshape(-1) if cfg.snr_weight else None
    return motion_distillation_loss(eps_pred, noise, kind=cfg.loss, stride=cfg.loss_stride, weight=weight)


def autocast(precision: str, device: torch.device):
    """bf16/fp16 autocast when asked (``auto``: bf16 on CUDA); a no-op for fp32."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve_precision(precision, device))
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``auto`` means bf16 on CUDA and fp32 elsewhere (bf16 matmuls are slow on most CPUs)."""
    if precision != "auto":
        return precision
    return "bf16" if torch.device(device).type == "cuda" else "fp32"
