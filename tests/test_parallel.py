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


def _train(tmp_path: Path, *extra: str, gpus: int = 2) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "out"
    env = {**os.environ, "VMC_FAST_CACHE": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "vmc_fast.cli", "train", "--videos", str(_library(tmp_path)), "--prompt",
               "a square moving", "--out", str(out), "--steps", "3", "--gpus", str(gpus), "--json", *extra]
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
    assert all(torch.equal(a[k], c[k]) for k in a) and not all(torch.equal(a[k], b[k]) for k in a)


def test_zero_strategy_refuses_8bit_adam_before_starting_ranks(tmp_path):
    result, out = _train(tmp_path, "--strategy", "zero", "--optimizer", "adamw8bit")
    assert result.returncode != 0
    assert "--optimizer adamw8bit does not combine with the zero strategy" in result.stdout + result.stderr
    assert not out.exists()
