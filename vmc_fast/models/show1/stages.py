"""Show-1's frozen cascade stages (interpolation, IF-II first frame, sr1, sr2): what a cascade is made of, and
building and loading its stages. Running them is `vmc_fast.inference.cascade`.

Real stages come from hub ids or local folders: the two pixel-space Show-1 stages through `load_show1_unet`
(the same code as the keyframe model), IF-II and sr2 through diffusers' own pipelines. ``show1-tiny-random``
gets seeded tiny random stages of the same classes, so the whole cascade runs on a CPU in seconds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Callable

import torch
from torch import nn

from vmc_fast.errors import VmcError
from vmc_fast.models.registry import LoadOptions
from vmc_fast.models.show1.loading import (
    SHOW1_SCHEDULER_CONFIG,
    RepositorySource,
    load_show1_scheduler,
    load_show1_unet,
    save_show1_pretrained,
    show1_scheduler,
)

STAGES = ("interpolation", "sr1_first_frame", "sr1", "sr2")
SHOW1_STAGE_IDS = {
    "interpolation": "showlab/show-1-interpolation",
    "sr1_first_frame": "DeepFloyd/IF-II-L-v1.0",
    "sr1": "showlab/show-1-sr1",
    "sr2": "showlab/show-1-sr2",
}
"""Where the public Show-1 stages live; `--stage NAME=ID` points one elsewhere (e.g. a downloaded folder)."""

NO_STAGE = "none"
"""`--stage sr1_first_frame=none` skips IF-II: the first sr1 window then has no given first frame."""


@dataclass
class Show1Cascade:
    """Where each frozen stage of a Show-1 model comes from; `load(name)` builds one on demand."""

    sources: dict[str, str]
    """Stage name (see STAGES) -> hub id, local folder, or a built-in marker; NO_STAGE skips sr1_first_frame."""
    build: Callable[[str, str], Any]
    """build(stage name, source) -> the stage (a PixelStage or a diffusers pipeline)."""
    sr2_size: tuple[int, int] = (320, 576)
    """(height, width) of the final video."""

    def load(self, name: str) -> Any:
        return self.build(name, self.sources[name])

    def has(self, name: str) -> bool:
        return self.sources.get(name, NO_STAGE) != NO_STAGE

    def with_sources(self, overrides: dict[str, str]) -> "Show1Cascade":
        """The same cascade with some stages taken from elsewhere (`--stage NAME=ID`)."""
        check_stage_sources(overrides)
        return replace(self, sources={**self.sources, **overrides})


def check_stage_sources(sources: dict[str, str]) -> None:
    """ValueError naming `--stage` for an unknown stage, or for skipping a stage that cannot be skipped."""
    for name, source in sources.items():
        if name not in STAGES:
            raise ValueError(f"--stage: unknown stage {name!r}; stages are {', '.join(STAGES)}")
        if source == NO_STAGE and name != "sr1_first_frame":
            raise ValueError(f"--stage: only sr1_first_frame can be skipped with 'none', not {name}")


@dataclass
class PixelStage:
    """A Show-1 pixel-space stage: its UNet and its DDPM scheduler (and the noising scheduler of sr1)."""

    unet: nn.Module
    scheduler: Any
    image_noising_scheduler: Any = None


TINY_SOURCE = "built-in tiny random"
IF_NOISING_CONFIG = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "clip_sample": True,
                     "variance_type": "fixed_small", "prediction_type": "epsilon"}
"""IF-II's image-noising schedule, used by the tiny stages."""


def show1_cascade(options: LoadOptions, sources: dict[str, str] | None = None,
                  sr2_size: tuple[int, int] = (320, 576)) -> Show1Cascade:
    """The cascade of a real Show-1 model: stages loaded from `sources` (default: the public repositories)."""
    return Show1Cascade(sources=dict(sources or SHOW1_STAGE_IDS), build=partial(load_stage, options=options),
                        sr2_size=sr2_size)


def tiny_cascade(options: LoadOptions) -> Show1Cascade:
    """``show1-tiny-random``'s cascade: 16x24 keyframes -> 29 frames -> 64x96 -> 96x144."""
    return Show1Cascade(sources={name: TINY_SOURCE for name in STAGES}, build=partial(load_stage, options=options),
                        sr2_size=(96, 144))


def load_stage(name: str, source: str, options: LoadOptions):
    """One stage from a source: the built-in tiny one, or a hub id / local folder."""
    if source == TINY_SOURCE:
        return _TINY_BUILDERS[name](options)
    loader = {"interpolation": load_pixel_stage, "sr1": partial(load_pixel_stage, noising=True),
              "sr1_first_frame": load_first_frame_pipeline, "sr2": load_sr2_pipeline}[name]
    try:
        return loader(source, options)
    except (VmcError, OSError, ValueError) as exc:
        detail = str(exc) if isinstance(exc, VmcError) else f"could not load {source!r} ({type(exc).__name__}: {exc})"
        skip = " or skip it with --stage sr1_first_frame=none (IF-II is gated on the hub)," \
            if name == "sr1_first_frame" else ""
        raise VmcError(f"cascade stage {name}: {detail}. Point it elsewhere with --stage {name}=FOLDER,{skip} or "
                       f"pass --keyframes-only") from exc


# ---------------------------------------------------------------------------------------------- real weights


def load_pixel_stage(model_id: str, options: LoadOptions, noising: bool = False) -> PixelStage:
    """interpolation or sr1: a Show-1 repository (unet/, scheduler/, and image_noising_scheduler/ for sr1)."""
    from diffusers import DDPMScheduler

    unet = load_show1_unet(model_id, options)
    noising_scheduler = None
    if noising:
        path = RepositorySource(model_id).path("image_noising_scheduler/scheduler_config.json")
        noising_scheduler = DDPMScheduler.from_config(json.loads(path.read_text()))
    return PixelStage(unet=unet, scheduler=load_show1_scheduler(model_id), image_noising_scheduler=noising_scheduler)


def load_first_frame_pipeline(model_id: str, options: LoadOptions):
    """DeepFloyd IF-II (image super-resolution) without its text encoder, safety checker or watermarker."""
    from diffusers import IFSuperResolutionPipeline

    pipe = IFSuperResolutionPipeline.from_pretrained(
        model_id, text_encoder=None, tokenizer=None, safety_checker=None, feature_extractor=None, watermarker=None,
        requires_safety_checker=False, torch_dtype=options.dtype)
    return _placed(pipe, options)


def load_sr2_pipeline(model_id: str, options: LoadOptions):
    """Show-1 sr2: a ZeroScope-style video-to-video pipeline with its own VAE and CLIP text encoder."""
    from diffusers import VideoToVideoSDPipeline

    return _placed(VideoToVideoSDPipeline.from_pretrained(model_id, torch_dtype=options.dtype), options)



def _placed(pipe, options: LoadOptions):
    pipe.set_progress_bar_config(disable=True)  # progress goes through generate's own bars
    if hasattr(pipe, "vae"):
        pipe.vae.enable_slicing()  # sr2 sends every frame through its VAE at once otherwise (29 at 576x320)
    return pipe.to(options.device)


def _cast(pipe, dtype: torch.dtype):
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)  # built in fp32; diffusers warns on a no-op


def save_stage(stage, folder) -> None:
    """Write a stage in the layout its loader reads (tests and users who build their own)."""
    from pathlib import Path

    folder = Path(folder)
    if isinstance(stage, PixelStage):
        save_show1_pretrained(folder, stage.unet, scheduler=stage.scheduler)
        if stage.image_noising_scheduler is not None:
            stage.image_noising_scheduler.save_pretrained(str(folder / "image_noising_scheduler"))
    else:
        stage.save_pretrained(str(folder))


# ---------------------------------------------------------------------------------------------- tiny stages


def _tiny_pixel_stage(options: LoadOptions, in_channels: int, seed: int, sr: bool = False) -> PixelStage:
    from diffusers import DDPMScheduler

    from vmc_fast.models import tiny
    from vmc_fast.models.show1.unet import Show1UNet3D, init_random_weights

    config = {**tiny.show1_unet_config(), "in_channels": in_channels}
    if sr:  # 4x larger frames: spatial attention only at the lowest of three levels, as in IF-II
        config.update(class_embed_type="timestep", block_out_channels=[32, 32, 64],
                      down_block_types=["ResnetDownsampleBlock3D"] * 2 + ["SimpleCrossAttnDownBlock3D"],
                      up_block_types=["SimpleCrossAttnUpBlock3D"] + ["ResnetUpsampleBlock3D"] * 2)
    unet = init_random_weights(Show1UNet3D.from_config(config), seed).to(options.device, options.dtype).eval()
    noising = DDPMScheduler.from_config(IF_NOISING_CONFIG) if sr else None
    return PixelStage(unet=unet, scheduler=show1_scheduler(), image_noising_scheduler=noising)


def _tiny_first_frame_pipeline(options: LoadOptions):
    from diffusers import DDPMScheduler, IFSuperResolutionPipeline, UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        unet = UNet2DConditionModel(
            in_channels=6, out_channels=6, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, class_embed_type="timestep")
    pipe = IFSuperResolutionPipeline(
        tokenizer=None, text_encoder=None, unet=unet, scheduler=DDPMScheduler.from_config(SHOW1_SCHEDULER_CONFIG),
        image_noising_scheduler=DDPMScheduler.from_config(IF_NOISING_CONFIG), safety_checker=None,
        feature_extractor=None, watermarker=None, requires_safety_checker=False)
    return _placed(_cast(pipe, options.dtype), options)


def _tiny_sr2_pipeline(options: LoadOptions):
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        UNet3DConditionModel,
        VideoToVideoSDPipeline,
    )

    from vmc_fast.models import tiny
    from vmc_fast.models.diffusers_unet3d import tiny_clip_prompt_encoder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        unet = UNet3DConditionModel(**{**tiny.UNET3D_CONFIG, "sample_size": 24})
        vae = AutoencoderKL(**{**tiny.VAE_CONFIG, "block_out_channels": (16, 32, 32),
                               "down_block_types": ("DownEncoderBlock2D",) * 3,
                               "up_block_types": ("UpDecoderBlock2D",) * 3})
        clip = tiny_clip_prompt_encoder()
    clip.tokenizer.model_max_length = 77  # the pipeline pads to it; the in-memory tokenizer has no limit
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False)
    pipe = VideoToVideoSDPipeline(vae=vae, text_encoder=clip.text_encoder, tokenizer=clip.tokenizer, unet=unet,
                                  scheduler=scheduler)
    return _placed(_cast(pipe, options.dtype), options)


_TINY_BUILDERS = {
    "interpolation": lambda options: _tiny_pixel_stage(options, in_channels=7, seed=1),
    "sr1": lambda options: _tiny_pixel_stage(options, in_channels=6, seed=2, sr=True),
    "sr1_first_frame": _tiny_first_frame_pipeline,
    "sr2": _tiny_sr2_pipeline,
}
