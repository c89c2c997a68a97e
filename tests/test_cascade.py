"""Show-1's frozen cascade: interpolation windows, sr1 windows with a given first frame, sr2, loading from folders."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vmc_fast.config import GenerateConfig
from vmc_fast.errors import VmcError
from vmc_fast.inference.cascade import (
    CascadeSettings,
    interpolate,
    run_cascade,
    sr1_windows,
    super_resolve,
)
from vmc_fast.inference.generate import generate
from vmc_fast.models import load_backbone
from vmc_fast.models.registry import LoadOptions
from vmc_fast.models.show1.loading import show1_scheduler
from vmc_fast.models.show1.stages import PixelStage, save_stage, tiny_cascade

ONE_STEP = CascadeSettings().with_steps(1)
TWO_STEPS = CascadeSettings().with_steps(2)  # one step is at t = 0, where DDPM adds no noise (no variance used)


class RecordingUNet(nn.Module):
    """Returns a constant epsilon half, then a different constant variance half, and keeps every input, to check
    what a stage feeds its UNet and which output half it uses."""

    def __init__(self, out_channels: int = 6, eps_value: float = 0.0, variance_value: float = 0.5):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))
        self.out_channels = out_channels
        self.eps_value, self.variance_value = eps_value, variance_value
        self.calls: list[dict] = []

    def forward(self, sample, timestep, encoder_hidden_states, class_labels=None):
        self.calls.append({"sample": sample.clone(), "text": encoder_hidden_states, "labels": class_labels})
        b, _, f, h, w = sample.shape
        half = (b, self.out_channels // 2, f, h, w)
        return torch.cat([torch.full(half, self.eps_value), torch.full(half, self.variance_value)], 1) + self.anchor


def _states(width: int = 32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"prompt": torch.randn(1, 77, width, generator=g), "negative": torch.randn(1, 77, width, generator=g)}


def _keyframes(num_frames: int, h: int = 8, w: int = 8) -> torch.Tensor:
    """(1, 3, F, h, w): frame i is the constant i / F (easy to recognise in the conditioning)."""
    values = torch.arange(num_frames, dtype=torch.float32) / num_frames
    return values.view(1, 1, num_frames, 1, 1).expand(1, 3, num_frames, h, w).clone()


def test_sr1_windows_cover_every_frame_and_share_their_boundary():
    assert sr1_windows(29, 8, 7) == [0, 7, 14, 21]  # the public script's four windows for 29 frames
    assert sr1_windows(5, 8, 7) == [0]
    for num_frames in range(2, 40):
        starts = sr1_windows(num_frames, 8, 7)
        covered = {f for s in starts for f in range(s, min(s + 8, num_frames))}
        assert covered == set(range(num_frames))
        assert all(0 < b - a < 8 for a, b in zip(starts, starts[1:]))  # each window starts on a frame already done


def test_interpolation_conditions_each_window_on_its_two_keyframes():
    unet = RecordingUNet()
    stage = PixelStage(unet=unet, scheduler=show1_scheduler())
    keyframes = _keyframes(3)
    video = interpolate(stage, keyframes, _states(), ONE_STEP, seed=0)
    assert video.shape == (1, 3, 9, 8, 8)  # 4F - 3 frames
    assert len(unet.calls) == 2  # one window per keyframe pair, one step each
    for i, call in enumerate(unet.calls):
        x = call["sample"]
        assert x.shape == (2, 7, 5, 8, 8)  # noisy frames, blended keyframes, mask; conditional and unconditional
        torch.testing.assert_close(x[0, 3:6, 0], keyframes[0, :, i])
        torch.testing.assert_close(x[0, 3:6, 4], keyframes[0, :, i + 1])
        torch.testing.assert_close(x[0, 3:6, 2], (keyframes[0, :, i] + keyframes[0, :, i + 1]) / 2)
        assert x[0, 6, :, 0, 0].tolist() == [1, 0, 0, 0, 1]
        torch.testing.assert_close(x[0, :3], x[1, :3])  # both guidance branches see the same x_t
    torch.testing.assert_close(unet.calls[0]["sample"][0, :3], unet.calls[1]["sample"][0, :3])  # same noise


def test_a_fixed_variance_scheduler_is_given_the_epsilon_half_only():
    from vmc_fast.models.show1.loading import SHOW1_SCHEDULER_CONFIG

    def video(eps: float, variance: float) -> torch.Tensor:
        scheduler = show1_scheduler({**SHOW1_SCHEDULER_CONFIG, "variance_type": "fixed_small"})
        stage = PixelStage(unet=RecordingUNet(eps_value=eps, variance_value=variance), scheduler=scheduler)
        return interpolate(stage, _keyframes(2), _states(), TWO_STEPS, seed=0)

    base = video(0.1, 0.0)
    assert base.shape == (1, 3, 5, 8, 8) and torch.isfinite(base).all()
    torch.testing.assert_close(video(0.1, 1e3), base, rtol=0, atol=0)  # the variance half is not used
    assert (video(0.3, 0.0) - base).abs().max() > 1e-2  # the epsilon half is


def test_a_learned_range_scheduler_steps_with_epsilon_then_the_variance_half():
    """guided_ddpm equals scheduler.step, frame by frame, on the hand-built output [epsilon, variance]."""
    from vmc_fast.inference.cascade import guided_ddpm

    eps, variance = 0.2, -0.4
    noise = torch.randn(1, 3, 5, 8, 8, generator=torch.Generator().manual_seed(2))
    condition = torch.zeros(1, 4, 5, 8, 8)

    def run(variance_value: float) -> torch.Tensor:
        stage = PixelStage(unet=RecordingUNet(eps_value=eps, variance_value=variance_value),
                           scheduler=show1_scheduler())
        return guided_ddpm(stage, noise, condition, _states(), 2, 7.0, torch.Generator().manual_seed(3))

    scheduler = show1_scheduler()
    assert scheduler.config.variance_type == "learned_range"
    scheduler.set_timesteps(2)
    generator, x = torch.Generator().manual_seed(3), noise[0].permute(1, 0, 2, 3)  # frames as the batch
    for t in scheduler.timesteps:
        output = torch.cat([torch.full_like(x, eps), torch.full_like(x, variance)], 1)
        x = scheduler.step(output, t, x, generator=generator).prev_sample
    torch.testing.assert_close(run(variance), x.permute(1, 0, 2, 3)[None])
    assert (run(0.9) - run(variance)).abs().max() > 1e-3  # and the variance half is used


def test_sr1_noises_the_upscaled_input_but_keeps_the_given_first_frame():
    from diffusers import DDPMScheduler

    from vmc_fast.models.show1.stages import IF_NOISING_CONFIG

    def stage():
        return PixelStage(unet=RecordingUNet(), scheduler=show1_scheduler(),
                          image_noising_scheduler=DDPMScheduler.from_config(IF_NOISING_CONFIG))

    video = _keyframes(15, 4, 4)
    first = torch.full((1, 3, 16, 16), 0.5)
    whole = stage()
    out = super_resolve(whole, video, _states(), ONE_STEP, seed=0, first_frame=first)
    assert out.shape == (1, 3, 15, 16, 16)
    assert len(whole.unet.calls) == 2  # windows at 0 and 7
    first_window = super_resolve(stage(), video[:, :, :8], _states(), ONE_STEP, seed=0, first_frame=first)
    for call, given in zip(whole.unet.calls, (first, first_window[:, :, 7])):
        x = call["sample"]
        assert x.shape[1] == 6 and call["labels"].tolist() == [250, 250]
        torch.testing.assert_close(x[0, 3:, 0], given[0])  # the given frame, not noised
        assert (x[0, 3:, 1] - x[0, 3:, 1].mean()).abs().max() > 0.05  # the other frames carry noise


def test_tiny_cascade_turns_8_keyframes_into_29_frames_at_the_final_size():
    cascade = tiny_cascade(LoadOptions())
    seen = []
    video = run_cascade(cascade, _keyframes(8, 16, 24)[0] * 2 - 1, _states(), "a dog", ONE_STEP, seed=0,
                        on_step=lambda phase, i, n: seen.append((phase, i, n)))
    assert video.shape == (3, 29, 96, 144) and video.abs().max() <= 1 and torch.isfinite(video).all()
    assert [s for s in seen if s[1] == s[2]] == [("interpolate", 7, 7), ("sr1 first frame", 1, 1), ("sr1", 4, 4),
                                                 ("sr2", 1, 1)]


def test_stages_saved_to_folders_load_through_the_real_loaders_and_match(tmp_path):
    """The from_pretrained paths (Show-1 UNet folders, IF-II and sr2 diffusers pipelines) give the same video."""
    built_in = tiny_cascade(LoadOptions())
    folders = {}
    for name in built_in.sources:
        folders[name] = str(tmp_path / name)
        save_stage(built_in.load(name), folders[name])
    loaded = built_in.with_sources(folders)
    keyframes = _keyframes(2, 16, 24)[0] * 2 - 1
    expected = run_cascade(built_in, keyframes, _states(), "a dog", ONE_STEP, seed=1)
    actual = run_cascade(loaded, keyframes, _states(), "a dog", ONE_STEP, seed=1)
    assert expected.shape == (3, 5, 96, 144)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_a_missing_stage_folder_names_the_stage_and_the_fix(tmp_path):
    cascade = tiny_cascade(LoadOptions()).with_sources({"sr1": str(tmp_path / "nowhere")})
    with pytest.raises(VmcError, match=r"cascade stage sr1: .*--stage sr1=FOLDER.*--keyframes-only"):
        cascade.load("sr1")
    with pytest.raises(ValueError, match="unknown stage 'sr3'"):
        cascade.with_sources({"sr3": "x"})
    with pytest.raises(ValueError, match="only sr1_first_frame can be skipped"):
        cascade.with_sources({"sr2": "none"})
    with pytest.raises(VmcError, match="--stage sr1_first_frame=none"):
        cascade.with_sources({"sr1_first_frame": str(tmp_path / "nowhere")}).load("sr1_first_frame")


def test_without_the_first_frame_model_sr1_still_runs():
    cascade = tiny_cascade(LoadOptions()).with_sources({"sr1_first_frame": "none"})
    seen = []
    video = run_cascade(cascade, _keyframes(2, 16, 24)[0], _states(), "a dog", ONE_STEP, seed=0,
                        on_step=lambda phase, i, n: seen.append(phase))
    assert video.shape == (3, 5, 96, 144) and "sr1 first frame" not in seen


def test_generate_runs_the_show1_cascade_and_writes_every_frame(tmp_path):
    from PIL import Image

    out = tmp_path / "show1.gif"
    cfg = GenerateConfig(model_id="show1-tiny-random", prompt="a dog", num_inference_steps=1, num_frames=3,
                         cascade_steps=1, output=str(out), cache_dir=str(tmp_path / "cache"))
    result = generate(cfg)
    assert result.frames.shape == (3, 9, 96, 144) and result.note == ""
    assert {"interpolate", "sr1", "sr2"} <= result.seconds.keys()
    image = Image.open(out)
    assert image.n_frames == 9 and image.size == (144, 96)


def test_keyframes_only_stops_after_the_keyframes_and_says_so(tmp_path):
    cfg = GenerateConfig(model_id="show1-tiny-random", prompt="a dog", num_inference_steps=1, num_frames=2,
                         height=8, width=8, keyframes_only=True, output=None, cache_dir=str(tmp_path / "cache"))
    result = generate(cfg, backbone=load_backbone("show1-tiny-random"))
    assert result.frames.shape == (3, 2, 8, 8)
    assert "keyframes only" in result.note and "--keyframes-only" in result.note


def test_cascade_options_on_a_single_stage_model_warn(tmp_path):
    cfg = GenerateConfig(model_id="tiny-random", prompt="a dog", num_inference_steps=1, num_frames=2, height=16,
                         width=16, cascade_steps=3, output=None, cache_dir=str(tmp_path / "cache"))
    with pytest.warns(UserWarning, match="tiny-random has no cascade stages"):
        generate(cfg)


@pytest.mark.parametrize("overrides, option", [
    (dict(cascade_steps=0), "--cascade-steps"),
    (dict(stages={"sr3": "x"}), "--stage"),
    (dict(stages={"sr2": "none"}), "--stage: only sr1_first_frame can be skipped"),
])
def test_bad_cascade_options_raise_value_error_naming_the_option(overrides, option):
    with pytest.raises(ValueError, match=option):
        GenerateConfig(model_id="show1-tiny-random", **overrides)


def test_cli_stage_option_must_be_name_equals_id(tmp_path):
    from typer.testing import CliRunner

    from vmc_fast.cli import app

    result = CliRunner().invoke(app, ["generate", "--model", "show1-tiny-random", "--prompt", "a dog",
                                      "--stage", "sr1", "--out", str(tmp_path / "x.gif")])
    assert result.exit_code != 0 and "--stage: 'sr1' is not NAME=ID" in result.output
    assert not (tmp_path / "x.gif").exists()
