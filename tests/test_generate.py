"""Generation: DDIM inversion + guided DDIM sampling on the tiny random models, adapters, atomic output."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from vmc_fast.config import GenerateConfig
from vmc_fast.errors import VmcError
from vmc_fast.inference.ddim import (
    ddim_invert,
    inversion_scheduler,
    predict_noise,
    sample,
    sampling_scheduler,
)
from vmc_fast.inference.generate import generate
from vmc_fast.io.video import write_video_atomic
from vmc_fast.models import load_backbone
from vmc_fast.toy.world import ClipSpec, render_clip, write_clip
from vmc_fast.tuning.adapters import base_fingerprint, save_adapter
from vmc_fast.tuning.surgery import temporal_qkv_parameters

# Small enough for a busy 2-core CPU: 4 frames at 16x16 pixels (8x8 latents for tiny-random).
FRAMES, SIZE = 4, 16


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("tiny-random")


@pytest.fixture(scope="module")
def tiny_states(tiny):
    encoder = tiny.load_text_encoder()
    states = encoder(["", "a ball is moving to the right"])
    return states[:1], states[1:]  # empty (1, 77, 32), prompt (1, 77, 32)


def _toy_clip(num_frames: int = FRAMES, size: int = SIZE) -> torch.Tensor:
    """(3, F, H, W) in [-1, 1]: a red circle moving right on grey."""
    return render_clip(ClipSpec(num_frames=num_frames, height=size, width=size, motion="right")).frames


def _rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).pow(2).mean().sqrt().item()


def _config(tmp_path, **overrides) -> GenerateConfig:
    values = dict(model_id="tiny-random", prompt="a ball is moving to the right", num_inference_steps=2,
                  num_frames=FRAMES, height=SIZE, width=SIZE, output=None,
                  cache_dir=str(tmp_path / "cache"))
    return GenerateConfig(**{**values, **overrides})


def _write_adapter(path, backbone, scale: float = 0.5, fingerprint: str | None = None):
    """An adapter of perturbed temporal Q/K/V tensors for `backbone` (the base itself is left unchanged)."""
    params = dict(temporal_qkv_parameters(backbone.unet))
    generator = torch.Generator().manual_seed(0)
    tensors = {n: p.detach() + scale * torch.randn(p.shape, generator=generator) for n, p in params.items()}
    fingerprint = fingerprint or base_fingerprint(backbone.unet, exclude=set(params))
    return save_adapter(path, tensors, base_model=backbone.model_id, fingerprint=fingerprint, prompt="p", steps=1,
                        final_loss=0.0, loss="cos", num_frames=FRAMES, height=SIZE, width=SIZE)


# ---------------------------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("model_id", ["tiny-random", "show1-tiny-random", "animatediff-tiny-random"])
def test_schedulers_use_the_models_own_schedule(model_id):
    backbone = load_backbone(model_id)
    config = backbone.noise_scheduler.config
    expected = backbone.noise_scheduler.alphas_cumprod
    inverse, forward = inversion_scheduler(config, 75), sampling_scheduler(config, 75)
    torch.testing.assert_close(inverse.alphas_cumprod, expected, rtol=0, atol=0)
    torch.testing.assert_close(forward.alphas_cumprod, expected, rtol=0, atol=0)
    # Inversion ends where sampling starts.
    assert inverse.timesteps.flip(0).tolist() == forward.timesteps.tolist()
    assert inverse.config.clip_sample is False  # clipping x_0 would make inversion non-invertible
    assert forward.config.thresholding == config.get("thresholding", False)  # sampling keeps the model's own


def test_the_two_builtin_schedules_differ():
    # Guards the test above: a mix-up between these (the public code's bug) would be visible.
    a = load_backbone("tiny-random").noise_scheduler.alphas_cumprod
    b = load_backbone("show1-tiny-random").noise_scheduler.alphas_cumprod
    assert (a - b).abs().max() > 0.05


# ---------------------------------------------------------------------------------------------- the loops


def test_inversion_then_sampling_reconstructs_the_input(tiny, tiny_states):
    """Inverting with the empty prompt and sampling back (guidance 1) lands near the input.

    Random weights make the DDIM ODE rough, so the reconstruction is only approximate; measured on this model
    (4x8x8 latents, rms error relative to a sample from fresh noise): 0.15 at 10 steps, 0.12 at 25, 0.09 at 50.
    12 steps keep the test short on a busy CPU.
    """
    empty, _ = tiny_states
    x0 = tiny.encode_pixels(_toy_clip().unsqueeze(0)).float()
    config = tiny.noise_scheduler.config
    steps = 12
    x_T = ddim_invert(tiny.unet, x0, empty, config, steps)
    reconstruction = sample(tiny.unet, x_T, empty, None, config, steps, 1.0)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    from_noise = sample(tiny.unet, noise, empty, None, config, steps, 1.0)
    assert x_T.shape == x0.shape and torch.isfinite(x_T).all()
    error, baseline = _rms(reconstruction, x0), _rms(from_noise, x0)
    assert error < 0.35 * baseline, f"reconstruction rms {error:.4f} vs {baseline:.4f} from noise"



def test_guidance_one_equals_the_conditional_sample(tiny, tiny_states):
    empty, prompt = tiny_states
    x_T = torch.randn(1, 4, FRAMES, 8, 8, generator=torch.Generator().manual_seed(1))
    config = tiny.noise_scheduler.config
    conditional = sample(tiny.unet, x_T, prompt, None, config, 2, 1.0)
    guided_one = sample(tiny.unet, x_T, prompt, empty, config, 2, 1.0)  # one batch of 2
    guided = sample(tiny.unet, x_T, prompt, empty, config, 2, 7.5)
    torch.testing.assert_close(guided_one, conditional, rtol=1e-4, atol=1e-4)
    assert _rms(guided, conditional) > 1e-2


def test_learned_variance_model_inverts_and_samples():
    """Show-1 outputs 6 channels; only the epsilon half drives the steps (x keeps 3 channels)."""
    backbone = load_backbone("show1-tiny-random")
    assert backbone.learned_variance
    states = torch.zeros(1, 77, 32)
    x0 = _toy_clip(num_frames=2, size=8).unsqueeze(0)
    x_T = ddim_invert(backbone.unet, x0, states, backbone.noise_scheduler.config, 1)
    x = sample(backbone.unet, x_T, states, states, backbone.noise_scheduler.config, 1, 9.0)
    assert x_T.shape == x.shape == x0.shape and torch.isfinite(x).all()


# ---------------------------------------------------------------------------------------------- generate


def test_generate_inverts_a_video_and_writes_a_gif_atomically(tmp_path, tiny):
    from PIL import Image

    video = write_clip(_toy_clip(num_frames=6), tmp_path / "input.mp4")
    out = tmp_path / "out" / "result.gif"
    steps = []
    result = generate(_config(tmp_path, video=str(video), inversion_steps=2, output=str(out)), backbone=tiny,
                      on_step=lambda phase, i, n: steps.append((phase, i, n)))
    assert steps == [("invert", 1, 2), ("invert", 2, 2), ("sample", 1, 2), ("sample", 2, 2)]
    assert result.frames.shape == (3, FRAMES, SIZE, SIZE) and result.frames.abs().max() <= 1
    assert result.x_T.shape == (1, 4, FRAMES, 8, 8)
    assert result.output == out and Image.open(out).n_frames == FRAMES
    assert sorted(p.name for p in out.parent.iterdir()) == ["result.gif", "result.json"]  # no temporary file left
    sidecar = json.loads((out.parent / "result.json").read_text())  # what produced the video, beside it
    assert sidecar["config"]["prompt"] == "a ball is moving to the right" and sidecar["frames"] == [FRAMES, SIZE, SIZE]
    assert result.note == ""  # a one-stage model: nothing left out
    assert {"load", "prompts", "invert", "sample", "decode", "write"} <= result.seconds.keys()


def test_adapter_changes_the_output_and_another_base_is_refused(tmp_path):
    tiny = load_backbone("tiny-random")  # own copy: the adapter is copied into it
    adapter = _write_adapter(tmp_path / "motion.safetensors", tiny)
    cfg = _config(tmp_path, seed=3)
    plain = generate(cfg, backbone=tiny).frames
    tuned = generate(_config(tmp_path, seed=3, adapter=str(adapter)), backbone=tiny).frames
    assert _rms(tuned, plain) > 1e-3

    show1 = load_backbone("show1-tiny-random")
    foreign = _write_adapter(tmp_path / "show1.safetensors", show1)
    with pytest.raises(VmcError, match="another base model"):
        generate(_config(tmp_path, adapter=str(foreign)), backbone=load_backbone("tiny-random"))
    forged = _write_adapter(tmp_path / "forged.safetensors", tiny, fingerprint="0" * 16)
    with pytest.raises(VmcError, match="fingerprint"):
        generate(_config(tmp_path, adapter=str(forged)), backbone=load_backbone("tiny-random"))


def test_options_that_do_nothing_warn(tmp_path, tiny):
    with pytest.warns(UserWarning, match="inversion_steps: ignored without --video"):
        generate(_config(tmp_path, inversion_steps=5, num_inference_steps=1), backbone=tiny)


def test_failed_write_leaves_no_file(tmp_path):
    with pytest.raises(Exception):
        write_video_atomic(torch.zeros(2, 3), tmp_path / "broken.gif")  # not (3, F, H, W)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("overrides, option", [
    (dict(model_id=" "), "--model"),
    (dict(num_inference_steps=0), "--steps"),
    (dict(inversion_steps=1001), "--inversion-steps"),
    (dict(guidance_scale=-1.0), "--guidance-scale"),
    (dict(seed=-1), "--seed"),
    (dict(num_frames=1), "--frames"),
    (dict(height=4), "--height"),
    (dict(resize="stretch"), "--resize"),
    (dict(output="out.avi"), "--out"),
    (dict(precision="fp8"), "--precision"),
    (dict(device="tpu"), "--device"),
    (dict(adapter="missing.safetensors"), "--adapter"),
    (dict(video="missing.mp4"), "--video"),
])
def test_bad_options_raise_value_error_naming_the_option(tmp_path, overrides, option):
    with pytest.raises(ValueError, match=option):
        _config(tmp_path, **overrides)


# ---------------------------------------------------------------------------------------------- learned variance


class _LearnedVarianceStub(torch.nn.Module):
    """eps(x) = 0.1 x + 0.05, followed (with `variance`) by a variance half of large random values."""

    def __init__(self, variance: bool):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.variance = variance

    def forward(self, sample, timestep, encoder_hidden_states):
        eps = 0.1 * sample + 0.05 + self.anchor
        return torch.cat([eps, 1e3 * torch.randn_like(sample)], 1) if self.variance else eps


def test_predict_noise_returns_exactly_the_epsilon_half():
    x = torch.randn(1, 3, FRAMES, 8, 8, generator=torch.Generator().manual_seed(4))
    states = torch.zeros(1, 77, 32)
    eps = predict_noise(_LearnedVarianceStub(variance=True), x, 500, states)
    assert torch.equal(eps, 0.1 * x + 0.05)


def test_inversion_of_a_learned_variance_model_ignores_the_variance_half():
    config = load_backbone("show1-tiny-random").noise_scheduler.config
    x0 = _toy_clip(num_frames=2, size=8).unsqueeze(0)
    states = torch.zeros(1, 77, 32)
    with_variance = ddim_invert(_LearnedVarianceStub(variance=True), x0, states, config, 3)
    without = ddim_invert(_LearnedVarianceStub(variance=False), x0, states, config, 3)
    torch.testing.assert_close(with_variance, without, rtol=0, atol=0)
    assert (without - x0).abs().max() > 1e-2  # inversion moved: the epsilon half drove it


# ---------------------------------------------------------------------------------------------- non-finite frames


def test_frames_holding_nan_are_never_written(tmp_path, tiny, monkeypatch):
    from vmc_fast.inference import generate as generate_module

    real_decode = generate_module.decode

    def decode_with_a_nan(backbone, x0):
        frames = real_decode(backbone, x0)
        frames[0, 1, 2, 3] = math.nan
        return frames

    monkeypatch.setattr(generate_module, "decode", decode_with_a_nan)
    out = tmp_path / "out" / "nan.gif"
    with pytest.raises(VmcError, match=r"NaN or inf \(precision fp16\); nothing was written; use --precision bf16"):
        generate(_config(tmp_path, precision="fp16", output=str(out)), backbone=tiny)
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


# ---------------------------------------------------------------------------------- E3: the frames tuned on


def _grey_clip(folder, num_frames: int = 80):
    """A frame folder whose frame i is flat grey of level 3 i (lossless PNG), so a frame tells its index."""
    from conftest import write_frame_folder

    levels = 3 * np.arange(num_frames, dtype=np.uint8)
    return write_frame_folder(folder, np.broadcast_to(levels[:, None, None, None], (num_frames, 16, 16, 3)).copy())


@pytest.fixture(scope="module")
def tuned_on_a_sampled_clip(tmp_path_factory):
    """An adapter tuned on frames 30, 34, 38, 42 of a grey clip, played backwards: (adapter, clip folder)."""
    from vmc_fast.config import DataConfig, RunConfig, TrainConfig
    from vmc_fast.tuning.session import TuningSession

    root = tmp_path_factory.mktemp("sampled")
    clip = _grey_clip(root / "grey")
    cfg = RunConfig(data=DataConfig(videos=str(clip), num_frames=4, height=16, width=16, start_frame=30,
                                    frame_stride=4, reverse=True),
                    train=TrainConfig(steps=1), prompt="a grey fade", out_dir=str(root / "out"),
                    cache_dir=str(root / "cache"))
    session = TuningSession(cfg)
    states = session.prompt_embeddings([cfg.prompt])[cfg.prompt]
    return session.tune_video(clip, cfg.prompt, states, root / "grey.safetensors").adapter, clip


def _inverted_levels(tmp_path, adapter, clip, **overrides):
    """(grey level of each frame generate inverted, its sidecar)."""
    backbone = load_backbone("tiny-random")
    seen = []
    encode = backbone.encode_pixels
    backbone.encode_pixels = lambda pixels: seen.append(pixels.clone()) or encode(pixels)
    out = tmp_path / "g.gif"
    values = dict(adapter=str(adapter) if adapter else None, video=str(clip), prompt="a grey fade",
                  inversion_steps=1, num_inference_steps=1, output=str(out), cache_dir=str(tmp_path / "cache"))
    generate(GenerateConfig(**{**values, **overrides}), backbone=backbone)
    levels = ((seen[0][0].mean(dim=(0, 2, 3)) + 1) * 127.5).round().tolist()
    return levels, json.loads(out.with_suffix(".json").read_text())


def test_the_adapter_records_how_its_frames_were_sampled(tuned_on_a_sampled_clip):
    from vmc_fast.config import DataConfig
    from vmc_fast.tuning.adapters import read_adapter

    adapter, clip = tuned_on_a_sampled_clip
    sampling = read_adapter(adapter)[1].sampling
    assert {k: sampling[k] for k in ("start_frame", "frame_stride", "reverse", "num_frames", "height", "width",
                                     "resize")} == dict(start_frame=30, frame_stride=4, reverse=True, num_frames=4,
                                                        height=16, width=16, resize="crop")
    assert sampling["frames"] == [42, 38, 34, 30] and sampling["video"] == str(clip.resolve())
    every_setting = {f for f in DataConfig.__dataclass_fields__ if f != "videos"}
    assert every_setting <= sampling.keys()  # sampling fields added later are recorded too


def test_generate_inverts_the_frames_the_adapter_was_tuned_on(tmp_path, tuned_on_a_sampled_clip):
    adapter, clip = tuned_on_a_sampled_clip
    levels, sidecar = _inverted_levels(tmp_path, adapter, clip)
    assert levels == [3 * i for i in (42, 38, 34, 30)]
    assert sidecar["inverted"]["frames"] == [42, 38, 34, 30] and sidecar["start"] == "inversion"
    assert sidecar["inverted"]["video"] == str(clip.resolve()) and sidecar["seed"] == 0
    config = sidecar["config"]
    assert (config["start_frame"], config["frame_stride"], config["reverse"], config["resize"]) == (30, 4, True, "crop")
    assert sidecar["adapter"]["sampling"]["frames"] == [42, 38, 34, 30] and "base_samples" not in json.dumps(sidecar)
    assert sidecar["adapter_path"] == str(adapter.resolve()) and sidecar["model"] == "tiny-random"


@pytest.mark.parametrize("overrides, frames", [
    (dict(frame_stride=1), [33, 32, 31, 30]),
    (dict(start_frame=0, reverse=False), [0, 4, 8, 12]),
    (dict(reverse=False), [30, 34, 38, 42]),
])
def test_generate_sampling_options_override_the_adapters(tmp_path, tuned_on_a_sampled_clip, overrides, frames):
    adapter, clip = tuned_on_a_sampled_clip
    levels, sidecar = _inverted_levels(tmp_path, adapter, clip, **overrides)
    assert levels == [3 * i for i in frames] and sidecar["inverted"]["frames"] == frames


def test_generate_without_an_adapter_samples_from_the_start(tmp_path):
    clip = _grey_clip(tmp_path / "grey", num_frames=12)
    levels, sidecar = _inverted_levels(tmp_path, None, clip, num_frames=4, height=16, width=16)
    assert levels == [0, 3, 6, 9] and sidecar["inverted"]["frames"] == [0, 1, 2, 3]


def test_an_adapter_from_before_the_sampling_record_keeps_its_direction(tmp_path, tiny):
    params = dict(temporal_qkv_parameters(tiny.unet))
    old = save_adapter(tmp_path / "old.safetensors", {n: p.detach() for n, p in params.items()},
                       base_model="tiny-random", fingerprint=base_fingerprint(tiny.unet, set(params)), prompt="p",
                       steps=1, final_loss=0.0, loss="cos", num_frames=4, height=16, width=16,
                       extra={"reverse": True})  # what adapters recorded before the sampling record
    clip = _grey_clip(tmp_path / "grey", num_frames=12)
    levels, _ = _inverted_levels(tmp_path, old, clip)
    assert levels == [9, 6, 3, 0]


def test_sampling_options_without_a_video_warn(tmp_path, tiny):
    with pytest.warns(UserWarning, match="start_frame, reverse: ignored without --video"):
        generate(_config(tmp_path, start_frame=3, reverse=True), backbone=tiny)


def test_a_clip_too_short_for_the_adapters_sampling_says_where_it_came_from(tmp_path, tuned_on_a_sampled_clip):
    adapter, _ = tuned_on_a_sampled_clip
    short = _grey_clip(tmp_path / "short", num_frames=20)
    with pytest.raises(VmcError, match=r"has 20 frames but 43 are needed.*generate took --frame-stride 4, "
                                       r"--resize crop, --start-frame 30, --reverse, --background white from the "
                                       r"adapter"):
        _inverted_levels(tmp_path, adapter, short)
    levels, _ = _inverted_levels(tmp_path, adapter, short, start_frame=0)
    assert levels == [3 * i for i in (12, 8, 4, 0)]


def _transparent_clip(folder, num_frames: int = 6):
    """A frame folder of fully transparent frames whose hidden colour is magenta: only --background shows."""
    from conftest import write_frame_folder

    frames = np.zeros((num_frames, 16, 16, 4), dtype=np.uint8)
    frames[..., 0] = frames[..., 2] = 255  # magenta under alpha 0
    return write_frame_folder(folder, frames)


def test_generate_composites_onto_the_background_the_adapter_was_tuned_with(tmp_path):
    from vmc_fast.config import DataConfig, RunConfig, TrainConfig
    from vmc_fast.tuning.adapters import read_adapter
    from vmc_fast.tuning.session import TuningSession

    clip = _transparent_clip(tmp_path / "rgba")
    cfg = RunConfig(data=DataConfig(videos=str(clip), num_frames=4, height=16, width=16, background="black",
                                    fps=10),  # ignored: a frame folder has no times
                    train=TrainConfig(steps=1), prompt="a fade", out_dir=str(tmp_path / "out"),
                    cache_dir=str(tmp_path / "cache"))
    session = TuningSession(cfg)
    with pytest.warns(UserWarning, match="transparent"):
        adapter = session.tune_video(clip, cfg.prompt, session.prompt_embeddings([cfg.prompt])[cfg.prompt],
                                     tmp_path / "a.safetensors").adapter
    assert read_adapter(adapter)[1].sampling["fps"] is None  # recorded as taken: by index
    with pytest.warns(UserWarning, match="#000000"):
        levels, sidecar = _inverted_levels(tmp_path, adapter, clip)
    assert levels == [0, 0, 0, 0] and sidecar["inverted"]["sampling"]["background"] == "black"
    with pytest.warns(UserWarning, match="#ffffff"):
        levels, _ = _inverted_levels(tmp_path, adapter, clip, background="white")  # the option overrides
    assert levels == [255, 255, 255, 255]


def test_generate_samples_by_time_at_the_rate_the_adapter_was_tuned_at(tmp_path):
    """train --fps is recorded as the sampling's `fps`; generate's field for it is `sample_fps`."""
    from types import SimpleNamespace

    from vmc_fast.inference.generate import resolve_sampling

    info = SimpleNamespace(sampling={"fps": 15.0, "background": "gray", "start_frame": 2}, extra={})
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"")  # resolve_sampling reads only the adapter's record
    cfg = resolve_sampling(GenerateConfig(prompt="p", video=str(video)), info)
    assert (cfg.sample_fps, cfg.background, cfg.start_frame) == (15.0, "gray", 2)
    cfg = resolve_sampling(GenerateConfig(prompt="p", video=str(video), sample_fps=30.0, background="black"), info)
    assert (cfg.sample_fps, cfg.background) == (30.0, "black")
    untouched = resolve_sampling(GenerateConfig(prompt="p", video=str(video)), SimpleNamespace(sampling={}, extra={}))
    assert (untouched.sample_fps, untouched.background) == (None, "white")
