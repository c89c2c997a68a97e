"""Show-1 (Zhang et al., 2023): the keyframe UNet re-implemented (`unet`), loading and saving its repositories
(`loading`), its T5 prompt encoder (`text_encoder`) and the frozen cascade stages (`stages`)."""

from vmc_fast.models.show1.unet import (
                                        Show1Config,
                                        Show1UNet3D,
                                        Show1UNetOutput,
                                        TemporalSelfAttention,
                                        init_random_weights,
                                        is_show1_unet_config,
)

__all__ = ["Show1Config", "Show1UNet3D", "Show1UNetOutput", "TemporalSelfAttention", "init_random_weights",
           "is_show1_unet_config"]
