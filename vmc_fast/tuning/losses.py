"""VMC's motion-distillation losses on frame-to-frame noise residuals (docs/design.md section 1).

All functions take noise tensors laid out (B, C, F, H, W) and return a scalar tensor. Learned-variance models
output 2x channels; callers pass `epsilon_half(output)` (or this module drops the extra half itself when
`eps_pred` has twice the channels of `eps_true`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vmc_fast.config import LOSS_KINDS, LOSS_WEIGHTS

LOSS_FORMULAS = {
    "cos": "mean_n [1 - cos(d_eps^n, d_eps_theta^n)] (eq. 17)",
    "l2": "mean_n ||d_eps^n - d_eps_theta^n||^2 (eq. 16 without its weight)",
    "cos-frames-abs": "mean_chw [1 - cos_frames(|d_eps_theta|, |d_eps|)] (authors' public code)",
    "eps-mse": "mean ||eps_theta - eps||^2 (plain denoising loss)",
}
"""Each loss kind written out; d_eps^n = eps^(n+c) - eps^n, the frame residual at offset c (--loss-stride)."""


def motion_distillation_loss(
    eps_pred: torch.Tensor,
    eps_true: torch.Tensor,
    kind: str = "cos",
    stride: int = 1,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Loss between predicted and true noise, both (B, C, F, H, W); returns a float32 scalar.

    kind: ``cos`` (paper eq. 17, default), ``l2`` (eq. 16 without its weight: the mean over frame pairs of
    ||d_eps - d_eps_theta||^2), ``cos-frames-abs`` (authors' public code) or ``eps-mse`` (plain diffusion loss,
    the ablation baseline). stride: frame offset c of the residuals.
    weight: optional (B,) per-sample weight, used by ``l2`` only; (1 - abar_t) / abar_t makes it eq. 16 exactly
    (`TrainConfig.loss_weight` ``snr``). `loss_formula` writes each choice out.
    """
    if kind not in LOSS_KINDS:
        raise ValueError(f"loss kind {kind!r} is not one of {', '.join(LOSS_KINDS)}")
    eps_pred = epsilon_half(eps_pred, eps_true.shape[1])
    if eps_pred.shape != eps_true.shape:
        raise ValueError(f"eps_pred {tuple(eps_pred.shape)} and eps_true {tuple(eps_true.shape)} differ in shape")
    eps_pred, eps_true = eps_pred.float(), eps_true.float()
    if kind == "eps-mse":
        return F.mse_loss(eps_pred, eps_true)
    num_frames = eps_true.shape[2]
    if not 1 <= stride < num_frames:
        raise ValueError(f"frame stride {stride} must be in [1, {num_frames - 1}] for {num_frames} frames")
    d_pred, d_true = frame_residuals(eps_pred, stride), frame_residuals(eps_true, stride)
    if kind == "cos":
        return _cos_loss(d_pred, d_true)
    if kind == "l2":
        return _l2_loss(d_pred, d_true, weight)
    return _cos_frames_abs_loss(d_pred, d_true)


def epsilon_half(output: torch.Tensor, num_channels: int) -> torch.Tensor:
    """The noise prediction of a (B, C or 2C, F, H, W) output: learned-variance models put it in the first C."""
    if output.shape[1] == 2 * num_channels:
        return output[:, :num_channels]
    return output


def frame_residuals(eps: torch.Tensor, stride: int = 1) -> torch.Tensor:
    """eps^{n+c} - eps^n along frames: (B, C, F, H, W) -> (B, C, F - c, H, W)."""
    return eps[:, :, stride:] - eps[:, :, :-stride]


def _cos_loss(d_pred: torch.Tensor, d_true: torch.Tensor) -> torch.Tensor:
    # One cosine per (batch, frame pair), taken over that pair's whole C*H*W vector.
    pred = d_pred.transpose(1, 2).flatten(2)
    true = d_true.transpose(1, 2).flatten(2)
    return (1 - F.cosine_similarity(pred, true, dim=-1, eps=1e-8)).mean()


def _l2_loss(d_pred: torch.Tensor, d_true: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    # Squared norm per (batch, frame pair), then the mean over pairs (and batch).
    per_pair = (d_pred - d_true).pow(2).sum(dim=(1, 3, 4))
    if weight is not None:
        per_pair = per_pair * weight.float().reshape(-1, 1)
    return per_pair.mean()


def _cos_frames_abs_loss(d_pred: torch.Tensor, d_true: torch.Tensor) -> torch.Tensor:
    # Cosine along the frame axis at every (b, c, h, w) position, of the residuals' magnitudes.
    return (1 - F.cosine_similarity(d_pred.abs(), d_true.abs(), dim=2, eps=1e-8)).mean()


def loss_formula(kind: str, weight: str = "none") -> str:
    """The loss `kind` with per-timestep `weight` (``none`` | ``snr``) written out, as recorded in adapters."""
    if kind not in LOSS_KINDS or weight not in LOSS_WEIGHTS:
        raise ValueError(f"loss {kind!r} with weight {weight!r}: kinds are {', '.join(LOSS_KINDS)}, weights "
                         f"{', '.join(LOSS_WEIGHTS)}")
    if weight == "snr":
        return "mean_n (1 - abar_t) / abar_t * ||d_eps^n - d_eps_theta^n||^2 (eq. 16)"
    return LOSS_FORMULAS[kind]
