"""Config files: a run saves its whole config, `--config FILE` reruns it (JSON or YAML, flags overriding),
bit-identically on the CPU, and a file with a wrong name or value ends in one clear line."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from vmc_fast.cli import app
from vmc_fast.config import GenerateConfig, RunConfig, config_from_file, setting_names

runner = CliRunner()


def _train(*args: str) -> None:
    result = runner.invoke(app, ["train", *args])
    assert result.exit_code == 0, result.output


def _tensors(out: Path) -> dict[str, torch.Tensor]:
    [adapter] = sorted((out / "adapters").glob("*.safetensors"))
    return load_file(str(adapter))


def _flat(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict) and key in ("data", "model", "train", "parallel"):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


@pytest.fixture
def first_run(square_video, tmp_path, monkeypatch):
    """A run with settings off their defaults, given with relative paths from tmp_path: settings that have no
    option (betas, timestep range) from a YAML file, the rest as flags."""
    monkeypatch.chdir(tmp_path)
    video = Path("clips") / "square.mp4"
    video.parent.mkdir()
    square_video.rename(video)
    Path("start.yaml").write_text("train:\n  betas: [0.8, 0.99]\n  timestep_range: [100, 900]\n  steps: 9\n")
    _train("--config", "start.yaml", "--videos", str(video), "--prompt", "a square moving right", "--out", "run1",
           "--steps", "3", "--seed", "7", "--lr", "3e-4", "--loss", "l2", "--frames", "6", "--weight-decay", "0.02")
    return tmp_path / "run1"


def test_saved_config_is_the_whole_tree_with_absolute_paths(first_run, tmp_path):
    saved = json.loads((first_run / "config.json").read_text())
    assert sorted(_flat(saved)) == sorted(setting_names(RunConfig))  # every field, option or not (betas, ...)
    assert saved["out_dir"] == str(first_run)
    assert saved["data"]["videos"] == str(tmp_path / "clips" / "square.mp4")
    assert Path(saved["cache_dir"]).is_absolute()
    assert saved["train"]["seed"] == 7 and saved["train"]["learning_rate"] == 3e-4
    assert saved["data"]["num_frames"] == 6 and saved["train"]["steps"] == 3  # the flag beat the file's 9
    assert saved["train"]["betas"] == [0.8, 0.99] and saved["train"]["timestep_range"] == [100, 900]
    rebuilt = RunConfig.from_dict(saved).to_dict()
    assert json.loads(json.dumps(rebuilt)) == saved


def test_rerun_from_saved_config_is_bit_identical_and_flags_override(first_run, tmp_path):
    first = _tensors(first_run)
    _train("--config", str(first_run / "config.json"), "--out", "run2")
    rerun = _tensors(tmp_path / "run2")
    assert first.keys() == rerun.keys() and all(torch.equal(first[k], rerun[k]) for k in first)
    manifests = [json.loads((tmp_path / d / "manifest.jsonl").read_text()) for d in ("run1", "run2")]
    assert manifests[0]["request_hash"] == manifests[1]["request_hash"]

    (tmp_path / "run.yaml").write_text(yaml.safe_dump(json.loads((first_run / "config.json").read_text())))
    _train("--config", "run.yaml", "--out", "run3", "--seed", "8")  # YAML with the same names; a flag overrides
    saved = json.loads((tmp_path / "run3" / "config.json").read_text())
    assert saved["train"]["seed"] == 8 and saved["train"]["learning_rate"] == 3e-4 and saved["train"]["loss"] == "l2"
    other = _tensors(tmp_path / "run3")
    assert not all(torch.equal(first[k], other[k]) for k in first)  # the seed did change the adapter


def test_rerun_into_the_same_folder_resumes(first_run):
    adapter = next((first_run / "adapters").glob("*.safetensors"))
    stamp = adapter.stat().st_mtime_ns
    result = runner.invoke(app, ["train", "--config", str(first_run)])  # a run folder names its config.json
    assert result.exit_code == 0, result.output
    assert "nothing to tune" in result.output and adapter.stat().st_mtime_ns == stamp
    refused = runner.invoke(app, ["train", "--config", str(first_run / "config.json"), "--steps", "4"])
    assert refused.exit_code == 2 and "--steps 3 → 4" in refused.output and "--retune" in refused.output


@pytest.mark.parametrize("content, expected", [
    ({"train": {"stpes": 3}}, "unknown setting 'train.stpes'; did you mean 'train.steps'?"),
    ({"steps": 3}, "unknown setting 'steps'; did you mean 'train.steps'?"),
    ({"lr": 0.001}, "unknown setting 'lr'; did you mean 'train.learning_rate'?"),
    ({"modle": {"model_id": "tiny-random"}}, "unknown setting 'modle'; did you mean 'model'?"),
    ({"train": {"steps": "3"}}, "train.steps: must be an int, not '3'"),
    ({"train": {"betas": [0.9]}}, "train.betas: must be a list of 2 values"),
    ({"train": 3}, "train must be a mapping of its settings"),
    ({"train": {"steps": 0}}, "--steps: must be between 1 and 1,000,000"),
])
def test_a_bad_config_file_is_one_clear_line_and_writes_nothing(tmp_path, content, expected):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(content))
    result = runner.invoke(app, ["train", "--config", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert expected in result.output and result.output.startswith("error:"), result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, text, expected", [
    ("missing.json", None, "no such file"),
    ("broken.json", "{not json", "not valid JSON"),
    ("broken.yaml", "train: [", "not valid YAML"),
    ("list.yaml", "- 1\n- 2\n", "must hold a mapping of setting names, not list"),
])
def test_an_unreadable_config_file_is_named(tmp_path, name, text, expected):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    result = runner.invoke(app, ["train", "--config", str(path)])
    assert result.exit_code == 2 and f"--config {path}: {expected}" in result.output, result.output


def test_every_config_command_takes_config(tmp_path):
    for command in ("train", "generate", "export", "eval", "bench", "demo", "toy-pretrain"):
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0 and "--config" in result.output, (command, result.output)
    # generate's required --prompt may come from the file; a value from the file is validated as a flag's is
    (tmp_path / "g.yaml").write_text("prompt: a dog\noutput: x.txt\nnum_inference_steps: 2\n")
    result = runner.invoke(app, ["generate", "--config", str(tmp_path / "g.yaml")])
    assert result.exit_code == 2 and "--out: 'x.txt' must end in .gif or .mp4" in result.output, result.output
    result = runner.invoke(app, ["generate", "--steps", "2"])
    assert result.exit_code == 2 and "--prompt: required" in result.output, result.output
    (tmp_path / "empty.yaml").write_text("seed: 3\n")
    result = runner.invoke(app, ["generate", "--config", str(tmp_path / "empty.yaml")])
    assert result.exit_code == 2 and "--prompt: required; neither the command line nor" in result.output


def test_config_from_file_reads_old_names_and_overrides(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"train": {"loss": "l2", "snr_weight": True, "steps": 5}}))  # before loss_weight
    cfg = config_from_file(RunConfig, path, {("train", "seed"): 4})
    assert (cfg.train.loss_weight, cfg.train.steps, cfg.train.seed) == ("snr", 5, 4)
    (tmp_path / "g.yaml").write_text("prompt: a cat\nstages: {sr1_first_frame: none}\nguidance_scale: 7\n")
    generate = config_from_file(GenerateConfig, tmp_path / "g.yaml")
    assert generate.prompt == "a cat" and generate.guidance_scale == 7.0 and generate.stages == {"sr1_first_frame": "none"}
