"""The Show-1 backbones: a Show-1 repository (hub id or local folder), and the built-ins ``show1-tiny-random``
(tiny random keyframe UNet, T5 and cascade stages) and ``show1-base-arch`` (the full architecture with random
weights, for benchmarks). Importing this module registers them with the backbone registry."""

from __future__ import annotations

from functools import partial

import torch

from vmc_fast.models import tiny
from vmc_fast.models.registry import (
    Backbone,
    LoadOptions,
    ModelSpec,
    read_config_file,
    register,
    register_family,
    spec_from_configs,
)
from vmc_fast.models.show1.loading import (
    SHOW1_SCHEDULER_CONFIG,
    load_show1_scheduler,
    load_show1_unet,
    show1_scheduler,
)
from vmc_fast.models.show1.stages import show1_cascade, tiny_cascade
from vmc_fast.models.show1.text_encoder import (
    RandomPromptEncoder,
    T5PromptEncoder,
    load_show1_text_encoder,
)
from vmc_fast.models.show1.unet import (
    Show1Config,
    Show1UNet3D,
    init_random_weights,
    is_show1_unet_config,
)


def load_show1_backbone(model_id: str, unet_config: dict, options: LoadOptions) -> Backbone:
    """Family loader for a Show-1 repository (hub id or local folder)."""
    unet = load_show1_unet(model_id, options, config=unet_config)
    load_in_8bit = bool(getattr(options, "text_encoder_8bit", False))
    return Backbone(
        model_id=model_id, family="show1", unet=unet, noise_scheduler=load_show1_scheduler(model_id),
        load_text_encoder=partial(load_show1_text_encoder, model_id, device=options.device, dtype=options.dtype,
                                  load_in_8bit=load_in_8bit),
        num_frames=8, height=40, width=64, cascade=show1_cascade(options))


def build_tiny_random_unet(seed: int = 0) -> Show1UNet3D:
    """The show1-tiny-random keyframe UNet (fp32, CPU), identical for a given seed."""
    return init_random_weights(Show1UNet3D.from_config(tiny.show1_unet_config()), seed).eval()


def _tiny_prompt_encoder(device: str) -> T5PromptEncoder:
    tokenizer = tiny.show1_tokenizer()
    return T5PromptEncoder(tokenizer, tiny.t5_encoder(len(tokenizer)).to(device))


def build_tiny_random_backbone(options: LoadOptions) -> Backbone:
    """``show1-tiny-random``: tiny random keyframe UNet, tiny T5, Show-1 DDPM; 8 frames at 16x24.

    Its cascade has tiny random interpolation, IF-II and super-resolution stages (29 frames at 96x144).
    """
    unet = build_tiny_random_unet().to(device=options.device, dtype=options.dtype)
    return Backbone(model_id="show1-tiny-random", family="show1", unet=unet, noise_scheduler=show1_scheduler(),
                    load_text_encoder=partial(_tiny_prompt_encoder, options.device),
                    num_frames=8, height=16, width=24, cascade=tiny_cascade(options))


def build_base_arch_backbone(options: LoadOptions) -> Backbone:
    """``show1-base-arch``: the full base architecture with random weights, for speed and memory benchmarks.

    Built on the meta device and materialised once on options.device (no CPU copy for CUDA runs). With
    device "meta" the weights stay unmaterialised (shape-only uses such as FLOP counting).
    """
    with torch.device("meta"):
        unet = Show1UNet3D(Show1Config()).to(options.dtype)
    if str(options.device) != "meta":
        unet = init_random_weights(unet.to_empty(device=options.device), seed=0)
    return Backbone(model_id="show1-base-arch", family="show1", unet=unet.eval(), noise_scheduler=show1_scheduler(),
                    load_text_encoder=partial(RandomPromptEncoder, 4096, options.device),
                    num_frames=8, height=40, width=64, benchmark_only=True)


def show1_spec(model_id: str, unet_config: dict, scheduler_config: dict | None = None, *, height: int = 40,
               width: int = 64) -> ModelSpec:
    """The spec of a Show-1 keyframe model (pixel space: no VAE); the schedule of `scheduler_config`, else of
    the repository's scheduler_config.json (as `load_show1_backbone` sizes and schedules it)."""
    scheduler_config = scheduler_config or read_config_file(model_id, "scheduler/scheduler_config.json")
    return spec_from_configs(model_id, "show1", unet_config, None, scheduler_config, num_frames=8, height=height,
                             width=width)


register_family("show1", is_show1_unet_config, load_show1_backbone, spec=show1_spec)
register("show1-tiny-random", build_tiny_random_backbone,
         "tiny random Show-1 family: keyframe UNet, tiny T5, interpolation and super-resolution stages (CPU tests "
         "and smoke runs, no download)",
         spec=lambda: show1_spec("show1-tiny-random", tiny.show1_unet_config(), SHOW1_SCHEDULER_CONFIG, height=16,
                                 width=24))
register("show1-base-arch", build_base_arch_backbone,
         "full Show-1 base architecture with random weights (benchmarks only; random text states)",
         spec=lambda: show1_spec("show1-base-arch", Show1Config().to_dict(), SHOW1_SCHEDULER_CONFIG))
