"""Running `vmc-fast train`: plan once, then tune on this process or on launched ranks.

Two strategies share the work of several ranks:
- ``videos``: each rank tunes its own share of the videos with a plain optimizer (no communication; the best
  use of many GPUs for a library of videos).
- ``zero``: all ranks tune the same video together through a DeepSpeed engine (`vmc_fast.tuning.steps`); only
  rank 0 writes adapters and the manifest. The ranks agree on every video's outcome (`AgreeingSession`).

The plan (`vmc_fast.runs.library.plan_run`) is made once, here, before anything is written; launched ranks
receive it in a file and never plan again. Ranks are started with torch.distributed.run; each runs `worker`. On
a machine without CUDA they are CPU processes talking over gloo, which is how these paths are tested. The
reporter is handed in: this module never draws anything itself.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import traceback
import warnings
from pathlib import Path
from typing import Callable

import torch

from vmc_fast.config import RunConfig
from vmc_fast.errors import VmcError
from vmc_fast.runs.library import (
    Job,
    Manifest,
    Plan,
    QuietReporter,
    ReadOnlyManifest,
    Reporter,
    RunSummary,
    plan_run,
    rank_hold,
    run_jobs,
    running,
    summarize,
)
from vmc_fast.runtime import resolve_device

WORKER_COMMAND = ("-m", "vmc_fast.cli", "rank")
"""How a launched rank starts: the CLI's hidden `rank` command, which builds its reporter and calls `worker`."""
DEFAULT_TIMEOUT_S = 1800
"""Collective timeout of a rank on a host without the plan file, until rank 0's plan arrives."""
STOP_GRACE_S = 30
"""Seconds launched ranks get to stop after Ctrl-C before they are killed."""


def train(cfg: RunConfig, reporter: Reporter | None = None) -> RunSummary:
    """Tune every pending video of `cfg`: in this process for one rank, else in `num_ranks` launched ranks.

    ``--strategy zero`` always goes through the launcher and DeepSpeed, one rank included (ZeRO-3 can then offload,
    and it is how one GPU tests the NCCL path). Raises VmcError or ValueError for unusable input before anything
    is written.
    """
    plan = plan_run(cfg)
    if cfg.parallel.multi_rank or plan.strategy == "zero":
        return launch(cfg, plan)
    reporter = reporter or QuietReporter()
    # The session is built before anything is written: weights that cannot be loaded leave no folder behind.
    session = _session(cfg, str(resolve_device()), num_videos=len(plan.todo)) if plan.todo else None
    out = Path(cfg.out_dir).expanduser()
    with running(cfg, plan) as plan:  # --out held; the plan made again under the hold
        reporter.run_started(cfg, plan.todo, plan.num_done)
        if session is not None and plan.todo:
            run_jobs(session, plan.todo, Manifest(out), reporter, tensorboard=cfg.tensorboard)
    return summarize(out, plan.jobs)


def _session(cfg: RunConfig, device: str, **kwargs):
    from vmc_fast.tuning.session import TuningSession

    return TuningSession(cfg, device=device, **kwargs)


# --------------------------------------------------------------------------------------------- ranks


def launch(cfg: RunConfig, plan: Plan) -> RunSummary:
    """Start `num_ranks` ranks with torch.distributed.run, hand them the plan, and wait for them.

    Raises VmcError naming the rank and its error when a rank fails (the others are stopped by
    torch.distributed.run); finished videos stay recorded and a rerun resumes.
    """
    num_ranks = cfg.parallel.num_ranks
    if plan.strategy == "zero" and cfg.train.optimizer == "adamw8bit":
        raise VmcError("--optimizer adamw8bit does not combine with the zero strategy (DeepSpeed resets Adam's "
                       "own moments between videos); use --optimizer adamw, whose moments ZeRO shards across "
                       "ranks, or --strategy videos")
    if plan.strategy == "zero" and cfg.train.precision == "fp16":  # before anything is written
        chosen = "" if cfg.parallel.strategy == "zero" else " (what --strategy auto picks for fewer videos than ranks)"
        raise ValueError(f"--precision fp16 does not combine with --strategy zero{chosen}: DeepSpeed's fp16 mode "
                         f"would recast the whole UNet, and its loss scaling is not wired here; use --precision bf16, "
                         f"or --strategy videos")
    env = dict(os.environ)
    if num_ranks > 1:  # torch.distributed.run's own default for several ranks, set here so it prints no banner
        env.setdefault("OMP_NUM_THREADS", "1")
    if not torch.cuda.is_available():
        warnings.warn(f"--gpus {num_ranks}: no CUDA device; running {num_ranks} CPU ranks with gloo", stacklevel=2)
        env["DS_ACCELERATOR"] = "cpu"
    elif torch.cuda.device_count() < num_ranks:
        raise VmcError(f"--gpus {num_ranks}: only {torch.cuda.device_count()} CUDA devices are visible; "
                       f"lower --gpus or set CUDA_VISIBLE_DEVICES")
    out = Path(cfg.out_dir).expanduser()
    # --out held until every rank has exited; on the other nodes of a multi-node run node 0 holds and records it
    holding = running(cfg, plan) if cfg.parallel.node_rank == 0 else contextlib.nullcontext(plan)
    with holding as plan:
        if plan.todo:
            _launch_ranks(cfg, plan, env, out)
    return summarize(out, plan.jobs)


def _launch_ranks(cfg: RunConfig, plan: Plan, env: dict, out: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="vmc-fast-ranks-") as folder:
        plan_file = Path(folder) / "plan.json"
        plan_file.write_text(json.dumps({"config": cfg.to_dict(), "todo": [j.to_dict() for j in plan.todo],
                                         "num_done": plan.num_done, "strategy": plan.strategy}))
        returncode = _wait(subprocess.Popen(launcher_command(cfg, str(plan_file)), env=env,
                                            preexec_fn=_die_with_parent(signal.SIGTERM)))
        if returncode != 0:
            raise VmcError(f"{cfg.parallel.world_size} ranks: {_rank_errors(Path(folder), returncode)}; the run "
                           f"stopped; finished videos are in {out}/manifest.jsonl; rerun the same command to resume")


def _die_with_parent(sig: int) -> Callable[[], None] | None:
    """A preexec function that has the kernel send `sig` to the child when its parent dies (Linux
    PR_SET_PDEATHSIG), so that killing `vmc-fast train`, even with SIGKILL, stops its ranks; None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None

    def preexec() -> None:
        _set_parent_death_signal(sig)
    return preexec


def _set_parent_death_signal(sig: int) -> None:
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig)


def launcher_command(cfg: RunConfig, plan_file: str) -> list[str]:
    """The command that starts this machine's ranks, each running `worker` on `plan_file`:
    - --hostfile: the DeepSpeed launcher (``deepspeed.launcher.runner``), which starts each host's slots over
      pdsh/ssh (one host: locally, no ssh);
    - --nodes N: torch.distributed.run's static rendezvous at --master-addr:--master-port, --gpus ranks here;
    - one machine: torch.distributed.run with --gpus ranks on a free port."""
    par = cfg.parallel
    if par.hostfile is not None:
        from vmc_fast.config import read_hostfile

        hosts = read_hostfile(par.hostfile)
        command = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(Path(par.hostfile).resolve()),
                   "--master_addr", par.master_addr or "127.0.0.1",
                   "--master_port", str(par.master_port if len(hosts) > 1 else _free_port())]
        if len(hosts) == 1:
            command.append("--no_ssh_check")  # one host: launched here, no ssh involved
        return [*command, "--module", "--no_local_rank", WORKER_COMMAND[1], *WORKER_COMMAND[2:], plan_file]
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={par.num_ranks}"]
    if par.nodes > 1:
        command += [f"--nnodes={par.nodes}", f"--node-rank={par.node_rank}", f"--master-addr={par.master_addr}",
                    f"--master-port={par.master_port}"]
    else:
        command.append(f"--master-port={_free_port()}")
    return [*command, *WORKER_COMMAND, plan_file]


def _wait(process: subprocess.Popen) -> int:
    """The launcher's exit status; on Ctrl-C the ranks are asked to stop (torch.distributed.run passes the
    signal on to them), then killed if they do not, and KeyboardInterrupt goes on up."""
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        raise


def _rank_errors(folder: Path, returncode: int) -> str:
    """What the failed ranks wrote before exiting, or the launcher's status when none did."""
    errors = [f"rank {path.stem.removeprefix('rank')} failed ({path.read_text().strip()})"
              for path in sorted(folder.glob("rank*.error"))]
    return "; ".join(errors) or f"a rank exited with status {returncode} (see its output above)"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker(plan_file: str, make_reporter: Callable[[int], Reporter]) -> None:
    """One launched rank (torch.distributed.run sets RANK, WORLD_SIZE, LOCAL_RANK): its process group, its share
    of the plan. A rank that fails writes its error beside the plan file (the launcher reports it) and exits
    non-zero, and torch.distributed.run stops the others.

    make_reporter(rank) -> the reporter of this rank (the CLI draws on rank 0 only).
    """
    local = Path(plan_file)
    payload = json.loads(local.read_text()) if local.is_file() else None  # on another host: rank 0 sends it
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if device != "cpu":
        torch.cuda.set_device(device)
    backend = "nccl" if device != "cpu" else "gloo"
    timeout = payload["config"]["parallel"]["timeout_s"] if payload else DEFAULT_TIMEOUT_S
    torch.distributed.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    payload = _plan_of_rank_0(payload)
    cfg = RunConfig.from_dict(payload["config"])
    print(f"rank {rank} of {world_size}: {device}, backend {backend}", file=sys.stderr, flush=True)
    if sys.platform.startswith("linux") and "TORCHELASTIC_RUN_ID" in os.environ:  # started by torch.distributed.run
        _set_parent_death_signal(signal.SIGKILL)  # the launcher gone: so is this rank
    try:
        todo = [Job.from_dict(job) for job in payload["todo"]]
        with rank_hold(cfg.out_dir):
            run_rank(cfg, todo, make_reporter(rank), num_done=payload["num_done"], device=device, rank=rank,
                     world_size=world_size, strategy=payload["strategy"])
    except BaseException as exc:
        if not isinstance(exc, KeyboardInterrupt):
            message = str(exc) if isinstance(exc, (VmcError, ValueError)) else _one_line(exc)
            if local.parent.is_dir():  # the launcher on this host reports it
                (local.parent / f"rank{rank}.error").write_text(message + "\n")
        raise
    finally:
        torch.distributed.destroy_process_group()


def _plan_of_rank_0(payload: dict | None) -> dict:
    """Global rank 0's plan on every rank: on several machines each launcher planned on its own, and only node 0's
    plan (the one whose jobs were recorded as pending) counts."""
    shared = [payload]
    torch.distributed.broadcast_object_list(shared, src=0)
    return shared[0]


def _one_line(exc: BaseException) -> str:
    cause = exc.__cause__ or exc
    last = traceback.extract_tb(cause.__traceback__)[-1:] if cause.__traceback__ else []
    where = f" at {Path(last[0].filename).name}:{last[0].lineno}" if last else ""
    return f"{type(cause).__name__}: {cause}{where}"


def run_rank(cfg: RunConfig, todo: list[Job], reporter: Reporter, *, num_done: int, device: str, rank: int,
             world_size: int, strategy: str) -> None:
    """This rank's share of the plan: prepare one session, tune its videos, record each outcome.

    ``videos``: every world_size-th job from `rank` on; ranks never wait for each other (a rank with fewer or
    shorter videos simply exits). ``zero``: every job, all ranks together; rank 0 writes.
    """
    zero = strategy == "zero"
    mine = todo if zero else todo[rank::world_size]
    reporter.run_started(cfg, todo, num_done)  # the whole run: rank 0's display counts every rank's videos
    if not mine:
        return
    manifest = Manifest(Path(cfg.out_dir).expanduser())
    if not zero:
        run_jobs(_session(cfg, device, num_videos=len(mine)), mine, manifest, reporter, tensorboard=cfg.tensorboard)  # each its own
        return
    from vmc_fast.tuning.steps import RankAgreement, ZeroPackStepFactory, ZeroStepFactory

    ranks = RankAgreement()
    session = _session(cfg, device, write_adapters=rank == 0, make_optimizer_step=ZeroStepFactory(cfg, ranks),
                       num_videos=len(mine), make_pack_step=ZeroPackStepFactory(cfg, ranks),
                       agree_pack_size=lambda size: ranks.minimum([size])[0])
    session.rank = rank  # each rank draws its own timesteps and noise: an effective batch of one sample per rank
    run_jobs(AgreeingSession(session, ranks), mine, manifest if rank == 0 else ReadOnlyManifest(manifest),
             reporter, write_metrics=rank == 0, tensorboard=cfg.tensorboard)
    torch.distributed.barrier()  # short: all ranks settled the last video together


class AgreeingSession:
    """A tuning session for ``--strategy zero``: every rank tunes the same video, so they must agree on it.

    Every rank settles (`RankAgreement.settle`) after loading its input, at each step (`DeepSpeedStep`), and at
    the end of the video. A problem on any rank at one of those points fails the video on every rank with the
    same error (rank 0 records it `failed`) and all go on to the next one; `done` is recorded only after the
    final agreement. An exception inside a collective cannot be agreed on (the other ranks wait in it), so it
    raises RankStopped, which stops the run.
    """

    def __init__(self, session, ranks):
        self.session = session
        self.ranks = ranks
        read_input = session.read_input

        def read_input_on_every_rank(video: Path):
            try:
                value = read_input(video)
            except Exception as exc:  # every rank fails this video with the reason (a RanksFailed)
                ranks.settle(str(exc) if isinstance(exc, VmcError) else f"{Path(video).name}: {_one_line(exc)}")
                raise AssertionError("settle() with a problem always raises") from exc  # pragma: no cover
            ranks.settle(None)  # before any collective of the video
            return value

        session.read_input = read_input_on_every_rank  # tune_video calls it first (load_input goes through it)

    @property
    def pack_size(self) -> int:
        return self.session.pack_size

    def tune_pack(self, items: list, *args, **kwargs) -> list:
        """`TuningSession.tune_pack` on every rank: a failure of the whole pass (outside a collective) is agreed
        on like a video's; per-video outcomes already agree (losses are agreed per video, norms are global)."""
        from vmc_fast.tuning.steps import RanksFailed, RankStopped

        try:
            outcomes = self.session.tune_pack(items, *args, **kwargs)
        except RanksFailed:
            raise
        except Exception as exc:
            if self.ranks.broken:
                raise RankStopped(_one_line(exc)) from exc
            self.ranks.settle(str(exc) if isinstance(exc, VmcError) else _one_line(exc))
            raise AssertionError("settle() with a problem always raises")  # pragma: no cover
        self.ranks.settle(None)
        return outcomes

    def prompt_embeddings(self, prompts: list[str]):
        return self.session.prompt_embeddings(prompts)

    def tune_video(self, video: Path, *args, **kwargs):
        from vmc_fast.tuning.steps import RanksFailed, RankStopped

        try:
            done = self.session.tune_video(video, *args, **kwargs)
        except RanksFailed:
            raise  # every rank raised it at the same point
        except Exception as exc:
            if self.ranks.broken:
                raise RankStopped(_one_line(exc)) from exc
            self.ranks.settle(str(exc) if isinstance(exc, VmcError) else f"{video.name}: {_one_line(exc)}")
            raise AssertionError("settle() with a problem always raises")  # pragma: no cover
        self.ranks.settle(None)
        return done
