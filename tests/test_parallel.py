"""Several ranks on the CPU (gloo): the `videos` split and DeepSpeed ZeRO on one video at a time."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import moving_square_frames, write_video


def _library(tmp_path: Path) -> Path:
    videos = tmp_path / "videos"
    videos.mkdir()
    for name, step in (("a", 3), ("b", 2), ("c", 3)):  # a and c are the same clip
        write_video(videos / f"{name}.mp4", moving_square_frames(step=step))
    return videos


def _train(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "out"
    env = {**os.environ, "VMC_FAST_CACHE": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "vmc_fast.cli", "train", "--videos", str(_library(tmp_path)), "--prompt",
               "a square moving", "--out", str(out), "--steps", "3", "--gpus", "2", "--json", *extra]
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
    # Rank 0 tuned a and c one after the other: equal clips, equal adapters (the session resets between videos).
    assert all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.slow
def test_zero_stage2_on_two_cpu_ranks(tmp_path):
    result, out = _train(tmp_path, "--strategy", "zero", "--zero-stage", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    entries = _entries(out)
    assert {e["status"] for e in entries.values()} == {"done"}
    a, b, c = (load_file(out / "adapters" / f"{n}.safetensors") for n in "abc")
    # The engine is built once; before c its master weights and Adam moments were reset, so c repeats a exactly.
    assert all(torch.equal(a[k], c[k]) for k in a)
    assert not all(torch.equal(a[k], b[k]) for k in a)
