"""`vmc_fast.losses.motion_distillation_loss`, a stable import path (the losses live in vmc_fast.tuning.losses)."""

from vmc_fast.tuning.losses import LOSS_KINDS, epsilon_half, motion_distillation_loss

__all__ = ["LOSS_KINDS", "epsilon_half", "motion_distillation_loss"]
