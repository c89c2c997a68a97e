"""`vmc-fast export`: each format loads in the library it is for and reproduces our own application of the
adapter (`apply_adapter`); at a lower rank, the change it loads is off by exactly the recorded error.

Tolerances: at full rank the factors are exact up to float32 rounding of U sqrt(S) and sqrt(S) V^T, so the UNet
outputs agree to FULL_RANK_ATOL (measured: about 1e-6 on these tiny models) and the loaded changes to
FULL_RANK_WEIGHT_ERROR relative; at rank r the loaded change's relative error equals the recorded one to
RECORDED_ERROR_RTOL (both are measured on the same float32 factors).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import moving_square_frames, write_video
from vmc_fast.cli import app
from vmc_fast.config import DataConfig, ExportConfig, ModelConfig, RunConfig, TrainConfig
from vmc_fast.errors import VmcError
from vmc_fast.inference.ddim import predict_noise
from vmc_fast.models import load_backbone
from vmc_fast.models.animatediff import tiny_parts
from vmc_fast.tuning.adapters import apply_adapter
from vmc_fast.tuning.export import (
    DIFFUSERS_WEIGHTS,
    METADATA_KEY,
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    RECORD_SUFFIX,
    adapter_changes,
    adapter_kind,
    comfy_key,
    diffusers_module,
    export_adapter,
    low_rank,
)
from vmc_fast.tuning.session import TuningSession

FULL_RANK_ATOL = 1e-5
FULL_RANK_WEIGHT_ERROR = 1e-6
RECORDED_ERROR_RTOL = 1e-4
TINY_AD = "animatediff-tiny-random"
PROMPT = "a square moving right"


def _train(model: str, folder: Path) -> Path:
    """A real adapter: 3 steps at a high learning rate, so that its change is far above float32 rounding."""
    video = write_video(folder / "square.mp4", moving_square_frames(10, 32, 32, step=2))
    cfg = RunConfig(data=DataConfig(videos=str(video), num_frames=8, height=32, width=32),
                    model=ModelConfig(model_id=model), train=TrainConfig(steps=3, learning_rate=1e-2),
                    prompt=PROMPT, out_dir=str(folder / "out"), cache_dir=str(folder / "cache"))
    session = TuningSession(cfg)
    states = session.prompt_embeddings([PROMPT])[PROMPT]
    return session.tune_video(video, PROMPT, states, folder / f"{model}.safetensors").adapter


@pytest.fixture(scope="module")
def ad_adapter(tmp_path_factory):
    return _train(TINY_AD, tmp_path_factory.mktemp("ad"))


def _export(adapter, fmt: str, out, rank: int = 1000):
    return export_adapter(ExportConfig(adapter=str(adapter), format=fmt, out_dir=str(out), rank=rank))


def _inputs(model: str, frames: int = 8, size: int = 8):
    backbone = load_backbone(model)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, backbone.in_channels, frames, size, size, generator=g)
    return x, 500, backbone.load_text_encoder()([PROMPT])


def _ours(model: str, adapter, inputs) -> torch.Tensor:
    unet = load_backbone(model).unet
    apply_adapter(unet, adapter)
    return predict_noise(unet, *inputs)


# ---------------------------------------------------------------------------------------------- diffusers


def _pipeline():
    """A tiny AnimateDiffPipeline of animatediff-tiny-random's own parts (its UNet is that model's base)."""
    from diffusers import AnimateDiffPipeline, DDIMScheduler

    from vmc_fast.models.animatediff import TINY_SCHEDULER_CONFIG
    from vmc_fast.models.diffusers_unet3d import tiny_clip_prompt_encoder

    unet2d, adapter, vae = tiny_parts()
    encoder = tiny_clip_prompt_encoder()
    return AnimateDiffPipeline(vae=vae, text_encoder=encoder.text_encoder, tokenizer=encoder.tokenizer, unet=unet2d,
                               motion_adapter=adapter, scheduler=DDIMScheduler(**TINY_SCHEDULER_CONFIG))


def _lora_layers(unet) -> dict[str, torch.Tensor]:
    """Module name -> the change each injected PEFT LoRA layer adds (float64)."""
    from peft.tuners.lora import LoraLayer

    return {name: module.get_delta_weight(module.active_adapters[0]).detach().double()
            for name, module in unet.named_modules() if isinstance(module, LoraLayer)}


def _pipeline_frames(pipe) -> torch.Tensor:
    return pipe(PROMPT, num_frames=8, height=32, width=32, num_inference_steps=2, guidance_scale=7.5,
                generator=torch.Generator().manual_seed(0), output_type="pt").frames


def test_diffusers_export_loads_in_the_animatediff_pipeline_and_equals_our_adapter(ad_adapter, tmp_path):
    result = _export(ad_adapter, "diffusers", tmp_path / "lora")
    assert result.files[0] == tmp_path / "lora" / DIFFUSERS_WEIGHTS
    assert result.record["rank"] == 64 and result.relative_error < FULL_RANK_WEIGHT_ERROR  # capped at full rank

    ours, loaded, plain = _pipeline(), _pipeline(), _pipeline()
    apply_adapter(ours.unet, ad_adapter)
    loaded.load_lora_weights(str(tmp_path / "lora"))
    assert len(_lora_layers(loaded.unet)) == 42  # a file in the wrong names would load zero layers, silently
    x, t, states = _inputs(TINY_AD)
    per_frame = states.repeat_interleave(8, 0)  # the pipeline's own convention

    def unet_output(pipe):
        with torch.no_grad():
            return pipe.unet(x, t, per_frame).sample

    torch.testing.assert_close(unet_output(loaded), unet_output(ours), rtol=0, atol=FULL_RANK_ATOL)
    assert (unet_output(plain) - unet_output(ours)).abs().max() > 100 * FULL_RANK_ATOL
    # End to end: the whole pipeline (2 DDIM steps, guidance, VAE) gives the frames our adapter gives.
    torch.testing.assert_close(_pipeline_frames(loaded), _pipeline_frames(ours), rtol=0, atol=10 * FULL_RANK_ATOL)


def test_diffusers_export_at_a_lower_rank_loads_the_change_off_by_the_recorded_error(ad_adapter, tmp_path):
    result = _export(ad_adapter, "diffusers", tmp_path / "lora", rank=4)
    changes = adapter_changes(load_backbone(TINY_AD).unet, ad_adapter)
    loaded = _pipeline()
    loaded.load_lora_weights(str(tmp_path / "lora"))
    deltas = _lora_layers(loaded.unet)
    assert sorted(deltas) == sorted(changes) and result.record["rank"] == 4
    lost = sum((changes[n] - deltas[n]).square().sum() for n in changes)
    total = sum(c.square().sum() for c in changes.values())
    measured = math.sqrt(lost / total)
    assert 0.01 < measured and measured == pytest.approx(result.relative_error, rel=RECORDED_ERROR_RTOL)
    # Eckart-Young: the truncated SVD loses exactly the trailing singular values.
    trailing = sum(torch.linalg.svdvals(c)[4:].square().sum() for c in changes.values())
    assert result.relative_error == pytest.approx(math.sqrt(trailing / total), rel=RECORDED_ERROR_RTOL)
    # Recorded beside the weights and inside them.
    record = json.loads((tmp_path / "lora" / ("pytorch_lora_weights" + RECORD_SUFFIX)).read_text())
    assert record["relative_error"] == result.relative_error and record["rank"] == 4
    with safe_open(str(result.files[0]), "pt") as handle:
        assert json.loads(handle.metadata()[METADATA_KEY])["relative_error"] == result.relative_error


# ---------------------------------------------------------------------------------------------- peft


@pytest.mark.parametrize("model", ["tiny-random", "show1-tiny-random", TINY_AD])
def test_peft_export_loads_with_peft_and_equals_our_adapter(model, tmp_path):
    from peft import LoraConfig, PeftModel, inject_adapter_in_model, set_peft_model_state_dict

    adapter = _train(model, tmp_path)
    frames, size = (8, 8) if model != "show1-tiny-random" else (8, 16)
    inputs = _inputs(model, frames, size)
    ours = _ours(model, adapter, inputs)
    result = _export(adapter, "peft", tmp_path / "peft")
    assert [f.name for f in result.files] == [PEFT_WEIGHTS, PEFT_CONFIG, "adapter_model" + RECORD_SUFFIX]
    config = LoraConfig.from_pretrained(str(tmp_path / "peft"))
    assert config.r == config.lora_alpha == result.record["rank"]

    wrapped = load_backbone(model).unet
    PeftModel.from_pretrained(wrapped, str(tmp_path / "peft"))  # injects into `wrapped` in place
    bare = load_backbone(model).unet
    inject_adapter_in_model(config, bare)
    state = {k.removeprefix("base_model.model."): v for k, v in load_file(tmp_path / "peft" / PEFT_WEIGHTS).items()}
    assert not set_peft_model_state_dict(bare, state).unexpected_keys
    assert len(_lora_layers(bare)) == len(_lora_layers(wrapped)) == result.record["layers"]
    for unet in (wrapped, bare):
        torch.testing.assert_close(predict_noise(unet, *inputs), ours, rtol=0, atol=FULL_RANK_ATOL)
    plain = predict_noise(load_backbone(model).unet, *inputs)
    assert (plain - ours).abs().max() > 100 * FULL_RANK_ATOL


# ---------------------------------------------------------------------------------------------- comfyui

# Keys of AnimateDiff's own motion LoRAs (guoyww/animatediff v2_lora_*.ckpt; ComfyUI-AnimateDiff-Evolved's
# model_injection.py names the first), and the diffusers module each is for.
ORIGINAL_KEYS = {
    "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.processor"
    ".to_q_lora.down.weight": ("down_blocks.0.motion_modules.0.transformer_blocks.0.attn1.to_q", "down"),
    "mid_block.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.1.processor"
    ".to_v_lora.up.weight": ("mid_block.motion_modules.0.transformer_blocks.0.attn2.to_v", "up"),
    "up_blocks.3.motion_modules.2.temporal_transformer.transformer_blocks.0.attention_blocks.1.processor"
    ".to_k_lora.down.weight": ("up_blocks.3.motion_modules.2.transformer_blocks.0.attn2.to_k", "down"),
}


def _comfy_model_key(key: str) -> str:
    """ComfyUI-AnimateDiff-Evolved's rule (load_motion_lora_as_patches): a LoRA key -> the motion model's key."""
    model_key = key.replace("processor.", "").replace("_lora", "").replace("down.", "").replace("up.", "")
    return model_key if "to_out.0." in model_key else model_key.replace("to_out.", "to_out.0.")


def test_comfyui_keys_map_both_ways():
    from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers

    for key, (module, part) in ORIGINAL_KEYS.items():
        assert comfy_key(module, part) == key and diffusers_module(key) == (module, part)
    modules = [n.removesuffix(".weight") for n, _ in load_backbone(TINY_AD).unet.named_parameters()
               if n.endswith(("to_q.weight", "to_k.weight", "to_v.weight")) and "motion_modules" in n]
    keys = {comfy_key(m, part): (m, part) for m in modules for part in ("down", "up")}
    assert len(keys) == 2 * len(modules) == 84
    assert all(diffusers_module(key) == value for key, value in keys.items())
    # ComfyUI's rule names the original motion-module weight; diffusers' own converter names ours from it.
    original = {_comfy_model_key(key): None for key, (_, part) in keys.items() if part == "down"}
    assert sorted(convert_animatediff_checkpoint_to_diffusers(original)) == sorted(m + ".weight" for m in modules)
    with pytest.raises(VmcError, match="comfyui format holds only"):
        comfy_key("down_blocks.0.temp_attentions.0.transformer_blocks.0.attn1.to_q", "down")
    with pytest.raises(VmcError, match="not an AnimateDiff motion-LoRA"):
        diffusers_module("down_blocks.0.motion_modules.0.temporal_transformer.norm.weight")


def test_comfyui_export_replayed_with_comfyuis_rule_reproduces_our_adapter(ad_adapter, tmp_path):
    from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers

    result = _export(ad_adapter, "comfyui", tmp_path / "comfy")
    assert result.files[0] == tmp_path / "comfy" / ad_adapter.name
    state = load_file(result.files[0])
    assert all("temporal" in key and "alpha" not in key for key in state)
    # ComfyUI-AnimateDiff-Evolved: keep "temporal" keys, each down with its up, W += strength * (up @ down) in fp32.
    patches = {_comfy_model_key(key): state[key.replace(".down.", ".up.")].float() @ state[key].float()
               for key in state if "up." not in key}
    unet = load_backbone(TINY_AD).unet
    x, t, states = _inputs(TINY_AD)
    plain = predict_noise(unet, x, t, states)
    with torch.no_grad():
        for name, delta in convert_animatediff_checkpoint_to_diffusers(patches).items():
            unet.get_parameter(name).add_(1.0 * delta)
    ours = _ours(TINY_AD, ad_adapter, (x, t, states))
    torch.testing.assert_close(predict_noise(unet, x, t, states), ours, rtol=0, atol=FULL_RANK_ATOL)
    assert (plain - ours).abs().max() > 100 * FULL_RANK_ATOL


# ---------------------------------------------------------------------------------------------- the rest


def test_low_rank_is_the_truncated_svd_and_pads_smaller_layers():
    g = torch.Generator().manual_seed(0)
    changes = {"a": torch.randn(6, 4, generator=g, dtype=torch.float64),
               "b": torch.randn(5, 7, generator=g, dtype=torch.float64)}
    factors = low_rank(changes, 3)
    assert factors.rank == 3 and factors.up["a"].shape == (6, 3) and factors.down["b"].shape == (3, 7)
    for name, delta in changes.items():
        s = torch.linalg.svdvals(delta)
        assert factors.errors[name] == pytest.approx(math.sqrt(s[3:].square().sum() / s.square().sum()), rel=1e-5)
    exact = low_rank(changes, 100)  # capped at the largest layer rank (5); "a" (rank 4) padded with zeros
    assert exact.rank == 5 and exact.up["a"].shape == (6, 5) and exact.up["a"][:, 4].abs().max() == 0
    assert exact.relative_error < 1e-6
    for name, delta in changes.items():
        torch.testing.assert_close((exact.up[name] @ exact.down[name]).double(), delta, rtol=0, atol=1e-5)


def test_adapter_kind_tells_lora_adapters_from_full_ones():
    assert adapter_kind({"x.to_q.weight": torch.zeros(2, 2)}) == "full"
    assert adapter_kind({"x.to_q.lora_A.weight": torch.zeros(1, 2), "x.to_q.lora_B.weight": torch.zeros(2, 1)}) \
        == "lora"


@pytest.fixture(scope="module")
def unet3d_adapter(tmp_path_factory):
    return _train("tiny-random", tmp_path_factory.mktemp("unet3d"))


@pytest.mark.parametrize("fmt", ["diffusers", "comfyui"])
def test_animatediff_only_formats_refuse_other_models_with_the_fix(unet3d_adapter, tmp_path, fmt):
    with pytest.raises(VmcError, match=f"--format {fmt}: .* AnimateDiff only .* use --format peft"):
        _export(unet3d_adapter, fmt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_another_base_model_is_refused(unet3d_adapter, tmp_path):
    with pytest.raises(VmcError, match="made for another base model"):
        export_adapter(ExportConfig(adapter=str(unet3d_adapter), format="peft", out_dir=str(tmp_path / "o"),
                                    model_id="show1-tiny-random"))


def test_the_command_line(unet3d_adapter, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["export", str(unet3d_adapter), "--format", "peft", "--rank", "4",
                                 "--out", str(tmp_path / "peft")])
    assert result.exit_code == 0, result.output
    assert "relative error" in result.output and (tmp_path / "peft" / PEFT_WEIGHTS).is_file()
    for args, message in ((["--format", "onnx"], "--format: must be one of diffusers, peft, comfyui"),
                          (["--format", "peft", "--rank", "0"], "--rank: must be between"),
                          (["--format", "diffusers"], "--format diffusers: ")):
        bad = runner.invoke(app, ["export", str(unet3d_adapter), "--out", str(tmp_path / "x"), *args])
        assert bad.exit_code == 2 and message in bad.output, bad.output
    missing = runner.invoke(app, ["export", str(tmp_path / "nope.safetensors"), "--format", "peft", "--out", "x"])
    assert missing.exit_code == 2 and "ADAPTER: no such file" in missing.output
