"""Per-step metrics beside a run: DIR/NAME/metrics.jsonl, one strict-JSON line per step written as it goes,
started afresh when a video is tuned again; TensorBoard event files with --tensorboard."""

import json
import math
import sys

import pytest

from vmc_fast.config import DataConfig, RunConfig, TrainConfig
from vmc_fast.errors import VmcError
from vmc_fast.runs.launch import train
from vmc_fast.runs.library import QuietReporter
from vmc_fast.runs.metrics import FIELDS, MetricsWriter, metrics_path, read_metrics, tensorboard_dir
from vmc_fast.tuning.loop import StepStats


def _cfg(video, out, steps=3, **kwargs) -> RunConfig:
    return RunConfig(data=DataConfig(videos=str(video)), train=TrainConfig(steps=steps, learning_rate=2e-4),
                     prompt="a square moving right", out_dir=str(out), **kwargs)


class LinesAtEachStep(QuietReporter):
    """Reads the metrics file while the run goes on: how many lines it holds when each step is reported."""

    def __init__(self, path):
        self.path, self.seen = path, []

    def step(self, stats):
        self.seen.append(len(read_metrics(self.path)))


def test_metrics_jsonl_has_one_line_per_step_written_as_it_goes(square_video, tmp_path):
    out = tmp_path / "out"
    path = metrics_path(out, "square")
    watcher = LinesAtEachStep(path)
    summary = train(_cfg(square_video, out), watcher)
    assert summary.ok and path == out / "square" / "metrics.jsonl"
    assert watcher.seen == [1, 2, 3]  # each line is on disk when its step is reported
    rows = read_metrics(path)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(set(r) == set(FIELDS) for r in rows)
    assert all(r["lr"] == 2e-4 and r["grad_norm"] > 0 and math.isfinite(r["loss"]) for r in rows)
    assert rows[0]["seconds"] < rows[1]["seconds"] < rows[2]["seconds"]
    [entry] = summary.entries
    assert entry["final_loss"] == pytest.approx(rows[-1]["loss"])  # 3 steps: the last 10% is the last step
    for line in path.read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))

    retuned = train(_cfg(square_video, out, steps=2, retune=True))
    assert retuned.ok and [r["step"] for r in read_metrics(path)] == [1, 2]  # afresh, not appended to


def test_metrics_lines_are_strict_json_and_a_cut_last_line_is_left_out(tmp_path):
    with MetricsWriter(tmp_path, "clip") as write:
        write(StepStats(1, 2, 0.5, float("inf"), 0.1, lr=1e-4))
        write(StepStats(2, 2, 0.25, 0.3, 0.2, lr=1e-4))
    path = metrics_path(tmp_path, "clip")
    assert "Infinity" not in path.read_text() and read_metrics(path)[0]["grad_norm"] is None
    path.write_text(path.read_text() + '{"step": 3, "lo')  # a run stopped mid-line
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    path.write_text('{"step": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON line"):
        read_metrics(path)
    assert read_metrics(tmp_path / "none" / "metrics.jsonl") == []


def test_tensorboard_writes_event_files_beside_the_metrics(square_video, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    assert train(_cfg(square_video, out, steps=2, tensorboard=True)).ok
    events = EventAccumulator(str(tensorboard_dir(out, "square")))
    events.Reload()
    assert {"loss", "grad_norm", "lr"} <= set(events.Tags()["scalars"])
    losses = [e.value for e in events.Scalars("loss")]
    assert losses == pytest.approx([r["loss"] for r in read_metrics(metrics_path(out, "square"))])


def test_tensorboard_without_the_package_is_one_clear_error_before_anything_is_written(square_video, tmp_path,
                                                                                       monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard now raises ImportError
    with pytest.raises(VmcError, match=r"--tensorboard: the tensorboard package is not installed; pip install "
                                       r"tensorboard"):
        train(_cfg(square_video, tmp_path / "out", tensorboard=True))
    assert not (tmp_path / "out").exists()
