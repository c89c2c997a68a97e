"""The built-in ``toy`` model: tokenizer, architecture, pretraining (resume, held-out motions), export and loading."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from typer.testing import CliRunner

import vmc_fast.toy.model as toy  # registers "toy" (until the registry imports it itself)
from vmc_fast.cli import app
from vmc_fast.errors import VmcError
from vmc_fast.models.registry import LoadOptions, load_backbone
from vmc_fast.models.show1 import Show1UNet3D
from vmc_fast.models.show1.loading import show1_scheduler
from vmc_fast.toy import pretrain as pretrain_toy
from vmc_fast.toy import world as toyworld
from vmc_fast.tuning.surgery import temporal_qkv_parameters

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _all_captions() -> list[str]:
    out = []
    for shape, colour, background, motion in itertools.product(toyworld.SHAPES, toyworld.COLOURS,
                                                                toyworld.BACKGROUNDS, toyworld.MOTION_FAMILIES):
        spec = toyworld.ClipSpec(shape=shape, colour=colour, background=background, motion=motion)
        out.extend(toyworld.captions(spec))
    return out


def _tiny_config(tmp_path, name: str, steps: int) -> pretrain_toy.PretrainConfig:
    """The real toy architecture on 4 frames of 8x8 with batch 1: a step takes a fraction of a second."""
    return pretrain_toy.PretrainConfig(out=str(tmp_path / name), steps=steps, batch_size=1, num_frames=4, height=8,
                                       width=8, warmup_steps=2, checkpoint_every=2, log_every=1, device="cpu")


def _quiet(_line: str) -> None:
    pass


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer and architecture


def test_tokenizer_is_deterministic_and_covers_every_caption():
    first, second = toy.build_toy_tokenizer(), toy.build_toy_tokenizer()
    assert first.get_vocab() == second.get_vocab()
    assert [first.convert_ids_to_tokens(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"]
    captions = sorted(set(_all_captions()))
    ids = first(captions)["input_ids"]
    assert ids == second(captions)["input_ids"]
    unk = first.unk_token_id
    assert not [c for c, row in zip(captions, ids) if unk in row]
    assert all(row[-1] == first.eos_token_id and len(row) == len(c.split()) + 1 for c, row in zip(captions, ids))
    assert unk in first(["a purple circle"])["input_ids"][0]


def test_tokenizer_pads_to_the_show1_prompt_length():
    batch = toy.tokenize(toy.build_toy_tokenizer(), ["a red circle moving left on a grey background", ""])
    assert batch["input_ids"].shape == (2, toy.PROMPT_LENGTH)
    assert batch["attention_mask"].sum(1).tolist() == [10, 1]  # nine words + </s>; the empty prompt is </s>


def test_toy_unet_is_a_show1_keyframe_unet_with_temporal_qkv():
    unet = toy.build_toy_unet()
    assert isinstance(unet, Show1UNet3D)
    assert (unet.config.in_channels, unet.config.out_channels) == (3, 6)
    qkv = temporal_qkv_parameters(unet)
    expected = [n for n, _ in unet.named_parameters()
                if "temp_attentions" in n and n.endswith(("to_q.weight", "to_k.weight", "to_v.weight"))]
    assert [n for n, _ in qkv] == expected and len(expected) == 42  # 7 temporal transformers x attn1/2 x q/k/v
    heads = {m.num_heads for n, m in unet.named_modules() if n.endswith("attn1")}
    assert heads == {toy.toy_unet_config()["attention_head_dim"]}
    out = unet(torch.randn(1, 3, 2, toy.HEIGHT, toy.WIDTH), torch.tensor([10]), torch.randn(1, 5, 64)).sample
    assert out.shape == (1, 6, 2, toy.HEIGHT, toy.WIDTH)


# ---------------------------------------------------------------------------------------------------------------
# Pretraining


def test_training_batches_never_hold_a_held_out_motion():
    cfg = pretrain_toy.PretrainConfig(out="unused", batch_size=4)
    motions = [spec.motion for step in range(150) for spec in pretrain_toy.sample_specs(cfg, step)]
    assert set(motions) == set(toyworld.TRAIN_MOTIONS)
    assert not set(motions) & set(toyworld.HELD_OUT_MOTIONS)


def test_batches_are_a_function_of_seed_and_step():
    cfg = dataclasses.replace(pretrain_toy.PretrainConfig(out="unused"), batch_size=8, caption_dropout=0.5,
                              num_frames=2, height=8, width=8)
    a, b = pretrain_toy.make_batch(cfg, 3, 1000), pretrain_toy.make_batch(cfg, 3, 1000)
    assert a["captions"] == b["captions"] and torch.equal(a["noise"], b["noise"])
    assert torch.equal(a["timesteps"], b["timesteps"]) and torch.equal(a["pixels"], b["pixels"])
    assert "" in a["captions"] and any(" on a " in c for c in a["captions"])  # dropped and full captions
    assert not torch.equal(a["noise"], pretrain_toy.make_batch(cfg, 4, 1000)["noise"])


def test_vlb_term_is_zero_for_the_true_posterior():
    scheduler = show1_scheduler()
    x0, noise = torch.rand(2, 3, 2, 4, 4) * 2 - 1, torch.randn(2, 3, 2, 4, 4)
    t = torch.tensor([5, 700])
    abar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1, 1)
    xt = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    exact = pretrain_toy.vlb_term(scheduler, x0, xt, t, noise, -torch.ones_like(x0))  # frac 0: posterior variance
    assert exact.abs().max() < 1e-3
    assert (pretrain_toy.vlb_term(scheduler, x0, xt, t, noise, torch.ones_like(x0)) > exact).all()


def test_v_weighting_scales_each_sample_by_inverse_abar_capped(tmp_path):
    cfg = dataclasses.replace(_tiny_config(tmp_path, "w", 1), vlb_weight=0.0, batch_size=2)
    scheduler, tokenizer = show1_scheduler(), toy.build_toy_tokenizer()
    state = pretrain_toy.build_state(cfg, torch.device("cpu"), len(tokenizer))
    losses = {}
    for timesteps in ([999, 999], [300, 300]):
        batch = {**pretrain_toy.make_batch(cfg, 0, 1000), "timesteps": torch.tensor(timesteps)}
        for weighting in pretrain_toy.LOSS_WEIGHTINGS:
            run = dataclasses.replace(cfg, loss_weighting=weighting)
            with torch.no_grad():
                losses[timesteps[0], weighting] = pretrain_toy.diffusion_loss(
                    run, state, scheduler, tokenizer, batch, torch.device("cpu"))[0].item()
    assert losses[999, "v"] == pytest.approx(pretrain_toy.V_WEIGHT_CAP * losses[999, "uniform"], rel=1e-5)
    abar = scheduler.alphas_cumprod[300].item()
    assert 1 < 1 / abar < pretrain_toy.V_WEIGHT_CAP
    assert losses[300, "v"] == pytest.approx(losses[300, "uniform"] / abar, rel=1e-5)
    with pytest.raises(ValueError, match="loss_weighting"):
        dataclasses.replace(cfg, loss_weighting="snr")


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory):
    """(uninterrupted 3-step run, 2-step run resumed to 3) folders and their final states."""
    tmp = tmp_path_factory.mktemp("toy-runs")
    straight = pretrain_toy.pretrain(_tiny_config(tmp, "straight", 3), log=_quiet)
    pretrain_toy.pretrain(_tiny_config(tmp, "resumed", 2), log=_quiet)
    resumed = pretrain_toy.pretrain(_tiny_config(tmp, "resumed", 3), resume=True, log=_quiet, command="resume")
    return tmp, straight, resumed


def test_resume_is_bit_identical_to_an_uninterrupted_run(finished_runs):
    _, straight, resumed = finished_runs
    assert straight.step == resumed.step == 3
    for module in ("unet", "text_encoder"):
        a, b = getattr(straight, module).state_dict(), getattr(resumed, module).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), module
    opt_a, opt_b = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(opt_a[i]["exp_avg_sq"], opt_b[i]["exp_avg_sq"]) for i in opt_a)
    assert [h["loss"] for h in straight.history] == [h["loss"] for h in resumed.history]
    assert resumed.commands == ["resume"]


def test_existing_checkpoint_needs_resume(finished_runs):
    tmp, _, _ = finished_runs
    with pytest.raises(ValueError, match="--resume"):
        pretrain_toy.pretrain(_tiny_config(tmp, "straight", 4), log=_quiet)
    result = CliRunner().invoke(app, ["toy-pretrain", "--out", str(tmp / "straight"), "--steps", "4"])
    assert result.exit_code == 2 and "--resume" in result.output


# ---------------------------------------------------------------------------------------------------------------
# Export and loading


def test_export_then_load_backbone_round_trip(finished_runs, tmp_path, monkeypatch):
    run_dir, straight, _ = finished_runs
    pretrain_toy.export(run_dir / "straight", tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "unet.safetensors", "text_encoder.safetensors",
                                                   "README.md"}
    assert "Steps reached: 3" in (tmp_path / "README.md").read_text()
    monkeypatch.setenv(toy.TOY_DIR_ENV, str(tmp_path))
    backbone = load_backbone("toy", LoadOptions(dtype=torch.float32))
    assert backbone.family == "show1" and backbone.learned_variance
    assert (backbone.num_frames, backbone.height, backbone.width) == (4, 8, 8)
    trained = straight.unet.state_dict()
    assert all(torch.equal(v, trained[k].half().float()) for k, v in backbone.unet.state_dict().items())
    assert backbone.noise_scheduler.config.variance_type == "learned_range"
    states = backbone.load_text_encoder()(["a red circle moving left on a grey background", ""])
    assert states.shape == (2, toy.PROMPT_LENGTH, 64) and states.dtype == torch.float32
    out = backbone.unet(torch.zeros(1, 3, 4, 8, 8), torch.tensor([3]), states[:1]).sample
    assert out.shape == (1, 6, 4, 8, 8) and torch.isfinite(out).all()


def test_missing_weights_raise_with_the_fix(finished_runs, tmp_path, monkeypatch):
    run_dir, _, _ = finished_runs
    monkeypatch.setenv(toy.TOY_DIR_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(VmcError, match="toy-pretrain"):
        load_backbone("toy")
    pretrain_toy.export(run_dir / "straight", tmp_path)
    (tmp_path / toy.UNET_FILE).unlink()
    monkeypatch.setenv(toy.TOY_DIR_ENV, str(tmp_path))
    with pytest.raises(VmcError, match=r"unet\.safetensors is missing.*toy-pretrain"):
        load_backbone("toy")


def test_learning_rate_warms_up_then_follows_the_schedule():
    constant = pretrain_toy.PretrainConfig(out="unused", steps=1000, lr=1e-3, warmup_steps=100)
    assert pretrain_toy.learning_rate(constant, 0) == pytest.approx(1e-5)
    assert pretrain_toy.learning_rate(constant, 99) == pytest.approx(1e-3)
    assert pretrain_toy.learning_rate(constant, 999) == pytest.approx(1e-3)
    cosine = dataclasses.replace(constant, lr_schedule="cosine", min_lr_ratio=0.1)
    assert pretrain_toy.learning_rate(cosine, 100) == pytest.approx(1e-3)
    assert pretrain_toy.learning_rate(cosine, 549) == pytest.approx(0.55e-3, rel=1e-2)  # half-way
    assert pretrain_toy.learning_rate(cosine, 999) == pytest.approx(1e-4)
    rates = [pretrain_toy.learning_rate(cosine, step) for step in range(100, 1000)]
    assert rates == sorted(rates, reverse=True)


@pytest.mark.slow
def test_rendering_in_worker_processes_changes_nothing(tmp_path):
    """Batches depend only on (seed, step), so rendering them ahead in workers gives the same run."""
    alone = pretrain_toy.pretrain(dataclasses.replace(_tiny_config(tmp_path, "alone", 2), data_workers=0),
                                  log=_quiet)
    workers = pretrain_toy.pretrain(dataclasses.replace(_tiny_config(tmp_path, "workers", 2), data_workers=2),
                                    log=_quiet)
    assert [h["loss"] for h in alone.history] == [h["loss"] for h in workers.history]
    for a, b in zip(alone.unet.parameters(), workers.unet.parameters()):
        assert torch.equal(a, b)
