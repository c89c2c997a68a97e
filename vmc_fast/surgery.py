"""`vmc_fast.surgery.temporal_qkv_parameters`, a stable import path (surgery lives in vmc_fast.tuning.surgery)."""

from vmc_fast.tuning.surgery import (
                                     DEFAULT_TRAINABLE_PATTERN,
                                     prepare_for_lora_tuning,
                                     prepare_for_motion_tuning,
                                     temporal_qkv_parameters,
                                     trainable_state,
)

__all__ = ["DEFAULT_TRAINABLE_PATTERN", "prepare_for_lora_tuning", "prepare_for_motion_tuning",
           "temporal_qkv_parameters", "trainable_state"]
