"""Each loss kind equals a direct, loop-based computation of its formula (docs/design.md section 1)."""

import math

import pytest
import torch

from vmc_fast.tuning.losses import LOSS_KINDS, motion_distillation_loss


def _pair(seed=0, shape=(2, 3, 5, 4, 6)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def _cos(a, b):
    return float((a * b).sum() / (a.norm() * b.norm()))


def direct(kind, pred, true, stride=1, weight=None):
    b_, c_, f_, h_, w_ = true.shape
    if kind == "eps-mse":
        return float(((pred - true) ** 2).mean())
    terms = []
    for b in range(b_):
        for n in range(f_ - stride):
            dp = pred[b, :, n + stride] - pred[b, :, n]
            dt = true[b, :, n + stride] - true[b, :, n]
            if kind == "cos":
                terms.append(1 - _cos(dp.flatten(), dt.flatten()))
            elif kind == "l2":
                terms.append(float(((dp - dt) ** 2).sum()) * (float(weight[b]) if weight is not None else 1.0))
            else:  # cos-frames-abs: cosine along frames at each (c, h, w)
                pass
    if kind == "cos-frames-abs":
        dp = (pred[:, :, stride:] - pred[:, :, :-stride]).abs()
        dt = (true[:, :, stride:] - true[:, :, :-stride]).abs()
        for b in range(b_):
            for c in range(c_):
                for y in range(h_):
                    for x in range(w_):
                        terms.append(1 - _cos(dp[b, c, :, y, x], dt[b, c, :, y, x]))
    return sum(terms) / len(terms)


@pytest.mark.parametrize("kind", LOSS_KINDS)
@pytest.mark.parametrize("stride", [1, 2])
def test_loss_equals_formula(kind, stride):
    pred, true = _pair(seed=stride)
    got = float(motion_distillation_loss(pred, true, kind=kind, stride=stride))
    assert math.isclose(got, direct(kind, pred, true, stride), rel_tol=1e-5, abs_tol=1e-6)


def test_l2_weight_per_sample():
    pred, true = _pair(seed=3)
    weight = torch.tensor([0.5, 2.0])
    got = float(motion_distillation_loss(pred, true, kind="l2", weight=weight))
    assert math.isclose(got, direct("l2", pred, true, weight=weight), rel_tol=1e-5)


def test_learned_variance_uses_first_half():
    pred, true = _pair(seed=4)
    doubled = torch.cat([pred, torch.randn_like(pred) * 100], dim=1)
    for kind in LOSS_KINDS:
        assert torch.allclose(motion_distillation_loss(doubled, true, kind=kind),
                              motion_distillation_loss(pred, true, kind=kind))


def test_motion_losses_ignore_a_shared_appearance_offset():
    # Adding the same tensor to every frame changes no frame residual: the motion losses must not move,
    # while the faithful-reconstruction loss does (the paper's argument for residuals).
    pred, true = _pair(seed=5)
    offset = torch.randn(2, 3, 1, 4, 6).expand_as(pred)
    for kind in ("cos", "l2", "cos-frames-abs"):
        assert torch.allclose(motion_distillation_loss(pred + offset, true, kind=kind),
                              motion_distillation_loss(pred, true, kind=kind), atol=1e-5)
    assert not torch.allclose(motion_distillation_loss(pred + offset, true, kind="eps-mse"),
                              motion_distillation_loss(pred, true, kind="eps-mse"))


def test_perfect_prediction_gives_zero_loss():
    _, true = _pair(seed=6)
    for kind in LOSS_KINDS:
        assert float(motion_distillation_loss(true.clone(), true, kind=kind)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    ({"kind": "nope"}, "loss kind"),
    ({"stride": 5}, "frame stride"),
    ({"stride": 0}, "frame stride"),
])
def test_bad_arguments_are_named(kwargs, message):
    pred, true = _pair()
    with pytest.raises(ValueError, match=message):
        motion_distillation_loss(pred, true, **kwargs)


def test_shape_mismatch_is_refused():
    pred, true = _pair()
    with pytest.raises(ValueError, match="differ in shape"):
        motion_distillation_loss(pred[:, :, :4], true)


# ---------------------------------------------------------------------------------------------- eq. 16's weight


class _HalfUNet(torch.nn.Module):
    """eps_theta(x) = x / 2: a prediction that depends on the noised input, hence on t."""

    def forward(self, sample, timestep, encoder_hidden_states):
        return sample / 2


def test_snr_loss_weight_is_eq16s_per_timestep_factor_on_the_l2_loss():
    from vmc_fast.config import TrainConfig
    from vmc_fast.tuning.loop import vmc_loss

    clip, noise = _pair(seed=7)
    abar = torch.linspace(0.999, 0.01, 1000)
    t = torch.tensor([30, 800])
    states = torch.zeros(2, 1, 4)
    plain = TrainConfig(loss="l2")
    weighted = TrainConfig(loss="l2", loss_weight="snr")
    per_sample = [float(vmc_loss(_HalfUNet(), clip[b:b + 1], noise[b:b + 1], t[b:b + 1], abar, states[:1], plain))
                  for b in range(2)]
    a = abar[t]
    expected = sum(float((1 - a[b]) / a[b]) * per_sample[b] for b in range(2)) / 2
    assert float(vmc_loss(_HalfUNet(), clip, noise, t, abar, states, weighted)) == pytest.approx(expected, rel=1e-6)
    assert float(vmc_loss(_HalfUNet(), clip, noise, t, abar, states, plain)) == pytest.approx(sum(per_sample) / 2,
                                                                                               rel=1e-6)
    assert (1 - a[1]) / a[1] > 10 * (1 - a[0]) / a[0]  # the two timesteps really are weighted differently


@pytest.mark.parametrize("kwargs, message", [
    ({"loss": "cos", "loss_weight": "snr"}, "--loss-weight: snr applies to --loss l2 only"),
    ({"loss": "l2", "loss_weight": "min-snr"}, "--loss-weight: must be one of none, snr"),
])
def test_bad_loss_weight_is_named(kwargs, message):
    from vmc_fast.config import TrainConfig

    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_the_cli_offers_the_weight_and_says_what_l2_is():
    from typer.testing import CliRunner

    from vmc_fast.cli import app

    result = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    text = " ".join(result.output.replace("\u2502", " ").split())  # help lines joined, box edges dropped
    assert result.exit_code == 0 and "--loss-weight" in text
    assert "eq. 16 without its weight" in text and "(1 - abar_t) / abar_t" in text


@pytest.mark.parametrize("legacy, loss, expected", [(True, "l2", "snr"), (False, "l2", "none"), (True, "cos", "none")])
def test_configs_saved_with_snr_weight_still_load(legacy, loss, expected):
    from vmc_fast.config import RunConfig

    saved = RunConfig().to_dict()
    del saved["train"]["loss_weight"]
    saved["train"].update(snr_weight=legacy, loss=loss)  # snr_weight only ever weighted l2
    assert RunConfig.from_dict(saved).train.loss_weight == expected


def test_the_recorded_formula_names_the_weight():
    from vmc_fast.tuning.losses import loss_formula

    assert "(1 - abar_t) / abar_t" in loss_formula("l2", "snr") and "eq. 16" in loss_formula("l2", "snr")
    assert "without its weight" in loss_formula("l2") and "abar" not in loss_formula("l2")
    assert len({loss_formula(kind) for kind in LOSS_KINDS}) == len(LOSS_KINDS)
