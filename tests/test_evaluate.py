"""`vmc-fast eval` and `vmc-fast demo`: shipped examples, the scoring of one video, the report files, the CLI."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from vmc_fast.cli import app
from vmc_fast.io.video import FrameSampling, load_clip
from vmc_fast.studies.evaluation import (
    SPATIAL_PATTERN,
    EvalConfig,
    findings,
    markdown,
    new_appearances,
    paired_difference,
    run_eval,
    score,
    summarize,
    verdict,
)
from vmc_fast.toy import world as toyworld
from vmc_fast.toy.examples import (
    EXAMPLES_DIR,
    held_out_example,
    held_out_spec,
    write_held_out_examples,
)

runner = CliRunner()


# ------------------------------------------------------------------------------------------------ examples


@pytest.mark.parametrize("motion", toyworld.HELD_OUT_MOTIONS)
def test_shipped_examples_are_the_held_out_clips_they_claim(motion):
    path, clip = held_out_example(motion)
    assert clip.spec.motion == motion and motion not in toyworld.TRAIN_MOTIONS
    frames = load_clip(path, FrameSampling(num_frames=8, height=32, width=32))
    # gif keeps these flat colours to within its palette rounding
    assert (frames - clip.frames).abs().max() < 0.05
    assert (EXAMPLES_DIR / f"{motion}.txt").read_text().strip() == clip.motion_caption
    record = json.loads((EXAMPLES_DIR / f"{motion}.json").read_text())
    assert torch.allclose(torch.tensor(record["track"]), clip.track, atol=1e-3)
    assert toyworld.inside_image(clip).all()


def test_examples_reproduce_byte_for_byte(tmp_path):
    for path in write_held_out_examples(tmp_path):
        for suffix in (".gif", ".txt", ".json"):
            shipped = EXAMPLES_DIR / path.with_suffix(suffix).name
            assert path.with_suffix(suffix).read_bytes() == shipped.read_bytes(), shipped


# ------------------------------------------------------------------------------------------------ scoring


def test_new_appearances_change_everything_but_the_motion():
    reference = held_out_spec("spiral")
    targets = new_appearances(reference, 12, seed=3)
    assert targets == new_appearances(reference, 12, seed=3)
    assert targets != new_appearances(reference, 12, seed=4)
    for t in targets:
        assert t.shape != reference.shape and t.colour != reference.colour and t.background != reference.background
        assert t.motion == reference.motion and t.motion_params == reference.motion_params
        assert (t.colour, t.background) not in {("blue", "dark-blue"), ("white", "grey")}


def test_score_rewards_the_asked_appearance_on_the_reference_motion():
    _, reference = held_out_example("zigzag")
    target = dataclasses.replace(reference.spec, shape="square", colour="yellow", background="black")
    perfect = score(toyworld.render_clip(target).frames, reference, target)
    assert perfect["motion_fidelity"] > 0.95
    assert perfect["colour_adherence"] == 1.0 and perfect["shape_adherence"] > 0.7
    assert perfect["colour_leak"] == 0.0

    copied = score(reference.frames, reference, target)  # the reference itself: right motion, wrong appearance
    assert copied["motion_fidelity"] > 0.95
    assert copied["colour_adherence"] == 0.0 and copied["colour_leak"] == 1.0

    other = toyworld.render_clip(dataclasses.replace(held_out_spec("figure-eight"), shape="square",
                                                     colour="yellow", background="black"))
    wrong = score(other.frames, reference, target)
    assert wrong["motion_fidelity"] < 0.5
    assert wrong["colour_adherence"] == 1.0


def _case(variant, look, value, start="noise", key="motion_fidelity"):
    return {"variant": variant, "start": start, "motion": "zigzag", "seed": 0, "prompt": f"look {look}", key: value}


def _findings_for(samples):
    summary = summarize(samples, ["no-tuning", "cos"], ["zigzag"], ["noise"])
    return findings(summary, samples)


def test_findings_say_holds_only_beyond_two_standard_errors():
    # cos beats no-tuning by 0.2 in every case, with a little spread: far beyond 2 s.e.
    steady = [_case("no-tuning", i, 0.3 + 0.01 * i) for i in range(6)] + \
             [_case("cos", i, 0.5 + 0.01 * i + 0.002 * (i % 2)) for i in range(6)]
    assert paired_difference(steady, "cos", "no-tuning", "motion_fidelity", "noise")[2] == 6
    [line] = _findings_for(steady)
    assert line.startswith("From noise: Tuning (cos) beats the untuned model on motion fidelity: holds (")
    assert "paired difference +0.201, s.e. 0.000, n 6" in line


def test_findings_say_not_shown_within_two_standard_errors():
    noisy = [_case("no-tuning", i, 0.5) for i in range(6)] + \
            [_case("cos", i, v) for i, v in enumerate([0.9, 0.2, 0.8, 0.3, 0.6, 0.4])]
    [line] = _findings_for(noisy)
    assert ": not shown (" in line and "n 6" in line


def test_findings_say_reversed_when_significant_the_other_way():
    worse = [_case("no-tuning", i, 0.6 + 0.01 * i) for i in range(6)] + \
            [_case("cos", i, 0.3 + 0.01 * i) for i in range(6)]
    assert ": reversed (" in _findings_for(worse)[0]
    # colour leak: lower is better, so cos leaking less than eps-mse holds
    leak = [_case("eps-mse", i, 0.8, key="colour_leak") for i in range(6)] + \
           [_case("cos", i, 0.1 + 0.01 * i, key="colour_leak") for i in range(6)]
    assert verdict(paired_difference(leak, "cos", "eps-mse", "colour_leak", "noise"), higher_is_better=False) == "holds"


def test_findings_pair_only_cases_of_the_same_start():
    mixed = [_case("no-tuning", i, 0.3, start="inversion") for i in range(6)] + \
            [_case("cos", i, 0.9, start="noise") for i in range(6)]
    assert paired_difference(mixed, "cos", "no-tuning", "motion_fidelity") is None
    assert ": not shown (" in _findings_for(mixed)[0] and "fewer than 2 paired cases" in _findings_for(mixed)[0]


def test_spatial_variant_tunes_spatial_attention_only():
    from vmc_fast.toy.model import build_toy_unet

    names = [n for n, _ in build_toy_unet().named_parameters()]
    spatial = [n for n in names if re.search(SPATIAL_PATTERN, n)]
    assert spatial and not any("temp_attentions" in n for n in spatial)
    assert {n.rsplit(".", 2)[-2] for n in spatial} == {"to_q", "to_k", "to_v"}


@pytest.mark.parametrize("kwargs, field", [
    ({"variants": ("cos", "warp")}, "--variants"), ({"motions": ("left",)}, "--motions"),
    ({"samples": 0}, "--samples"), ({"seeds": ()}, "--seeds"), ({"steps": 0}, "--steps"),
    ({"guidance_scale": 0.5}, "--guidance-scale"),
])
def test_eval_config_names_the_bad_option(kwargs, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        EvalConfig(**kwargs)


# ------------------------------------------------------------------------------------------------ running


@pytest.fixture(scope="module")
def small_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    cfg = EvalConfig(variants=("no-tuning", "cos", "spatial"), motions=("zigzag",), samples=2, seeds=(0,), steps=3,
                     inference_steps=3, clip_model="tiny-random", out_dir=str(out),
                     cache_dir=str(out / "cache"))
    calls = []
    report = run_eval(cfg, progress=lambda label, done, total: calls.append((label, done, total)))
    return cfg, report, calls, out


def test_eval_scores_every_variant_and_writes_its_files(small_report):
    cfg, report, calls, out = small_report
    per_variant = ["inversion"] * 2 + ["noise"] * 2  # two looks from each start
    assert [(s["variant"], s["start"]) for s in report["samples"]] == \
        [(v, start) for v in ("no-tuning", "cos", "spatial") for start in per_variant]
    for sample in report["samples"]:
        assert 0 <= sample["motion_fidelity"] <= 1 and -1 <= sample["clip_text_alignment"] <= 1
        assert 0 <= sample["background_adherence"] <= 1
        assert sample["target"]["colour"] != "red"  # the zigzag reference is red
    assert report["samples"][0]["tune_seconds"] is None and report["samples"][4]["tune_seconds"] > 0
    # per variant: tuning (3 steps, none untuned) + one inversion (3) + 2 looks x 2 starts x 3 sampling steps
    assert calls[-1][1] == calls[-1][2] == 3 * (3 + 2 * 2 * 3) + 2 * 3
    assert [d for _, d, _ in calls] == sorted(d for _, d, _ in calls)

    saved = json.loads((out / "eval.json").read_text())
    assert saved["summary"].keys() == {"inversion", "noise"}
    assert saved["summary"]["noise"].keys() == {"no-tuning", "cos", "spatial"}
    assert saved["summary"]["noise"]["cos"]["samples"] == 2 and saved["model_training"]["steps"] > 0
    table = (out / "eval.md").read_text()
    assert table == markdown(saved)
    assert "## From inversion" in table and "## From noise" in table
    assert all(f"| {name} |" in table for name in ("no-tuning", "cos", "spatial"))
    image = Image.open(out / "eval.png")
    assert image.size[1] == (1 + 3 * 2) * 32 * 3  # reference + 3 variants x 2 starts, frames scaled 3x
    assert not list(out.glob(".*tmp*"))


def test_untuned_rows_are_identical_and_tuned_rows_differ(small_report):
    _, report, _, _ = small_report
    rows = {s["variant"]: s for s in report["samples"][::4]}
    # same inversion + sampling path; only the tuned weights differ (3 steps move them a little)
    assert rows["no-tuning"]["prompt"] == rows["cos"]["prompt"] == rows["spatial"]["prompt"]
    assert rows["cos"]["final_loss"] is not None and rows["no-tuning"]["final_loss"] is None


def test_a_noise_start_never_touches_the_reference_clip_and_every_row_draws_the_same_noise(tmp_path, monkeypatch):
    from vmc_fast.studies import evaluation

    starts = []
    monkeypatch.setattr(evaluation, "invert_clip", lambda *a, **k: pytest.fail("a noise start inverted the clip"))
    real_sample = evaluation.sample_frames

    def recording_sample(backbone, x_T, *args, **kwargs):
        starts.append(x_T.clone())
        return real_sample(backbone, x_T, *args, **kwargs)

    monkeypatch.setattr(evaluation, "sample_frames", recording_sample)
    cfg = EvalConfig(variants=("no-tuning", "cos"), motions=("zigzag",), starts=("noise",), samples=2, seeds=(0,),
                     steps=2, inference_steps=2, out_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"))
    report = run_eval(cfg)
    assert {s["start"] for s in report["samples"]} == {"noise"} and len(starts) == 4
    untuned, tuned = starts[:2], starts[2:]
    assert all(torch.equal(a, b) for a, b in zip(untuned, tuned))  # the same draw for the same look in each row
    assert not torch.equal(untuned[0], untuned[1])  # and another for another look


# ------------------------------------------------------------------------------------------------ CLI


def test_demo_cli_tunes_renders_and_scores(tmp_path):
    from vmc_fast.tuning.adapters import read_adapter

    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--out", str(out), "--steps", "3", "--samples", "2",
                                 "--inference-steps", "2"])
    assert result.exit_code == 0, result.output
    assert "motion" in result.output and "demo.gif" in result.output
    # without a terminal (as here) progress still shows as plain lines; the last one at 100%
    assert re.search(r"zigzag.*: (\d+)/\1 UNet calls, \d+ s elapsed, ETA 0.0 min", result.output), result.output
    tensors, info = read_adapter(out / "adapters" / "zigzag.safetensors")
    assert info.base_model == "toy" and info.prompt == "a circle moving in a zigzag" and info.steps == 3
    from vmc_fast.studies import demo

    tile_h, tile_w = demo.LABEL_HEIGHT + 32 * demo.SCALE, 32 * demo.SCALE
    size = (2 * tile_h + demo.GAP, 5 * tile_w + 4 * demo.GAP)  # 2 looks; reference + 4 videos each
    frames = load_clip(out / "demo.gif", FrameSampling(num_frames=8, height=size[0], width=size[1],
                                                       resize="squash"))
    assert frames.shape == (3, 8, *size)
    _, reference = held_out_example("zigzag")
    reference_tile = frames[:, :, demo.LABEL_HEIGHT:tile_h, :tile_w]  # the top-left video, under its label
    upscaled = reference.frames.repeat_interleave(demo.SCALE, 2).repeat_interleave(demo.SCALE, 3)
    assert (reference_tile - upscaled).abs().mean() < 0.05  # gif palette rounding only
    record = json.loads((out / "demo.json").read_text())
    assert len(record["samples"]) == 2 * 2 * 2 and record["adapter"].endswith("zigzag.safetensors")
    assert {(s["variant"], s["start"]) for s in record["samples"]} == \
        {(v, st) for v in ("no-tuning", "cos") for st in ("inversion", "noise")}
    assert "untuned / tuned" in result.output


@pytest.mark.parametrize("args, message", [
    (["demo", "--motion", "left"], "--motion"),
    (["demo", "--steps", "0"], "--steps"),
    (["eval", "--variants", "cos,warp"], "--variants: warp"),
    (["eval", "--seeds", "0,x"], "--seeds"),
    (["eval", "--motions", "zigzag,left"], "--motions: left"),
])
def test_demo_and_eval_refuse_bad_options_in_one_line(tmp_path, args, message):
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_readme_demo_command_runs_on_cpu(tmp_path):
    """The README's first command, exactly (defaults: 400 steps, 3 new appearances), in CI time on the CPU."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text().splitlines()
    command = next(line for line in readme[:6] if "vmc-fast demo" in line)
    args = command.split("&&", 1)[1].split("#", 1)[0].split()
    assert args[:2] == ["vmc-fast", "demo"]
    out = tmp_path / "runs" / "demo"
    args = [*args[2:-1], str(out)] if args[-2] == "--out" else [*args[2:], "--out", str(out)]
    done = subprocess.run([sys.executable, "-m", "vmc_fast.cli", "demo", *args], capture_output=True, text=True,
                          timeout=1200)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((out / "demo.json").read_text())
    assert len(record["samples"]) == 3 * 2 * 2 and (out / "demo.gif").stat().st_size > 0
    assert all(0 <= s["motion_fidelity"] <= 1 for s in record["samples"])
