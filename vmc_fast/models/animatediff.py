"""AnimateDiff backbones: a Stable Diffusion 1.5 base plus a motion adapter, as diffusers' `UNetMotionModel`.

Three ways to name one (`--model`):

- ``BASE+MOTION_ADAPTER``: a Stable Diffusion 1.5 repository (hub id or local folder in the diffusers layout:
  ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``) and a diffusers `MotionAdapter`
  (hub id or local folder holding its ``config.json``), e.g.
  ``stable-diffusion-v1-5/stable-diffusion-v1-5+guoyww/animatediff-motion-adapter-v1-5-2``. Both are loaded with
  ``from_pretrained`` and joined with `UNetMotionModel.from_unet2d`, as `AnimateDiffPipeline` does. The noise
  schedule is the base's with AnimateDiff's own settings (`SCHEDULER_OVERRIDES`: the linear betas its motion
  modules were trained with).
- a saved `AnimateDiffPipeline` (hub id or local folder whose ``unet/config.json`` is a ``UNetMotionModel``): its
  own UNet, VAE, text encoder and scheduler, as saved.
- ``animatediff-tiny-random``: a tiny random one built in code (tests and smoke runs, no download).

VMC tunes the motion modules' attention Q/K/V (`MOTION_QKV_PATTERN`) and nothing else. Their names are the same in
`UNetMotionModel` and in `MotionAdapter`, so an adapter's tensors also apply to a motion adapter checkpoint.

`UNetMotionModel` reads the text states once per frame, (B*F, L, D); every other backbone, and so the rest of
vmc-fast, passes (B, L, D). `states_per_frame` puts a forward pre-hook on the UNet that repeats them (as
`AnimateDiffPipeline` does with ``repeat_interleave``), so the module, its class and its parameter names stay
diffusers' own, and the pipeline's own calls, already per frame, pass unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path

import torch
from torch import nn

from vmc_fast.errors import VmcError
from vmc_fast.models import tiny
from vmc_fast.models.diffusers_unet3d import ClipPromptEncoder, place, tiny_clip_prompt_encoder
from vmc_fast.models.registry import (
    COMPOSITE_SEPARATOR,
    Backbone,
    LoadOptions,
    ModelSpec,
    read_config_file,
    register,
    register_composite,
    register_family,
    spec_from_configs,
)

FAMILY = "animatediff"
TINY_ID = "animatediff-tiny-random"
MOTION_QKV_PATTERN = r"motion_modules\.\d+\.transformer_blocks\.\d+\.attn[12]\.to_[qkv]\.weight$"
"""The tuned tensors: ``{down_blocks.i,mid_block,up_blocks.i}.motion_modules.j.transformer_blocks.k.attn{1,2}
.to_{q,k,v}.weight`` (both attentions of a motion module attend along the frames)."""
NUM_FRAMES = 16
"""Frames per clip by default: AnimateDiff's motion modules were trained on 16-frame clips."""
SCHEDULER_OVERRIDES = {"beta_schedule": "linear", "clip_sample": False, "steps_offset": 1,
                       "timestep_spacing": "linspace"}
"""AnimateDiff's noise schedule on top of a Stable Diffusion base's scheduler config: linear betas (its motion
modules' training and inference configs, and the scheduler diffusers' AnimateDiff documentation builds), no x_0
clipping."""
TINY_SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                         **SCHEDULER_OVERRIDES}


# ------------------------------------------------------------------------------------------------ the UNet


def _repeat_per_frame(states, sample: torch.Tensor):
    """(B, L, D) text states -> (B*F, L, D) for a sample (B, C, F, H, W); states already per frame pass as they
    are (with F > 1 the two batch sizes differ, so which one was passed is never ambiguous)."""
    if not isinstance(states, torch.Tensor) or sample.dim() != 5:
        return states
    batch, frames = sample.shape[0], sample.shape[2]
    if frames == 1 or states.shape[0] != batch:
        return states
    return states.repeat_interleave(frames, dim=0)


def _states_per_frame_hook(module: nn.Module, args: tuple, kwargs: dict):
    sample = args[0] if args else kwargs.get("sample")
    if len(args) >= 3:
        args = (*args[:2], _repeat_per_frame(args[2], sample), *args[3:])
    elif "encoder_hidden_states" in kwargs:
        kwargs = {**kwargs, "encoder_hidden_states": _repeat_per_frame(kwargs["encoder_hidden_states"], sample)}
    return args, kwargs


def states_per_frame(unet: nn.Module) -> nn.Module:
    """Let `unet` (a `UNetMotionModel`) take text states (B, L, D) like the other backbones: a forward pre-hook
    repeats them for each of the F frames of the sample (B, C, F, H, W). Installed once; returns `unet`."""
    if not getattr(unet, "_vmc_states_per_frame", False):
        unet.register_forward_pre_hook(_states_per_frame_hook, with_kwargs=True)
        unet._vmc_states_per_frame = True
    return unet


@contextlib.contextmanager
def _quiet_diffusers_cast():
    """`from_unet2d` casts with `.to()` and diffusers then logs "There are modules in UNetMotionModel that should
    be kept in float32: []", about an empty list: nothing a user can act on."""
    logger = logging.getLogger("diffusers.models.modeling_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def motion_unet(unet2d: nn.Module, motion_adapter: nn.Module, options: LoadOptions) -> nn.Module:
    """`UNetMotionModel.from_unet2d(unet2d, motion_adapter)` on the device and dtype of `options`, in eval mode,
    taking text states (B, L, D) (`states_per_frame`). ValueError when the adapter does not fit the UNet."""
    from diffusers import UNetMotionModel

    with _quiet_diffusers_cast():
        unet = UNetMotionModel.from_unet2d(unet2d, motion_adapter)
    return states_per_frame(place(unet, options))


def _noise_scheduler(config: dict):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(config)


# ------------------------------------------------------------------------------------------------ BASE+ADAPTER


def split_pair(model_id: str) -> tuple[str, str]:
    """(base, motion adapter) of ``BASE+MOTION_ADAPTER``; VmcError naming --model unless exactly two parts."""
    parts = [part.strip() for part in model_id.split(COMPOSITE_SEPARATOR)]
    example = (f"e.g. stable-diffusion-v1-5/stable-diffusion-v1-5{COMPOSITE_SEPARATOR}"
               f"guoyww/animatediff-motion-adapter-v1-5-2")
    if len(parts) != 2 or not all(parts):
        raise VmcError(f"--model {model_id!r}: an AnimateDiff model is BASE{COMPOSITE_SEPARATOR}MOTION_ADAPTER, two "
                       f"hub ids or local folders, {example}")
    for part in parts:
        hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", part) and not part.startswith((".", "~"))
        if not Path(part).expanduser().is_dir() and not hub_id:
            raise VmcError(f"--model {model_id!r}: {part!r} is neither a local folder nor a hub id (org/name); "
                           f"name the Stable Diffusion base and the motion adapter, {example}")
    return parts[0], parts[1]


def load_pair(model_id: str, options: LoadOptions) -> Backbone:
    """``BASE+MOTION_ADAPTER``: the base's UNet, VAE, CLIP text encoder and scheduler config, the adapter's
    motion modules, joined into a `UNetMotionModel` (see the module docstring)."""
    from diffusers import AutoencoderKL, MotionAdapter, UNet2DConditionModel

    base, adapter_id = split_pair(model_id)
    _check_pair_configs(model_id)
    try:
        unet2d = UNet2DConditionModel.from_pretrained(base, subfolder="unet", torch_dtype=options.dtype)
        vae = AutoencoderKL.from_pretrained(base, subfolder="vae", torch_dtype=options.dtype)
        scheduler_config = read_config_file(base, "scheduler/scheduler_config.json") or {}
    except (OSError, ValueError) as exc:
        raise VmcError(f"model {model_id!r}: could not load the Stable Diffusion base {base!r} ({exc}); check "
                       f"that it has the diffusers layout (unet/, vae/, text_encoder/, tokenizer/, scheduler/)") from exc
    try:
        adapter = MotionAdapter.from_pretrained(adapter_id, torch_dtype=options.dtype)
    except (OSError, ValueError) as exc:
        raise VmcError(f"model {model_id!r}: could not load the motion adapter {adapter_id!r} ({exc}); pass a "
                       f"diffusers MotionAdapter, e.g. guoyww/animatediff-motion-adapter-v1-5-2") from exc
    try:
        unet = motion_unet(unet2d, adapter, options)
    except ValueError as exc:
        raise VmcError(f"model {model_id!r}: the motion adapter does not fit the base ({exc}); AnimateDiff "
                       f"v1/v2/v3 motion adapters fit Stable Diffusion 1.5 bases") from exc
    return _backbone(model_id, unet, vae, _noise_scheduler({**scheduler_config, **SCHEDULER_OVERRIDES}),
                     lambda: ClipPromptEncoder.from_pretrained(base), options)


def _check_pair_configs(model_id: str) -> tuple[dict, dict]:
    """(base unet config, motion adapter config); VmcError when either is missing or they do not fit."""
    base, adapter_id = split_pair(model_id)
    unet_config = read_config_file(base, "unet/config.json")
    if unet_config is None or unet_config.get("_class_name") != "UNet2DConditionModel":
        found = "no unet/config.json" if unet_config is None else f"a {unet_config.get('_class_name')}"
        raise VmcError(f"model {model_id!r}: the base {base!r} has {found}; it must be a Stable Diffusion 1.5 "
                       f"repository in the diffusers layout (its unet/ a UNet2DConditionModel)")
    adapter_config = read_config_file(adapter_id, "config.json")
    if adapter_config is None or adapter_config.get("_class_name") != "MotionAdapter":
        found = "no config.json" if adapter_config is None else f"a {adapter_config.get('_class_name')}"
        raise VmcError(f"model {model_id!r}: the motion adapter {adapter_id!r} has {found}; it must be a diffusers "
                       f"MotionAdapter, e.g. guoyww/animatediff-motion-adapter-v1-5-2")
    if list(adapter_config.get("block_out_channels", ())) != list(unet_config.get("block_out_channels", ())):
        raise VmcError(f"model {model_id!r}: the motion adapter's blocks {adapter_config.get('block_out_channels')} "
                       f"do not fit the base's {unet_config.get('block_out_channels')}; AnimateDiff v1/v2/v3 "
                       f"motion adapters fit Stable Diffusion 1.5 bases")
    return unet_config, adapter_config


def pair_spec(model_id: str) -> ModelSpec:
    """The spec of ``BASE+MOTION_ADAPTER`` from the base's unet, vae and scheduler configs and the adapter's
    config (its frame limit), without weights."""
    base, _ = split_pair(model_id)
    unet_config, adapter_config = _check_pair_configs(model_id)
    return _spec(model_id, unet_config, read_config_file(base, "vae/config.json"),
                 read_config_file(base, "scheduler/scheduler_config.json"), NUM_FRAMES,
                 adapter_config.get("motion_max_seq_length"))


def _spec(model_id: str, unet_config: dict, vae_config: dict | None, scheduler_config: dict | None,
          num_frames: int, max_frames: int | None, **size) -> ModelSpec:
    if vae_config is None:
        raise VmcError(f"model {model_id!r}: no vae/config.json; an AnimateDiff model needs its Stable Diffusion "
                       f"VAE (vae/)")
    return spec_from_configs(model_id, FAMILY, unet_config, vae_config, scheduler_config, num_frames=num_frames,
                             trainable_pattern=MOTION_QKV_PATTERN, max_frames=max_frames, **size)


# ------------------------------------------------------------------------------------------------ saved pipelines


def is_motion_unet(unet_config: dict) -> bool:
    """A saved AnimateDiffPipeline's unet/config.json."""
    return unet_config.get("_class_name") == "UNetMotionModel"


def load_pipeline_folder(model_id: str, unet_config: dict, options: LoadOptions) -> Backbone:
    """A saved `AnimateDiffPipeline` (hub id or local folder): its UNetMotionModel, VAE, CLIP text encoder and
    scheduler config, as saved."""
    from diffusers import AutoencoderKL, UNetMotionModel

    try:
        with _quiet_diffusers_cast():
            unet = UNetMotionModel.from_pretrained(model_id, subfolder="unet", torch_dtype=options.dtype)
        vae = AutoencoderKL.from_pretrained(model_id, subfolder="vae", torch_dtype=options.dtype)
    except (OSError, ValueError) as exc:
        raise VmcError(f"model {model_id!r}: could not load unet/vae ({exc}); check that it is a saved "
                       f"AnimateDiffPipeline") from exc
    scheduler_config = read_config_file(model_id, "scheduler/scheduler_config.json") or {}
    return _backbone(model_id, states_per_frame(place(unet, options)), vae, _noise_scheduler(scheduler_config),
                     lambda: ClipPromptEncoder.from_pretrained(model_id), options)


def pipeline_folder_spec(model_id: str, unet_config: dict) -> ModelSpec:
    """The spec of a saved AnimateDiffPipeline, from its unet, vae and scheduler configs."""
    return _spec(model_id, unet_config, read_config_file(model_id, "vae/config.json"),
                 read_config_file(model_id, "scheduler/scheduler_config.json"), NUM_FRAMES,
                 unet_config.get("motion_max_seq_length"))


# ------------------------------------------------------------------------------------------------ tiny-random


def tiny_parts() -> tuple[nn.Module, nn.Module, nn.Module]:
    """(UNet2DConditionModel, MotionAdapter, AutoencoderKL) of animatediff-tiny-random, fp32 on the CPU, seeded
    (the caller's random state is left untouched)."""
    from diffusers import AutoencoderKL, MotionAdapter, UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tiny.ANIMATEDIFF_SEED)
        return (UNet2DConditionModel(**tiny.SD_UNET_CONFIG), MotionAdapter(**tiny.MOTION_ADAPTER_CONFIG),
                AutoencoderKL(**tiny.VAE_CONFIG))


def build_tiny_random(options: LoadOptions) -> Backbone:
    """``animatediff-tiny-random``: a tiny random SD UNet, motion adapter, VAE and CLIP; 8 frames at 32x32 pixels
    (16x16 latents). No downloads."""
    unet2d, adapter, vae = tiny_parts()
    return _backbone(TINY_ID, motion_unet(unet2d, adapter, options), vae, _noise_scheduler(TINY_SCHEDULER_CONFIG),
                     tiny_clip_prompt_encoder, options, num_frames=8, height=32, width=32)


def tiny_spec() -> ModelSpec:
    """The spec of animatediff-tiny-random, from the configs it is built with."""
    return _spec(TINY_ID, tiny.SD_UNET_CONFIG, tiny.VAE_CONFIG, TINY_SCHEDULER_CONFIG, 8,
                 tiny.MOTION_ADAPTER_CONFIG["motion_max_seq_length"], height=32, width=32)


def save_tiny_pretrained(folder: str | Path) -> tuple[Path, Path]:
    """Write animatediff-tiny-random as a Stable Diffusion repository (``folder/base``, scheduler as the tiny
    one's before AnimateDiff's overrides: scaled-linear betas) and a MotionAdapter (``folder/motion_adapter``), for
    tests of ``BASE+MOTION_ADAPTER``. Returns (base folder, motion adapter folder)."""
    from diffusers import DDPMScheduler

    folder = Path(folder)
    unet2d, adapter, vae = tiny_parts()
    base = folder / "base"
    unet2d.save_pretrained(base / "unet")
    vae.save_pretrained(base / "vae")
    DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  clip_sample=False).save_pretrained(base / "scheduler")
    encoder = tiny_clip_prompt_encoder()
    encoder.tokenizer.save_pretrained(base / "tokenizer")
    encoder.text_encoder.save_pretrained(base / "text_encoder")
    adapter.save_pretrained(folder / "motion_adapter")
    return base, folder / "motion_adapter"


# ------------------------------------------------------------------------------------------------ common


def _backbone(model_id: str, unet: nn.Module, vae: nn.Module, scheduler, load_text_encoder, options: LoadOptions,
              **size) -> Backbone:
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    sample = int(unet.config.sample_size or 64) * vae_scale
    size = {"num_frames": NUM_FRAMES, "height": sample, "width": sample, **size}
    return Backbone(model_id=model_id, family=FAMILY, unet=unet, vae=place(vae, options),
                    vae_scaling_factor=float(vae.config.scaling_factor), noise_scheduler=scheduler,
                    load_text_encoder=load_text_encoder, trainable_pattern=MOTION_QKV_PATTERN, **size)


register(TINY_ID, build_tiny_random,
         "tiny random AnimateDiff (Stable Diffusion UNet + motion adapter) latent model (tests and smoke runs)",
         spec=tiny_spec)
register_family(FAMILY, is_motion_unet, load_pipeline_folder, spec=pipeline_folder_spec)
register_composite(FAMILY, load_pair, pair_spec)
