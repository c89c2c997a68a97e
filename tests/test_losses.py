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
