"""AnimateDiff as a backbone: the tiny built-in, BASE+MOTION_ADAPTER and saved pipelines, surgery on the motion
modules only, text states per frame, training, the library and generate."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from conftest import moving_square_frames, write_video
from vmc_fast.config import DataConfig, GenerateConfig, ModelConfig, RunConfig, TrainConfig
from vmc_fast.errors import VmcError
from vmc_fast.models import load_backbone
from vmc_fast.models.animatediff import MOTION_QKV_PATTERN, save_tiny_pretrained, tiny_parts
from vmc_fast.models.registry import TEMPORAL_QKV_PATTERN, model_spec
from vmc_fast.tuning.adapters import read_adapter
from vmc_fast.tuning.surgery import prepare_for_motion_tuning, temporal_qkv_parameters

TINY = "animatediff-tiny-random"
MOTION_QKV = re.compile(r"^(down_blocks\.\d+|mid_block|up_blocks\.\d+)\.motion_modules\.\d+\.transformer_blocks\.\d+"
                        r"\.attn[12]\.to_[qkv]\.weight$")


@pytest.fixture(scope="module")
def tiny():
    return load_backbone(TINY)


def _inputs(frames: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 4, frames, 8, 8, generator=g), torch.tensor([500]), torch.randn(1, 77, 32, generator=g)


def _output(unet, x, t, states) -> torch.Tensor:
    with torch.no_grad():
        return unet(x, t, states).sample


# ---------------------------------------------------------------------------------------------- the backbone


def test_the_builtin_is_a_motion_unet_that_tunes_only_motion_attention_qkv(tiny):
    from diffusers import UNetMotionModel

    assert isinstance(tiny.unet, UNetMotionModel) and tiny.family == "animatediff"
    assert tiny.trainable_pattern == MOTION_QKV_PATTERN != TEMPORAL_QKV_PATTERN
    unet = load_backbone(TINY).unet  # a fresh copy: surgery changes requires_grad
    report = prepare_for_motion_tuning(unet, tiny.trainable_pattern)
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    motion = [n for n, _ in unet.named_parameters() if MOTION_QKV.match(n)]
    # 7 motion modules (2 down, 1 mid, 4 up) x attn1/attn2 x q/k/v
    assert trainable == motion and len(trainable) == report.num_tensors == 42
    # Without a pattern, surgery finds the family's own from the names.
    assert [n for n, _ in temporal_qkv_parameters(load_backbone(TINY).unet)] == trainable
    # The names are the motion adapter's own: an adapter also applies to a MotionAdapter checkpoint.
    adapter_names = {n for n, _ in tiny_parts()[1].named_parameters()}
    assert set(trainable) <= adapter_names


def test_the_temporal_pattern_of_the_other_backbones_finds_nothing_here(tiny):
    with pytest.raises(VmcError, match="--trainable .*no parameter name matches it in this UNetMotionModel"):
        prepare_for_motion_tuning(load_backbone(TINY).unet, TEMPORAL_QKV_PATTERN)


def test_text_states_are_taken_per_clip_like_the_other_backbones(tiny):
    x, t, states = _inputs()
    per_clip = _output(tiny.unet, x, t, states)  # (B, L, D), as vmc-fast passes them
    per_frame = _output(tiny.unet, x, t, states.repeat_interleave(8, 0))  # (B*F, L, D), as the pipeline passes
    by_name = tiny.unet(sample=x, timestep=t, encoder_hidden_states=states).sample.detach()
    assert per_clip.shape == x.shape
    torch.testing.assert_close(per_clip, per_frame, rtol=0, atol=0)
    torch.testing.assert_close(by_name, per_frame, rtol=0, atol=0)
    # The hook is what makes (B, L, D) work: diffusers' own UNetMotionModel refuses it.
    from diffusers import UNetMotionModel

    plain = UNetMotionModel.from_unet2d(*tiny_parts()[:2]).eval()
    torch.testing.assert_close(_output(plain, x, t, states.repeat_interleave(8, 0)), per_frame)
    with pytest.raises(RuntimeError):
        _output(plain, x, t, states)


def test_spec_matches_the_build_and_limits_the_frames(tiny):
    spec = model_spec(TINY)
    assert (spec.family, spec.num_frames, spec.height, spec.width) == ("animatediff", tiny.num_frames, tiny.height,
                                                                        tiny.width)
    assert spec.trainable_pattern == tiny.trainable_pattern
    assert spec.max_frames == tiny.unet.config.motion_max_seq_length == 32
    assert spec.frames_problem("--frames", 32) is None
    assert "at most 32 frames" in spec.frames_problem("--frames", 33)
    assert model_spec("tiny-random").max_frames is None


def test_the_math_attention_backend_reaches_the_motion_modules(tiny):
    from vmc_fast.models.attention import set_temporal_attention_backend

    unet = load_backbone(TINY).unet
    x, t, states = _inputs()
    reference = _output(unet, x, t, states)
    assert set_temporal_attention_backend(unet, "math") == 14  # 7 motion modules x attn1/attn2
    torch.testing.assert_close(_output(unet, x, t, states), reference, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- BASE+ADAPTER


@pytest.fixture(scope="module")
def saved_parts(tmp_path_factory):
    return save_tiny_pretrained(tmp_path_factory.mktemp("animatediff"))


def test_a_base_and_a_motion_adapter_load_as_the_builtin(tiny, saved_parts, monkeypatch):
    base, adapter = saved_parts
    monkeypatch.chdir(base.parent)
    model_id = ModelConfig(model_id="base+motion_adapter").model_id  # each part resolved to an absolute folder
    assert model_id == f"{base}+{adapter}"
    pair = load_backbone(model_id)
    assert pair.family == "animatediff" and pair.trainable_pattern == MOTION_QKV_PATTERN
    x, t, states = _inputs()
    torch.testing.assert_close(_output(pair.unet, x, t, states), _output(tiny.unet, x, t, states), rtol=0, atol=0)
    # The schedule is the base's with AnimateDiff's settings: linear betas, as the built-in's.
    assert pair.noise_scheduler.config.beta_schedule == "linear"
    torch.testing.assert_close(pair.noise_scheduler.alphas_cumprod, tiny.noise_scheduler.alphas_cumprod)
    spec = model_spec(model_id)
    assert (spec.family, spec.num_frames, spec.max_frames, spec.pixel_multiple) == ("animatediff", 16, 32, 4)
    torch.testing.assert_close(pair.load_text_encoder()(["a dog"]), tiny.load_text_encoder()(["a dog"]))


@pytest.mark.parametrize("parts, message", [
    ("{base}+{base}", "has no config.json"),
    ("{adapter}+{adapter}", "has no unet/config.json"),
    ("{base}+{adapter}+{adapter}", "two hub ids or local folders"),
    ("{base}+", "two hub ids or local folders"),
    ("{base}+./no_such_folder", "'./no_such_folder' is neither a local folder nor a hub id"),
])
def test_a_wrong_pair_is_refused_before_loading_weights(saved_parts, parts, message):
    base, adapter = saved_parts
    with pytest.raises(VmcError, match=message):
        model_spec(parts.format(base=base, adapter=adapter))
    with pytest.raises(VmcError, match=message):
        load_backbone(parts.format(base=base, adapter=adapter))


def test_an_adapter_that_does_not_fit_the_base_is_refused(saved_parts, tmp_path):
    from diffusers import MotionAdapter

    base, _ = saved_parts
    MotionAdapter(block_out_channels=(32, 64, 64), motion_layers_per_block=1, motion_num_attention_heads=4,
                  motion_norm_num_groups=8).save_pretrained(tmp_path / "wide")
    with pytest.raises(VmcError, match="do not fit the base"):
        model_spec(f"{base}+{tmp_path / 'wide'}")


def test_a_saved_animatediff_pipeline_loads_with_its_own_scheduler(tiny, tmp_path):
    from diffusers import AnimateDiffPipeline, DDIMScheduler

    unet2d, adapter, vae = tiny_parts()
    encoder = tiny.load_text_encoder()
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False)
    AnimateDiffPipeline(vae=vae, text_encoder=encoder.text_encoder, tokenizer=encoder.tokenizer, unet=unet2d,
                        motion_adapter=adapter, scheduler=scheduler).save_pretrained(tmp_path / "pipe")
    loaded = load_backbone(str(tmp_path / "pipe"))
    assert loaded.family == "animatediff" and loaded.noise_scheduler.config.beta_schedule == "scaled_linear"
    x, t, states = _inputs()
    torch.testing.assert_close(_output(loaded.unet, x, t, states), _output(tiny.unet, x, t, states), rtol=0,
                               atol=0)
    assert model_spec(str(tmp_path / "pipe")).max_frames == 32


# ---------------------------------------------------------------------------------------------- runs


def _run_config(videos: Path, tmp_path: Path, **model) -> RunConfig:
    return RunConfig(data=DataConfig(videos=str(videos)), model=ModelConfig(model_id=TINY, **model),
                     train=TrainConfig(steps=2, learning_rate=1e-2), prompt="a square moving right",
                     out_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"),
                     adapter_dtype="fp32")  # exact tensors: tests compare them across settings


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """A library run of two videos on animatediff-tiny-random: (its folder, the summary)."""
    from vmc_fast.runs.launch import train

    tmp_path = tmp_path_factory.mktemp("library")
    videos = tmp_path / "clips"
    videos.mkdir()
    write_video(videos / "right.mp4", moving_square_frames(10, 32, 32, step=2))
    write_video(videos / "left.mp4", moving_square_frames(10, 32, 32, step=2)[::-1].copy())
    return tmp_path, train(_run_config(videos, tmp_path))


def test_a_library_run_tunes_motion_modules_only(library, tiny):
    tmp_path, summary = library
    assert summary.ok and sorted(e["status"] for e in summary.entries) == ["done", "done"]
    base = dict(tiny.unet.named_parameters())
    for entry in summary.entries:
        tensors, info = read_adapter(entry["adapter"])
        assert info.base_model == TINY and info.extra["family"] == "animatediff"
        assert sorted(tensors) == sorted(n for n in base if MOTION_QKV.match(n))
        assert all(not torch.equal(tensors[n], base[n].detach()) for n in tensors)
    # The request key records the resolved pattern: a rerun with it spelled out is the same run.
    manifest = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert {e["request"]["model.trainable_pattern"] for e in manifest} == {MOTION_QKV_PATTERN}


def test_rerunning_with_the_default_pattern_spelled_out_is_the_same_run(library):
    from vmc_fast.runs.library import plan_run

    tmp_path, _ = library
    plan = plan_run(_run_config(tmp_path / "clips", tmp_path, trainable_pattern=MOTION_QKV_PATTERN))
    assert plan.todo == []


def test_too_many_frames_are_refused_before_anything_is_written(tmp_path, square_video):
    from vmc_fast.runs.launch import train

    cfg = _run_config(square_video, tmp_path)
    cfg.data.num_frames = 40
    with pytest.raises(ValueError, match="--frames 40: .* at most 32 frames"):
        train(cfg)
    assert not (tmp_path / "out").exists()


def test_generate_inverts_a_clip_with_an_adapter_and_writes_a_video(library, tmp_path):
    from vmc_fast.inference.generate import generate

    runs, summary = library
    entry = next(e for e in summary.entries if e["video"].endswith("right.mp4"))
    cfg = GenerateConfig(adapter=entry["adapter"], video=entry["video"], prompt="a dog moving right",
                         num_inference_steps=2, inversion_steps=2, output=str(tmp_path / "dog.gif"),
                         cache_dir=str(runs / "cache"))
    result = generate(cfg)
    assert cfg.model_id is None and result.output == tmp_path / "dog.gif" and result.output.is_file()
    assert tuple(result.frames.shape) == (3, 8, 32, 32) and torch.isfinite(result.frames).all()
    sidecar = json.loads((tmp_path / "dog.json").read_text())
    assert sidecar["model"] == TINY and sidecar["start"] == "inversion"
    too_long = GenerateConfig(adapter=entry["adapter"], prompt="a dog", num_frames=33, num_inference_steps=1,
                              output=None, cache_dir=str(runs / "cache"))
    with pytest.raises(ValueError, match="--frames 33"):
        generate(too_long)


def test_checkpointing_tunes_the_same_adapter(tmp_path, square_video):
    from vmc_fast.tuning.session import TuningSession

    tensors = []
    for checkpointing in (False, True):
        session = TuningSession(_run_config(square_video, tmp_path / str(checkpointing),
                                            gradient_checkpointing=checkpointing))
        assert session.backbone.unet.is_gradient_checkpointing == checkpointing
        states = session.prompt_embeddings(["a square"])["a square"]
        done = session.tune_video(square_video, "a square", states, tmp_path / f"{checkpointing}.safetensors")
        tensors.append(read_adapter(done.adapter)[0])
    for name in tensors[0]:
        torch.testing.assert_close(tensors[1][name], tensors[0][name], rtol=0, atol=1e-6)
