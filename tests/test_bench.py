"""`vmc-fast bench` on the CPU: a preset runs in a fresh process and leaves a valid JSON record."""

import json
import time

import pytest
import torch
from typer.testing import CliRunner

from vmc_fast.cli import app
from vmc_fast.studies.bench import (
    PRESETS,
    BenchOptions,
    Preset,
    _timed,
    run_one,
    step_flops,
)


def test_flop_count_of_the_base_architecture_matches_the_reference():
    # Forward FLOPs of Show-1 base at 8x40x64 are 5.235e12 (tests/fixtures/show1/show1_base_stats.json, torch
    # FlopCounterMode). A training
    # step adds backward to the activations down to the first temporal attention and Q/K/V weight gradients.
    forward = step_flops("show1-base-arch", 8, 40, 64, backward=False)
    assert forward == pytest.approx(5.235e12, rel=1e-3)
    step = step_flops("show1-base-arch", 8, 40, 64)
    assert 1.8 * forward < step < 2.2 * forward


def test_run_one_measures_a_cpu_preset():
    preset = Preset("cpu-fp32", "fp32", "fp32", checkpointing=False, compile="off", about="test")
    options = BenchOptions("show1-tiny-random", steps=2, warmup=1, device="cpu")
    began = time.perf_counter()
    record = run_one(preset, options)
    wall = time.perf_counter() - began
    # Checked against a clock outside the benchmark: the timed steps fit inside the whole call.
    assert 0 < options.steps * record["step_seconds"] <= wall
    assert record["flops_per_step"] > 0 and record["peak_rss_bytes"] > 0 and record["mfu"] is None
    assert record["trainable_parameters"] > 0 and (record["frames"], record["height"]) == (8, 16)
    assert record["graphs_compiled_while_timed"] == 0


def test_the_step_timer_measures_seconds_per_step():
    assert _timed(lambda: time.sleep(0.02), 5, torch.device("cpu")) == pytest.approx(0.02, rel=0.5)
    calls = []
    _timed(lambda: calls.append(1), 7, torch.device("cpu"))
    assert len(calls) == 7


class _SleepingStep:
    """Stands in for TorchStep: the first call (the warm-up, where compilation happens) is slow."""

    def __init__(self, params, cfg):
        self.calls = 0

    def __call__(self, loss):
        self.calls += 1
        time.sleep(0.3 if self.calls == 1 else 0.02)
        return 0.0


@pytest.mark.parametrize("compile_mode", ["off", "regional"])
def test_warm_up_is_left_out_of_the_step_time_and_counted_as_compilation(monkeypatch, compile_mode):
    from vmc_fast.tuning import loop, steps

    monkeypatch.setattr(steps, "TorchStep", _SleepingStep)
    monkeypatch.setattr(loop, "vmc_loss", lambda *args: torch.zeros(()))  # no UNet call: the step is the sleep
    preset = Preset("sleepy", "fp32", "fp32", checkpointing=False, compile=compile_mode, about="test")
    record = run_one(preset, BenchOptions("show1-tiny-random", steps=3, warmup=1, device="cpu"))
    assert 0.015 < record["step_seconds"] < 0.1  # 0.12 if the 0.3 s warm-up step were timed
    if compile_mode == "off":
        assert record["compile_seconds"] == 0.0
    else:
        assert record["compile_seconds"] == pytest.approx(0.28, abs=0.1)


@pytest.mark.slow
def test_bench_cli_writes_json_records(tmp_path):
    result = CliRunner().invoke(app, ["bench", "--presets", "fast-eager", "--steps", "1", "--warmup", "0",
                                      "--results", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    [line] = (tmp_path / "bench-cpu.jsonl").read_text().splitlines()
    record = json.loads(line)
    assert record["preset"]["name"] == "fast-eager" and record["preset"]["frozen_dtype"] == "bf16"
    for key in ("git_sha", "versions", "device", "date", "step_seconds", "total_seconds_400"):
        assert key in record
    assert record["versions"]["torch"].startswith("2.") and record["device"]["type"] == "cpu"


def test_unknown_preset_is_named():
    result = CliRunner().invoke(app, ["bench", "--presets", "paper,warp-speed"])
    assert result.exit_code == 2 and "unknown warp-speed" in result.output


def test_presets_change_one_lever_at_a_time():
    for name, preset in PRESETS.items():
        # "fast-eager+int8" is fast-eager plus one lever; "paper-t5-freed" is paper minus one.
        parent = name.rsplit("+", 1)[0] if "+" in name else name.split("-")[0]
        base = PRESETS[parent]
        changed = [f for f in ("frozen_dtype", "precision", "checkpointing", "compile", "attention", "optimizer",
                               "text_encoder_resident") if getattr(preset, f) != getattr(base, f)]
        # A frozen-weight dtype travels with its compute dtype (bf16) or the 8-bit optimizer (int8): one lever.
        levers = set(changed) - ({"optimizer", "precision"} if "frozen_dtype" in changed else set())
        assert len(levers) <= 1 or name in ("paper", "fast"), (name, changed)
