"""The command line: an end-to-end run in a subprocess, resuming, and one clear error for each bad input."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import moving_square_frames, write_video
from vmc_fast.cli import app

runner = CliRunner()


def _adapters(out: Path) -> list[Path]:
    return sorted((out / "adapters").glob("*.safetensors")) if (out / "adapters").is_dir() else []


def test_train_end_to_end_in_a_subprocess(square_video, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "VMC_FAST_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(
        [sys.executable, "-m", "vmc_fast.cli", "train", "--videos", str(square_video), "--prompt",
         "a square moving right", "--out", str(out), "--steps", "2", "--json"],
        capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["ok"] and summary["counts"] == {"done": 1}
    [entry] = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert entry["status"] == "done" and Path(entry["adapter"]).is_file() and entry["steps"] == 2
    assert json.loads((out / "config.json").read_text())["train"]["steps"] == 2
    assert "ETA" in result.stderr and "loss" in result.stderr  # the progress display went to stderr


def test_library_run_survives_a_bad_video_and_resumes(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "good.mp4", moving_square_frames())
    (videos / "good.txt").write_text("a square moving right")
    (videos / "broken.mp4").write_text("not a video")
    (videos / "broken.txt").write_text("a square moving right")
    write_video(videos / "noprompt.mp4", moving_square_frames())
    out = tmp_path / "out"
    args = ["train", "--videos", str(videos), "--out", str(out), "--steps", "1"]
    first = runner.invoke(app, args)
    assert first.exit_code == 1, first.output
    entries = {Path(e["video"]).name: e for e in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}
    assert entries["good.mp4"]["status"] == "done"
    assert entries["broken.mp4"]["status"] == "failed" and "cannot be decoded" in entries["broken.mp4"]["error"]
    assert entries["noprompt.mp4"]["status"] == "failed" and "no prompt" in entries["noprompt.mp4"]["error"]
    assert [p.name for p in _adapters(out)] == ["good.safetensors"]

    good_adapter = out / "adapters" / "good.safetensors"
    stamp = good_adapter.stat().st_mtime_ns
    (videos / "noprompt.txt").write_text("a square moving right")
    (videos / "broken.mp4").unlink()
    second = runner.invoke(app, args)
    assert second.exit_code == 0, second.output
    assert "1 video(s) already done" in second.output
    assert good_adapter.stat().st_mtime_ns == stamp  # done work is never redone
    assert [p.name for p in _adapters(out)] == ["good.safetensors", "noprompt.safetensors"]

    status = runner.invoke(app, ["library", str(out)])
    assert status.exit_code == 0 and "2 done, 1 failed" in status.output  # broken.mp4 keeps its failure on record
    missing = runner.invoke(app, ["library", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "no manifest.jsonl" in missing.output


def _bad_inputs(tmp_path: Path, video: Path) -> dict:
    fake = tmp_path / "fake.mp4"
    fake.write_text("hello")
    short = write_video(tmp_path / "short.mp4", moving_square_frames(num_frames=4))
    empty = tmp_path / "empty"
    empty.mkdir()
    locked = tmp_path / "locked"
    locked.write_text("a file where the output folder should be")
    p = ["--prompt", "a square moving"]
    return {
        "text file named .mp4": (["--videos", str(fake), *p], "fake.mp4: cannot be decoded"),
        "too few frames": (["--videos", str(short), *p], "has 4 frames but 8 are needed"),
        "missing video": (["--videos", str(tmp_path / "nope.mp4"), *p], "no such file or folder"),
        "empty folder": (["--videos", str(empty), *p], "holds no videos"),
        "missing prompt": (["--videos", str(video)], "no prompt; pass --prompt"),
        "unknown model": (["--videos", str(video), *p, "--model", "no-such-model"], "unknown model 'no-such-model'"),
        "missing model folder": (["--videos", str(video), *p, "--model", "./nope/"], "no such folder"),
        "output not writable": (["--videos", str(video), *p, "--out", str(locked / "sub")], "not writable"),
        "steps": (["--videos", str(video), *p, "--steps", "0"], "--steps: must be between"),
        "loss": (["--videos", str(video), *p, "--loss", "mse"], "--loss: must be one of"),
        "lr": (["--videos", str(video), *p, "--lr", "-1"], "--lr: must be in"),
        "frames": (["--videos", str(video), *p, "--frames", "1"], "--frames: must be between"),
        "resize": (["--videos", str(video), *p, "--resize", "zoom"], "--resize: must be one of"),
        "gpus": (["--videos", str(video), *p, "--gpus", "0"], "--gpus: must be between"),
        "trainable regex": (["--videos", str(video), *p, "--trainable", "to_[q"], "not a valid regex"),
        "nothing trainable": (["--videos", str(video), *p, "--trainable", "nothing_matches"],
                              "no parameter name matches"),
    }


BAD_INPUTS = ["text file named .mp4", "too few frames", "missing video", "empty folder", "missing prompt",
              "unknown model", "missing model folder", "output not writable", "steps", "loss", "lr", "frames",
              "resize", "gpus", "trainable regex", "nothing trainable"]


def test_every_bad_input_case_is_listed(tmp_path, square_video):
    assert sorted(_bad_inputs(tmp_path, square_video)) == sorted(BAD_INPUTS)


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_gives_one_clear_error_and_no_adapter(case, square_video, tmp_path):
    args, message = _bad_inputs(tmp_path, square_video)[case]
    if "--out" not in args:
        args = [*args, "--out", str(tmp_path / "out")]
    result = runner.invoke(app, ["train", *args, "--steps" if "--steps" not in args else "--seed", "1"])
    assert result.exit_code != 0
    assert message in " ".join(result.output.split()), result.output
    assert _adapters(tmp_path / "out") == []
    assert not list(tmp_path.rglob("*.tmp"))  # nothing half-written


def test_help_has_examples():
    result = runner.invoke(app, ["train", "--help"])
    assert result.exit_code == 0 and "Examples" in result.output and "--videos" in result.output


def test_generate_uses_a_trained_adapter(square_video, tmp_path):
    out = tmp_path / "run"
    trained = runner.invoke(app, ["train", "--videos", str(square_video), "--prompt", "a square moving right",
                                  "--out", str(out), "--steps", "1"])
    assert trained.exit_code == 0, trained.output
    gif = tmp_path / "gen.gif"
    result = runner.invoke(app, ["generate", "--adapter", str(out / "adapters" / "square.safetensors"), "--video",
                                 str(square_video), "--prompt", "a circle moving right", "--steps", "2",
                                 "--inversion-steps", "2", "--out", str(gif)])
    assert result.exit_code == 0, result.output
    import av

    with av.open(str(gif)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 8  # the adapter's frame count
    missing = runner.invoke(app, ["generate", "--adapter", str(tmp_path / "nope.safetensors"), "--prompt", "x"])
    assert missing.exit_code == 2 and "no such file" in missing.output


# --------------------------------------------------------------------------------------------- logs and Ctrl-C


def test_train_prints_plain_progress_lines_without_a_terminal(tmp_path, monkeypatch):
    from vmc_fast import reporting

    monkeypatch.setattr(reporting, "PLAIN_PROGRESS_EVERY_S", 0)
    name = "a_clip[take 1]_whose_name_is_long_enough_to_overflow_eighty_columns_" + "x" * 18 + ".mp4"
    video = write_video(tmp_path / name, moving_square_frames())
    result = runner.invoke(app, ["train", "--videos", str(video), "--prompt", "a square moving right", "--steps", "2",
                                 "--out", str(tmp_path / "out")])  # CliRunner's output is not a terminal
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any(line.startswith(f"video 1/1: {name}") for line in lines), result.output
    assert any(line.startswith(f"{name}: step 1/2, loss ") and "steps/s, ETA" in line for line in lines)
    assert any(f"{name}: step 2/2" in line for line in lines)
    assert any(str(video) in line and "done" in line for line in lines)  # the table row, whole on one line


def test_train_prints_no_step_line_before_the_interval(tmp_path):
    video = write_video(tmp_path / "clip.mp4", moving_square_frames())
    result = runner.invoke(app, ["train", "--videos", str(video), "--prompt", "a square", "--steps", "3",
                                 "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    steps = [line for line in result.output.splitlines() if line.startswith("clip.mp4: step")]
    assert steps == [next(line for line in steps if "step 3/3" in line)]  # only the last step within a minute


def test_ctrl_c_says_what_is_kept_and_exits_130(square_video, tmp_path):
    import signal
    import time

    out = tmp_path / "out"
    env = {**os.environ, "VMC_FAST_CACHE": str(tmp_path / "cache")}
    process = subprocess.Popen([sys.executable, "-m", "vmc_fast.cli", "train", "--videos", str(square_video),
                                "--prompt", "a square moving right", "--out", str(out), "--steps", "400"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 300
    while not (out / "manifest.jsonl").is_file() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    time.sleep(1.0)  # into the tuning loop
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-3000:]
    assert "interrupted:" in stderr and "rerun the same command" in stderr, stderr[-3000:]
    [entry] = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert entry["status"] == "pending"
    assert not list(out.rglob("*.tmp*"))


def test_warnings_print_as_one_line_and_known_noise_is_dropped(tmp_path):
    import warnings

    from rich.console import Console

    from vmc_fast.errors import VmcWarning
    from vmc_fast.reporting import print_warnings_as_lines

    console = Console(file=io.StringIO(), width=200)
    with warnings.catch_warnings():
        print_warnings_as_lines(console)
        warnings.warn(VmcWarning("clip.mp4: frames have transparent pixels; composited onto white"))
        warnings.warn(FutureWarning("`torch_dtype` is deprecated and will be removed in version 1.0.0."))
    assert console.file.getvalue() == "warning: clip.mp4: frames have transparent pixels; composited onto white\n"


def test_generate_refuses_a_size_the_model_cannot_take(tmp_path):
    result = runner.invoke(app, ["generate", "--prompt", "a dog", "--height", "30", "--steps", "1",
                                 "--out", str(tmp_path / "x.gif")])
    assert result.exit_code == 2 and "--height 30: tiny-random needs a multiple of 4" in result.output
    assert not (tmp_path / "x.gif").exists()
