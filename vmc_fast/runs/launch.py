"""Running `vmc-fast train`: plan once, then tune on this process or on launched ranks.

Two strategies share the work of several ranks:
- ``videos``: each rank tunes its own share of the videos with a plain optimizer (no communication; the best
  use of many GPUs for a library of videos).
- ``zero``: all ranks tune the same video together through a DeepSpeed engine (`vmc_fast.tuning.steps`); only
  rank 0 writes adapters and the manifest.

Ranks are started with torch.distributed.run; each runs `run_rank`. On a machine without CUDA they are CPU
processes talking over gloo, which is how these paths are tested. The reporter is handed in: this module never
draws anything itself.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Callable

import torch

from vmc_fast.config import RunConfig
from vmc_fast.errors import VmcError
from vmc_fast.runs.library import (
    Job,
    Manifest,
    QuietReporter,
    ReadOnlyManifest,
    Reporter,
    RunSummary,
    mark_pending,
    pending_jobs,
    plan_jobs,
    prepare_out_dir,
    run_jobs,
    summarize,
)
from vmc_fast.runtime import resolve_device

WORKER_COMMAND = ("-m", "vmc_fast.cli", "rank")
"""How a launched rank starts: the CLI's hidden `rank` command, which builds its reporter and calls `run_rank`."""


def train(cfg: RunConfig, reporter: Reporter | None = None) -> RunSummary:
    """Tune every pending video of `cfg`: in this process for one rank, else in `num_ranks` launched ranks.

    ``--strategy zero`` always goes through the launcher and DeepSpeed, one rank included (ZeRO-3 can then offload,
    and it is how one GPU tests the NCCL path). Raises VmcError for unusable input before any work starts.
    """
    jobs = plan_jobs(cfg)
    strategy = resolve_strategy(cfg, len(jobs))
    if cfg.parallel.num_ranks == 1 and strategy != "zero":
        out = prepare_out_dir(cfg)
        run_rank(cfg, jobs, reporter or QuietReporter(), device=str(resolve_device()))
        return summarize(out, jobs)
    return launch(cfg, jobs, strategy)


def resolve_strategy(cfg: RunConfig, num_videos: int) -> str:
    """``auto`` picks ``videos`` when every rank gets at least one video, else ``zero``."""
    if cfg.parallel.strategy != "auto":
        return cfg.parallel.strategy
    return "videos" if num_videos >= cfg.parallel.num_ranks else "zero"


def run_rank(cfg: RunConfig, jobs: list[Job], reporter: Reporter, *, device: str, rank: int = 0,
             world_size: int = 1, strategy: str = "videos") -> None:
    """This rank's share of the run: prepare one session, tune its videos, record each outcome.

    Steps: skip what is done → rank 0 marks the rest pending → (all ranks agree on the list) → take this rank's
    share → prepare one session → tune each video.
    """
    from vmc_fast.tuning.session import TuningSession
    from vmc_fast.tuning.steps import ZeroStepFactory

    manifest = Manifest(Path(cfg.out_dir).expanduser())
    todo = pending_jobs(jobs, manifest)
    if rank == 0:
        mark_pending(todo, manifest)
    if world_size > 1:
        torch.distributed.barrier()  # every rank must split the same list: none may finish a video before all read it
    zero = strategy == "zero"
    mine = todo if zero else todo[rank::world_size]
    reporter.run_started(cfg, mine, len(jobs) - len(todo))
    if not mine:
        return
    writer = rank == 0 or not zero  # under ZeRO every rank tunes the same video; rank 0 writes
    if zero:  # each rank draws its own timesteps and noise: an effective batch of one sample per rank
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=cfg.train.seed + rank))
    session = TuningSession(cfg, device=device, write_adapters=writer,
                            make_optimizer_step=ZeroStepFactory(cfg) if zero else None)
    run_jobs(session, mine, manifest if writer else ReadOnlyManifest(manifest), reporter)


# --------------------------------------------------------------------------------------------- ranks


def launch(cfg: RunConfig, jobs: list[Job], strategy: str) -> RunSummary:
    """Start `num_ranks` ranks with torch.distributed.run and wait for them."""
    num_ranks = cfg.parallel.num_ranks
    if strategy == "zero" and cfg.train.optimizer == "adamw8bit":
        raise VmcError("--optimizer adamw8bit does not combine with the zero strategy (DeepSpeed resets Adam's "
                       "own moments between videos); use --optimizer adamw, whose moments ZeRO shards across "
                       "ranks, or --strategy videos")
    if strategy == "zero" and cfg.train.precision == "fp16":  # before anything is written
        chosen = "" if cfg.parallel.strategy == "zero" else " (what --strategy auto picks for fewer videos than ranks)"
        raise ValueError(f"--precision fp16 does not combine with --strategy zero{chosen}: DeepSpeed's fp16 mode would "
                         f"recast the whole UNet, and its loss scaling is not wired here; use --precision bf16, or "
                         f"--strategy videos")
    out = prepare_out_dir(cfg)
    env = dict(os.environ)
    if not torch.cuda.is_available():
        warnings.warn(f"--gpus {num_ranks}: no CUDA device; running {num_ranks} CPU ranks with gloo", stacklevel=2)
        env["DS_ACCELERATOR"] = "cpu"
    elif torch.cuda.device_count() < num_ranks:
        raise VmcError(f"--gpus {num_ranks}: only {torch.cuda.device_count()} CUDA devices are visible; "
                       f"lower --gpus or set CUDA_VISIBLE_DEVICES")
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={num_ranks}",
               f"--master-port={_free_port()}", *WORKER_COMMAND, str(out / "config.json")]
    completed = subprocess.run(command, env=env)
    if completed.returncode != 0:
        raise VmcError(f"{num_ranks} ranks: a worker exited with status {completed.returncode}; see its output "
                       f"above; finished videos are in {out}/manifest.jsonl and a rerun resumes")
    return summarize(out, jobs)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker(config_file: str, make_reporter: Callable[[int], Reporter]) -> None:
    """One launched rank (torch.distributed.run sets RANK, WORLD_SIZE, LOCAL_RANK): its process group, its share.

    make_reporter(rank) -> the reporter of this rank (the CLI draws on rank 0 only).
    """
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
        jobs = plan_jobs(cfg)
        run_rank(cfg, jobs, make_reporter(rank), device=device, rank=rank, world_size=world_size,
                 strategy=resolve_strategy(cfg, len(jobs)))
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()
