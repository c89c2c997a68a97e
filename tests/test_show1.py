"""Show-1 backbone: weight compatibility, equality with the original code, checkpointing, loading, registry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vmc_fast.errors import VmcError
from vmc_fast.models import tiny
from vmc_fast.models.registry import LoadOptions, load_backbone
from vmc_fast.models.show1 import (
    Show1Config,
    Show1UNet3D,
    TemporalSelfAttention,
    init_random_weights,
    is_show1_unet_config,
)
from vmc_fast.models.show1 import loading as pipe
from vmc_fast.models.show1 import text_encoder as show1_text

REFERENCE = Path(__file__).resolve().parent / "fixtures" / "show1"
"""Data produced by running the original Show-1 code on tiny models (see its README.md)."""
QKV_SUFFIXES = ("to_q.weight", "to_k.weight", "to_v.weight")


def _reference_json(*parts: str) -> dict:
    return json.loads(REFERENCE.joinpath(*parts).read_text())


def _small_unet(seed: int = 0) -> Show1UNet3D:
    """A tiny1-sized UNet with random (non-zero everywhere) weights; works without the fixtures."""
    return init_random_weights(Show1UNet3D.from_config(tiny.show1_unet_config()), seed)


def _temporal_qkv(unet: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in unet.named_parameters() if "temp_attentions" in n and n.endswith(QKV_SUFFIXES)]


# ---------------------------------------------------------------------------------------------------------------
# Architecture


@pytest.fixture(scope="module")
def base_unet_on_meta() -> Show1UNet3D:
    """The full base model without storage (defaults are the base config; a test checks they equal the file)."""
    with torch.device("meta"):
        return Show1UNet3D(Show1Config())


def test_base_state_dict_names_shapes_and_order_equal_original(base_unet_on_meta):
    config = Show1Config.from_dict(_reference_json("show1_base_config.json"))
    assert config == base_unet_on_meta.config
    unet = base_unet_on_meta
    ours = [(name, list(t.shape)) for name, t in unet.state_dict().items()]
    theirs = [(t["name"], t["shape"]) for t in _reference_json("show1_base_keys.json")["tensors"]]
    assert len(ours) == len(theirs) == 1827
    assert dict(ours) == dict(theirs)
    assert ours == theirs  # registration order too
    assert sum(t.numel() for t in unet.state_dict().values()) == 1_726_848_390


def test_base_temporal_qkv_count(base_unet_on_meta):
    qkv = _temporal_qkv(base_unet_on_meta)
    assert len(qkv) == 132
    assert sum(p.numel() for _, p in qkv) == 134_553_600
    assert all(".transformer_blocks.0.attn" in name for name, _ in qkv)


def test_config_is_attribute_access_and_validated():
    unet = Show1UNet3D.from_config({**tiny.show1_unet_config(), "_name_or_path": "ignored"})
    assert unet.config.in_channels == 3 and unet.config.out_channels == 6
    assert unet.config.block_out_channels == (32, 64)
    assert unet.config.addition_embed_type == "text"
    with pytest.raises(ValueError, match="down_block_types"):
        Show1UNet3D.from_config({**tiny.show1_unet_config(),
                                 "down_block_types": ["CrossAttnDownBlock3D", "SimpleCrossAttnDownBlock3D"]})
    with pytest.raises(ValueError, match="transfromer_in_opt"):
        Show1UNet3D.from_config({**tiny.show1_unet_config(), "transfromer_in_opt": True})
    with pytest.raises(ValueError, match="block_out_channels"):
        Show1UNet3D.from_config({**tiny.show1_unet_config(), "block_out_channels": [16, 32]})


def test_interpolation_style_config_same_class():
    """Show-1's other stages are the same class with more input channels."""
    unet = _small_unet()
    wider = Show1UNet3D.from_config({**tiny.show1_unet_config(), "in_channels": 7})
    assert wider.conv_in.weight.shape[1] == 7
    assert set(wider.state_dict()) == set(unet.state_dict())


def test_super_resolution_style_config_takes_noise_level_labels():
    """IF-II/Show-1 SR stages condition on the noise level of their low-resolution input (class_embed_type)."""
    config = {**tiny.show1_unet_config(), "in_channels": 6, "class_embed_type": "timestep"}
    unet = Show1UNet3D.from_config(config).eval()
    temb = unet.time_embedding.linear_2.out_features
    c0 = unet.config.block_out_channels[0]
    assert unet.state_dict()["class_embedding.linear_1.weight"].shape == (temb, c0)
    assert unet.state_dict()["class_embedding.linear_2.weight"].shape == (temb, temb)
    keys = list(unet.state_dict())
    assert keys.index("class_embedding.linear_1.weight") < keys.index("add_embedding.norm1.weight") \
        if "add_embedding.norm1.weight" in keys else True
    sample = torch.randn(1, 6, 2, 16, 16)
    text = torch.randn(1, 5, unet.config.encoder_hid_dim)
    with torch.no_grad():
        low = unet(sample, 10, text, class_labels=torch.tensor([20])).sample
        high = unet(sample, 10, text, class_labels=torch.tensor([250])).sample
    assert low.shape == (1, 6, 2, 16, 16) and not torch.allclose(low, high)
    with pytest.raises(ValueError, match="needs class_labels"):
        unet(sample, 10, text)


# ---------------------------------------------------------------------------------------------------------------
# Numerical equality with the original code


@pytest.mark.parametrize("fixture", ["tiny1", "tiny3_variant_flags"])
def test_tiny_fixture_output_equals_original(fixture):
    from safetensors.torch import load_file

    torch.manual_seed(0)
    folder = REFERENCE / fixture
    unet = Show1UNet3D.from_config(_reference_json(fixture, "config.json"))
    expected_keys = [(t["name"], t["shape"]) for t in _reference_json(fixture, "keys.json")["tensors"]]
    assert [(n, list(t.shape)) for n, t in unet.state_dict().items()] == expected_keys
    weights = {k: v.float() for k, v in load_file(folder / "weights.safetensors").items()}  # stored fp16
    unet.load_state_dict(weights, strict=True)
    unet.eval()
    inputs, reference = load_file(folder / "inputs.safetensors"), load_file(folder / "output.safetensors")["sample"]
    with torch.no_grad():
        out = unet(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"]).sample
    assert out.shape == reference.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=1e-4)


def test_scalar_timestep_is_broadcast():
    unet = _small_unet().eval()
    x, text = torch.randn(2, 3, 2, 8, 8), torch.randn(2, 5, 32)
    with torch.no_grad():
        by_tensor = unet(x, torch.tensor([417, 417]), text).sample
        by_int = unet(x, 417, text).sample
        by_0d = unet(x, torch.tensor(417), text).sample
    torch.testing.assert_close(by_int, by_tensor, atol=0, rtol=0)
    torch.testing.assert_close(by_0d, by_tensor, atol=0, rtol=0)


def test_temporal_attention_backend_is_passed_through():
    unet = _small_unet().eval()
    x, text = torch.randn(1, 3, 4, 8, 8), torch.randn(1, 5, 32)
    with torch.no_grad():
        sdpa = unet(x, 10, text).sample
        layers = [m for m in unet.modules() if isinstance(m, TemporalSelfAttention)]
        assert layers and all(m.backend == "sdpa" for m in layers)
        for m in layers:
            m.backend = "math"
        math = unet(x, 10, text).sample
        torch.testing.assert_close(math, sdpa, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="divisible by 2"):
            unet(torch.randn(1, 3, 4, 8, 9), 10, text)
        layers[0].backend = "no-such-kernel"
        with pytest.raises(ValueError, match="no-such-kernel"):
            unet(x, 10, text)


# ---------------------------------------------------------------------------------------------------------------
# Gradient checkpointing


def _loss_and_qkv_grads(unet: Show1UNet3D, x, text) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    unet.zero_grad(set_to_none=True)
    loss = unet(x, torch.tensor([321]), text).sample[:, :3].square().mean()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in _temporal_qkv(unet)}


def test_gradient_checkpointing_same_loss_and_grads_and_really_recomputes():
    torch.manual_seed(0)
    unet = _small_unet().train()
    unet.requires_grad_(False)
    for _, p in _temporal_qkv(unet):
        p.requires_grad_(True)
    x, text = torch.randn(1, 3, 4, 8, 8), torch.randn(1, 5, 32)
    calls = []
    # A pre-hook: recomputation may stop early (before forward hooks would fire) once it has what it needs.
    unet.down_blocks[1].register_forward_pre_hook(lambda *_: calls.append(1))
    num_saved = []

    def run():
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(1) or t, lambda t: t):
            result = _loss_and_qkv_grads(unet, x, text)
        num_saved.append(len(saved))
        return result

    loss_plain, grads_plain = run()
    assert len(calls) == 1
    unet.enable_gradient_checkpointing()
    calls.clear()
    loss_ckpt, grads_ckpt = run()
    assert len(calls) == 2, "a checkpointed block runs again in backward"
    assert num_saved[1] < num_saved[0] / 4, num_saved
    torch.testing.assert_close(loss_ckpt, loss_plain, atol=0, rtol=0)
    assert len(grads_plain) == 24 and all(g.abs().sum() > 0 for g in grads_plain.values())
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], grad, atol=1e-6, rtol=1e-5)
    unet.eval()
    calls.clear()
    with torch.no_grad():
        unet(x, 321, text)
    assert len(calls) == 1  # never in eval / no-grad
    unet.disable_gradient_checkpointing()
    assert not unet.gradient_checkpointing


# ---------------------------------------------------------------------------------------------------------------
# Loading and saving


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
@pytest.mark.parametrize("variant", [None, "fp16"])
def test_pretrained_round_trip(tmp_path, safe, variant):
    unet = _small_unet(seed=3)
    pipe.save_show1_pretrained(tmp_path, unet, scheduler=pipe.show1_scheduler(), variant=variant,
                               safe_serialization=safe)
    suffix = ".safetensors" if safe else ".bin"
    assert (tmp_path / "unet" / f"diffusion_pytorch_model{'.fp16' if variant else ''}{suffix}").is_file()
    loaded = pipe.load_show1_unet(str(tmp_path))
    assert loaded.config == unet.config and not loaded.training
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in loaded.parameters())
    original = unet.state_dict()
    for name, tensor in loaded.state_dict().items():
        expected = original[name].half().float() if variant else original[name]
        assert torch.equal(tensor, expected), name
    half = pipe.load_show1_unet(str(tmp_path), LoadOptions(dtype=torch.float16))
    assert all(p.dtype == torch.float16 for p in half.parameters())


def test_folder_backbone_round_trip_with_text_encoder(tmp_path):
    tokenizer = tiny.show1_tokenizer()
    encoder = tiny.t5_encoder(len(tokenizer))
    unet = _small_unet(seed=4)
    pipe.save_show1_pretrained(tmp_path, unet, scheduler=pipe.show1_scheduler(), text_encoder=encoder,
                               tokenizer=tokenizer)
    backbone = load_backbone(str(tmp_path))
    assert backbone.family == "show1" and backbone.in_channels == 3 and backbone.learned_variance
    scheduler = backbone.noise_scheduler
    assert type(scheduler).__name__ == "DDPMScheduler"
    assert (scheduler.config.beta_schedule, scheduler.config.variance_type, scheduler.config.prediction_type) == (
        "squaredcos_cap_v2", "learned_range", "epsilon")
    prompts = ["a bird is flying", ""]
    states = backbone.load_text_encoder()(prompts)
    torch.testing.assert_close(states, show1_text.T5PromptEncoder(tokenizer, encoder)(prompts), atol=0, rtol=0)
    assert states.shape == (2, 77, 32) and states.dtype == torch.float32


def test_scheduler_values_come_from_the_file(tmp_path):
    (tmp_path / "scheduler").mkdir()
    config = {**pipe.SHOW1_SCHEDULER_CONFIG, "num_train_timesteps": 500, "_class_name": "DDPMScheduler"}
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    assert pipe.load_show1_scheduler(str(tmp_path)).config.num_train_timesteps == 500


def _rewrite_weights(folder: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, path)


def test_missing_and_unexpected_keys_raise_vmc_error(tmp_path):
    pipe.save_show1_pretrained(tmp_path, _small_unet())
    _rewrite_weights(tmp_path, lambda s: [s.pop(k) for k in list(s) if "temp_attentions.0.proj_out" in k])
    with pytest.raises(VmcError, match=r"6 missing \(e\.g\. .*proj_out.*\), 0 unexpected"):
        pipe.load_show1_unet(str(tmp_path))
    _rewrite_weights(tmp_path, lambda s: s.update({"extra.weight": torch.zeros(1)}))
    with pytest.raises(VmcError, match=r"1 unexpected \(e\.g\. extra\.weight\)"):
        pipe.load_show1_unet(str(tmp_path))


def test_wrong_shapes_and_missing_weights_raise_vmc_error(tmp_path):
    pipe.save_show1_pretrained(tmp_path, _small_unet())
    _rewrite_weights(tmp_path, lambda s: s.update({"conv_in.bias": torch.zeros(5)}))
    with pytest.raises(VmcError, match="wrong shape"):
        pipe.load_show1_unet(str(tmp_path))
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(VmcError, match="no UNet weights"):
        pipe.load_show1_unet(str(tmp_path))


# ---------------------------------------------------------------------------------------------------------------
# Registry


def test_family_detector_accepts_show1_config():
    assert is_show1_unet_config(_reference_json("show1_base_config.json"))


MODELSCOPE_UNET_CONFIG = {
    "_class_name": "UNet3DConditionModel", "_diffusers_version": "0.19.0", "act_fn": "silu", "attention_head_dim": 64,
    "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"],
    "downsample_padding": 1, "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1,
    "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 32,
    "up_block_types": ["UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"],
}
"""unet/config.json of a ModelScope/ZeroScope text-to-video repository (diffusers' own UNet3DConditionModel)."""


def test_family_detector_rejects_modelscope_config():
    assert not is_show1_unet_config(MODELSCOPE_UNET_CONFIG)
    assert is_show1_unet_config(Show1Config().to_dict())
    assert not is_show1_unet_config({**Show1Config().to_dict(), "_class_name": "UNet2DConditionModel"})


@pytest.mark.slow
def test_family_detector_rejects_config_written_by_diffusers_unet3d():
    from diffusers import (
        UNet3DConditionModel,  # slow import: pulls in all of diffusers' model code
    )

    with torch.device("meta"):
        modelscope = UNet3DConditionModel(block_out_channels=(32, 64), norm_num_groups=32, cross_attention_dim=32,
                                          attention_head_dim=8, layers_per_block=1,
                                          down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                                          up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"))
    config = json.loads(modelscope.to_json_string())
    assert config["_class_name"] == "UNet3DConditionModel"
    assert not is_show1_unet_config(config)


def test_tiny_random_backbone():
    backbone = load_backbone("show1-tiny-random")
    again = load_backbone("show1-tiny-random")
    assert (backbone.family, backbone.num_frames, backbone.height, backbone.width) == ("show1", 8, 16, 24)
    assert not backbone.benchmark_only and backbone.learned_variance
    for a, b in zip(backbone.unet.state_dict().values(), again.unet.state_dict().values()):
        assert torch.equal(a, b)  # deterministic weights
    assert backbone.noise_scheduler.config.variance_type == "learned_range"
    encode = backbone.load_text_encoder()
    states = encode(["a bird is flying", "", "a bird is flying"])
    assert states.shape == (3, 77, backbone.unet.config.encoder_hid_dim)
    assert torch.equal(states[0], states[2]) and not torch.allclose(states[0], states[1])
    torch.testing.assert_close(again.load_text_encoder()(["a bird is flying"]), states[:1], atol=0, rtol=0)
    with torch.no_grad():
        out = backbone.unet(torch.randn(1, 3, 2, 16, 24), 999, states[:1]).sample
    assert out.shape == (1, 6, 2, 16, 24) and torch.isfinite(out).all()


def test_base_arch_backbone_on_meta():
    backbone = load_backbone("show1-base-arch", LoadOptions(device="meta", dtype=torch.bfloat16))
    assert backbone.benchmark_only and (backbone.height, backbone.width, backbone.num_frames) == (40, 64, 8)
    assert sum(p.numel() for p in backbone.unet.parameters()) == 1_726_848_390
    assert all(p.dtype == torch.bfloat16 for p in backbone.unet.parameters())
    with pytest.warns(UserWarning, match="random"):
        assert isinstance(backbone.load_text_encoder(), show1_text.RandomPromptEncoder)
    with pytest.warns(UserWarning, match="random"):
        states = show1_text.RandomPromptEncoder(4096)(["a bird is flying", "a bird is flying", ""])
    assert states.shape == (3, 77, 4096)
    assert torch.equal(states[0], states[1]) and not torch.equal(states[0], states[2])


def test_hub_id_is_served_through_hub_downloads(tmp_path, monkeypatch):
    """A hub id goes through list_repo_files + hub_file (faked here from a local folder: no network in tests)."""
    import huggingface_hub

    repo = tmp_path / "repo"
    unet = _small_unet(seed=5)
    pipe.save_show1_pretrained(repo, unet, scheduler=pipe.show1_scheduler(), variant="fp16", safe_serialization=False)
    files = [str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file()]
    fetched = []
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo_id, **_: files)
    monkeypatch.setattr(pipe, "hub_file", lambda repo_id, rel: fetched.append(rel) or str(repo / rel))
    loaded = pipe.load_show1_unet("someorg/show-1-fake", LoadOptions(dtype=torch.float16))
    assert fetched == ["unet/config.json", "unet/diffusion_pytorch_model.fp16.bin"]
    assert torch.equal(loaded.conv_in.weight, unet.conv_in.weight.half())
    assert pipe.load_show1_scheduler("someorg/show-1-fake").config.variance_type == "learned_range"

    def offline(repo_id, **_):
        raise ConnectionError("offline")

    monkeypatch.setattr(huggingface_hub, "list_repo_files", offline)
    with pytest.raises(VmcError, match="could not list the hub repository"):
        pipe.load_show1_unet("someorg/other", config=Show1Config().to_dict())


def test_8bit_text_encoder_falls_back_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU fallback")
    tokenizer = tiny.show1_tokenizer()
    pipe.save_show1_pretrained(tmp_path, _small_unet(), text_encoder=tiny.t5_encoder(len(tokenizer)),
                               tokenizer=tokenizer)
    with pytest.warns(UserWarning, match="8-bit"):
        encode = show1_text.load_show1_text_encoder(str(tmp_path), load_in_8bit=True)
    assert encode(["a dog is running"]).shape == (1, 77, 32)
