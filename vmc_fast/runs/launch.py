"""Ranks: launching them, choosing what each does, and the DeepSpeed ZeRO optimizer step.

Two strategies share the work of a run:
- ``videos``: each rank tunes its own share of the videos with a plain optimizer (no communication; the best
  use of many GPUs for a library of videos).
- ``zero``: all ranks tune the same video together through a DeepSpeed engine. Each rank draws its own timestep
  and noise (an effective batch of one sample per rank); ZeRO shards optimizer state (stage 1), gradients
  (stage 2) and parameters (stage 3) across ranks. Only rank 0 writes adapters and the manifest.

On a machine without CUDA the ranks are CPU processes talking over gloo; that is how these paths are tested.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from vmc_fast.config import RunConfig
from vmc_fast.errors import VmcError
from vmc_fast.runs.library import Reporter, RunSummary, plan_jobs, prepare_out_dir, summarize, train_videos
from vmc_fast.tuning.loop import build_optimizer


def train(cfg: RunConfig, reporter: Reporter | None = None) -> RunSummary:
    """Run `vmc-fast train`: in this process for one rank, else in `num_ranks` launched processes.

    ``--strategy zero`` always goes through the launcher and DeepSpeed, one rank included (ZeRO-3 can then offload,
    and it is how one GPU tests the NCCL path); one rank with another strategy trains in this process.
    """
    if cfg.parallel.num_ranks == 1 and cfg.parallel.strategy != "zero":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return train_videos(cfg, reporter, device=device)
    return launch(cfg)


def resolve_strategy(cfg: RunConfig, num_videos: int) -> str:
    """``auto`` picks ``videos`` when every rank gets at least one video, else ``zero``."""
    if cfg.parallel.strategy != "auto":
        return cfg.parallel.strategy
    return "videos" if num_videos >= cfg.parallel.num_ranks else "zero"


def launch(cfg: RunConfig) -> RunSummary:
    """Start `num_ranks` worker processes with torch.distributed.run and wait for them."""
    num_ranks = cfg.parallel.num_ranks
    jobs = plan_jobs(cfg)  # fail fast on bad input, before any process starts
    if resolve_strategy(cfg, len(jobs)) == "zero" and cfg.train.optimizer == "adamw8bit":
        raise VmcError("--optimizer adamw8bit does not combine with the zero strategy (DeepSpeed resets Adam's "
                       "own moments between videos); use --optimizer adamw, whose moments ZeRO shards across "
                       "ranks, or --strategy videos")
    out = prepare_out_dir(cfg)
    env = dict(os.environ)
    if not torch.cuda.is_available():
        warnings.warn(f"--gpus {num_ranks}: no CUDA device; running {num_ranks} CPU ranks with gloo", stacklevel=2)
        env["DS_ACCELERATOR"] = "cpu"
    elif torch.cuda.device_count() < num_ranks:
        raise VmcError(f"--gpus {num_ranks}: only {torch.cuda.device_count()} CUDA devices are visible; "
                       f"lower --gpus or set CUDA_VISIBLE_DEVICES")
    config_file = out / "config.json"
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={num_ranks}",
               f"--master-port={_free_port()}", "-m", "vmc_fast.runs.launch", str(config_file)]
    completed = subprocess.run(command, env=env)
    if completed.returncode != 0:
        raise VmcError(f"{num_ranks} ranks: a worker exited with status {completed.returncode}; see its output "
                       f"above; finished videos are in {out}/manifest.jsonl and a rerun resumes")
    return summarize(out, jobs)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker(config_file: str) -> None:
    """One rank's work (entry point of the launched processes)."""
    cfg = RunConfig.from_dict(json.loads(Path(config_file).read_text()))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if device != "cpu":
        torch.cuda.set_device(device)
    backend = "nccl" if device != "cpu" else "gloo"
    torch.distributed.init_process_group(backend)
    print(f"rank {rank} of {world_size}: {device}, backend {backend}", file=sys.stderr, flush=True)
    try:
        reporter = _rank_reporter(rank)
        strategy = resolve_strategy(cfg, len(plan_jobs(cfg)))
        if strategy == "videos":
            train_videos(cfg, reporter, device=device, rank=rank, world_size=world_size)
        else:
            run_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=cfg.train.seed + rank))
            train_videos(run_cfg, reporter, device=device, rank=rank, world_size=world_size, shard=False,
                         make_optimizer_step=ZeroStepFactory(cfg, rank))
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def _rank_reporter(rank: int):
    from vmc_fast.runs.library import QuietReporter

    if rank != 0:
        return QuietReporter()
    from rich.console import Console

    from vmc_fast.reporting import RichReporter

    return RichReporter(Console())


# --------------------------------------------------------------------------------------------- DeepSpeed


def deepspeed_config(cfg: RunConfig) -> dict:
    """The DeepSpeed config for the ``zero`` strategy: the user's file (if any) with our recipe on top."""
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

    def __init__(self, cfg: RunConfig, rank: int):
        self.cfg = cfg
        self.rank = rank
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
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

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


if __name__ == "__main__":
    worker(sys.argv[1])
