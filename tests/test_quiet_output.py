"""Quiet by default: other packages' known, harmless warnings and log lines never reach the user; ours do, each
as one ``warning:`` line; a launched rank's stdout never mixes into --json's line."""

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from conftest import moving_square_frames, write_video
from vmc_fast.reporting import KNOWN_NOISE, KNOWN_NOISE_LINES, KNOWN_NOISE_LOGS
from vmc_fast.runs.metrics import metrics_path, read_metrics

NOISE = [pattern for _, pattern in KNOWN_NOISE] + [pattern for _, pattern in KNOWN_NOISE_LOGS] + [
    *KNOWN_NOISE_LINES, r"Setting OMP_NUM_THREADS environment variable", r"kernels-community",
    r"\w+Warning: ",  # Python's own format: a warning that did not go through ours
]


def _noise_in(text: str) -> list[str]:
    return [line for line in text.splitlines() if any(re.search(p, line) for p in NOISE)]


def _run(args: list[str], tmp_path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "VMC_FAST_CACHE": str(tmp_path / "cache")}
    env.pop("DS_ACCELERATOR", None)  # as a user's shell has it: DeepSpeed detects the machine itself
    return subprocess.run([sys.executable, "-m", "vmc_fast.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=tmp_path)


def test_known_noise_is_dropped_where_it_is_made_and_ours_stays(tmp_path):
    """Each known message is produced for real (by the package, through its own logger or warning) after the
    CLI's filters are set: none comes out, while our warning and another message of the same loggers do."""
    script = textwrap.dedent("""
        import logging, sys, warnings
        from rich.console import Console
        from vmc_fast.reporting import NoiseFilteredLines, print_warnings_as_lines
        print_warnings_as_lines(Console(stderr=True))
        import deepspeed  # without DS_ACCELERATOR on a machine without CUDA: "Setting accelerator to CPU"
        from diffusers import TextToVideoSDPipeline, VideoToVideoSDPipeline  # bitsandbytes probes `kernels`
        for cls in (TextToVideoSDPipeline, VideoToVideoSDPipeline):  # their deprecation notices
            cls(vae=None, text_encoder=None, tokenizer=None, unet=None, scheduler=None)
        from transformers import CLIPImageProcessor  # "requires torchvision (not installed)" without it
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use ...", FutureWarning)
        from vmc_fast.errors import VmcWarning
        warnings.warn(VmcWarning("our own warning"))
        logging.getLogger("diffusers.pipelines.pipeline_utils").warning("another diffusers message")
        sys.stdout = NoiseFilteredLines(sys.stderr)
        print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
        print("an ordinary line")
    """)
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _noise_in(result.stdout + result.stderr) == [], result.stdout + result.stderr
    assert "warning: our own warning" in result.stderr
    assert "another diffusers message" in result.stderr and "an ordinary line" in result.stderr


@pytest.mark.parametrize("model, width", [("tiny-random", 48), ("show1-tiny-random", 32)])
def test_train_prints_no_noise_and_our_warnings(model, width, tmp_path):
    # an aspect the model's frames do not have (tiny-random 1:1, Show-1 3:2): our crop warning shows
    video = write_video(tmp_path / "square.mp4", moving_square_frames(height=32, width=width))
    result = _run(["train", "--model", model, "--videos", str(video), "--prompt", "a square moving right",
                   "--out", str(tmp_path / "out"), "--steps", "1", "--json"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _noise_in(result.stderr) == [], result.stderr
    assert re.search(r"^warning: square\.mp4: --resize crop keeps", result.stderr, re.M), result.stderr
    assert json.loads(result.stdout)["ok"]  # stdout is the one JSON line


def test_cpu_ranks_warn_once_as_ours_and_print_no_noise(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("a", "b"):
        write_video(videos / f"{name}.mp4", moving_square_frames())
    result = _run(["train", "--videos", str(videos), "--prompt", "a square moving right", "--gpus", "2",
                   "--strategy", "videos", "--resize", "squash", "--out", str(tmp_path / "out"), "--steps", "1",
                   "--json"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning: --gpus 2: no CUDA device; running 2 CPU ranks with gloo" in result.stderr
    assert _noise_in(result.stderr) == [], result.stderr
    assert json.loads(result.stdout)["counts"] == {"done": 2}
    for name in ("a", "b"):  # each rank wrote the metrics of the video it tuned
        assert [r["step"] for r in read_metrics(metrics_path(tmp_path / "out", name))] == [1]


@pytest.mark.slow
def test_zero_ranks_keep_deepspeed_off_stdout(tmp_path):
    """Under ZeRO on CPU ranks DeepSpeed prints its op loader's lines on stdout; --json's line stays alone, and
    only rank 0 writes the metrics."""
    video = write_video(tmp_path / "square.mp4", moving_square_frames())
    result = _run(["train", "--videos", str(video), "--prompt", "a square moving right", "--gpus", "2",
                   "--strategy", "zero", "--resize", "squash", "--out", str(tmp_path / "out"), "--steps", "2",
                   "--json"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _noise_in(result.stderr) == [], result.stderr
    assert json.loads(result.stdout)["counts"] == {"done": 1}, result.stdout
    rows = read_metrics(metrics_path(tmp_path / "out", "square"))
    assert [r["step"] for r in rows] == [1, 2]  # rank 0 alone writes the metrics of the video all ranks tune
