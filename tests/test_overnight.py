"""An overnight library (issue 13 items 4 and 5): a run that survives a kill, refuses a second run on its folder,
never rewrites a finished adapter, shows its progress; and adapters stored as bf16 changes from the base."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import moving_square_frames, write_video
from vmc_fast.config import DataConfig, RunConfig, TrainConfig
from vmc_fast.errors import VmcError
from vmc_fast.models import load_backbone
from vmc_fast.tuning.adapters import apply_adapter, base_fingerprint, base_reference, read_adapter, save_adapter
from vmc_fast.tuning.session import TuningSession
from vmc_fast.tuning.surgery import temporal_qkv_parameters

PROMPT = "a square moving right"


# --------------------------------------------------------------------------------------------- bf16 delta adapters


def _tuned(unet, scale: float = 1e-3, seed: int = 0) -> tuple[dict, dict]:
    """(base values, tuned values) of `unet`'s temporal Q/K/V: the base plus a small random change, fp32."""
    generator = torch.Generator().manual_seed(seed)
    base = {n: p.detach().float().clone() for n, p in temporal_qkv_parameters(unet)}
    return base, {n: v + scale * torch.randn(v.shape, generator=generator) for n, v in base.items()}


def _save(unet, path, tuned, base_values, dtype: str, **extra):
    names = set(tuned)
    return save_adapter(path, tuned, base_model="tiny-random", fingerprint=base_fingerprint(unet, names),
                        base=base_reference(unet, names), prompt="p", steps=1, final_loss=0.0, loss="cos",
                        num_frames=8, height=32, width=32, base_tensors=base_values, dtype=dtype, extra=extra)


def _finished_adapters(out: Path) -> list[Path]:
    """Adapter files in place; a temporary one being written (``.NAME.*.tmp.safetensors``) is not one yet."""
    return [p for p in (out / "adapters").glob("*.safetensors") if not p.name.startswith(".")]


@pytest.mark.parametrize("model_id", ["tiny-random", "show1-tiny-random"])
def test_a_bf16_delta_adapter_applies_within_its_recorded_error(tmp_path, model_id):
    unet = load_backbone(model_id).unet
    base, tuned = _tuned(unet)
    path = _save(unet, tmp_path / "d.safetensors", tuned, base, "bf16")
    stored, info = read_adapter(path)
    assert info.storage == "delta" and set(stored) == set(tuned) <= set(unet.state_dict())  # the base's own names
    assert all(t.dtype == torch.bfloat16 for t in stored.values())
    error = info.reconstruction
    largest_change = max((tuned[n] - base[n]).abs().max().item() for n in tuned)
    assert 0 < error["relative_error"] < 2 ** -8 and 0 < error["max_abs_error"] < 2 ** -8 * largest_change

    apply_adapter(unet, path)
    params = dict(unet.named_parameters())
    worst = max((params[n].detach() - tuned[n]).abs().max().item() for n in tuned)
    lost = sum((params[n].detach().double() - tuned[n].double()).square().sum().item() for n in tuned)
    change = sum((tuned[n].double() - base[n].double()).square().sum().item() for n in tuned)
    assert worst <= error["max_abs_error"] and worst > 0  # the error recorded is the error loaded
    assert (lost / change) ** 0.5 == pytest.approx(error["relative_error"], rel=1e-6)

    # Half the bytes of the exact fp32 tensors.
    full = _save(unet, tmp_path / "f.safetensors", tuned, base, "fp32")
    tensor_bytes = lambda p: sum(t.numel() * t.element_size() for t in load_file(p).values())  # noqa: E731
    assert tensor_bytes(path) * 2 == tensor_bytes(full)
    assert read_adapter(full)[1].storage == "full" and read_adapter(full)[1].reconstruction == {}


def test_applying_delta_adapters_one_after_another_gives_the_last_one(tmp_path):
    unet = load_backbone("tiny-random").unet
    base, first = _tuned(unet, seed=1)
    _, second = _tuned(unet, seed=2)
    a = _save(unet, tmp_path / "a.safetensors", first, base, "bf16")
    b = _save(unet, tmp_path / "b.safetensors", second, base, "bf16")
    full = _save(unet, tmp_path / "f.safetensors", first, base, "fp32")
    apply_adapter(unet, a)
    apply_adapter(unet, full)
    apply_adapter(unet, b)  # added to the base values, not to what a or the full adapter left
    fresh = load_backbone("tiny-random").unet
    apply_adapter(fresh, b)
    assert all(torch.equal(p, dict(fresh.named_parameters())[n]) for n, p in unet.named_parameters())


def test_a_bf16_delta_adapter_refuses_another_base(tmp_path):
    unet = load_backbone("tiny-random").unet
    base, tuned = _tuned(unet)
    path = _save(unet, tmp_path / "d.safetensors", tuned, base, "bf16")
    other = load_backbone("tiny-random").unet
    with torch.no_grad():
        next(p for n, p in other.named_parameters() if n not in tuned).mul_(1.5)  # a frozen weight differs
    with pytest.raises(VmcError, match="not this one"):
        apply_adapter(other, path)
    moved = load_backbone("tiny-random").unet
    with torch.no_grad():
        for _, p in temporal_qkv_parameters(moved):
            p.add_(0.1)  # the tuned tensors' own base values differ: a delta would land elsewhere
    with pytest.raises(VmcError, match="base values of its tuned tensors differ"):
        apply_adapter(moved, path)


def test_an_adapter_of_the_previous_format_still_loads(tmp_path):
    """Full fp32 tensors and no storage marker, as adapters were written before 2026-12."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    unet = load_backbone("tiny-random").unet
    base, tuned = _tuned(unet)
    path = _save(unet, tmp_path / "new.safetensors", tuned, base, "fp32")
    with safe_open(str(path), framework="pt") as handle:
        metadata = {k: v for k, v in handle.metadata().items() if k != "storage"}
    old = tmp_path / "old.safetensors"
    save_file(load_file(path), old, metadata)
    info = apply_adapter(unet, old)
    assert info.storage == "full"
    params = dict(unet.named_parameters())
    assert all(torch.equal(params[n], tuned[n]) for n in tuned)


def test_training_writes_bf16_deltas_by_default_and_fp32_by_option(square_video, tmp_path):
    adapters = {}
    for dtype in ("bf16", "fp32"):
        cfg = RunConfig(data=DataConfig(videos=str(square_video)), train=TrainConfig(steps=2, learning_rate=1e-2),
                        prompt=PROMPT, out_dir=str(tmp_path / dtype), cache_dir=str(tmp_path / "c"),
                        **({} if dtype == "bf16" else {"adapter_dtype": "fp32"}))
        session = TuningSession(cfg)
        done = session.tune_video(square_video, PROMPT, session.prompt_embeddings([PROMPT])[PROMPT],
                                  tmp_path / f"{dtype}.safetensors")
        adapters[dtype] = done.adapter
    exact, _ = read_adapter(adapters["fp32"])
    info = read_adapter(adapters["bf16"])[1]
    assert info.storage == "delta" and info.reconstruction["relative_error"] < 2 ** -8
    unet = load_backbone("tiny-random").unet
    apply_adapter(unet, adapters["bf16"])
    params = dict(unet.named_parameters())
    assert max((params[n] - exact[n]).abs().max().item() for n in exact) <= info.reconstruction["max_abs_error"]


def test_an_adapter_written_for_the_same_request_is_never_rewritten(tmp_path):
    unet = load_backbone("tiny-random").unet
    base, tuned = _tuned(unet)
    path = _save(unet, tmp_path / "a.safetensors", tuned, base, "bf16", request_hash="abc")
    before = path.stat()
    _save(unet, path, _tuned(unet, seed=5)[1], base, "bf16", request_hash="abc")
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    _save(unet, path, tuned, base, "bf16", request_hash="other")  # another request (--retune) replaces it
    assert path.stat().st_ino != before.st_ino


# --------------------------------------------------------------------------------------------- killed runs

from typer.testing import CliRunner  # noqa: E402

from vmc_fast.cli import app  # noqa: E402
from vmc_fast.io.files import atomic_path, held_lock, remove_stale_temporaries  # noqa: E402
from vmc_fast.runs.library import RUN_LOCK, RunProgress  # noqa: E402

runner = CliRunner()


def _videos(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True)
    for index in range(count):
        write_video(folder / f"clip{index}.mp4", moving_square_frames(step=2 + index))
    return folder


def _leftovers(*folders: Path) -> list[Path]:
    """Temporary and lock files under `folders`: what a finished run must not leave."""
    return [p for folder in folders for p in folder.rglob("*")
            if p.is_file() and (".tmp" in p.name or p.name.endswith(".lock") or p.name.startswith(".probe"))]


def _entries(out: Path) -> dict[str, dict]:
    return {Path(e["video"]).name: e for e in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}


def test_sigkill_mid_run_then_a_rerun_finishes_rewrites_nothing_and_leaves_no_temporary_files(tmp_path):
    videos, out, cache = _videos(tmp_path / "videos", 4), tmp_path / "out", tmp_path / "cache"
    args = ["train", "--videos", str(videos), "--prompt", PROMPT, "--out", str(out), "--steps", "4", "--cache-dir",
            str(cache)]
    env = {**os.environ, "VMC_FAST_CACHE": str(cache)}
    process = subprocess.Popen([sys.executable, "-m", "vmc_fast.cli", *args], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, cwd=tmp_path)  # not the repository's root
    try:
        deadline = time.monotonic() + 600
        while not list(_finished_adapters(out)) and process.poll() is None:
            assert time.monotonic() < deadline, "no adapter within 10 minutes"
            time.sleep(0.05)
        assert process.poll() is None, process.stderr.read()[-3000:]
        # While it runs, a second run on the same folder is refused, and writes nothing.
        manifest = (out / "manifest.jsonl").read_bytes()
        second = runner.invoke(app, args)
        assert second.exit_code == 2 and "another vmc-fast train is running on it (pid " in second.output, \
            second.output
        assert (out / "manifest.jsonl").read_bytes() == manifest or process.poll() is None
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    finished = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in _finished_adapters(out)}
    assert 1 <= len(finished) < 4
    # What a kill mid-write leaves: temporary files nobody holds (here planted, as a kill can leave them).
    stale = [out / "adapters" / ".clip3.k1ll3d00.tmp.safetensors", cache / "prompt-embeddings" / ".x.k1ll3d00.tmp"]
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")

    rerun = runner.invoke(app, args)
    assert rerun.exit_code == 0, rerun.output
    assert "already done" in rerun.output
    entries = _entries(out)
    assert sorted(e["status"] for e in entries.values()) == ["done"] * 4
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in _finished_adapters(out)}
    assert len(after) == 4 and all(after[name] == stamp for name, stamp in finished.items())  # never rewritten
    assert _leftovers(out, cache) == []


def test_an_adapter_written_but_not_recorded_is_recorded_from_its_metadata(tmp_path):
    """A run killed between renaming an adapter into place and recording it `done`."""
    videos, out = _videos(tmp_path / "videos", 2), tmp_path / "out"
    args = ["train", "--videos", str(videos), "--prompt", PROMPT, "--out", str(out), "--steps", "1"]
    assert runner.invoke(app, args).exit_code == 0
    lines = (out / "manifest.jsonl").read_text().splitlines()
    killed = [json.loads(line) for line in lines]
    adapter = Path(killed[0]["adapter"])
    stamp = (adapter.stat().st_ino, adapter.stat().st_mtime_ns)
    killed[0] = {k: v for k, v in killed[0].items() if k not in ("adapter", "final_loss", "seconds")}
    killed[0]["status"] = "pending"
    (out / "manifest.jsonl").write_text("".join(json.dumps(e) + "\n" for e in killed))
    rerun = runner.invoke(app, args)
    assert rerun.exit_code == 0, rerun.output
    entry = _entries(out)[Path(killed[0]["video"]).name]
    assert entry["status"] == "done" and entry["recovered"] and entry["adapter"] == str(adapter.resolve())
    assert entry["final_loss"] == read_adapter(adapter)[1].final_loss
    assert (adapter.stat().st_ino, adapter.stat().st_mtime_ns) == stamp
    assert _leftovers(out) == []


def test_a_second_run_on_the_folder_is_refused_but_a_dead_runs_lock_file_is_not(tmp_path):
    videos, out = _videos(tmp_path / "videos", 1), tmp_path / "out"
    args = ["train", "--videos", str(videos), "--prompt", PROMPT, "--out", str(out), "--steps", "1"]
    out.mkdir()
    with held_lock(out / RUN_LOCK):  # a live run
        refused = runner.invoke(app, args)
    assert refused.exit_code == 2 and f"--out {out}: another vmc-fast train is running on it (pid {os.getpid()} on" \
        in refused.output and "choose another --out" in refused.output
    assert not (out / "manifest.jsonl").exists() and not (out / "config.json").exists()
    (out / RUN_LOCK).write_text("pid 99999999 on elsewhere since 2026-12-01T00:00:00+00:00\n")  # a killed run's
    done = runner.invoke(app, args)
    assert done.exit_code == 0, done.output
    assert _leftovers(out) == []


def test_only_temporary_files_nobody_writes_are_removed(tmp_path):
    stale = tmp_path / "a" / ".clip.abcd1234.tmp.safetensors"
    stale.parent.mkdir()
    stale.write_bytes(b"x")
    keep = [tmp_path / "a" / "clip.safetensors", tmp_path / ".notours.tmp", tmp_path / "a" / "x.tmp.safetensors"]
    for path in keep:
        path.write_bytes(b"x")
    with atomic_path(tmp_path / "a" / "being_written.safetensors") as live:
        Path(live).write_bytes(b"y")
        assert remove_stale_temporaries(tmp_path) == [stale]
        assert Path(live).is_file()  # its writer holds it
    assert all(path.is_file() for path in keep) and not stale.exists()


def test_run_progress_counts_every_video_of_the_run_from_the_manifest(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    lines = [{"video": "/v/a", "status": "done"}, {"video": "/v/b", "status": "failed", "error": "bad"},
             {"video": "/v/c", "status": "pending"}, {"video": "/v/other", "status": "done"}]
    (out / "manifest.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    progress = RunProgress(out, ["/v/a", "/v/b", "/v/c"], num_before=2, started=100.0).poll()
    assert (progress.done, progress.failed, progress.total, progress.finished_now) == (3, 1, 5, 2)
    assert progress.per_hour(now=100.0 + 1800) == pytest.approx(4.0)  # 2 videos in half an hour
    assert progress.eta_seconds(now=100.0 + 1800) == pytest.approx(900.0)  # 1 left at 4 an hour
    assert progress.line(now=100.0 + 1800) == "videos 3/5 done, 1 failed, 4.0 videos/hour, ETA 15 min"
    assert RunProgress(out, ["/v/c"]).poll().line().endswith("- videos/hour, ETA -")


def test_train_prints_the_runs_progress_as_plain_lines(tmp_path):
    videos = _videos(tmp_path / "videos", 2)
    result = runner.invoke(app, ["train", "--videos", str(videos), "--prompt", PROMPT, "--out",
                                 str(tmp_path / "out"), "--steps", "1"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for done in (1, 2):
        assert any(line.startswith(f"videos {done}/2 done, ") and " videos/hour, ETA " in line for line in lines), \
            result.output


@pytest.mark.slow
def test_killing_the_launcher_of_two_ranks_stops_them_and_a_rerun_finishes(tmp_path):
    """SIGKILL to `vmc-fast train --gpus 2` (nothing of it runs after): its ranks die with it, the folder is free
    for the rerun, which finishes the rest without rewriting what was finished."""
    import psutil

    from vmc_fast.io.files import LockHeld
    from vmc_fast.runs.library import RANKS_LOCK

    videos, out, cache = _videos(tmp_path / "videos", 4), tmp_path / "out", tmp_path / "cache"
    args = ["train", "--videos", str(videos), "--prompt", PROMPT, "--out", str(out), "--steps", "4", "--gpus", "2",
            "--strategy", "videos", "--cache-dir", str(cache)]
    env = {**os.environ, "VMC_FAST_CACHE": str(cache)}
    command = [sys.executable, "-m", "vmc_fast.cli", *args]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 900
        while not list(_finished_adapters(out)) and process.poll() is None:
            assert time.monotonic() < deadline, "no adapter within 15 minutes"
            time.sleep(0.05)
        assert process.poll() is None
        children = psutil.Process(process.pid).children(recursive=True)  # torch.distributed.run and its ranks
        assert len(children) >= 3
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        _, alive = psutil.wait_procs(children, timeout=60)
        assert alive == [], f"{len(alive)} processes outlived the launcher by a minute"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    deadline = time.monotonic() + 120
    while True:  # the ranks hold this lock shared while they live
        try:
            with held_lock(out / RANKS_LOCK, remove=False):
                break
        except LockHeld:
            assert time.monotonic() < deadline, "the ranks outlived their launcher by 2 minutes"
            time.sleep(0.5)
    finished = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in _finished_adapters(out)}
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert sorted(e["status"] for e in _entries(out).values()) == ["done"] * 4
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in _finished_adapters(out)}
    assert all(after[name] == stamp for name, stamp in finished.items())
    assert _leftovers(out, cache) == []
