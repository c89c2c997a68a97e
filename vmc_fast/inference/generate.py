"""VMC inference: DDIM inversion of the input clip, guided DDIM sampling of keyframes, then Show-1's cascade.

Steps (DESIGN.md section 1, "Inference"): load the backbone, copy the motion adapter into its temporal Q/K/V,
encode the prompts once (then free the encoder), invert the input video with the empty prompt to get x_T, sample
from x_T with the target prompt and classifier-free guidance, decode (latent models), run the frozen cascade
stages when the model has them (`vmc_fast.inference.cascade`: Show-1's interpolation and two super-resolution stages),
write a gif/mp4 atomically.

Both schedulers are built from the backbone's own training schedule (``backbone.noise_scheduler.config``). The
authors' public code inverted with a schedule other than the model's; here a test holds the two together.

Only the keyframe UNet carries the motion adapter; the cascade stages are used frozen, as published.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from vmc_fast.config import PRECISIONS, RESIZE_MODES, check_field
from vmc_fast.io.files import atomic_path
from vmc_fast.tuning.losses import epsilon_half

OUTPUT_SUFFIXES = (".gif", ".mp4")
DEVICES = ("auto", "cpu", "cuda")

StepCallback = Callable[[str, int, int], None]
"""on_step(phase, step, total): phase is ``invert`` or ``sample``; step counts from 1 to total."""


@dataclass
class GenerateConfig:
    """One `vmc-fast generate` run; defaults are the paper's."""

    model_id: str = "tiny-random"
    """Built-in name, hub id or local folder of the base model (the adapter's base)."""
    prompt: str = ""
    """Target prompt, e.g. "a car is driving on the road"."""
    adapter: str | None = None
    """Motion adapter (.safetensors) to copy into the UNet; None samples the untuned model."""
    video: str | None = None
    """Input clip to invert into x_T; None samples from pure Gaussian noise."""
    negative_prompt: str = ""
    """Unconditional prompt of classifier-free guidance."""
    inversion_prompt: str = ""
    """Prompt used while inverting the input clip (the paper uses the empty prompt)."""
    num_inference_steps: int = 75
    """DDIM sampling steps."""
    inversion_steps: int = 75
    """DDIM inversion steps (use the same number as sampling so x_T lands on sampling's first timestep)."""
    guidance_scale: float = 9.0
    """Classifier-free guidance weight w: eps = eps_uncond + w (eps_cond - eps_uncond); 1.0 = conditional only."""
    seed: int = 0
    """Seeds the starting noise when there is no input clip."""
    num_frames: int | None = None
    """Frames to generate; None = the adapter's metadata, else the model's own."""
    height: int | None = None
    """Height in pixels; None = the adapter's metadata, else the model's own."""
    width: int | None = None
    """Width in pixels; None = the adapter's metadata, else the model's own."""
    frame_stride: int = 1
    """Take every k-th frame of the input clip."""
    resize: str = "crop"
    """How the input clip is resized: ``crop`` (keep aspect) or ``squash``."""
    output: str | None = "vmc-out/generated.gif"
    """Where the video goes (.gif or .mp4), written atomically; None writes nothing."""
    fps: int = 8
    """Frames per second of the written video."""
    precision: str = "auto"
    """Compute precision: ``auto`` = bf16 on CUDA, fp32 on CPU; or fp32, bf16, fp16."""
    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu`` or ``cuda``."""
    cache_dir: str = field(default_factory=lambda: os.environ.get(
        "VMC_FAST_CACHE", str(Path.home() / ".cache" / "vmc-fast")))
    """Prompt-embedding cache (shared with training)."""
    keyframes_only: bool = False
    """Stop after the keyframe model: skip the cascade (Show-1's interpolation and super-resolution)."""
    cascade_steps: int | None = None
    """Steps of every cascade stage instead of the public script's (75, 70, 125, 50); for quick runs."""
    stages: dict[str, str] = field(default_factory=dict)
    """Cascade stage -> hub id or folder (interpolation, sr1_first_frame, sr1, sr2); sr1_first_frame=none skips
    the IF-II first frame."""

    def __post_init__(self) -> None:
        check_field(bool(self.model_id.strip()), "--model", "must not be empty")
        check_field(1 <= self.num_inference_steps <= 1000, "--steps", "must be between 1 and 1000")
        check_field(1 <= self.inversion_steps <= 1000, "--inversion-steps", "must be between 1 and 1000")
        check_field(0.0 <= self.guidance_scale <= 100.0, "--guidance-scale", "must be between 0 and 100")
        check_field(self.seed >= 0, "--seed", "must be 0 or more")
        check_field(self.num_frames is None or 2 <= self.num_frames <= 64, "--frames", "must be between 2 and 64")
        for name in ("height", "width"):
            value = getattr(self, name)
            check_field(value is None or 8 <= value <= 4096, f"--{name}", "must be between 8 and 4096 pixels")
        check_field(self.frame_stride >= 1, "--frame-stride", "must be at least 1")
        check_field(self.resize in RESIZE_MODES, "--resize", f"must be one of {', '.join(RESIZE_MODES)}")
        check_field(1 <= self.fps <= 120, "--fps", "must be between 1 and 120")
        check_field(self.precision in PRECISIONS, "--precision", f"must be one of {', '.join(PRECISIONS)}")
        check_field(self.device in DEVICES, "--device", f"must be one of {', '.join(DEVICES)}")
        check_field(self.cascade_steps is None or 1 <= self.cascade_steps <= 1000, "--cascade-steps",
                    "must be between 1 and 1000")
        from vmc_fast.inference.cascade import check_stage_sources

        check_stage_sources(self.stages)
        self._check_paths()

    def _check_paths(self) -> None:
        if self.output is not None:
            check_field(Path(self.output).suffix.lower() in OUTPUT_SUFFIXES, "--out",
                   f"{self.output!r} must end in {' or '.join(OUTPUT_SUFFIXES)}")
        if self.adapter is not None:
            check_field(Path(self.adapter).expanduser().is_file(), "--adapter", f"{self.adapter} is not a file")
        if self.video is not None:
            check_field(Path(self.video).expanduser().exists(), "--video", f"{self.video} does not exist")


@dataclass
class GenerateResult:
    """What `generate` produced."""

    frames: torch.Tensor
    """float32 (3, F, H, W) in [-1, 1] on the CPU: the video written. Single-stage models: the sampled frames
    (decoded through the VAE for latent models); Show-1: the cascade's 4F-3 frames at its final size, or the
    keyframes with keyframes_only."""
    x_T: torch.Tensor
    """float32 (1, C, F, h, w) on the CPU: the starting point of sampling (inverted clip or seeded noise)."""
    output: Path | None
    """The written video, or None when no output was asked for."""
    seconds: dict[str, float]
    """Wall time per phase: load, adapter, prompts, invert, sample, decode, then interpolate, sr1, sr2 (cascade
    models), write."""
    note: str = ""
    """What this run left out (e.g. the cascade with keyframes_only); empty when nothing was left out."""


# ---------------------------------------------------------------------------------------------- schedulers


def sampling_scheduler(scheduler_config: Mapping[str, Any], num_steps: int):
    """A DDIMScheduler (eta 0) on the model's own training schedule, timesteps set for `num_steps`.

    The model's clip_sample/thresholding settings are kept: they are how its authors sample (Show-1/IF use
    dynamic thresholding of the predicted x_0).
    """
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(_known_keys(DDIMScheduler, scheduler_config))
    scheduler.set_timesteps(num_steps)
    return scheduler


def inversion_scheduler(scheduler_config: Mapping[str, Any], num_steps: int):
    """A DDIMInverseScheduler on the model's own training schedule, with x_0 clipping turned off.

    Clipping or thresholding the predicted x_0 makes a step non-invertible: the inversion then no longer traces
    the deterministic DDIM trajectory that sampling walks back along, and x_T loses what it needs to return to
    the input. Sampling keeps them, where they only touch x_0 estimates that already lie in range for an
    in-distribution x_T.
    """
    from diffusers import DDIMInverseScheduler

    config = {**_known_keys(DDIMInverseScheduler, scheduler_config), "clip_sample": False}
    scheduler = DDIMInverseScheduler.from_config(config)
    scheduler.set_timesteps(num_steps)
    return scheduler


def _known_keys(cls: type, config: Mapping[str, Any]) -> dict:
    # DDPM configs carry keys DDIM does not take (variance_type, ...); drop them instead of logging each one.
    import inspect

    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
    return {k: v for k, v in dict(config).items() if k in accepted}


# ---------------------------------------------------------------------------------------------- the two loops


def predict_noise(unet: nn.Module, x: torch.Tensor, t: torch.Tensor | int, states: torch.Tensor) -> torch.Tensor:
    """eps_theta(x, t, states): x (B, C, F, H, W), states (B, L, D) -> float32 (B, C, F, H, W).

    Learned-variance models output 2C channels; only the epsilon half is returned.
    """
    param = next(unet.parameters())
    timestep = torch.as_tensor(t, device=x.device).reshape(1).expand(x.shape[0])
    output = unet(x.to(param.dtype), timestep, states.to(param.device, param.dtype))
    output = output.sample if hasattr(output, "sample") else output
    return epsilon_half(output, x.shape[1]).float()


@torch.no_grad()
def ddim_invert(unet: nn.Module, x0: torch.Tensor, text_states: torch.Tensor,
                scheduler_config: Mapping[str, Any], steps: int,
                on_step: StepCallback | None = None) -> torch.Tensor:
    """Deterministic DDIM inversion: clean x0 (1, C, F, H, W) -> x_T, float32, same shape.

    text_states (1, L, D) is the prompt used for inversion (the empty prompt in the paper). x_T ends at the
    noise level of the last timestep of a `steps`-step DDIM sampler on the same schedule.
    """
    scheduler = inversion_scheduler(scheduler_config, steps)
    x = x0.float()
    total = len(scheduler.timesteps)
    for i, t in enumerate(scheduler.timesteps):
        eps = predict_noise(unet, x, t, text_states)
        x = scheduler.step(eps, t, x).prev_sample
        if on_step is not None:
            on_step("invert", i + 1, total)
    return x


@torch.no_grad()
def sample(unet: nn.Module, x_T: torch.Tensor, cond_states: torch.Tensor, uncond_states: torch.Tensor | None,
           scheduler_config: Mapping[str, Any], steps: int, guidance_scale: float,
           generator: torch.Generator | None = None, on_step: StepCallback | None = None) -> torch.Tensor:
    """DDIM sampling (eta 0) with classifier-free guidance: x_T (1, C, F, H, W) -> x_0, float32, same shape.

    cond_states / uncond_states are (1, L, D); both go through the UNet as one batch of 2. With uncond_states
    None the conditional prediction is used alone (one batch of 1).
    """
    scheduler = sampling_scheduler(scheduler_config, steps)
    x = x_T.float()
    states = cond_states if uncond_states is None else torch.cat([cond_states, uncond_states])
    total = len(scheduler.timesteps)
    for i, t in enumerate(scheduler.timesteps):
        eps = predict_noise(unet, x.expand(states.shape[0], *x.shape[1:]), t, states)
        if uncond_states is not None:
            eps_cond, eps_uncond = eps.chunk(2)
            eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
        x = scheduler.step(eps, t, x, eta=0.0, generator=generator).prev_sample
        if on_step is not None:
            on_step("sample", i + 1, total)
    return x


# ---------------------------------------------------------------------------------------------- generate


def generate(cfg: GenerateConfig, backbone=None, on_step: StepCallback | None = None) -> GenerateResult:
    """Run VMC inference for the keyframe model and write the video (see the module docstring).

    `backbone` may be passed to reuse a loaded model (it must be cfg.model_id's; the adapter is copied into its
    UNet in place). Models with a cascade (Show-1) then run it unless cfg.keyframes_only.
    """
    _warn_ignored(cfg)
    seconds: dict[str, float] = {}
    device = _device(cfg.device)
    with timed(seconds, "load"):
        backbone = backbone or _load(cfg, device)
        device = next(backbone.unet.parameters()).device
    with timed(seconds, "adapter"):
        info = _apply_adapter(backbone, cfg.adapter)
    num_frames, height, width = _size(cfg, backbone, info)
    with timed(seconds, "prompts"):
        states = _prompt_states(cfg, backbone, device)
    scheduler_config = backbone.noise_scheduler.config
    with _precision(cfg.precision, device):
        with timed(seconds, "invert"):
            x_T = _starting_point(cfg, backbone, states, (num_frames, height, width), device, on_step)
        with timed(seconds, "sample"):
            generator = torch.Generator(device).manual_seed(cfg.seed)
            guided = cfg.guidance_scale != 1.0
            x0 = sample(backbone.unet, x_T, states["prompt"], states["negative"] if guided else None,
                        scheduler_config, cfg.num_inference_steps, cfg.guidance_scale, generator, on_step)
    with timed(seconds, "decode"):
        frames = decode(backbone, x0)
    with _precision(cfg.precision, device):
        frames, note = _cascade(cfg, backbone, frames, states, seconds, on_step)
    with timed(seconds, "write"):
        output = write_video_atomic(frames, cfg.output, cfg.fps) if cfg.output else None
    return GenerateResult(frames=frames, x_T=x_T.cpu(), output=output, seconds=seconds, note=note)


def _cascade(cfg: GenerateConfig, backbone, keyframes: torch.Tensor, states: dict[str, torch.Tensor],
             seconds: dict[str, float], on_step: StepCallback | None) -> tuple[torch.Tensor, str]:
    """(video (3, F', H', W'), note): the keyframes through the backbone's frozen cascade, unless it has none."""
    if backbone.cascade is None:
        if cfg.keyframes_only or cfg.cascade_steps is not None or cfg.stages:
            warnings.warn(f"--keyframes-only/--cascade-steps/--stage: ignored, {cfg.model_id} has no cascade stages",
                          stacklevel=3)
        return keyframes, ""
    if cfg.keyframes_only:
        return keyframes, (f"keyframes only (--keyframes-only): the interpolation and super-resolution stages "
                           f"were not run")
    from vmc_fast.inference.cascade import CascadeSettings, run_cascade

    video = run_cascade(backbone.cascade.with_sources(cfg.stages), keyframes, states, cfg.prompt,
                        CascadeSettings().with_steps(cfg.cascade_steps), cfg.seed, on_step,
                        timer=functools.partial(timed, seconds))
    return video, ""


def _warn_ignored(cfg: GenerateConfig) -> None:
    defaults = GenerateConfig.__dataclass_fields__
    if cfg.video is None:
        unused = [name for name in ("inversion_prompt", "inversion_steps", "frame_stride", "resize")
                  if getattr(cfg, name) != defaults[name].default]
        if unused:
            warnings.warn(f"{', '.join(unused)}: ignored without --video (sampling starts from noise)", stacklevel=3)
    elif cfg.inversion_steps != cfg.num_inference_steps:
        warnings.warn(f"--inversion-steps {cfg.inversion_steps} differs from --steps {cfg.num_inference_steps}: "
                      f"x_T is then taken at another noise level than sampling starts from", stacklevel=3)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device: cuda was asked for but this machine has no CUDA device")
    return torch.device(name)


def _load(cfg: GenerateConfig, device: torch.device):
    from vmc_fast.models.registry import LoadOptions, load_backbone
    from vmc_fast.tuning.loop import resolve_precision

    # Nothing is trained here, so the frozen weights can be stored in the compute dtype.
    precision = resolve_precision(cfg.precision, device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    return load_backbone(cfg.model_id, LoadOptions(dtype=dtype, device=str(device)))


def _apply_adapter(backbone, adapter: str | None):
    """Copy the adapter into the UNet (refused for another base model); its metadata, or None."""
    if adapter is None:
        return None
    from vmc_fast.tuning.adapters import apply_adapter

    return apply_adapter(backbone.unet, Path(adapter).expanduser())


def _size(cfg: GenerateConfig, backbone, info) -> tuple[int, int, int]:
    """(num_frames, height, width) in pixels: the config's, else the adapter's, else the model's."""
    def pick(name: str) -> int:
        value = getattr(cfg, name)
        if value is not None:
            return value
        return getattr(info, name) if info is not None else getattr(backbone, name)

    return pick("num_frames"), pick("height"), pick("width")


def _prompt_states(cfg: GenerateConfig, backbone, device: torch.device) -> dict[str, torch.Tensor]:
    """{"prompt", "negative", "inversion"} -> (1, L, D) float32 states; the encoder is built at most once."""
    from vmc_fast.io.prompts import cached_prompt_embeddings, embedding_model_key

    texts = {"prompt": cfg.prompt, "negative": cfg.negative_prompt, "inversion": cfg.inversion_prompt}
    embeddings = cached_prompt_embeddings(list(dict.fromkeys(texts.values())), embedding_model_key(cfg.model_id, backbone.family),
                                          cfg.cache_dir, backbone.load_text_encoder)
    return {role: embeddings[text].unsqueeze(0).to(device) for role, text in texts.items()}


def _starting_point(cfg: GenerateConfig, backbone, states: dict[str, torch.Tensor], size: tuple[int, int, int],
                    device: torch.device, on_step: StepCallback | None) -> torch.Tensor:
    """x_T (1, C, F, h, w) float32: the inverted input clip, or seeded Gaussian noise without one."""
    if cfg.video is None:
        generator = torch.Generator("cpu").manual_seed(cfg.seed)
        return torch.randn(_latent_shape(backbone, size), generator=generator).to(device)
    from vmc_fast.io.video import FrameSampling, load_clip

    num_frames, height, width = size
    sampling = FrameSampling(num_frames=num_frames, height=height, width=width, stride=cfg.frame_stride,
                             resize=cfg.resize)
    pixels = load_clip(Path(cfg.video).expanduser(), sampling).unsqueeze(0).to(device)
    x0 = backbone.encode_pixels(pixels).float()
    return ddim_invert(backbone.unet, x0, states["inversion"], backbone.noise_scheduler.config,
                       cfg.inversion_steps, on_step)


def _latent_shape(backbone, size: tuple[int, int, int]) -> tuple[int, ...]:
    num_frames, height, width = size
    factor = 1 if backbone.vae is None else 2 ** (len(backbone.vae.config.block_out_channels) - 1)
    if height % factor or width % factor:
        raise ValueError(f"--height/--width: {height}x{width} must be multiples of the VAE's factor {factor}")
    return (1, backbone.in_channels, num_frames, height // factor, width // factor)


@torch.no_grad()
def decode(backbone, x0: torch.Tensor) -> torch.Tensor:
    """The UNet's x_0 (1, C, F, h, w) -> float32 (3, F, H, W) pixels in [-1, 1] on the CPU.

    Pixel-space models return x_0 itself (clamped); latent models run their VAE decoder frame by frame.
    """
    if backbone.vae is None:
        return x0[0].float().clamp(-1, 1).cpu()
    param = next(backbone.vae.parameters())
    frames = x0[0].permute(1, 0, 2, 3) / backbone.vae_scaling_factor  # (F, C, h, w)
    pixels = torch.cat([backbone.vae.decode(f.unsqueeze(0).to(param.device, param.dtype)).sample for f in frames])
    return pixels.float().clamp(-1, 1).permute(1, 0, 2, 3).cpu()


def write_video_atomic(frames: torch.Tensor, path: str | Path, fps: int = 8) -> Path:
    """Write (3, F, H, W) frames in [-1, 1] as .gif/.mp4 via a temporary file in the same folder and a rename.

    A crash or a failing encoder leaves no file (and no temporary file) at `path`.
    """
    from vmc_fast.toy.world import write_clip

    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        write_clip(frames, tmp, fps)
    return path


def _precision(precision: str, device: torch.device):
    from vmc_fast.tuning.loop import autocast

    return autocast(precision, device)


@contextlib.contextmanager
def timed(seconds: dict[str, float], name: str):
    """Records the wall time of the block as seconds[name]."""
    start = time.perf_counter()
    yield
    seconds[name] = time.perf_counter() - start
