"""``--lora-rank``: PEFT LoRA on the temporal Q/K/V of every tiny backbone: only the factors train, the frozen base
stays bit-identical, adapters are several times smaller and round-trip (save -> `apply_adapter` on a fresh model
-> the trained model's output), another base is refused, `generate` and `vmc-fast export` take them.

Tolerance: ROUNDTRIP_ATOL (float32) between the trained model and a fresh one with the adapter applied: the same
PEFT layers with the same factors, so only the order of float32 sums may differ (measured: 0 on these models).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import moving_square_frames, write_video
from vmc_fast.cli import app
from vmc_fast.config import DataConfig, ExportConfig, GenerateConfig, ModelConfig, RunConfig, TrainConfig
from vmc_fast.errors import VmcError
from vmc_fast.inference.ddim import predict_noise
from vmc_fast.inference.generate import generate
from vmc_fast.models import load_backbone
from vmc_fast.tuning.adapters import apply_adapter, base_tensors, read_adapter
from vmc_fast.tuning.export import PEFT_WEIGHTS, adapter_kind, export_adapter
from vmc_fast.tuning.lora import init_lora, lora_layers, lora_settings
from vmc_fast.tuning.session import TuningSession
from vmc_fast.tuning.surgery import temporal_qkv_parameters

ROUNDTRIP_ATOL = 1e-5
PROMPT = "a square moving right"
MODELS = ["tiny-random", "show1-tiny-random", "toy", "animatediff-tiny-random"]
SIZE = {"show1-tiny-random": (16, 24)}  # (height, width); others 32x32
runner = CliRunner()


def _video(folder: Path, step: int = 2, name: str = "square.mp4") -> Path:
    return write_video(folder / name, moving_square_frames(10, 32, 32, step=step))


def _session(model: str, folder: Path, rank: int = 4, alpha: float | None = None, steps: int = 3,
             adapter_dtype: str = "fp32", **train) -> TuningSession:
    """fp32 adapters unless asked: the tests compare tensors exactly."""
    height, width = SIZE.get(model, (32, 32))
    cfg = RunConfig(data=DataConfig(videos=str(folder), num_frames=8, height=height, width=width),
                    model=ModelConfig(model_id=model, lora_rank=rank, lora_alpha=alpha),
                    train=TrainConfig(steps=steps, learning_rate=1e-2, **train), prompt=PROMPT,
                    out_dir=str(folder / "out"), cache_dir=str(folder / "cache"), adapter_dtype=adapter_dtype)
    return TuningSession(cfg)


def _tune(session: TuningSession, video: Path, adapter: Path) -> Path:
    states = session.prompt_embeddings([PROMPT])[PROMPT]
    return session.tune_video(video, PROMPT, states, adapter).adapter


def _inputs(model: str, backbone):
    height, width = SIZE.get(model, (32, 32))
    factor = 1 if backbone.vae is None else 8
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, backbone.in_channels, 8, height // factor, width // factor, generator=g)
    return x, 500, backbone.load_text_encoder()([PROMPT])


@pytest.fixture(scope="module", params=MODELS)
def trained(request, tmp_path_factory):
    """(model, session after tuning one video, its LoRA adapter file)."""
    folder = tmp_path_factory.mktemp(request.param)
    session = _session(request.param, folder)
    return request.param, session, _tune(session, _video(folder), folder / "lora.safetensors")


def test_lora_trains_only_lora_factors_on_the_temporal_qkv(trained):
    model, session, adapter = trained
    fresh = load_backbone(model)
    targets = sorted(name.removesuffix(".weight") for name, _ in temporal_qkv_parameters(fresh.unet))
    unet = session.backbone.unet
    assert [name for name, _ in lora_layers(unet)] == targets  # exactly the modules full tuning would tune
    trainable = {name for name, p in unet.named_parameters() if p.requires_grad}
    assert trainable == {f"{t}.lora_{part}.default.weight" for t in targets for part in "AB"}
    assert session.surgery.num_tensors == 2 * len(targets) and session.surgery.lora_rank == 4
    assert session.surgery.num_trainable == sum(unet.get_parameter(n).numel() for n in trainable)
    # The frozen base, Q/K/V included, is bit-identical to a fresh load after training.
    base, reference = base_tensors(unet), base_tensors(fresh.unet)
    assert sorted(base) == sorted(reference)
    assert all(torch.equal(base[n], reference[n]) for n in reference)

    tensors, info = read_adapter(adapter)
    assert sorted(tensors) == sorted(f"{t}.lora_{part}.weight" for t in targets for part in "AB")
    assert adapter_kind(tensors) == "lora" and (info.lora_rank, info.lora_alpha) == (4, 4.0)
    assert all(tensors[f"{t}.lora_A.weight"].shape[0] == 4 for t in targets)
    assert any(tensors[f"{t}.lora_B.weight"].abs().max() > 0 for t in targets)  # trained away from B = 0
    from peft import get_peft_model_state_dict  # our key names are the ones PEFT saves

    assert sorted(get_peft_model_state_dict(unet, adapter_name="default")) == sorted(tensors)


def test_a_lora_adapter_round_trips_into_a_fresh_model(trained):
    model, session, adapter = trained
    unet = session.backbone.unet
    fresh = load_backbone(model)
    inputs = _inputs(model, fresh)
    plain = predict_noise(fresh.unet, *inputs)
    info = apply_adapter(fresh.unet, adapter)
    assert info.lora_rank == 4
    ours = predict_noise(unet, *inputs)
    torch.testing.assert_close(predict_noise(fresh.unet, *inputs), ours, rtol=0, atol=ROUNDTRIP_ATOL)
    assert (plain - ours).abs().max() > 100 * ROUNDTRIP_ATOL  # the adapter does change the output
    apply_adapter(fresh.unet, adapter)  # again, into the LoRA it now carries: same result, nothing re-injected
    torch.testing.assert_close(predict_noise(fresh.unet, *inputs), ours, rtol=0, atol=ROUNDTRIP_ATOL)


def test_a_lora_adapter_is_several_times_smaller_than_a_full_one(tmp_path):
    video = _video(tmp_path)
    lora = _tune(_session("tiny-random", tmp_path, rank=4, steps=1), video, tmp_path / "lora.safetensors")
    full = _tune(_session("tiny-random", tmp_path, rank=0, steps=1), video, tmp_path / "full.safetensors")
    assert adapter_kind(load_file(full)) == "full"
    assert lora.stat().st_size * 3 < full.stat().st_size, (lora.stat().st_size, full.stat().st_size)


def test_a_bf16_lora_adapter_stores_rounded_factors_and_applies_within_its_recorded_error(tmp_path):
    video = _video(tmp_path)
    exact = _tune(_session("tiny-random", tmp_path, rank=4, steps=2), video, tmp_path / "fp32.safetensors")
    rounded = _tune(_session("tiny-random", tmp_path, rank=4, steps=2, adapter_dtype="bf16"), video,
                    tmp_path / "bf16.safetensors")
    factors, info = read_adapter(rounded)
    assert {t.dtype for t in factors.values()} == {torch.bfloat16} and info.lora is not None
    reference = load_file(exact)
    nbytes = [sum(t.numel() * t.element_size() for t in d.values()) for d in (factors, reference)]
    assert nbytes[0] * 2 == nbytes[1] and rounded.stat().st_size < exact.stat().st_size  # tiny: metadata dominates
    error = sum((factors[k].double() - reference[k].double()).square().sum() for k in reference) ** 0.5 / \
        sum(reference[k].double().square().sum() for k in reference) ** 0.5
    assert info.reconstruction["relative_error"] == pytest.approx(float(error), rel=1e-6)
    assert 0 < info.reconstruction["relative_error"] < 1e-2
    fresh = load_backbone("tiny-random")
    apply_adapter(fresh.unet, rounded)  # bf16 factors go into the fp32 LoRA layers
    assert lora_settings(fresh.unet) == info.lora


def test_videos_of_a_session_start_from_the_same_factors_whatever_their_position(tmp_path):
    """a, b, a in one session: the second a repeats the first exactly; between videos the factors go back to
    B = 0 and A drawn from the seed."""
    session = _session("tiny-random", tmp_path, rank=4, steps=2)
    a, b = _video(tmp_path, 2, "a.mp4"), _video(tmp_path, 3, "b.mp4")
    first = load_file(_tune(session, a, tmp_path / "a1.safetensors"))
    second = load_file(_tune(session, b, tmp_path / "b.safetensors"))
    third = load_file(_tune(session, a, tmp_path / "a2.safetensors"))
    assert all(torch.equal(first[k], third[k]) for k in first)
    assert not all(torch.equal(first[k], second[k]) for k in first)
    session.reset_trainable()
    start = {n: p.detach().clone() for n, p in session.backbone.unet.named_parameters() if p.requires_grad}
    init_lora(session.backbone.unet, session.cfg.train.seed)
    assert all(torch.equal(p, start[n]) for n, p in session.backbone.unet.named_parameters() if p.requires_grad)
    assert all(start[n].abs().max() == 0 for n in start if ".lora_B." in n)
    assert all(start[n].abs().max() > 0 for n in start if ".lora_A." in n)
    # Another seed draws other A factors.
    other = _session("tiny-random", tmp_path, rank=4, steps=2, seed=1)
    assert not all(torch.equal(p, start[n]) for n, p in other.backbone.unet.named_parameters() if p.requires_grad)


def test_factors_start_in_fp32_from_the_seed_whatever_the_frozen_dtype():
    from vmc_fast.models.registry import LoadOptions
    from vmc_fast.tuning.lora import LoraSettings
    from vmc_fast.tuning.surgery import prepare_for_lora_tuning

    layers = []
    for dtype in (torch.float32, torch.bfloat16):
        unet = load_backbone("tiny-random", LoadOptions(dtype=dtype)).unet
        prepare_for_lora_tuning(unet, LoraSettings(4, 4.0), seed=0)
        layers.append(dict(lora_layers(unet)))
    fp32, bf16 = layers
    some = next(iter(bf16.values()))
    assert some.base_layer.weight.dtype == torch.bfloat16 and some.lora_A["default"].weight.dtype == torch.float32
    assert all(torch.equal(fp32[k].lora_A["default"].weight, bf16[k].lora_A["default"].weight) for k in fp32)


def test_lora_alpha_scales_the_change_and_travels_in_the_metadata(tmp_path):
    video = _video(tmp_path)
    adapter = _tune(_session("tiny-random", tmp_path, rank=4, alpha=16.0, steps=2), video, tmp_path / "a.safetensors")
    _, info = read_adapter(adapter)
    assert (info.lora_rank, info.lora_alpha) == (4, 16.0)
    unet = load_backbone("tiny-random").unet
    apply_adapter(unet, adapter)
    assert {layer.scaling["default"] for _, layer in lora_layers(unet)} == {4.0}


def test_a_lora_adapter_for_another_base_is_refused_and_nothing_is_injected(tmp_path):
    adapter = _tune(_session("tiny-random", tmp_path, steps=1), _video(tmp_path), tmp_path / "a.safetensors")
    show1 = load_backbone("show1-tiny-random").unet
    with pytest.raises(VmcError, match="was made for another base model"):
        apply_adapter(show1, adapter)
    other = load_backbone("tiny-random").unet
    with torch.no_grad():
        other.conv_in.weight.mul_(1.1)  # the same architecture, other frozen weights
    with pytest.raises(VmcError, match=r"made for base model tiny-random .*frozen weights differ"):
        apply_adapter(other, adapter)
    assert not list(lora_layers(show1)) and not list(lora_layers(other))
    # A model carrying another LoRA (rank 8) does not take this one (rank 4) silently.
    carrying = _session("tiny-random", tmp_path, rank=8, steps=1).backbone.unet
    with pytest.raises(VmcError, match="already carries a LoRA"):
        apply_adapter(carrying, adapter)
    # Nor does it take a full adapter, whose change the LoRA would add to.
    full = _tune(_session("tiny-random", tmp_path, rank=0, steps=1), _video(tmp_path), tmp_path / "full.safetensors")
    with pytest.raises(VmcError, match="full adapter, and this model carries a LoRA"):
        apply_adapter(carrying, full)


def test_generate_writes_a_video_with_a_lora_adapter(tmp_path):
    adapter = _tune(_session("tiny-random", tmp_path, steps=2), _video(tmp_path), tmp_path / "a.safetensors")
    common = dict(prompt=PROMPT, num_inference_steps=2, num_frames=8, height=32, width=32, seed=3,
                  cache_dir=str(tmp_path / "cache"))
    plain = generate(GenerateConfig(model_id="tiny-random", output=None, **common)).frames
    result = generate(GenerateConfig(adapter=str(adapter), output=str(tmp_path / "v.gif"), **common))
    assert result.output.is_file() and result.output.stat().st_size > 0
    assert (result.frames - plain).abs().max() > 1e-4
    sidecar = json.loads(result.output.with_suffix(".json").read_text())
    assert sidecar["adapter"]["lora_rank"] == 4 and sidecar["adapter"]["lora_alpha"] == 4.0


@pytest.mark.parametrize("model", ["tiny-random", "animatediff-tiny-random"])
def test_a_lora_adapter_exports_as_is_and_loads_with_peft(model, tmp_path):
    from peft import PeftModel
    from test_export import FULL_RANK_ATOL, _lora_layers

    adapter = _tune(_session(model, tmp_path, rank=4, alpha=8.0, steps=2), _video(tmp_path),
                    tmp_path / "a.safetensors")
    result = export_adapter(ExportConfig(adapter=str(adapter), format="peft", out_dir=str(tmp_path / "peft")))
    assert result.record["rank"] == 4 and result.relative_error == 0.0
    assert "as it was trained" in result.record["source"]
    ours = load_backbone(model)
    inputs = _inputs(model, ours)
    apply_adapter(ours.unet, adapter)
    wrapped = load_backbone(model).unet
    PeftModel.from_pretrained(wrapped, str(tmp_path / "peft"))
    assert len(_lora_layers(wrapped)) == result.record["layers"]
    torch.testing.assert_close(predict_noise(wrapped, *inputs), predict_noise(ours.unet, *inputs), rtol=0,
                               atol=FULL_RANK_ATOL)
    # Exported as trained: A unchanged, alpha / r = 2 folded into B.
    tensors, exported = load_file(adapter), load_file(tmp_path / "peft" / PEFT_WEIGHTS)
    some = next(k for k in tensors if k.endswith("lora_B.weight"))
    torch.testing.assert_close(exported["base_model.model." + some], 2 * tensors[some])
    with pytest.warns(UserWarning, match="--model show1-tiny-random: not used; a LoRA adapter is exported as it is"):
        export_adapter(ExportConfig(adapter=str(adapter), format="peft", out_dir=str(tmp_path / "p2"),
                                    model_id="show1-tiny-random"))


def test_a_lora_adapter_exports_to_diffusers_and_comfyui_and_each_reproduces_our_output(tmp_path):
    from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers
    from test_export import FULL_RANK_ATOL, TINY_AD, _comfy_model_key, _lora_layers, _pipeline, _pipeline_frames

    adapter = _tune(_session(TINY_AD, tmp_path, rank=4, alpha=2.0, steps=2), _video(tmp_path),
                    tmp_path / "a.safetensors")
    export_adapter(ExportConfig(adapter=str(adapter), format="diffusers", out_dir=str(tmp_path / "d")))
    ours, loaded = _pipeline(), _pipeline()
    apply_adapter(ours.unet, adapter)
    loaded.load_lora_weights(str(tmp_path / "d"))
    assert len(_lora_layers(loaded.unet)) == 42
    torch.testing.assert_close(_pipeline_frames(loaded), _pipeline_frames(ours), rtol=0, atol=10 * FULL_RANK_ATOL)

    # ComfyUI-AnimateDiff-Evolved's rule replayed: W += up @ down on each original motion-module weight.
    comfy = export_adapter(ExportConfig(adapter=str(adapter), format="comfyui", out_dir=str(tmp_path / "c")))
    state = load_file(comfy.files[0])
    patches = {_comfy_model_key(key): state[key.replace(".down.", ".up.")].float() @ state[key].float()
               for key in state if "up." not in key}
    patched = load_backbone(TINY_AD)
    inputs = _inputs(TINY_AD, patched)
    with torch.no_grad():
        for name, delta in convert_animatediff_checkpoint_to_diffusers(patches).items():
            patched.unet.get_parameter(name).add_(delta)
    mine = load_backbone(TINY_AD)
    apply_adapter(mine.unet, adapter)
    torch.testing.assert_close(predict_noise(patched.unet, *inputs), predict_noise(mine.unet, *inputs), rtol=0,
                               atol=FULL_RANK_ATOL)


def test_lora_on_8bit_frozen_linears_trains(tmp_path):
    pytest.importorskip("bitsandbytes")
    session = _session("tiny-random", tmp_path, steps=2)
    session.cfg.model.frozen_dtype = "int8"
    session = TuningSession(session.cfg)
    layer = dict(lora_layers(session.backbone.unet))
    some = next(iter(layer.values()))
    assert type(some.base_layer).__name__ == "Linear8bit"  # the frozen Q/K/V weight is 8-bit, the factors fp32
    assert some.lora_A["default"].weight.dtype == torch.float32
    adapter = _tune(session, _video(tmp_path), tmp_path / "a.safetensors")
    assert any(v.abs().max() > 0 for k, v in load_file(adapter).items() if ".lora_B." in k)


# ---------------------------------------------------------------------------------------------- options


@pytest.mark.parametrize("args, message", [
    (["--lora-rank", "-1"], "--lora-rank: -1 is not a rank; use 0 (tune Q/K/V fully) or a LoRA rank"),
    (["--lora-alpha", "8"], "--lora-alpha: applies to a LoRA only; pass --lora-rank R with it"),
    (["--lora-rank", "4", "--lora-alpha", "0"], "--lora-alpha: 0.0 must be a positive number"),
    (["--lora-rank", "4", "--trainable", r"norm\.weight$"], "--lora-rank: --trainable selects"),
])
def test_bad_lora_options_give_one_clear_line(args, message, tmp_path):
    video = _video(tmp_path)
    result = runner.invoke(app, ["train", "--videos", str(video), "--prompt", PROMPT, "--out", str(tmp_path / "out"),
                                 "--steps", "1", "--frames", "8", "--height", "32", "--width", "32", *args],
                           env={"VMC_FAST_CACHE": str(tmp_path / "cache")})
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert any(message in " ".join(line.split()) for line in lines), result.output
    assert not list((tmp_path / "out").rglob("*.safetensors"))


def test_lora_options_resolve_alpha_to_the_rank():
    assert ModelConfig(lora_rank=16).lora_alpha == 16.0
    assert ModelConfig().lora_alpha is None and ModelConfig().lora_rank == 0


# ---------------------------------------------------------------------------------------------- ZeRO


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_lora_under_zero_on_two_cpu_ranks(stage, tmp_path, monkeypatch):
    """Both ranks start from the same factors (drawn from the run's seed, not the rank's) and write whole factors;
    ZeRO-3 partitions even these small factors."""
    from test_parallel import _entries, _train

    # The ranks run `python -m vmc_fast.cli` from the working directory, which is then on sys.path: from the
    # repository root its kernels/ folder would shadow Hugging Face's `kernels`, which PEFT's diffusers import needs.
    monkeypatch.chdir(tmp_path)
    extra = []
    if stage == 3:
        config = tmp_path / "zero3.json"
        config.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
        extra = ["--deepspeed-config", str(config)]
    result, out = _train(tmp_path, "--strategy", "zero", "--zero-stage", str(stage), "--lora-rank", "4", *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    assert {e["status"] for e in _entries(out).values()} == {"done"}
    a, b, c = (load_file(out / "adapters" / f"{n}.safetensors") for n in "abc")
    assert all(re.search(r"\.lora_[AB]\.weight$", k) for k in a)
    assert all(a[k].shape[0 if ".lora_A." in k else 1] == 4 for k in a)  # whole factors, not partitions
    # c is a's clip under another name: it draws its own timesteps and noise (seeded by its name), so it differs;
    # that every video starts from the same factors is tested in one session (a, b, a) above.
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert not all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().max() > 0 for k in a if ".lora_B." in k)  # trained
    with safe_open(str(out / "adapters" / "a.safetensors"), "pt") as handle:
        assert handle.metadata()["lora_rank"] == "4"
