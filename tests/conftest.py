"""Shared fixtures: tiny synthetic videos written to disk, and CPU-friendly defaults."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

# `python -m pytest` puts the repository root on sys.path, which would make our kernels/ folder importable as a
# top-level `kernels` package (a name Hugging Face owns). The project is installed (pip install -e .), so the
# root is not needed: drop it and import vmc_fast.kernels the installed way.
_ROOT = str(Path(__file__).resolve().parents[1])
sys.path[:] = [p for p in sys.path if p not in ("", ".", _ROOT)]

# Triton decides when a kernel's module is imported whether it is compiled or interpreted, and its own modules
# cache that choice for the whole process: mixing the two breaks both (inductor's kernels included). So the choice
# is made once, here, before anything imports triton: without CUDA the interpreter runs the kernel tests on the
# CPU; with CUDA the kernels are compiled (tests/test_gpu.py) and the interpreter tests skip.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# VMC_FAST_TEST_THREADS=1 when another job holds a core: two threads on a shared core spin against each other.
torch.set_num_threads(int(os.environ.get("VMC_FAST_TEST_THREADS", min(2, os.cpu_count() or 1))))


def moving_square_frames(num_frames: int = 10, height: int = 32, width: int = 48, step: int = 3) -> np.ndarray:
    """(F, H, W, 3) uint8: a white square moving right on a dark background."""
    frames = np.full((num_frames, height, width, 3), 30, dtype=np.uint8)
    for f in range(num_frames):
        x = 2 + step * f
        frames[f, 10:20, x: x + 10] = (250, 240, 60)
    return frames


def write_video(path: Path, frames: np.ndarray, fps: int = 8) -> Path:
    """Encode (F, H, W, 3) uint8 frames with PyAV (mp4/mov: mpeg4, webm: vp9 when available, gif: gif)."""
    import av

    codec = {".gif": "gif", ".webm": "libvpx-vp9"}.get(path.suffix, "mpeg4")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "rgb8" if codec == "gif" else "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_frame_folder(folder: Path, frames: np.ndarray) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"{i:04d}.png")
    return folder


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny tensors: on a busy 2-core machine, thread hand-offs cost more than the work."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def square_video(tmp_path) -> Path:
    return write_video(tmp_path / "square.mp4", moving_square_frames())


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    # Prompt-embedding cache per test, so tests never see each other's files.
    monkeypatch.setenv("VMC_FAST_CACHE", str(tmp_path / "cache"))


def pytest_configure(config):
    global _PYTEST_CONFIG
    _PYTEST_CONFIG = config


_PYTEST_CONFIG = None


def pytest_runtest_logreport(report):
    """VMC_FAST_REPORT_FAILURES_AT_ONCE=1 prints each failure as it happens, not only at the end: a GPU slot's
    test run can be killed at its time budget before pytest's summary, and its log must still say what failed."""
    if not report.failed or os.environ.get("VMC_FAST_REPORT_FAILURES_AT_ONCE") != "1" or _PYTEST_CONFIG is None:
        return
    terminal = _PYTEST_CONFIG.pluginmanager.get_plugin("terminalreporter")
    if terminal is not None:
        terminal.write_line(f"\n=== FAILED {report.nodeid} ({report.when}) ===\n{report.longreprtext[-6000:]}")
