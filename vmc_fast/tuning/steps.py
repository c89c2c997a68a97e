"""Optimizer steps: backward, clipping, the update and zero-grad for one loss, with a plain torch optimizer
(`TorchStep`) or through a DeepSpeed ZeRO engine (`DeepSpeedStep`). The training loop sees only `OptimizerStep`.

DeepSpeed runs its optimizer on the trainable temporal Q/K/V only. Each rank draws its own timestep and noise (an
effective batch of one sample per rank); ZeRO shards optimizer state (stage 1), gradients (stage 2) and
parameters (stage 3) across ranks.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from vmc_fast.config import RunConfig, TrainConfig


class OptimizerStep(Protocol):
    """Backward + (clip) + update + zero-grad for one loss; returns the pre-clip gradient norm (or nan).

    Gradients that cannot be used (NaN or inf) raise `NonFiniteGradient` before the update is applied.
    """

    def __call__(self, loss: torch.Tensor) -> float: ...

    def full_parameters(self, modify: bool = False) -> contextlib.AbstractContextManager:
        """Inside, the trained parameters are whole on this rank (ZeRO-3 partitions them across ranks); with
        `modify`, in-place changes made inside are kept."""
        ...


def build_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with the recipe's hyper-parameters; ``adamw8bit`` keeps its moments in 8 bits (bitsandbytes)."""
    kwargs = dict(lr=cfg.learning_rate, betas=cfg.betas, eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


class NonFiniteGradient(ArithmeticError):
    """Raised by an optimizer step, before any update, when the gradients cannot be used: their global norm is NaN
    or inf (fp32/bf16), or fp16 loss scaling skipped `MAX_CONSECUTIVE_OVERFLOWS` steps in a row. The training loop
    turns it into a `NonFiniteError` naming the step."""

    def __init__(self, norm: float, consecutive_overflows: int = 0):
        super().__init__(f"gradient norm {norm}")
        self.norm = norm
        """The global gradient norm (before clipping) that was not finite."""
        self.consecutive_overflows = consecutive_overflows
        """fp16: how many steps in a row the loss scaler skipped; 0 when no scaler runs."""


MAX_CONSECUTIVE_OVERFLOWS = 10
"""fp16: a run whose loss-scaled gradients overflow this many steps in a row stops (the scale is then 2**-10 of
where it started: the overflow is not a scaling problem)."""


class TorchStep:
    """A plain torch optimizer over the trainable parameters, with global-norm clipping.

    fp16 autocast gets dynamic loss scaling (`torch.amp.GradScaler`): the loss is multiplied by the scale before
    backward, the gradients divided by it before clipping, and a step whose gradients overflowed is skipped (no
    update) while the scale halves; `skipped_steps` counts them. Without fp16 the scaler is off and a NaN or inf
    gradient norm raises `NonFiniteGradient` before the update.
    """

    def __init__(self, params: list[nn.Parameter], cfg: TrainConfig):
        self.params = params
        self.grad_clip = cfg.grad_clip
        self.optimizer = build_optimizer(params, cfg)
        device_type = params[0].device.type if params else "cpu"
        self.scaler = torch.amp.GradScaler(device_type, enabled=cfg.precision == "fp16")
        self.skipped_steps = 0
        """fp16: steps skipped because their scaled gradients overflowed."""
        self._consecutive_overflows = 0

    def __call__(self, loss: torch.Tensor) -> float:
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
        max_norm = self.grad_clip if self.grad_clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        if torch.isfinite(norm):
            self._consecutive_overflows = 0
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.zero_grad(set_to_none=True)  # never applied, never carried into the next step
            if not self.scaler.is_enabled():
                raise NonFiniteGradient(float(norm))
            self.skipped_steps += 1
            self._consecutive_overflows += 1
            self.scaler.update(self.scaler.get_scale() * self.scaler.get_backoff_factor())
            if self._consecutive_overflows >= MAX_CONSECUTIVE_OVERFLOWS:
                raise NonFiniteGradient(float(norm), self._consecutive_overflows)
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def full_parameters(self, modify: bool = False) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # never partitioned


def whole_parameters(step: OptimizerStep | None, modify: bool = False) -> contextlib.AbstractContextManager:
    """The step's gather of partitioned parameters (ZeRO-3); nothing for steps that never partition them."""
    full_parameters = getattr(step, "full_parameters", None)
    return full_parameters(modify) if full_parameters is not None else contextlib.nullcontext()


# --------------------------------------------------------------------------------------------- DeepSpeed


def deepspeed_config(cfg: RunConfig) -> dict:
    """The DeepSpeed config of the ``zero`` strategy: the user's file (if any) with our recipe on top."""
    base = json.loads(Path(cfg.parallel.deepspeed_config).read_text()) if cfg.parallel.deepspeed_config else {}
    # Master weights stay fp32 in our own surgery and compute runs under autocast, so DeepSpeed's own bf16/fp16
    # modes (which would recast the whole module) stay off.
    return {
        **base,
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.train.grad_clip,
        "zero_optimization": {**base.get("zero_optimization", {}), "stage": cfg.parallel.zero_stage},
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,
    }


class ZeroStepFactory:
    """Builds the DeepSpeed engine once per session; later videos reset its master weights and moments."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.step: DeepSpeedStep | None = None

    def __call__(self, unet: nn.Module, params: list[nn.Parameter]) -> "DeepSpeedStep":
        if self.step is None:
            self.step = DeepSpeedStep(unet, params, self.cfg)
        else:
            self.step.reset(params)
        return self.step


class DeepSpeedStep:
    """backward + clip + step through a DeepSpeed engine (ZeRO stage from the config)."""

    def __init__(self, unet: nn.Module, params: list[nn.Parameter], cfg: RunConfig):
        import deepspeed

        optimizer = build_optimizer(params, cfg.train)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=unet, optimizer=optimizer, model_parameters=params, config=deepspeed_config(cfg))
        self.params = params

    def __call__(self, loss: torch.Tensor) -> float:
        self.engine.backward(loss)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else math.nan

    def full_parameters(self, modify: bool = False) -> contextlib.AbstractContextManager:
        """ZeRO-3: gathers the partitions (collective: every rank must enter); with `modify`, rank 0's in-place
        changes are what every rank keeps. Other stages: nothing to do."""
        if not any(hasattr(p, "ds_id") for p in self.params):  # only ZeRO-3 marks its parameters
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(self.params, modifier_rank=0 if modify else None)

    def reset(self, params: list[nn.Parameter]) -> None:
        """Start a new video: master weights from the (already reset) module params, zero Adam moments."""
        from deepspeed.utils import (
            safe_set_full_fp32_param,
            safe_set_full_optimizer_state,
            safe_set_local_fp32_param,
            safe_set_local_optimizer_state,
        )

        with self.full_parameters():
            values = [param.detach().clone().float() for param in params]
        for param, full in zip(params, values):
            if hasattr(param, "ds_id"):  # ZeRO-3: write this rank's partition (the full setters assume no padding)
                local = _local_partition(param, full)
                safe_set_local_fp32_param(param, local)
                for key in ("exp_avg", "exp_avg_sq"):
                    safe_set_local_optimizer_state(param, torch.zeros_like(local), key)
                continue
            safe_set_full_fp32_param(param, full)
            for key in ("exp_avg", "exp_avg_sq"):
                safe_set_full_optimizer_state(param, torch.zeros_like(full), key)
        for state in self.engine.optimizer.optimizer.state.values():
            if "step" in state:
                state["step"] = torch.zeros_like(state["step"]) if torch.is_tensor(state["step"]) else 0


def _local_partition(param: nn.Parameter, full: torch.Tensor) -> torch.Tensor:
    """This rank's ZeRO-3 partition of `full`: flattened, zero-padded to equal parts, this rank's part."""
    size = param.ds_tensor.numel()
    group = param.ds_process_group
    rank, num_ranks = torch.distributed.get_rank(group), torch.distributed.get_world_size(group)
    flat = torch.nn.functional.pad(full.flatten(), (0, size * num_ranks - full.numel()))
    return flat[rank * size:(rank + 1) * size]
