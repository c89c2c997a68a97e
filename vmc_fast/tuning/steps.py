"""Optimizer steps: backward, clipping, the update and zero-grad for one loss, with a plain torch optimizer
(`TorchStep`) or through a DeepSpeed ZeRO engine (`DeepSpeedStep`). The training loop sees only `OptimizerStep`.

DeepSpeed runs its optimizer on the trainable temporal Q/K/V only. Each rank draws its own timestep and noise (an
effective batch of one sample per rank); ZeRO shards optimizer state (stage 1), gradients (stage 2) and
parameters (stage 3) across ranks.

Under ZeRO all ranks must take every collective together, so they also decide together (`RankAgreement`): before
each step whether every loss is finite, after it whether the update was applied, and whether every rank could
load its input. A problem on any rank then fails the video on all of them, and none is ever left waiting in a
collective the others skipped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from pathlib import Path
from typing import Callable, Iterator, Protocol

import torch
from torch import nn

from vmc_fast.config import RunConfig, TrainConfig
from vmc_fast.errors import VmcError


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


class PackedTorchStep:
    """A plain torch optimizer over packed (K, ...) tensors (`vmc_fast.tuning.packing`): backward of the active
    videos' summed loss, each video's slices clipped by its own gradient norm, one AdamW update (elementwise, so
    each slice moves as it would alone). A video whose norm is NaN or inf gets no gradient in that update."""

    def __init__(self, params: list[nn.Parameter], cfg: TrainConfig):
        self.params = params
        self.grad_clip = cfg.grad_clip
        self.optimizer = build_optimizer(params, cfg)

    def __call__(self, losses: torch.Tensor, active: list[int]) -> list[float]:
        from vmc_fast.tuning.packing import clip_per_video, drop_videos

        num_videos = losses.shape[0]
        losses[active].sum().backward()
        drop_videos(self.params, [k for k in range(num_videos) if k not in active])
        norms = clip_per_video(self.params, self.grad_clip if self.grad_clip > 0 else math.inf, num_videos).tolist()
        drop_videos(self.params, [k for k in active if not math.isfinite(norms[k])])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norms

    def agree_videos(self, finite: list[bool]) -> list[bool]:
        return finite  # one process

    def full_parameters(self, modify: bool = False) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


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


class RanksFailed(VmcError):
    """Some rank could not go on with the video; every rank raised this at the same point, so all can move on
    to the next video together. The message names each rank's problem."""


class RankStopped(BaseException):
    """A rank failed inside a collective, where the others cannot learn of it: the run must stop (this rank exits
    and torch.distributed.run stops the others). A BaseException, so that per-video error handling, which
    records a failure and moves on, lets it through."""


class RankAgreement:
    """Decisions all ranks of the default process group take together (each call is a collective: every rank
    must make the same calls in the same order).

    `settle(problem)` is the one decision: each rank says what, if anything, went wrong on it; when any rank has
    a problem every rank raises the same RanksFailed. `collective()` marks code in which the ranks talk (backward,
    the update, engine set-up; `watch` adds a module's forward, which gathers parameters under ZeRO-3): an
    exception there leaves the others waiting, so `broken` turns True and the run must stop instead.
    """

    def __init__(self, device: torch.device | str | None = None):
        self.device = torch.device(device) if device is not None else _collective_device()
        self._failed_inside = False
        self._depth = 0

    @property
    def broken(self) -> bool:
        """True after an exception inside a collective (or while one is still open: it was left by one)."""
        return self._failed_inside or self._depth > 0

    def agree(self, ok: bool) -> bool:
        """True when `ok` on every rank (an all-reduce of one integer, MIN)."""
        return bool(self.minimum([int(ok)])[0])

    def minimum(self, values: list[int]) -> list[int]:
        """Each value's minimum over the ranks (one all-reduce, MIN)."""
        flags = torch.tensor(values, dtype=torch.int64, device=self.device)
        with self.collective():
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MIN)
        return [int(v) for v in flags.tolist()]

    def settle(self, problem: str | None) -> None:
        """Return when no rank has a problem; else raise RanksFailed naming each rank's, on every rank."""
        if self.agree(problem is None):
            return
        problems: list[str | None] = [None] * torch.distributed.get_world_size()
        with self.collective():
            torch.distributed.all_gather_object(problems, problem)
        raise RanksFailed(_by_rank(problems))

    @contextlib.contextmanager
    def collective(self) -> Iterator[None]:
        self._depth += 1
        try:
            yield
        except BaseException:
            self._failed_inside = True
            raise
        finally:
            self._depth -= 1

    def watch(self, module: nn.Module) -> None:
        """Count `module`'s forward as a collective (ZeRO-3 gathers its partitioned parameters there): an
        exception inside it never reaches the post-hook, so the collective stays open and `broken` is True."""
        def enter(*_):
            self._depth += 1

        def leave(*_):
            self._depth -= 1

        module.register_forward_pre_hook(enter)
        module.register_forward_hook(leave)


def _by_rank(problems: list[str | None]) -> str:
    """The problems by rank: ``rank 1: X``, or ``ranks 0, 1: X`` when several report the same."""
    grouped: dict[str, list[int]] = {}
    for rank, problem in enumerate(problems):
        if problem is not None:
            grouped.setdefault(problem, []).append(rank)
    return "; ".join(f"rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r))}: {p}" for p, r in grouped.items())


def _collective_device() -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class ZeroStepFactory:
    """Builds the DeepSpeed engine once per session; later videos reset its master weights and moments."""

    def __init__(self, cfg: RunConfig, ranks: RankAgreement | None = None):
        self.cfg = cfg
        self.ranks = ranks
        self.step: DeepSpeedStep | None = None

    def __call__(self, unet: nn.Module, params: list[nn.Parameter]) -> "DeepSpeedStep":
        self.ranks = ranks = self.ranks or RankAgreement()
        with ranks.collective():  # initialize broadcasts and partitions; resetting ZeRO-3 gathers
            if self.step is None:
                self.step = self._new_step(unet, params, ranks)
            else:
                self.step.reset(params)
        return self.step

    def _new_step(self, unet: nn.Module, params: list[nn.Parameter], ranks: RankAgreement) -> "DeepSpeedStep":
        return DeepSpeedStep(unet, params, self.cfg, ranks)


class DeepSpeedStep:
    """backward + clip + step through a DeepSpeed engine (ZeRO stage from the config), agreeing with the other
    ranks before each step that every loss is finite and after it that the update was applied (stage 0, which
    has no overflow check of its own: before it, that every gradient is finite)."""

    def __init__(self, unet: nn.Module, params: list[nn.Parameter], cfg: RunConfig,
                 ranks: RankAgreement | None = None):
        import deepspeed

        optimizer = build_optimizer(params, cfg.train)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=unet, optimizer=optimizer, model_parameters=params, config=deepspeed_config(cfg))
        self.params = params
        self.stage = cfg.parallel.zero_stage
        self.ranks = ranks or RankAgreement()
        self.step_index = 0
        if self.stage == 3:
            self.ranks.watch(unet)

    def __call__(self, loss: torch.Tensor) -> float:
        self.step_index += 1
        value = float(loss.detach())
        self.ranks.settle(None if math.isfinite(value) else f"the loss became {value} at step {self.step_index}")
        with self.ranks.collective():
            self.engine.backward(loss)
        if self.stage == 0:  # gradients are already averaged: look at them before the update
            norm = _grad_norm(self.params)
            self.ranks.settle(self._gradient_problem(norm))
        with self.ranks.collective():
            self.engine.step()
        if self.stage > 0:  # ZeRO skips the update on a non-finite norm (its overflow check) and says so here
            reported = self.engine.get_global_grad_norm()  # None when the engine computes no norm
            norm = float(reported) if reported is not None else math.nan
            applied = self.engine.was_step_applied() and (reported is None or math.isfinite(norm))
            self.ranks.settle(None if applied else self._gradient_problem(norm))
        return norm

    def _gradient_problem(self, norm: float) -> str | None:
        """None for a finite norm, else what happened (the update is skipped or was not applied)."""
        if math.isfinite(norm):
            return None
        return f"the gradient norm became {norm} at step {self.step_index}; the update was not applied"

    def full_parameters(self, modify: bool = False) -> contextlib.AbstractContextManager:
        """ZeRO-3: gathers the partitions (collective: every rank must enter); with `modify`, rank 0's in-place
        changes are what every rank keeps. Other stages: nothing to do."""
        if not any(hasattr(p, "ds_id") for p in self.params):  # only ZeRO-3 marks its parameters
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(self.params, modifier_rank=0 if modify else None)

    def reset(self, params: list[nn.Parameter]) -> None:
        """Start a new video: master weights from the (already reset) module params, zero Adam moments.

        Stage 0 has no master copy (the module's parameters are the optimizer's, already reset by the session),
        and the torch optimizer is `engine.optimizer` itself: its state is dropped, AdamW rebuilds it lazily."""
        self.step_index = 0
        optimizer = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)
        if self.stage == 0:
            optimizer.state.clear()
            for param in params:  # a video that failed between backward and the update left its gradients
                param.grad = None
            return
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
        for state in optimizer.state.values():
            if "step" in state:
                state["step"] = torch.zeros_like(state["step"]) if torch.is_tensor(state["step"]) else 0


def _grad_norm(params: list[nn.Parameter]) -> float:
    """Global 2-norm of the parameters' gradients (inf or nan when any entry is)."""
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


def _local_partition(param: nn.Parameter, full: torch.Tensor) -> torch.Tensor:
    """This rank's ZeRO-3 partition of `full`: flattened, zero-padded to equal parts, this rank's part."""
    size = param.ds_tensor.numel()
    group = param.ds_process_group
    rank, num_ranks = torch.distributed.get_rank(group), torch.distributed.get_world_size(group)
    flat = torch.nn.functional.pad(full.flatten(), (0, size * num_ranks - full.numel()))
    return flat[rank * size:(rank + 1) * size]


# --------------------------------------------------------------------------------------------- DeepSpeed packs


class ZeroPackStepFactory(ZeroStepFactory):
    """`ZeroStepFactory` for packs: one `DeepSpeedPackStep` per session, reset between packs."""

    def _new_step(self, unet: nn.Module, params: list[nn.Parameter], ranks: RankAgreement) -> "DeepSpeedPackStep":
        return DeepSpeedPackStep(unet, params, self.cfg, ranks)


class DeepSpeedPackStep(DeepSpeedStep):
    """A pack through a DeepSpeed engine: every rank holds the same K videos (each drawing its own noise), the
    engine averages the gradients and shards the K adapters' gradients and Adam state (ZeRO stage from the
    config). DeepSpeed's own clipping is global, so it is off here and each video is clipped by its own norm
    between backward and the update: each rank sums the squares of the gradient elements it holds per video
    (stage 0: all of them, already averaged), one all-reduce of K numbers makes them global, and each video's
    elements are scaled (`clip_per_video`'s formula) or zeroed (failed videos). Exact, for K floats of traffic."""

    def __init__(self, unet: nn.Module, params: list[nn.Parameter], cfg: RunConfig,
                 ranks: RankAgreement | None = None):
        no_clip = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_clip=0.0))
        super().__init__(unet, params, no_clip, ranks)
        self.grad_clip = cfg.train.grad_clip

    def agree_videos(self, finite: list[bool]) -> list[bool]:
        """Per video: finite on every rank (each rank drew its own noise, so one rank's NaN fails it on all)."""
        return [bool(v) for v in self.ranks.minimum([int(f) for f in finite])]

    def __call__(self, losses: torch.Tensor, active: list[int]) -> list[float]:
        self.step_index += 1
        num_videos = losses.shape[0]
        with self.ranks.collective():
            self.engine.backward(losses[active].sum())
            pieces = [piece for p in self.params for piece in _local_grad_pieces(p, self.stage)]
            squares = torch.zeros(num_videos, dtype=torch.float64, device=self.ranks.device)
            for piece, start, per_video, _ in pieces:
                for k, a, b in _video_ranges(start, piece.numel(), per_video, num_videos):
                    squares[k] += piece[a:b].double().square().sum().to(squares.device)
            if self.stage > 0:  # stage 0 holds the whole averaged gradient on every rank already
                torch.distributed.all_reduce(squares)
            norms = [math.sqrt(v) if math.isfinite(v) else math.nan for v in squares.cpu().tolist()]
            limit = self.grad_clip if self.grad_clip > 0 else math.inf
            scale = [min(1.0, limit / (n + 1e-6)) if k in active and math.isfinite(n) else 0.0
                     for k, n in enumerate(norms)]
            for piece, start, per_video, write_back in pieces:
                for k, a, b in _video_ranges(start, piece.numel(), per_video, num_videos):
                    piece[a:b].zero_() if scale[k] == 0.0 else piece[a:b].mul_(scale[k])
                if write_back is not None:
                    write_back()
            self.engine.step()
        return norms


def _video_ranges(start: int, numel: int, per_video: int, num_videos: int) -> Iterator[tuple[int, int, int]]:
    """(video, a, b): the elements [a, b) of a piece holding flat elements [start, start + numel) of a (K, ...)
    parameter whose video k owns [k * per_video, (k + 1) * per_video)."""
    for k in range(num_videos):
        lo, hi = max(start, k * per_video), min(start + numel, (k + 1) * per_video)
        if lo < hi:
            yield k, lo - start, hi - start


def _local_grad_pieces(param: nn.Parameter, stage: int) -> list[tuple[torch.Tensor, int, int, Callable | None]]:
    """(flat gradient elements this rank holds, their first index in the flattened parameter, elements per video,
    what writes them back or None when they are scaled in place) of a packed (K, ...) parameter, right after
    engine.backward: stage 0 the whole averaged gradient, stage 1-2 this rank's fragment (DeepSpeed's
    `_hp_mapping`), stage 3 its local partition without the padding (handed out as a copy, written back)."""
    shape = getattr(param, "ds_shape", param.shape)  # ZeRO-3 leaves an empty placeholder in the module
    per_video = math.prod(shape[1:])
    if stage == 0:
        return [] if param.grad is None else [(param.grad.view(-1), 0, per_video, None)]
    if hasattr(param, "ds_id"):
        from deepspeed.utils import safe_get_local_grad, safe_set_local_grad

        local = safe_get_local_grad(param)
        if local is None:
            return []
        start = torch.distributed.get_rank(param.ds_process_group) * param.ds_tensor.numel()
        piece = local.view(-1)[:max(0, min(local.numel(), param.ds_numel - start))]
        return [(piece, start, per_video, lambda: safe_set_local_grad(param, local))]
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is None:
        return []  # no element of this parameter is in this rank's partition
    fragment = mapping.get_lp_grad_fragment(param._index_in_param_group).view(-1)
    address = mapping.lp_fragment_address
    if fragment.numel() == param.numel() and address.numel != param.numel():  # a whole-size buffer
        fragment = fragment.narrow(0, address.start, address.numel)
    return [(fragment, address.start, per_video, None)]
