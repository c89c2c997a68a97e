"""Training on the tiny random backbone: what changes, what must not, and whether the loss falls."""

import re

import pytest
import torch

from vmc_fast.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from vmc_fast.errors import VmcError
from vmc_fast.models import load_backbone
from vmc_fast.tuning.adapters import apply_adapter, base_fingerprint, read_adapter
from vmc_fast.tuning.loop import vmc_loss
from vmc_fast.tuning.session import TuningSession
from vmc_fast.tuning.surgery import prepare_for_motion_tuning, temporal_qkv_parameters


def _cfg(video, tmp_path, model="tiny-random", **train):
    return RunConfig(data=DataConfig(videos=str(video)), train=TrainConfig(**{"steps": 3, **train}),
                     model=ModelConfig(model_id=model), prompt="a square moving right",
                     out_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "c"))


def test_surgery_unfreezes_exactly_temporal_qkv():
    unet = load_backbone("tiny-random").unet
    report = prepare_for_motion_tuning(unet)
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable == [n for n, _ in temporal_qkv_parameters(unet)]
    assert len(trainable) == report.num_tensors == 24  # 4 temporal layers x attn1/attn2 x q/k/v
    assert all("temp_attentions" in n and n.split(".")[-2] in ("to_q", "to_k", "to_v") for n in trainable)
    assert report.num_trainable == sum(p.numel() for n, p in unet.named_parameters() if p.requires_grad)


def test_surgery_without_a_match_fails_clearly():
    with pytest.raises(VmcError, match="no parameter name matches"):
        prepare_for_motion_tuning(load_backbone("tiny-random").unet, pattern=r"does_not_exist")


@pytest.mark.parametrize("model", ["tiny-random", "show1-tiny-random"])
def test_only_qkv_change_and_frozen_weights_stay_bit_identical(square_video, tmp_path, model):
    session = TuningSession(_cfg(square_video, tmp_path, model=model, learning_rate=1e-3))
    before = {n: p.detach().clone() for n, p in session.backbone.unet.named_parameters()}
    embeds = session.prompt_embeddings(["a square moving right"])
    session.tune_video(square_video, "a square moving right", embeds["a square moving right"],
                       tmp_path / "a.safetensors")
    for name, param in session.backbone.unet.named_parameters():
        changed = not torch.equal(before[name], param.detach())
        assert changed == param.requires_grad, name
        assert param.dtype == torch.float32


@pytest.mark.parametrize("model", ["tiny-random", "show1-tiny-random"])
def test_loss_falls_on_a_fixed_clip(square_video, tmp_path, model):
    session = TuningSession(_cfg(square_video, tmp_path, model=model, steps=25, learning_rate=2e-3))
    prompt = "a square moving right"
    states = session.prompt_embeddings([prompt])[prompt].unsqueeze(0)
    clip = session.load_input(square_video)
    g = torch.Generator().manual_seed(123)
    probes = [(torch.randint(100, 900, (1,), generator=g), torch.randn(clip.shape, generator=g)) for _ in range(6)]
    abar = session.backbone.noise_scheduler.alphas_cumprod.float()
    unet, cfg = session.backbone.unet, session.cfg.train

    def held_out_loss():
        with torch.no_grad():
            return sum(float(vmc_loss(unet, clip, n, t, abar, states, cfg)) for t, n in probes) / len(probes)

    before = held_out_loss()
    session.tune_video(square_video, prompt, states[0], tmp_path / "a.safetensors")
    after = held_out_loss()
    assert after < before - 0.01, (before, after)


def test_training_is_deterministic_and_resets_between_videos(square_video, tmp_path):
    prompt = "a square moving right"
    first = TuningSession(_cfg(square_video, tmp_path, learning_rate=1e-3))
    states = first.prompt_embeddings([prompt])[prompt]
    a = first.tune_video(square_video, prompt, states, tmp_path / "a.safetensors")
    b = first.tune_video(square_video, prompt, states, tmp_path / "b.safetensors")  # same session, reset
    tensors_a, _ = read_adapter(a.adapter)
    tensors_b, _ = read_adapter(b.adapter)
    assert a.result.losses == b.result.losses
    assert all(torch.equal(tensors_a[k], tensors_b[k]) for k in tensors_a)


def test_adapter_round_trip_and_refusal_for_another_base(square_video, tmp_path):
    session = TuningSession(_cfg(square_video, tmp_path, learning_rate=1e-3))
    prompt = "a square moving right"
    done = session.tune_video(square_video, prompt, session.prompt_embeddings([prompt])[prompt],
                              tmp_path / "a.safetensors")
    tensors, info = read_adapter(done.adapter)
    unet = session.backbone.unet
    assert set(tensors) == {n for n, p in unet.named_parameters() if p.requires_grad}
    assert set(tensors) <= set(unet.state_dict())
    assert info.prompt == prompt and info.steps == 3 and info.base_model == "tiny-random"
    assert (info.num_frames, info.height, info.width, info.loss) == (8, 32, 32, "cos")

    fresh = load_backbone("tiny-random").unet
    assert base_fingerprint(fresh, set(tensors)) == session.fingerprint
    apply_adapter(fresh, done.adapter)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in tensors.items())

    other = load_backbone("tiny-random").unet
    with torch.no_grad():
        other.conv_in.weight.add_(0.5)  # same architecture, different base weights
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(VmcError, match="was made for base model tiny-random"):
        apply_adapter(other, done.adapter)
    assert all(torch.equal(before[k], other.state_dict()[k]) for k in tensors)  # refused: nothing copied


def test_adapter_for_another_architecture_is_refused(tmp_path):
    from diffusers import UNet3DConditionModel

    from vmc_fast.models.tiny import UNET3D_CONFIG
    from vmc_fast.tuning.adapters import save_adapter

    bigger = UNet3DConditionModel(**{**UNET3D_CONFIG, "block_out_channels": (64, 64)})
    prepare_for_motion_tuning(bigger)
    tensors = {n: p for n, p in bigger.named_parameters() if p.requires_grad}
    path = save_adapter(tmp_path / "x.safetensors", tensors, base_model="other", fingerprint="f", prompt="p",
                        steps=1, final_loss=0.0, loss="cos", num_frames=8, height=32, width=32)
    with pytest.raises(VmcError, match="mis-shaped"):
        apply_adapter(load_backbone("tiny-random").unet, path)


def test_trains_a_show1_repository_folder(square_video, tmp_path):
    """A Show-1 folder in the original layout is detected by the registry and trained end to end."""
    from vmc_fast.models.registry import LoadOptions
    from vmc_fast.models.show1.backbones import build_tiny_random_backbone
    from vmc_fast.models.show1.loading import save_show1_pretrained

    tiny = build_tiny_random_backbone(LoadOptions())
    encoder = tiny.load_text_encoder()
    folder = save_show1_pretrained(tmp_path / "show1-folder", tiny.unet, scheduler=tiny.noise_scheduler,
                                   text_encoder=encoder.encoder, tokenizer=encoder.tokenizer)
    session = TuningSession(_cfg(square_video, tmp_path, model=str(folder)))
    assert session.backbone.family == "show1" and session.surgery.num_tensors > 0
    prompt = "a square moving right"
    done = session.tune_video(square_video, prompt, session.prompt_embeddings([prompt])[prompt],
                              tmp_path / "a.safetensors")
    tensors, info = read_adapter(done.adapter)
    assert info.base_model == str(folder) and set(tensors) <= set(tiny.unet.state_dict())
    apply_adapter(tiny.unet, done.adapter)  # same weights as the folder: accepted


def test_latents_are_encoded_once_and_cached_on_disk(square_video, tmp_path):
    session = TuningSession(_cfg(square_video, tmp_path))
    calls = []
    encode = session.backbone.encode_pixels
    session.backbone.encode_pixels = lambda pixels: calls.append(1) or encode(pixels)
    first = session.load_input(square_video)
    second = session.load_input(square_video)
    assert len(calls) == 1 and torch.equal(first, second) and first.shape == (1, 4, 8, 16, 16)
    assert len(list((tmp_path / "c" / "latents").glob("*.safetensors"))) == 1


@pytest.mark.parametrize("model_id", ["tiny-random", "show1-tiny-random"])
def test_fingerprint_does_not_depend_on_the_storage_dtype(model_id):
    """An adapter tuned on a CPU (fp32 frozen weights) must load into the same base on a GPU (bf16), and back.
    The scheme before 2026-11-30 (fp16 cast, 3 digits) told the two apart; its adapters still load."""
    from vmc_fast.models.registry import LoadOptions

    fp32 = load_backbone(model_id).unet
    bf16 = load_backbone(model_id, LoadOptions(dtype=torch.bfloat16)).unet
    tuned = {name for name, _ in temporal_qkv_parameters(fp32)}
    assert base_fingerprint(fp32, tuned) == base_fingerprint(bf16, tuned)
    assert base_fingerprint(fp32, tuned, legacy=True) != base_fingerprint(bf16, tuned, legacy=True)
    with torch.no_grad():
        next(p for n, p in fp32.named_parameters() if n not in tuned).mul_(1.5)
    assert base_fingerprint(fp32, tuned) != base_fingerprint(bf16, tuned)


def test_adapter_with_a_legacy_fingerprint_still_loads(tmp_path):
    from vmc_fast.tuning.adapters import save_adapter

    unet = load_backbone("tiny-random").unet
    tensors = {name: p.detach() + 0.1 for name, p in temporal_qkv_parameters(unet)}
    legacy = base_fingerprint(unet, set(tensors), legacy=True)
    path = save_adapter(tmp_path / "old.safetensors", tensors, base_model="tiny-random", fingerprint=legacy,
                        prompt="p", steps=1, final_loss=0.0, loss="cos", num_frames=8, height=8, width=8)
    apply_adapter(unet, path)
    name = next(iter(tensors))
    assert torch.equal(dict(unet.named_parameters())[name].detach(), tensors[name])


# ---------------------------------------------------------------------------------- E1: storage dtype, device

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture(scope="module")
def unets():
    """(model id, dtype name) -> that base UNet, loaded once (tests copy adapters only into its tuned tensors)."""
    from vmc_fast.models.registry import LoadOptions

    loaded = {}

    def get(model_id: str, dtype: str):
        if (model_id, dtype) not in loaded:
            loaded[model_id, dtype] = load_backbone(model_id, LoadOptions(dtype=DTYPES[dtype])).unet
        return loaded[model_id, dtype]
    return get


def _save_for(unet, path, base_model: str):
    """An adapter of perturbed temporal Q/K/V tensors for `unet`, with its fingerprint and base reference."""
    from vmc_fast.tuning.adapters import base_reference, save_adapter

    tensors = {name: p.detach().float() + 0.01 for name, p in temporal_qkv_parameters(unet)}
    return save_adapter(path, tensors, base_model=base_model, fingerprint=base_fingerprint(unet, set(tensors)),
                        base=base_reference(unet, set(tensors)), prompt="p", steps=1, final_loss=0.0, loss="cos",
                        num_frames=8, height=32, width=32), tensors


@pytest.mark.parametrize("loaded", DTYPES)
@pytest.mark.parametrize("saved", DTYPES)
@pytest.mark.parametrize("model_id", ["tiny-random", "show1-tiny-random"])
def test_an_adapter_loads_into_its_base_stored_in_any_dtype(tmp_path, unets, model_id, saved, loaded):
    """Tuned with --precision fp16 (fp16 frozen weights), generated in fp32 or bf16, and every other pair."""
    path, tensors = _save_for(unets(model_id, saved), tmp_path / "a.safetensors", model_id)
    target = unets(model_id, loaded)
    apply_adapter(target, path)
    params = dict(target.named_parameters())
    assert all(torch.equal(params[name], value.to(params[name].dtype)) for name, value in tensors.items())


@pytest.mark.parametrize("loaded", DTYPES)
@pytest.mark.parametrize("model_id", ["tiny-random", "show1-tiny-random"])
def test_a_changed_base_is_refused_whatever_its_dtype(tmp_path, unets, model_id, loaded):
    from vmc_fast.models.registry import LoadOptions

    path, _ = _save_for(unets(model_id, "fp32"), tmp_path / "a.safetensors", model_id)
    changed = load_backbone(model_id, LoadOptions(dtype=DTYPES[loaded])).unet
    tuned = {name for name, _ in temporal_qkv_parameters(changed)}
    name, frozen = next((n, p) for n, p in changed.named_parameters() if n not in tuned and p.dim() > 1)
    with torch.no_grad():
        frozen.mul_(1.05)  # 5%: well above the tolerance of one bf16 step (0.8%)
    before = {k: v.clone() for k, v in changed.state_dict().items()}
    with pytest.raises(VmcError, match=rf"was made for base model {model_id}.*max relative difference 0\.0[45]\d* "
                                       rf"in {re.escape(name)}"):
        apply_adapter(changed, path)
    assert all(torch.equal(before[k], v) for k, v in changed.state_dict().items())  # refused: nothing copied


@pytest.mark.parametrize("model_id", ["tiny-random", "show1-tiny-random"])
def test_a_base_of_another_seed_is_refused(tmp_path, unets, model_id):
    from diffusers import UNet3DConditionModel

    from vmc_fast.models.show1.backbones import build_tiny_random_unet
    from vmc_fast.models.tiny import UNET3D_CONFIG

    path, _ = _save_for(unets(model_id, "bf16"), tmp_path / "a.safetensors", model_id)
    if model_id == "tiny-random":
        torch.manual_seed(7)
        other = UNet3DConditionModel(**UNET3D_CONFIG)
    else:
        other = build_tiny_random_unet(seed=7)
    with pytest.raises(VmcError, match="its frozen weights differ"):
        apply_adapter(other, path)


def test_a_base_with_other_frozen_tensors_is_refused(tmp_path, unets):
    path, _ = _save_for(unets("tiny-random", "fp32"), tmp_path / "a.safetensors", "tiny-random")
    other = load_backbone("tiny-random").unet
    other.register_buffer("extra_table", torch.zeros(3))  # same tuned tensors, one frozen tensor more
    with pytest.raises(VmcError, match="its frozen tensors have other names or shapes"):
        apply_adapter(other, path)


def test_an_fp16_tuned_adapter_generates_at_the_default_precision(square_video, tmp_path):
    """The C1 case's second half: train with --precision fp16, then generate without it."""
    from vmc_fast.config import GenerateConfig
    from vmc_fast.inference.generate import generate

    cfg = _cfg(square_video, tmp_path, steps=1, precision="fp16")
    cfg.data = DataConfig(videos=str(square_video), num_frames=4, height=16, width=16)
    session = TuningSession(cfg)
    assert any(p.dtype == torch.float16 for p in session.backbone.unet.parameters())  # frozen weights in fp16
    prompt = "a square moving right"
    done = session.tune_video(square_video, prompt, session.prompt_embeddings([prompt])[prompt],
                              tmp_path / "a.safetensors")
    result = generate(GenerateConfig(adapter=str(done.adapter), prompt="a red ball", num_inference_steps=1,
                                     output=None, cache_dir=str(tmp_path / "c")))
    assert torch.isfinite(result.frames).all()


# ---------------------------------------------------------------------------------- E2: --model as a folder


def test_a_model_folder_is_recorded_by_its_absolute_path(square_video, tmp_path, monkeypatch):
    from vmc_fast.config import GenerateConfig
    from vmc_fast.inference.generate import generate
    from vmc_fast.models.diffusers_unet3d import save_tiny_pretrained

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    elsewhere.mkdir()
    save_tiny_pretrained(work / "tinymodel")
    monkeypatch.chdir(work)
    cfg = _cfg(square_video, tmp_path, model="tinymodel", steps=1)
    cfg.data = DataConfig(videos=str(square_video), num_frames=4, height=16, width=16)
    assert cfg.model.model_id == str((work / "tinymodel").resolve())
    session = TuningSession(cfg)
    prompt = "a square moving right"
    done = session.tune_video(square_video, prompt, session.prompt_embeddings([prompt])[prompt],
                              tmp_path / "a.safetensors")
    assert read_adapter(done.adapter)[1].base_model == str((work / "tinymodel").resolve())

    monkeypatch.chdir(elsewhere)  # the adapter names its base wherever generate runs
    gen = GenerateConfig(adapter=str(done.adapter), prompt="a ball", num_inference_steps=1, output=None,
                         cache_dir=str(tmp_path / "c"))
    assert torch.isfinite(generate(gen).frames).all()
    (work / "tinymodel").rename(tmp_path / "moved")
    with pytest.raises(VmcError, match=r"adapter .*a.safetensors names base model '.*tinymodel' \(recorded when it "
                                       r"was trained\), which cannot be loaded here: .*; pass --model"):
        generate(gen)
    moved = GenerateConfig(adapter=str(done.adapter), prompt="a ball", num_inference_steps=1, output=None,
                           cache_dir=str(tmp_path / "c"), model_id="../moved")
    assert moved.model_id == str((tmp_path / "moved").resolve())
    assert torch.isfinite(generate(moved).frames).all()


def test_model_ids_that_are_not_folders_stay_as_typed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny-random").mkdir()  # a folder named like a built-in model: the built-in comes first
    assert ModelConfig(model_id="tiny-random").model_id == "tiny-random"
    assert ModelConfig(model_id="org/some-model").model_id == "org/some-model"
    (tmp_path / "models" / "mine").mkdir(parents=True)
    assert ModelConfig(model_id="models/mine").model_id == str(tmp_path.resolve() / "models" / "mine")
