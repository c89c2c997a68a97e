"""Several ranks on the CPU (gloo): the `videos` split and DeepSpeed ZeRO on one video at a time, the ranks'
agreement on each video's outcome, and ZeRO's gradients against single-rank ones."""

import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import moving_square_frames, write_video

TESTS = Path(__file__).resolve().parent


def _library(tmp_path: Path) -> Path:
    videos = tmp_path / "videos"
    videos.mkdir()
    # a and c are the same clip, under other names: each video draws its own noise (seeded by its name), so their
    # adapters differ; resets between videos are checked by packed-equals-unpacked (a pack per video or not)
    for name, step in (("a", 3), ("b", 2), ("c", 3)):
        write_video(videos / f"{name}.mp4", moving_square_frames(step=step))
    return videos


def _train(tmp_path: Path, *extra: str, gpus: int = 2, env: dict | None = None
           ) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "out"
    env = {**os.environ, "VMC_FAST_CACHE": str(tmp_path / "cache"), **(env or {})}
    command = [sys.executable, "-m", "vmc_fast.cli", "train", "--videos", str(_library(tmp_path)), "--prompt",
               "a square moving", "--out", str(out), "--steps", "3", "--gpus", str(gpus), "--json",
               "--adapter-dtype", "fp32", *extra]  # exact tensors: tests compare them across runs
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=900), out


def _entries(out: Path) -> dict[str, dict]:
    return {Path(e["video"]).name: e for e in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}


@pytest.mark.slow
def test_two_cpu_ranks_split_the_videos(tmp_path):
    result, out = _train(tmp_path, "--strategy", "videos")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "running 2 CPU ranks with gloo" in result.stderr
    entries = _entries(out)
    assert {e["status"] for e in entries.values()} == {"done"} and len(entries) == 3
    a, c = (load_file(out / "adapters" / f"{n}.safetensors") for n in "ac")
    # Rank 0 tuned a and c one after the other: equal clips, but each drew its own noise.
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_on_two_cpu_ranks(stage, tmp_path):
    extra = []
    if stage == 3:  # every parameter partitioned, as the large ones of a real model are
        config = tmp_path / "zero3.json"
        config.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
        extra = ["--deepspeed-config", str(config)]
    result, out = _train(tmp_path, "--strategy", "zero", "--zero-stage", str(stage), *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    entries = _entries(out)
    assert {e["status"] for e in entries.values()} == {"done"}
    a, b, c = (load_file(out / "adapters" / f"{n}.safetensors") for n in "abc")
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the same clip, other draws (seeded by the name)
    assert not all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_zero_stage3_partitions_parameters_and_still_writes_whole_adapters(tmp_path):
    """With the persistence threshold at 0 every parameter is partitioned, as the large ones of a real model are:
    adapters must be gathered whole before writing, and resetting between videos must reach every partition.
    Three ranks: the Q/K/V sizes (32x32, 64x64) do not split evenly, so the last partition is padded."""
    config = tmp_path / "zero3.json"
    config.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    result, out = _train(tmp_path, "--strategy", "zero", "--zero-stage", "3", "--deepspeed-config", str(config),
                         gpus=3)
    assert result.returncode == 0, result.stderr[-3000:]
    assert {e["status"] for e in _entries(out).values()} == {"done"}
    a, b, c = (load_file(out / "adapters" / f"{n}.safetensors") for n in "abc")
    from vmc_fast.models import load_backbone

    base = dict(load_backbone("tiny-random").unet.named_parameters())
    assert all(a[k].shape == base[k].shape for k in a)  # not the empty local partitions
    assert not all(torch.equal(a[k], base[k].detach()) for k in a)  # tuned
    assert not all(torch.equal(a[k], b[k]) for k in a)


def _adapters(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {n: load_file(out / "adapters" / f"{n}.safetensors") for n in "abc"}


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_packs_equal_zero_one_at_a_time_on_two_ranks(stage, tmp_path):
    """Two ranks hold the same pack, each drawing its own noise per video; DeepSpeed averages, ZeRO shards the
    packed adapters, each video is clipped by its own norm: the adapters equal those of ZeRO one video at a time
    (3 videos in packs of 2: a full pack, then a partial one, after the engine was reset)."""
    extra = ["--strategy", "zero", "--zero-stage", str(stage), "--grad-clip", "0.01"]
    if stage == 3:
        config = tmp_path / "zero3.json"
        config.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
        extra += ["--deepspeed-config", str(config)]
    runs = {}
    for pack in ("1", "2"):
        folder = tmp_path / f"pack{pack}"
        folder.mkdir()
        result, out = _train(folder, *extra, "--pack", pack)
        assert result.returncode == 0, result.stderr[-3000:]
        assert {e["status"] for e in _entries(out).values()} == {"done"}
        runs[pack] = _adapters(out)
    for name in "abc":  # one adapter per video, whole, equal to one at a time
        assert _max_difference(runs["2"][name], runs["1"][name]) < 1e-5, name
    assert _max_difference(runs["2"]["a"], runs["2"]["b"]) > 1e-4


@pytest.mark.slow
def test_a_zero_pack_on_one_rank_equals_plain_training(tmp_path):
    """One rank: ZeRO-2 with a pack of 3 draws exactly what plain training (no DeepSpeed, one video at a
    time) draws, so their adapters agree."""
    runs = {}
    for name, extra in (("zero", ["--strategy", "zero", "--pack", "3"]), ("plain", [])):
        folder = tmp_path / name
        folder.mkdir()
        result, out = _train(folder, "--grad-clip", "0.01", *extra, gpus=1)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = _adapters(out)
    for name in "abc":
        assert _max_difference(runs["zero"][name], runs["plain"][name]) < 1e-5, name


def test_zero_strategy_refuses_8bit_adam_before_starting_ranks(tmp_path):
    result, out = _train(tmp_path, "--strategy", "zero", "--optimizer", "adamw8bit")
    assert result.returncode != 0
    assert "--optimizer adamw8bit does not combine with the zero strategy" in result.stdout + result.stderr
    assert not out.exists()


# --------------------------------------------------------------------------------------------- agreement (F1)


class _GradBomb(torch.autograd.Function):
    """Identity forward, infinite gradient backward: a finite loss whose gradient overflows."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("inf"))


class _FakeEngine:
    """What DeepSpeedStep uses of a DeepSpeed engine, data parallel in plain torch: backward averages the
    gradients over ranks (a collective), step applies SGD."""

    def __init__(self, params, fail_backward: bool = False, overflow: bool = False):
        self.params, self.fail_backward, self.overflow = params, fail_backward, overflow
        self.optimizer = torch.optim.SGD(params, lr=0.1)

    def backward(self, loss):
        if self.fail_backward:
            raise RuntimeError("injected failure inside backward")
        loss.backward()
        for p in self.params:
            torch.distributed.all_reduce(p.grad)
            p.grad /= torch.distributed.get_world_size()

    def step(self):
        if not self.overflow:  # ZeRO 1-3 skip the update on a non-finite global norm
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def get_global_grad_norm(self):
        return float("inf") if self.overflow else 1.0

    def was_step_applied(self):
        return not self.overflow


class _FakeZeroSession:
    """A session whose videos are 3 steps of a DeepSpeedStep over a fake engine; `fault` (rank, video, what)
    injects one problem: load (the input cannot be read), loss (nan at step 2), grad (inf gradient at step 2,
    stage 0), overflow (ZeRO 1-3 report a skipped update at step 2), collective (an exception inside backward at
    step 2)."""

    def __init__(self, rank: int, ranks, fault: tuple[int, str, str] | None):
        from vmc_fast.tuning.steps import DeepSpeedStep

        self.rank, self.ranks, self.fault = rank, ranks, fault
        self.weight = torch.nn.Parameter(torch.ones(4))
        self.step = DeepSpeedStep.__new__(DeepSpeedStep)  # its real __call__, a fake engine
        stage = 2 if fault is not None and fault[2] == "overflow" else 0
        self.step.params, self.step.stage, self.step.ranks, self.step.step_index = [self.weight], stage, ranks, 0

    def _faulty(self, video: Path, what: str) -> bool:
        return self.fault is not None and self.fault == (self.rank, video.name, what)

    def prompt_embeddings(self, prompts):
        return {p: torch.zeros(1) for p in prompts}

    def read_input(self, video: Path):
        """As TuningSession.read_input: (input, what was taken); tune_video reads its input through it first."""
        if self._faulty(video, "load"):
            from vmc_fast.errors import VmcError

            raise VmcError(f"video {video}: cannot be decoded")
        return torch.ones(4), None

    def tune_video(self, video, prompt, states, adapter, on_step=None, on_clip=None, *, request_hash=None):
        from vmc_fast.tuning.loop import TuneResult
        from vmc_fast.tuning.session import VideoResult

        x, _ = self.read_input(video)
        self.step.engine = _FakeEngine([self.weight])
        self.step.reset([self.weight])  # as ZeroStepFactory does for every video after the first
        result = TuneResult()
        for index in range(1, 4):
            self.step.engine = _FakeEngine([self.weight], self._faulty(video, "collective") and index == 2,
                                           self._faulty(video, "overflow") and index == 2)
            value = self.weight * x
            if index == 2 and self._faulty(video, "grad"):
                value = _GradBomb.apply(value)
            loss = value.sum() * (float("nan") if index == 2 and self._faulty(video, "loss") else 1.0)
            self.step(loss)
            result.losses.append(float(loss.detach()))
        return VideoResult(adapter=adapter, result=result, peak_memory_bytes=0)


def _agreement_rank(rank: int, world_size: int, init_file: str, out: str, fault) -> None:
    from vmc_fast.runs.launch import AgreeingSession
    from vmc_fast.runs.library import Job, Manifest, QuietReporter, ReadOnlyManifest, run_jobs
    from vmc_fast.tuning.steps import RankAgreement

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=world_size, timeout=datetime.timedelta(seconds=60))
    counted = torch.distributed.all_reduce
    calls = []

    def all_reduce(*args, **kwargs):
        calls.append(1)
        return counted(*args, **kwargs)

    torch.distributed.all_reduce = all_reduce
    ranks = RankAgreement()
    manifest = Manifest(Path(out)) if rank == 0 else ReadOnlyManifest(Manifest(Path(out)))
    jobs = [Job(video=Path(out) / v, prompt="a square", adapter=Path(out) / f"{v}.safetensors") for v in ("a", "b")]
    try:
        run_jobs(AgreeingSession(_FakeZeroSession(rank, ranks, fault), ranks), jobs, manifest, QuietReporter())
    finally:
        (Path(out) / f"calls{rank}").write_text(str(len(calls)))
    torch.distributed.barrier()  # as run_rank ends under zero: no rank tears down while another still talks
    torch.distributed.destroy_process_group()


def _run_agreement(tmp_path: Path, fault) -> dict[str, dict]:
    import torch.multiprocessing as mp

    out = tmp_path / "out"
    out.mkdir()
    mp.spawn(_agreement_rank, args=(2, str(tmp_path / "init"), str(out), fault), nprocs=2, join=True)
    return {Path(e["video"]).name: e for e in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}


@pytest.mark.parametrize("fault, error", [
    ((1, "a", "load"), "rank 1: video "),
    ((0, "a", "loss"), "rank 0: the loss became nan at step 2"),
    ((1, "a", "grad"), "ranks 0, 1: the gradient norm became inf at step 2"),  # averaged: every rank sees it
    ((1, "a", "overflow"), "rank 1: the gradient norm became inf at step 2; the update was not applied"),
])
def test_zero_ranks_fail_a_video_together_and_go_on(fault, error, tmp_path):
    start = time.monotonic()
    entries = _run_agreement(tmp_path, fault)
    assert entries["a"]["status"] == "failed" and entries["a"]["error"].startswith(error), entries["a"]
    assert entries["b"]["status"] == "done"  # both ranks moved on to b together
    calls = {(tmp_path / "out" / f"calls{r}").read_text() for r in (0, 1)}
    assert len(calls) == 1, calls  # the same collectives on every rank: none was skipped
    assert time.monotonic() - start < 60  # no rank waited out a timeout


def test_a_failure_inside_a_collective_stops_the_run(tmp_path, capfd):
    import torch.multiprocessing as mp

    start = time.monotonic()
    with pytest.raises(mp.ProcessExitedException):  # RankStopped is a BaseException: the process just exits
        _run_agreement(tmp_path, (1, "a", "collective"))
    assert "RankStopped: RuntimeError: injected failure inside backward" in capfd.readouterr().err
    assert time.monotonic() - start < 60
    entries = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert {e["status"] for e in entries} == {"pending"}  # never recorded done, never moved on to b


INJECTION = """
import os
if os.environ.get("RANK") == "1":
    from vmc_fast.errors import VmcError
    from vmc_fast.tuning import session

    read_input = session.TuningSession.read_input  # what tune_video reads its clip with

    def failing_read_input(self, video):
        if video.name == "a.mp4":
            raise VmcError(f"video {video}: injected failure on rank 1")
        return read_input(self, video)

    session.TuningSession.read_input = failing_read_input
"""


@pytest.mark.slow
def test_zero_cli_fails_a_video_that_one_rank_cannot_load(tmp_path):
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(INJECTION)
    result, out = _train(tmp_path, "--strategy", "zero", "--zero-stage", "2",
                         env={"PYTHONPATH": os.pathsep.join([str(inject), os.environ.get("PYTHONPATH", "")])})
    assert result.returncode == 1, result.stderr[-3000:]
    entries = _entries(out)
    assert entries["a.mp4"]["status"] == "failed" and "rank 1: video" in entries["a.mp4"]["error"]
    assert "injected failure on rank 1" in entries["a.mp4"]["error"]
    assert entries["b.mp4"]["status"] == entries["c.mp4"]["status"] == "done"
    assert not (out / "adapters" / "a.safetensors").exists()


# --------------------------------------------------------------------------------------------- timeout (F3)


@pytest.mark.slow
def test_an_idle_rank_does_not_wait_for_the_busy_one(tmp_path):
    """One video on two ranks: rank 1 has nothing to do and must not sit in a barrier for the whole video (it
    would time out after --dist-timeout seconds)."""
    videos = tmp_path / "one"
    videos.mkdir()
    write_video(videos / "a.mp4", moving_square_frames())
    env = {**os.environ, "VMC_FAST_CACHE": str(tmp_path / "cache")}
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "vmc_fast.cli", "train", "--videos", str(videos), "--prompt",
                             "a square", "--out", str(tmp_path / "out"), "--steps", "40", "--gpus", "2",
                             "--strategy", "videos", "--dist-timeout", "8"],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert time.monotonic() - start > 8 + 5  # the video outlasted the timeout (else this test proves nothing)


def test_worker_gives_the_process_group_the_configured_timeout(tmp_path, monkeypatch):
    from vmc_fast.config import ParallelConfig, RunConfig
    from vmc_fast.runs import launch

    seen = {}
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, **kw: seen.update(kw))
    monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda: None)
    monkeypatch.setattr(torch.distributed, "broadcast_object_list", lambda objects, src: None)  # rank 0's plan
    monkeypatch.setattr(torch.distributed, "barrier", lambda: pytest.fail("the videos strategy waits for no rank"))
    monkeypatch.setattr(launch, "_session", lambda *a, **k: pytest.fail("rank 1 has no video"))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = RunConfig(parallel=ParallelConfig(num_ranks=2, timeout_s=123), out_dir=str(tmp_path / "out"))
    plan_file = tmp_path / "plan.json"
    job = {"video": str(tmp_path / "a.mp4"), "prompt": "p", "adapter": str(tmp_path / "a.safetensors")}
    plan_file.write_text(json.dumps({"config": cfg.to_dict(), "todo": [job], "num_done": 0,
                                     "strategy": "videos"}))
    launch.worker(str(plan_file), lambda rank: __import__("vmc_fast.runs.library").runs.library.QuietReporter())
    assert seen["timeout"] == datetime.timedelta(seconds=123)


# --------------------------------------------------------------------------------------------- gradients (F4)


@pytest.fixture(scope="module")
def zero_gradients(tmp_path_factory):
    """Each ZeRO stage's gradients and the single-rank reference, from one launch of 2 gloo ranks."""
    folder = tmp_path_factory.mktemp("zero_gradients")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                             f"--master-port={_free_port()}", str(TESTS / "zero_gradients.py"), str(folder)],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return {int(path.stem.removeprefix("stage")): torch.load(path) for path in folder.glob("stage*.pt")}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_gradient_is_the_rank_average(stage, zero_gradients):
    found = zero_gradients[stage]
    assert set(found["zero"]) == set(found["reference"]) and found["zero"]
    for name, grad in found["zero"].items():
        torch.testing.assert_close(grad, found["reference"][name], atol=1e-6, rtol=1e-5, msg=name)
        assert not torch.allclose(grad, found["rank0_alone"][name], atol=1e-4)  # the average, not rank 0's own


# --------------------------------------------------------------------------------------------- past one machine


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["videos", "zero"])
def test_two_nodes_on_localhost(strategy, tmp_path):
    """Two launchers with --nodes 2 (one CPU rank each) meet at torchrun's rendezvous and share the videos
    (videos) or every video (zero), as two ranks of one machine would; node 0 alone records the plan."""
    videos, out, port = _library(tmp_path), tmp_path / "out", _free_port()
    env = {**os.environ, "VMC_FAST_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "vmc_fast.cli", "train", "--videos", str(videos), "--prompt", "a square moving",
            "--out", str(out), "--steps", "2", "--nodes", "2", "--master-addr", "127.0.0.1", "--master-port",
            str(port), "--strategy", strategy, "--json"]
    nodes = [subprocess.Popen([*base, "--node-rank", str(r)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env, cwd=tmp_path) for r in (0, 1)]
    outputs = [node.communicate(timeout=900) for node in nodes]
    for node, (stdout, stderr) in zip(nodes, outputs):
        assert node.returncode == 0, stderr[-3000:]
    assert "rank 1 of 2" in outputs[0][1] + outputs[1][1]
    entries = _entries(out)
    assert {e["status"] for e in entries.values()} == {"done"} and len(entries) == 3


@pytest.mark.slow
def test_a_one_host_hostfile_runs_through_the_deepspeed_launcher(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# one machine\nlocalhost slots=2\n")
    result, out = _train(tmp_path, "--hostfile", str(hostfile), "--strategy", "videos", gpus=1)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 1 of 2" in result.stderr
    assert {e["status"] for e in _entries(out).values()} == {"done"}


@pytest.mark.parametrize("text, error", [
    ("", "names no host"),
    ("worker-1 slots=two\n", "line 1: 'worker-1 slots=two' is not 'HOST slots=N'"),
    ("worker-1\n", "is not 'HOST slots=N'"),
    ("a slots=1\n# b\n\na slots=2\n", "line 4: a is listed twice"),
    ("a slots=0\n", "line 1: a has slots=0"),
])
def test_a_bad_hostfile_is_named_with_its_line(text, error, tmp_path):
    from vmc_fast.config import ParallelConfig

    hostfile = tmp_path / "hostfile"
    hostfile.write_text(text)
    with pytest.raises(ValueError, match="--hostfile") as caught:
        ParallelConfig(hostfile=str(hostfile))
    assert error in str(caught.value)


def test_hostfile_slots_make_the_world(tmp_path):
    from vmc_fast.config import ParallelConfig, RunConfig
    from vmc_fast.runs.launch import launcher_command

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("worker-0 slots=8  # first\nworker-1 slots=4\n")
    with pytest.raises(ValueError, match="--master-addr"):
        ParallelConfig(hostfile=str(hostfile))
    parallel = ParallelConfig(hostfile=str(hostfile), master_addr="worker-0", master_port=29600)
    assert parallel.world_size == 12
    command = launcher_command(RunConfig(parallel=parallel), "plan.json")
    assert command[1:3] == ["-m", "deepspeed.launcher.runner"] and "--no_ssh_check" not in command
    assert command[command.index("--master_port") + 1] == "29600" and command[-3:] == ["vmc_fast.cli", "rank",
                                                                                        "plan.json"]


@pytest.mark.parametrize("options, error", [
    ({"nodes": 2}, "--master-addr"),
    ({"nodes": 2, "node_rank": 2, "master_addr": "n0"}, "--node-rank"),
    ({"master_port": 70000}, "--master-port"),
])
def test_node_options_are_checked(options, error):
    from vmc_fast.config import ParallelConfig

    with pytest.raises(ValueError, match=error):
        ParallelConfig(**options)


def test_nodes_launch_through_torchrun_rendezvous():
    from vmc_fast.config import ParallelConfig, RunConfig
    from vmc_fast.runs.launch import launcher_command

    cfg = RunConfig(parallel=ParallelConfig(num_ranks=8, nodes=4, node_rank=3, master_addr="n0", master_port=29400))
    command = launcher_command(cfg, "plan.json")
    assert cfg.parallel.world_size == 32
    assert {"--nproc-per-node=8", "--nnodes=4", "--node-rank=3", "--master-addr=n0", "--master-port=29400"} \
        <= set(command)


@pytest.mark.slow
def test_videos_strategy_packs_each_ranks_own_videos(tmp_path):
    """--strategy videos with --pack 2 on 2 ranks: rank 0 packs a and c, rank 1 tunes b; every adapter equals the
    one plain training tunes one at a time in one process (draws follow the video, not the rank or the pack)."""
    runs = {}
    for name, extra, gpus in (("packed", ["--strategy", "videos", "--pack", "2"], 2), ("plain", [], 1)):
        folder = tmp_path / name
        folder.mkdir()
        result, out = _train(folder, "--grad-clip", "0.01", *extra, gpus=gpus)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = _adapters(out)
    for name in "abc":
        assert _max_difference(runs["packed"][name], runs["plain"][name]) < 1e-5, name
