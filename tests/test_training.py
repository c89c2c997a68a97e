"""Training on the tiny random backbone: what changes, what must not, and whether the loss falls."""

import json
import math
import re
from pathlib import Path

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


@pytest.mark.parametrize("model", ["tiny-random", "show1-tiny-random", "animatediff-tiny-random"])
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


@pytest.mark.parametrize("model", ["tiny-random", "show1-tiny-random", "animatediff-tiny-random"])
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
    tuned = dict(unet.named_parameters())  # the session keeps the tuned values until its next video
    assert info.storage == "delta"  # the default: bf16 changes, loaded within the error recorded when written
    assert all((fresh.state_dict()[k] - tuned[k]).abs().max() <= info.reconstruction["max_abs_error"]
               for k in tensors)

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


# ---------------------------------------------------------------------------------------------- non-finite values
# (issue 12, C1/C2: the case control_h264_yuv420p_24f.mp4 --precision fp16 --loss l2 --lr 0.9 trained NaN into a
# `done` adapter)

CASES = Path(__file__).parent / "fixtures" / "cases"


def _strict_json(text: str):
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))


def _snapshots_after_each_step(session):
    """on_step callback recording the tuned tensors after every finished step."""
    snapshots = []
    return snapshots, lambda stats: snapshots.append([p.detach().clone() for p in session.params])


def test_a_nan_loss_stops_before_its_backward_and_nothing_is_applied(square_video, tmp_path, monkeypatch):
    from vmc_fast.errors import NonFiniteError
    from vmc_fast.tuning import loop

    calls = []
    real = loop.vmc_loss
    monkeypatch.setattr(loop, "vmc_loss", lambda *a: calls.append(1) or real(*a) * (math.nan if len(calls) == 2
                                                                                      else 1.0))
    session = TuningSession(_cfg(square_video, tmp_path, steps=4, learning_rate=1e-2))
    prompt = "a square moving right"
    snapshots, on_step = _snapshots_after_each_step(session)
    with pytest.raises(NonFiniteError, match=r"the loss became nan at step 2 of 4.*--lr \(now 0\.01") as caught:
        session.tune_video(square_video, prompt, session.prompt_embeddings([prompt])[prompt],
                           tmp_path / "a.safetensors", on_step)
    assert caught.value.step == 2 and len(snapshots) == 1 and not (tmp_path / "a.safetensors").exists()
    assert all(torch.equal(p, s) for p, s in zip(session.params, snapshots[0]))  # step 2 changed nothing


def test_a_nan_gradient_stops_before_the_update(square_video, tmp_path):
    from vmc_fast.errors import NonFiniteError

    session = TuningSession(_cfg(square_video, tmp_path, steps=4, learning_rate=1e-2, precision="fp32"))
    backward_calls = []
    session.params[0].register_hook(lambda g: backward_calls.append(1) or (g * math.inf if len(backward_calls) == 2
                                                                           else g))
    prompt = "a square moving right"
    snapshots, on_step = _snapshots_after_each_step(session)
    with pytest.raises(NonFiniteError, match=r"the gradient became (nan|inf) at step 2 of 4 \(loss [0-9.]+\)"
                                             r".*--lr") as caught:
        session.tune_video(square_video, prompt, session.prompt_embeddings([prompt])[prompt],
                           tmp_path / "a.safetensors", on_step)
    assert caught.value.step == 2 and not (tmp_path / "a.safetensors").exists()
    assert all(torch.equal(p, s) for p, s in zip(session.params, snapshots[0]))  # the update was not applied
    assert all(p.grad is None for p in session.params)  # and its gradients were not kept for the next step


def test_a_diverged_video_is_failed_with_its_step_and_old_results_are_dropped(square_video, tmp_path, monkeypatch):
    from vmc_fast.reporting import summary_json
    from vmc_fast.runs.launch import train
    from vmc_fast.runs.library import Manifest
    from vmc_fast.tuning import loop

    cfg = _cfg(square_video, tmp_path, steps=3)
    out = Path(cfg.out_dir)
    out.mkdir()
    # An earlier run's `done` record whose adapter is gone: this run tunes the video again.
    Manifest(out).update(square_video.resolve(), status="done", adapter=str(out / "adapters" / "square.safetensors"),
                         final_loss=0.5, seconds=1.0, steps=3, peak_memory_bytes=0)
    calls = []
    real = loop.vmc_loss
    monkeypatch.setattr(loop, "vmc_loss", lambda *a: calls.append(1) or real(*a) * (math.inf if len(calls) == 2
                                                                                      else 1.0))
    summary = train(cfg)
    [entry] = summary.entries
    assert entry["status"] == "failed" and entry["nonfinite_step"] == 2
    assert "square.mp4: the loss became inf at step 2 of 3" in entry["error"]
    assert "--lr" in entry["error"] and "no adapter was written" in entry["error"]
    assert not {"adapter", "final_loss", "seconds", "steps"} & entry.keys()
    assert list((out / "adapters").iterdir()) == []
    assert _strict_json(summary_json(summary))["videos"][0]["status"] == "failed"
    [line] = (out / "manifest.jsonl").read_text().splitlines()
    assert _strict_json(line) == entry


def test_manifest_and_summary_json_stay_strict_json(tmp_path):
    from vmc_fast.reporting import summary_json
    from vmc_fast.runs.library import Manifest, RunSummary

    manifest = Manifest(tmp_path)
    entry = manifest.update(tmp_path / "v.mp4", status="done", final_loss=math.nan, losses=[1.0, math.inf])
    text = (tmp_path / "manifest.jsonl").read_text()
    assert _strict_json(text)["final_loss"] is None and _strict_json(text)["losses"] == [1.0, None]
    summary = _strict_json(summary_json(RunSummary(tmp_path, [entry])))
    assert summary["videos"][0]["final_loss"] is None and summary["ok"] is True


def test_fp16_scales_the_loss_and_skips_a_step_whose_gradients_overflow():
    from vmc_fast.tuning.steps import TorchStep

    layer = torch.nn.Linear(4, 4)
    params = list(layer.parameters())
    step = TorchStep(params, TrainConfig(precision="fp16", learning_rate=1e-2))
    assert step.scaler.is_enabled() and not TorchStep(params, TrainConfig(precision="fp32")).scaler.is_enabled()
    x = torch.randn(2, 4)

    def loss(scale: float) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.float16):
            out = layer(x)  # fp16: a large scaled gradient overflows it, as in a UNet's activations
        return out.float().pow(2).mean() * scale

    before, scale = [p.detach().clone() for p in params], step.scaler.get_scale()
    norm = step(loss(1e30))
    assert not math.isfinite(norm) and step.skipped_steps == 1
    assert all(torch.equal(p, b) for p, b in zip(params, before))  # skipped: no update, no NaN
    assert step.scaler.get_scale() == scale / 2
    assert math.isfinite(step(loss(1.0))) and step.skipped_steps == 1
    assert not all(torch.equal(p, b) for p, b in zip(params, before))  # a finite step is applied
    assert all(torch.isfinite(p).all() for p in params)


def test_fp16_stops_after_ten_overflows_in_a_row():
    from vmc_fast.tuning.steps import (
        MAX_CONSECUTIVE_OVERFLOWS,
        NonFiniteGradient,
        TorchStep,
    )

    layer = torch.nn.Linear(4, 4)
    step = TorchStep(list(layer.parameters()), TrainConfig(precision="fp16"))

    def overflowing_loss() -> torch.Tensor:
        return layer(torch.randn(2, 4)).sum() * math.inf

    for _ in range(MAX_CONSECUTIVE_OVERFLOWS - 1):
        step(overflowing_loss())
    with pytest.raises(NonFiniteGradient) as caught:
        step(overflowing_loss())
    assert caught.value.consecutive_overflows == MAX_CONSECUTIVE_OVERFLOWS == 10


def test_fp16_training_on_the_tiny_model_ends_finite_and_counts_skipped_steps(square_video, tmp_path):
    session = TuningSession(_cfg(square_video, tmp_path, precision="fp16", learning_rate=1e-3))
    prompt = "a square moving right"
    done = session.tune_video(square_video, prompt, session.prompt_embeddings([prompt])[prompt],
                              tmp_path / "a.safetensors")
    tensors, info = read_adapter(done.adapter)
    assert all(torch.isfinite(t).all() for t in tensors.values())
    assert info.extra["skipped_steps"] == done.result.skipped_steps == session._optimizer_step.skipped_steps


def test_fp16_with_the_zero_strategy_is_refused_before_anything_is_written(square_video, tmp_path):
    from typer.testing import CliRunner

    from vmc_fast.cli import app

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["train", "--videos", str(square_video), "--prompt", "a square", "--out",
                                      str(out), "--precision", "fp16", "--strategy", "zero"])
    assert result.exit_code == 2 and "--precision fp16 does not combine with --strategy zero" in result.output
    assert not out.exists()


def test_an_adapter_holding_nan_is_refused_and_generate_writes_nothing(tmp_path):
    from typer.testing import CliRunner

    from vmc_fast.cli import app
    from vmc_fast.tuning.adapters import save_adapter

    unet = load_backbone("tiny-random").unet
    tensors = {name: p.detach().clone() for name, p in temporal_qkv_parameters(unet)}
    name = sorted(tensors)[3]
    tensors[name][0, 0] = math.nan
    path = save_adapter(tmp_path / "nan.safetensors", tensors, base_model="tiny-random",
                        fingerprint=base_fingerprint(unet, set(tensors)), prompt="p", steps=1, final_loss=0.0,
                        loss="cos", num_frames=8, height=32, width=32)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    with pytest.raises(VmcError, match=rf"1 of 24 tensors hold NaN or inf \(e.g. {name}\).*retrain"):
        apply_adapter(unet, path)
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())  # nothing copied

    out = tmp_path / "gen.gif"
    result = CliRunner().invoke(app, ["generate", "--adapter", str(path), "--prompt", "a dog", "--steps", "1",
                                      "--out", str(out)])
    assert result.exit_code == 2 and "NaN or inf" in result.output
    assert list(tmp_path.glob("gen*")) == []


@pytest.mark.slow
def test_the_fp16_case_fails_its_video_with_valid_json_and_a_rerun_tunes_it(tmp_path):
    """The case command verbatim: loss scaling keeps it going past the first overflows, but lr 0.9 ruins the
    weights and the scaled gradients overflow 10 steps in a row (steps 5-14); then the fix the message names."""
    from typer.testing import CliRunner

    from vmc_fast.cli import app

    video, out = CASES / "control_h264_yuv420p_24f.mp4", tmp_path / "D"
    args = ["train", "--videos", str(video), "--prompt", "a red square moving right", "--loss", "l2",
            "--lr", "0.9", "--steps", "30", "--out", str(out), "--json"]
    first = CliRunner().invoke(app, [*args, "--precision", "fp16"])
    assert first.exit_code == 1, first.output
    summary = _strict_json(first.stdout.strip().splitlines()[-1])
    [entry] = summary["videos"]
    assert summary["counts"] == {"failed": 1} and entry["status"] == "failed"
    assert "fp16 gradients overflowed in 10 consecutive steps" in entry["error"]
    assert "--precision bf16 or fp32 (now fp16)" in entry["error"] and "--lr (now 0.9" in entry["error"]
    assert list((out / "adapters").glob("*.safetensors")) == []
    second = CliRunner().invoke(app, [*args, "--precision", "fp32"])
    assert second.exit_code == 0, second.output
    assert "already done" not in second.output
    tensors, _ = read_adapter(out / "adapters" / "control_h264_yuv420p_24f.safetensors")
    assert all(torch.isfinite(t).all() for t in tensors.values())


def test_the_adapter_records_the_loss_weight_and_formula(square_video, tmp_path):
    session = TuningSession(_cfg(square_video, tmp_path, steps=1, loss="l2", loss_weight="snr"))
    prompt = "a square moving right"
    done = session.tune_video(square_video, prompt, session.prompt_embeddings([prompt])[prompt],
                              tmp_path / "a.safetensors")
    _, info = read_adapter(done.adapter)
    assert info.loss == "l2" and info.extra["loss_weight"] == "snr"
    assert "(1 - abar_t) / abar_t" in info.extra["loss_formula"]


def test_ranks_that_share_a_step_stop_together_when_another_ranks_loss_is_not_finite(square_video, tmp_path):
    """A step offering agree(ok) (ZeRO's, across ranks) is asked before every backward; one rank's NaN stops all."""
    from vmc_fast.errors import NonFiniteError
    from vmc_fast.tuning.steps import TorchStep

    asked = []

    class AgreeingStep(TorchStep):
        def agree(self, ok: bool) -> bool:
            asked.append(ok)
            return ok and len(asked) != 2  # "another rank" had a NaN loss at step 2

    session = TuningSession(_cfg(square_video, tmp_path, steps=3), make_optimizer_step=lambda unet, params:
                            AgreeingStep(params, session.cfg.train))
    prompt = "a square moving right"
    snapshots, on_step = _snapshots_after_each_step(session)
    with pytest.raises(NonFiniteError, match="the loss became NaN or inf on another rank at step 2 of 3") as caught:
        session.tune_video(square_video, prompt, session.prompt_embeddings([prompt])[prompt],
                           tmp_path / "a.safetensors", on_step)
    assert asked == [True, True] and caught.value.step == 2
    assert all(torch.equal(p, s) for p, s in zip(session.params, snapshots[0]))


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
