"""Planning a run before anything is written: the model's spec and the checks against it, per-video request keys
(a rerun that asks for something else is refused, or retuned with --retune), and stable, unique adapter names."""

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open
from typer.testing import CliRunner

from conftest import moving_square_frames, write_video
from vmc_fast.cli import app
from vmc_fast.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from vmc_fast.errors import VmcError
from vmc_fast.models.registry import load_backbone, model_spec
from vmc_fast.runs.library import (
    REQUEST_EXCLUDED,
    Manifest,
    adapter_names,
    plan_run,
    request_key,
    summarize,
)

runner = CliRunner()
BUILTINS = ("tiny-random", "show1-tiny-random", "toy")


def _entries(out: Path) -> dict[str, dict]:
    return {Path(e["video"]).name: e for e in Manifest(out).read().values()}


def _adapter_extra(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as handle:
        return json.loads(handle.metadata()["extra"])


def _output(result) -> str:
    return " ".join(result.output.split())


# --------------------------------------------------------------------------------------------- model spec


@pytest.mark.parametrize("model", BUILTINS)
def test_spec_agrees_with_the_loaded_model(model):
    spec = model_spec(model)
    backbone = load_backbone(model)
    assert (spec.family, spec.num_frames, spec.height, spec.width) == \
        (backbone.family, backbone.num_frames, backbone.height, backbone.width)
    assert spec.num_train_timesteps == len(backbone.noise_scheduler.alphas_cumprod)
    # The size multiple from the built modules' own configs (the spec read config dicts only).
    vae_factor = 2 ** (len(backbone.vae.config.block_out_channels) - 1) if backbone.vae is not None else 1
    assert spec.pixel_multiple == vae_factor * 2 ** (len(backbone.unet.config.block_out_channels) - 1)


def test_spec_of_a_folder_reads_its_config_files(tmp_path):
    from vmc_fast.models.diffusers_unet3d import save_tiny_pretrained

    folder = save_tiny_pretrained(tmp_path / "tiny")
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    unet_config["block_out_channels"] = [32, 64, 64]  # one more level: the multiple doubles
    (folder / "unet" / "config.json").write_text(json.dumps(unet_config))
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    scheduler["num_train_timesteps"] = 500
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    spec = model_spec(str(folder))
    assert spec.model_id_resolved == str(folder.resolve()) and spec.family == "diffusers-unet3d"
    assert spec.pixel_multiple == model_spec("tiny-random").pixel_multiple * 2
    assert spec.num_train_timesteps == 500


@pytest.mark.parametrize("typed, suggested", [("tiny-randon", "tiny-random"),
                                              ("Show1-Tiny-Random", "show1-tiny-random"),
                                              ("./tiny-random", "tiny-random")])
def test_a_misspelled_model_suggests_the_built_in(typed, suggested):
    with pytest.raises(VmcError, match=f"did you mean '{suggested}'"):
        model_spec(typed)


@pytest.mark.parametrize("model", ["tiny-randon", "./no/such/folder"])
@pytest.mark.parametrize("gpus", ["1", "2"])
def test_an_unknown_model_leaves_no_folder(model, gpus, square_video, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["train", "--videos", str(square_video), "--prompt", "a square", "--model", model,
                                 "--out", str(out), "--gpus", gpus])
    assert result.exit_code == 2, result.output
    assert model in _output(result)
    if model == "tiny-randon":
        assert "did you mean 'tiny-random'" in _output(result)
    assert not out.exists()


# --------------------------------------------------------------------------------------------- checks


def _bad_and_good(model: str) -> list[tuple[list[str], str]]:
    spec = model_spec(model)
    m = spec.pixel_multiple
    return [
        (["--loss-stride", str(spec.num_frames)], "--loss-stride"),
        (["--height", str(spec.height + 1)], f"--height {spec.height + 1}: {model} needs a multiple of {m}"),
        (["--width", str(spec.width + 1)], f"use {spec.width // m * m} or {(spec.width // m + 1) * m}"),
    ]


@pytest.mark.parametrize("model", BUILTINS)
def test_options_that_do_not_fit_the_model_fail_before_anything_is_written(model, square_video, tmp_path):
    out = tmp_path / "out"
    for args, message in _bad_and_good(model):
        result = runner.invoke(app, ["train", "--videos", str(square_video), "--prompt", "a square", "--model",
                                     model, "--out", str(out), *args])
        assert result.exit_code == 2, (args, result.output)
        assert message in _output(result), result.output
        assert not out.exists()
    spec = model_spec(model)
    good = ["--loss-stride", str(spec.num_frames - 1), "--height", str(spec.height + spec.pixel_multiple),
            "--width", str(spec.width - spec.pixel_multiple)]
    result = runner.invoke(app, ["train", "--videos", str(square_video), "--prompt", "a square", "--model", model,
                                 "--out", str(out), "--steps", "1", *good])
    assert result.exit_code == 0, result.output
    assert _entries(out)["square.mp4"]["status"] == "done"


def test_timestep_range_is_checked_against_the_schedule(square_video, tmp_path):
    timesteps = model_spec("tiny-random").num_train_timesteps

    def cfg(hi: int) -> RunConfig:
        return RunConfig(data=DataConfig(videos=str(square_video)), prompt="a square", out_dir=str(tmp_path / "o"),
                         train=TrainConfig(timestep_range=(0, hi)))

    with pytest.raises(ValueError, match=f"timestep_range .*schedule has {timesteps} timesteps"):
        plan_run(cfg(timesteps + 1))
    assert plan_run(cfg(timesteps)).todo
    assert not (tmp_path / "o").exists()


def test_a_default_size_that_does_not_fit_is_named_as_the_default(square_video, tmp_path):
    from vmc_fast.models.diffusers_unet3d import save_tiny_pretrained

    folder = save_tiny_pretrained(tmp_path / "tiny")
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    unet_config["sample_size"] = 17  # 34 pixels: not a multiple of 4
    (folder / "unet" / "config.json").write_text(json.dumps(unet_config))
    cfg = RunConfig(data=DataConfig(videos=str(square_video)), prompt="a square", model=ModelConfig(str(folder)),
                    out_dir=str(tmp_path / "o"))
    with pytest.raises(ValueError, match=r"--height \(the model's default\) 34: .* use 32 or 36"):
        plan_run(cfg)


# --------------------------------------------------------------------------------------------- requests


def test_the_request_key_holds_every_setting_but_the_excluded_ones(square_video, tmp_path):
    cfg = RunConfig(data=DataConfig(videos=str(square_video)), prompt="a square", out_dir=str(tmp_path / "o"))
    job = plan_run(cfg).jobs[0]
    key = request_key(cfg, job, model_spec("tiny-random"))

    def leaves(obj, prefix=""):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            yield from leaves(value, prefix + f.name + ".") if dataclasses.is_dataclass(value) else [prefix + f.name]

    excluded = lambda name: name in REQUEST_EXCLUDED or name.split(".")[0] in REQUEST_EXCLUDED  # noqa: E731
    assert {n for n in leaves(cfg) if not excluded(n)} <= set(key)  # fields added later are keyed too
    assert {n for n in leaves(cfg) if excluded(n)} & set(key) == {"prompt"}  # the video's own, final prompt
    assert key["prompt"] == job.prompt == "a square" and key["video"] == str(square_video.resolve())
    # Speed levers do not change the key; a setting of the result does.
    faster = dataclasses.replace(cfg, model=ModelConfig(compile="regional", gradient_checkpointing=True))
    assert request_key(faster, job, model_spec("tiny-random")) == key
    other = dataclasses.replace(cfg, train=TrainConfig(weight_decay=0.5))
    assert request_key(other, job, model_spec("tiny-random")) != key


@pytest.fixture(scope="module")
def tuned_run(tmp_path_factory):
    """A finished one-step run (video and --out), copied by each test that changes it."""
    root = tmp_path_factory.mktemp("tuned")
    video = write_video(root / "clip.mp4", moving_square_frames())
    out = root / "run"
    result = runner.invoke(app, ["train", "--videos", str(video), "--prompt", "a square moving right", "--steps",
                                 "1", "--out", str(out)], env={"VMC_FAST_CACHE": str(root / "cache")})
    assert result.exit_code == 0, result.output
    return video, out


BASE_ARGS = ["--prompt", "a square moving right", "--steps", "1"]
CHANGES = {
    "prompt": (["--prompt", "a circle moving left", "--steps", "1"], "prompt 'a square moving right' → 'a circle"),
    "steps": (["--prompt", "a square moving right", "--steps", "2"], "--steps 1 → 2"),
    "loss": ([*BASE_ARGS, "--loss", "l2"], "--loss 'cos' → 'l2'"),
    "model": ([*BASE_ARGS, "--model", "show1-tiny-random"], "--model 'tiny-random' → 'show1-tiny-random'"),
    "start frame": ([*BASE_ARGS, "--start-frame", "1"], "--start-frame 0 → 1"),
    "frame stride": ([*BASE_ARGS, "--frames", "4", "--frame-stride", "2"], "--frame-stride 1 → 2"),
    "reverse": ([*BASE_ARGS, "--reverse"], "--reverse false → true"),
    "height": ([*BASE_ARGS, "--height", "36"], "--height 32 → 36"),
}


def _copy_run(tuned_run, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(tuned_run[1], out)
    return out


def _snapshot(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in [out / "config.json", out / "manifest.jsonl",
                                              *(out / "adapters").glob("*.safetensors")]}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_rerun_with_another_request_is_refused_and_writes_nothing(change, tuned_run, tmp_path):
    video, _ = tuned_run
    out = _copy_run(tuned_run, tmp_path)
    before = _snapshot(out)
    args, words = CHANGES[change]
    result = runner.invoke(app, ["train", "--videos", str(video), "--out", str(out), *args])
    assert result.exit_code == 2, result.output
    assert "tuned with other settings" in _output(result) and words in _output(result), result.output
    assert "--retune" in _output(result)
    assert _snapshot(out) == before


@pytest.mark.parametrize("change", ["prompt", "height"])
def test_retune_replaces_the_adapter_and_the_records(change, tuned_run, tmp_path):
    video, _ = tuned_run
    out = _copy_run(tuned_run, tmp_path)
    before = _snapshot(out)
    args, _ = CHANGES[change]
    result = runner.invoke(app, ["train", "--videos", str(video), "--out", str(out), *args, "--retune"])
    assert result.exit_code == 0, result.output
    entry = _entries(out)["clip.mp4"]
    config = json.loads((out / "config.json").read_text())
    assert entry["status"] == "done" and entry["request"]["prompt"] == config["prompt"]
    assert entry["request"]["data.height"] == (config["data"]["height"] or 32)
    assert _adapter_extra(out / "adapters" / "clip.safetensors")["request_hash"] == entry["request_hash"]
    assert _snapshot(out)["clip.safetensors"] != before["clip.safetensors"]
    assert _snapshot(out)["config.json"] != before["config.json"]


def test_an_identical_rerun_tunes_and_rewrites_nothing(tuned_run, tmp_path):
    video, _ = tuned_run
    out = _copy_run(tuned_run, tmp_path)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    # Speed levers are not part of the request.
    result = runner.invoke(app, ["train", "--videos", str(video), "--out", str(out), *BASE_ARGS, "--checkpointing"])
    assert result.exit_code == 0, result.output
    assert "1 video(s) already done, 0 to tune" in result.output
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamps


def test_a_rewritten_video_counts_as_changed(tmp_path):
    video = write_video(tmp_path / "clip.mp4", moving_square_frames())
    args = ["train", "--videos", str(video), "--out", str(tmp_path / "out"), *BASE_ARGS]
    assert runner.invoke(app, args).exit_code == 0
    write_video(video, moving_square_frames(step=2))
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "the video file changed" in _output(result), result.output


def test_the_adapter_file_must_carry_the_recorded_request(tuned_run, tmp_path):
    from safetensors.torch import load_file, save_file

    video, _ = tuned_run
    out = _copy_run(tuned_run, tmp_path)
    adapter = out / "adapters" / "clip.safetensors"
    with safe_open(str(adapter), framework="pt") as handle:
        metadata = handle.metadata()
    metadata["extra"] = json.dumps({**json.loads(metadata["extra"]), "request_hash": "0" * 16})
    save_file(load_file(adapter), adapter, metadata)  # an adapter another run wrote in its place
    result = runner.invoke(app, ["train", "--videos", str(video), "--out", str(out), *BASE_ARGS])
    assert result.exit_code == 2 and "clip.safetensors was written by another run" in _output(result), result.output


def test_a_manifest_from_before_request_keys_is_changed_only_by_what_it_recorded(tuned_run, tmp_path):
    video, _ = tuned_run
    out = _copy_run(tuned_run, tmp_path)
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    for entry in lines:
        for key in ("request", "request_hash", "adapter_name"):
            entry.pop(key)
    (out / "manifest.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    assert runner.invoke(app, ["train", "--videos", str(video), "--out", str(out), *BASE_ARGS]).exit_code == 0
    changed = runner.invoke(app, ["train", "--videos", str(video), "--out", str(out), "--prompt", "other", "--steps",
                                  "1"])
    assert changed.exit_code == 2 and "prompt 'a square moving right' → 'other'" in _output(changed)


# --------------------------------------------------------------------------------------------- names


def test_adapter_names_are_unique_ignoring_case(tmp_path):
    (tmp_path / "bird_gif").mkdir()
    videos = [tmp_path / n for n in ("BIRD.webm", "bird.gif", "bird.mp4", "bird_gif", "bird_mp4.mov", "a/clip.mp4",
                                     "b/clip.mp4", "Clip.mov")]
    names = adapter_names(videos, {})
    assert len({n.casefold() for n in names.values()}) == len(videos), names
    assert names[tmp_path / "bird_mp4.mov"] != names[tmp_path / "bird.mp4"]


def test_adapter_names_keep_what_the_manifest_recorded(tmp_path):
    recorded = {str(tmp_path / "bird.mp4"): {"adapter_name": "bird"}, str(tmp_path / "gone.mp4"): {"adapter_name": "x"}}
    names = adapter_names([tmp_path / "bird.mp4", tmp_path / "bird.gif", tmp_path / "X.mp4"], recorded)
    assert names[tmp_path / "bird.mp4"] == "bird"  # kept, although bird.gif now shares its stem
    assert names[tmp_path / "bird.gif"] == "bird_gif"
    assert names[tmp_path / "X.mp4"].casefold() != "x"  # another video of the folder's records holds "x"


def test_adding_a_video_keeps_the_names_and_adapters_of_the_others(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "bird.mp4", moving_square_frames())
    write_video(videos / "Bird_mp4.mov", moving_square_frames(step=2))
    out = tmp_path / "out"
    args = ["train", "--videos", str(videos), "--out", str(out), "--prompt", "a bird", "--steps", "1"]
    assert runner.invoke(app, args).exit_code == 0
    first = {name: (e["adapter"], Path(e["adapter"]).stat().st_mtime_ns) for name, e in _entries(out).items()}
    assert len({Path(a).stem.casefold() for a, _ in first.values()}) == 2
    write_video(videos / "bird.gif", moving_square_frames(step=4))
    second = runner.invoke(app, args)
    assert second.exit_code == 0 and "2 video(s) already done, 1 to tune" in second.output, second.output
    entries = _entries(out)
    assert {name: (entries[name]["adapter"], Path(entries[name]["adapter"]).stat().st_mtime_ns)
            for name in first} == first
    assert len({Path(e["adapter"]).stem.casefold() for e in entries.values()}) == 3
    cfg = RunConfig(data=DataConfig(videos=str(videos)), prompt="a bird", out_dir=str(out),
                    train=TrainConfig(steps=1))
    assert {e["status"] for e in summarize(out, plan_run(cfg).jobs).entries} == {"done"}
    assert os.path.isfile(entries["bird.gif"]["adapter"])


def test_a_name_recorded_twice_by_an_old_manifest_is_kept_once(tmp_path):
    clash = {str(tmp_path / "bird.mp4"): {"adapter": "out/adapters/bird_mp4.safetensors"},
             str(tmp_path / "bird_mp4.mov"): {"adapter": "out/adapters/bird_mp4.safetensors"}}
    names = adapter_names([tmp_path / "bird.mp4", tmp_path / "bird_mp4.mov"], clash)
    assert names[tmp_path / "bird.mp4"] == "bird_mp4" and names[tmp_path / "bird_mp4.mov"] != "bird_mp4"


def test_weights_that_cannot_be_loaded_leave_no_folder(square_video, tmp_path):
    from vmc_fast.models.diffusers_unet3d import save_tiny_pretrained

    folder = save_tiny_pretrained(tmp_path / "tiny")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_text("not weights")  # configs are fine
    out = tmp_path / "out"
    result = runner.invoke(app, ["train", "--videos", str(square_video), "--prompt", "a square", "--model",
                                 str(folder), "--out", str(out)])
    assert result.exit_code == 2 and "could not load" in _output(result), result.output
    assert not out.exists()


def test_a_setting_added_later_at_its_default_does_not_count_as_a_change(tuned_run, tmp_path):
    video, _ = tuned_run
    out = _copy_run(tuned_run, tmp_path)
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    lines[0]["request"].pop("train.weight_decay")  # as if vmc-fast had no --weight-decay when it was tuned
    (out / "manifest.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    rerun = runner.invoke(app, ["train", "--videos", str(video), "--out", str(out), *BASE_ARGS])
    assert rerun.exit_code == 0 and "0 to tune" in rerun.output, rerun.output
    other = runner.invoke(app, ["train", "--videos", str(video), "--out", str(out), *BASE_ARGS,
                                "--weight-decay", "0.5"])
    assert other.exit_code == 2 and "--weight-decay unset → 0.5" in _output(other), other.output
