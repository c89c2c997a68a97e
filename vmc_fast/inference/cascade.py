"""Show-1's frozen cascade after the (tuned) keyframe model: interpolation, then two super-resolution stages.

VMC tunes only the keyframe UNet; these stages are used as published (docs/design.md section 1, "Inference"):

1. **interpolation** (``showlab/show-1-interpolation``, a Show-1 UNet with 7 input channels): between each pair of
   keyframes, a window of 5 frames is sampled whose conditioning is the trilinear blend of the two keyframes plus
   a mask marking them; 8 keyframes -> 3 * 7 + 8 = 29 frames.
2. **sr1** (``showlab/show-1-sr1``, a Show-1 UNet conditioned on the noise level of its input): 4x pixel-space
   super-resolution in windows of 8 frames with stride 7. The first frame of each window is given: for the first
   window by the image model **sr1_first_frame** (DeepFloyd IF-II, diffusers' `IFSuperResolutionPipeline`), then
   the last frame the previous window produced.
3. **sr2** (``showlab/show-1-sr2``, a ZeroScope-style latent model run by diffusers' `VideoToVideoSDPipeline`):
   video-to-video refinement at the final size (576x320), with its own CLIP text encoder.

The settings are those of the authors' public inference script. The stages are loaded one at a time and dropped
after use, so only one of them is resident beside the keyframe model.
"""

from __future__ import annotations

import contextlib
import gc
import math
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F

from vmc_fast.models.show1.stages import PixelStage, Show1Cascade

StepCallback = Callable[[str, int, int], None]


@dataclass(frozen=True)
class CascadeSettings:
    """Sampling settings of each stage; defaults are the authors' public inference script."""

    interp_steps: int = 75
    """DDPM steps of each interpolation window."""
    interp_guidance: float = 4.0
    """Classifier-free guidance of the interpolation model."""
    first_frame_steps: int = 70
    """Steps of the IF-II image super-resolution of the first frame."""
    first_frame_guidance: float = 4.0
    """Guidance of the first-frame image model."""
    first_frame_noise_level: int = 150
    """Noise level added to the first frame's low-resolution input."""
    sr1_steps: int = 125
    """DDPM steps of each sr1 window."""
    sr1_guidance: float = 7.0
    """Guidance of sr1."""
    sr1_noise_level: int = 250
    """Noise level added to sr1's upscaled input (the model is told it through its class labels)."""
    sr1_window: int = 8
    """Frames per sr1 window."""
    sr1_stride: int = 7
    """Window stride: consecutive windows share one frame, the next window's given first frame."""
    sr2_steps: int = 50
    """Scheduler steps of sr2 (only the last `sr2_strength` of them run)."""
    sr2_strength: float = 0.8
    """How much noise sr2 adds to its input video before refining it (1.0 = start from noise)."""
    sr2_guidance: float = 15.0
    """Guidance of sr2 (the pipeline's default, which the public script keeps)."""
    sr2_negative_prompt: str = "low resolution, blur"
    """Negative prompt of sr2."""

    def __post_init__(self) -> None:
        if not 0.0 < self.sr2_strength <= 1.0:
            raise ValueError(f"sr2_strength must be in (0, 1], got {self.sr2_strength}")
        if self.sr1_window < 2 or not 1 <= self.sr1_stride < self.sr1_window:
            raise ValueError("sr1 windows must have at least 2 frames and a stride below the window "
                             "(consecutive windows share their boundary frame)")

    def with_steps(self, steps: int | None) -> "CascadeSettings":
        """The same settings with every stage's step count set to `steps` (quick runs); None keeps them."""
        if steps is None:
            return self
        return replace(self, interp_steps=steps, first_frame_steps=steps, sr1_steps=steps, sr2_steps=steps)


# ---------------------------------------------------------------------------------------------- the whole run


def run_cascade(cascade: Show1Cascade, keyframes: torch.Tensor, states: dict[str, torch.Tensor], prompt: str,
                settings: CascadeSettings, seed: int, on_step: StepCallback | None = None,
                timer: Callable[[str], contextlib.AbstractContextManager] | None = None) -> torch.Tensor:
    """Keyframes (3, F, h, w) in [-1, 1] -> the final video (3, 4F-3, H, W) in [-1, 1], float32 on the CPU.

    states holds (1, L, D) text states under "prompt" and "negative" (the keyframe model's encoder, which the
    pixel stages share); sr2 encodes `prompt` with its own text encoder. `timer(name)` wraps each stage
    (interpolate, sr1, sr2), loading included, e.g. to time it.
    """
    timer = timer or (lambda name: contextlib.nullcontext())
    with timer("interpolate"):
        stage = cascade.load("interpolation")
        video = interpolate(stage, keyframes[None], states, settings, seed, on_step)
        del stage
        _free()
    with timer("sr1"):
        video = _run_sr1(cascade, video, states, settings, seed, on_step)
    with timer("sr2"):
        pipe = cascade.load("sr2")
        video = refine_sr2(pipe, video, prompt, cascade.sr2_size, settings, seed, on_step)
        del pipe
        _free()
    return video[0].float().clamp(-1, 1).cpu()


def _run_sr1(cascade: Show1Cascade, video: torch.Tensor, states: dict[str, torch.Tensor],
             settings: CascadeSettings, seed: int, on_step: StepCallback | None) -> torch.Tensor:
    first = None
    if cascade.has("sr1_first_frame"):
        image_pipe = cascade.load("sr1_first_frame")
        first = upscale_first_frame(image_pipe, video[:, :, 0], states, settings, seed, on_step)
        del image_pipe
        _free()
    stage = cascade.load("sr1")
    video = super_resolve(stage, video, states, settings, seed, first, on_step)
    del stage
    _free()
    return video


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- one DDPM loop


@torch.no_grad()
def guided_ddpm(stage: PixelStage, noise: torch.Tensor, condition: torch.Tensor, states: dict[str, torch.Tensor],
                steps: int, guidance: float, generator: torch.Generator, class_labels: torch.Tensor | None = None,
                on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Ancestral DDPM sampling of a conditioned pixel stage, as Show-1's pipelines do it.

    noise (1, C, F, H, W) is x_T; condition (1, E, F, H, W) is concatenated to x_t on the channel axis at every
    step. The UNet outputs 2C channels (epsilon, then the learned variance); guidance mixes the epsilons and keeps
    the conditional variance. The scheduler steps frame by frame ((F, 2C, H, W)), so dynamic thresholding is per
    frame as in the original. Returns x_0, float32, shape of noise.
    """
    scheduler = stage.scheduler
    scheduler.set_timesteps(steps)
    param = next(stage.unet.parameters())
    text = torch.cat([states["prompt"], states["negative"]]).to(param.device, param.dtype)
    labels = None if class_labels is None else class_labels.to(param.device).repeat(2)
    x = noise.float()
    channels = x.shape[1]
    learned_variance = scheduler.config.variance_type in ("learned", "learned_range")
    total = len(scheduler.timesteps)
    for i, t in enumerate(scheduler.timesteps):
        model_input = torch.cat([x, condition.to(x)], dim=1).expand(2, -1, -1, -1, -1)
        kwargs = {} if labels is None else {"class_labels": labels}
        out = stage.unet(model_input.to(param.dtype), t.to(param.device), text, **kwargs)
        out = (out.sample if hasattr(out, "sample") else out).float()
        (eps_cond, variance), (eps_uncond, _) = out[:1].split(channels, 1), out[1:].split(channels, 1)
        model_output = eps_uncond + guidance * (eps_cond - eps_uncond)
        if learned_variance:  # the conditional branch's variance, as the original
            model_output = torch.cat([model_output, variance], dim=1)
        x = _framewise_step(scheduler, model_output, t, x, generator)
        if on_step is not None:
            on_step(i + 1, total)
    return x


def _framewise_step(scheduler, model_output: torch.Tensor, t: torch.Tensor, x: torch.Tensor,
                    generator: torch.Generator) -> torch.Tensor:
    """One scheduler step with frames as the batch: (1, C, F, H, W) tensors in and out."""
    frames = lambda v: v[0].permute(1, 0, 2, 3)  # noqa: E731  (1, C, F, H, W) -> (F, C, H, W)
    prev = scheduler.step(frames(model_output), t, frames(x), generator=generator).prev_sample
    return prev.permute(1, 0, 2, 3)[None]


def _generator(seed: int) -> torch.Generator:
    """A seeded CPU generator, as the original's torch.manual_seed(seed): draws are made on the CPU and moved, so
    a seed gives the same video on any device."""
    return torch.Generator("cpu").manual_seed(seed)


# ---------------------------------------------------------------------------------------------- the stages


def interpolate(stage: PixelStage, keyframes: torch.Tensor, states: dict[str, torch.Tensor],
                settings: CascadeSettings, seed: int, on_step: StepCallback | None = None) -> torch.Tensor:
    """(1, 3, F, H, W) keyframes -> (1, 3, 4F-3, H, W): 3 new frames between each pair, one window at a time.

    Every window starts from the same seeded noise, and its conditioning is the trilinear blend of its two
    keyframes plus a mask that is 1 on them. The window's own output replaces the keyframes at its ends.
    """
    b, c, num_keyframes, h, w = keyframes.shape
    device = next(stage.unet.parameters()).device
    keyframes = keyframes.float().to(device)
    noise = torch.randn((b, c, 5, h, w), generator=_generator(seed)).to(device)
    mask = torch.zeros((b, 1, 5, h, w), device=device)
    mask[:, :, [0, -1]] = 1
    video = torch.zeros((b, c, 4 * (num_keyframes - 1) + 1, h, w), device=device)
    total = (num_keyframes - 1) * settings.interp_steps
    for i in range(num_keyframes - 1):
        blend = F.interpolate(keyframes[:, :, i:i + 2], (5, h, w), mode="trilinear", align_corners=True)
        report = _offset(on_step, "interpolate", i * settings.interp_steps, total)
        video[:, :, 4 * i:4 * i + 5] = guided_ddpm(stage, noise, torch.cat([blend, mask], 1), states,
                                                   settings.interp_steps, settings.interp_guidance,
                                                   _generator(seed), on_step=report)
    return video


def upscale_first_frame(pipe, frame: torch.Tensor, states: dict[str, torch.Tensor], settings: CascadeSettings,
                        seed: int, on_step: StepCallback | None = None) -> torch.Tensor:
    """IF-II image super-resolution of one frame: (1, 3, h, w) -> (1, 3, 4h, 4w) in [-1, 1]."""
    param = next(pipe.unet.parameters())
    h, w = frame.shape[-2:]
    report = _offset(on_step, "sr1 first frame", 0, settings.first_frame_steps)
    callback = None if report is None else (lambda i, t, x: report(i + 1, settings.first_frame_steps))
    place = dict(device=param.device, dtype=param.dtype)
    image = pipe(image=frame.to(**place), prompt_embeds=states["prompt"].to(**place),
                 negative_prompt_embeds=states["negative"].to(**place), height=4 * h, width=4 * w,
                 num_inference_steps=settings.first_frame_steps, guidance_scale=settings.first_frame_guidance,
                 noise_level=settings.first_frame_noise_level, generator=_generator(seed),
                 output_type="pt", callback=callback).images
    return image.float()


def sr1_windows(num_frames: int, window: int, stride: int) -> list[int]:
    """Start frames of the sr1 windows; the last window is moved back so that the windows cover every frame."""
    if num_frames <= window:
        return [0]
    starts = list(range(0, num_frames - window + 1, stride))
    if starts[-1] + window < num_frames:
        starts.append(num_frames - window)
    return starts


def super_resolve(stage: PixelStage, video: torch.Tensor, states: dict[str, torch.Tensor],
                  settings: CascadeSettings, seed: int, first_frame: torch.Tensor | None = None,
                  on_step: StepCallback | None = None) -> torch.Tensor:
    """(1, 3, F, h, w) -> (1, 3, F, 4h, 4w) in windows; first_frame (1, 3, 4h, 4w) conditions the first window.

    Each window's input is its frames upscaled bilinearly and noised to `sr1_noise_level` (the UNet is told the
    level); the window's first frame is replaced by a given high-resolution frame, without noise.
    """
    b, c, num_frames, h, w = video.shape
    device = next(stage.unet.parameters()).device
    out = torch.zeros((b, c, num_frames, 4 * h, 4 * w), device=device)
    starts = sr1_windows(num_frames, settings.sr1_window, settings.sr1_stride)
    for n, start in enumerate(starts):
        given = first_frame if n == 0 else out[:, :, start]
        window = video[:, :, start:start + settings.sr1_window].float().to(device)
        report = _offset(on_step, "sr1", n * settings.sr1_steps, len(starts) * settings.sr1_steps)
        out[:, :, start:start + window.shape[2]] = _sr1_window(stage, window, given, states, settings, seed, report)
    return out


def _sr1_window(stage: PixelStage, window: torch.Tensor, given: torch.Tensor | None,
                states: dict[str, torch.Tensor], settings: CascadeSettings, seed: int,
                on_step: Callable[[int, int], None] | None) -> torch.Tensor:
    b, c, f, h, w = window.shape
    device = window.device
    generator = _generator(seed)
    noise = torch.randn((b, c, f, 4 * h, 4 * w), generator=generator).to(device)  # drawn first, as the original
    frames = window[0].permute(1, 0, 2, 3)  # (F, C, h, w)
    upscaled = F.interpolate(frames, (4 * h, 4 * w), mode="bilinear", align_corners=True).permute(1, 0, 2, 3)[None]
    level = torch.tensor([settings.sr1_noise_level], device=device)
    upscaled = stage.image_noising_scheduler.add_noise(
        upscaled, torch.randn(upscaled.shape, generator=generator).to(device), level)
    if given is not None:
        upscaled[:, :, 0] = given.to(upscaled)
    return guided_ddpm(stage, noise, upscaled, states, settings.sr1_steps, settings.sr1_guidance, generator,
                       class_labels=level, on_step=on_step)


def refine_sr2(pipe, video: torch.Tensor, prompt: str, size: tuple[int, int], settings: CascadeSettings,
               seed: int, on_step: StepCallback | None = None) -> torch.Tensor:
    """(1, 3, F, h, w) in [-1, 1] -> (1, 3, F, H, W) in [-1, 1] at size (H, W), through diffusers' video-to-video.

    Frames are resized to the final size first (bicubic, as the public script's PIL resize), then noised to
    `sr2_strength` and denoised with the prompt.
    """
    from PIL import Image

    pixels = ((video[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).cpu()
    frames = [Image.fromarray(f.numpy()).resize((size[1], size[0]), Image.BICUBIC) for f in pixels]
    # diffusers runs int(steps * strength) of the steps: at least one
    steps = max(settings.sr2_steps, math.ceil(1 / settings.sr2_strength))
    total = int(steps * settings.sr2_strength)
    report = _offset(on_step, "sr2", 0, total)
    callback = None if report is None else (lambda i, t, x: report(min(i + 1, total), total))
    out = pipe(prompt, video=[frames], negative_prompt=settings.sr2_negative_prompt,
               strength=settings.sr2_strength, num_inference_steps=steps,
               guidance_scale=settings.sr2_guidance, generator=_generator(seed), output_type="pt",
               callback=callback).frames
    # diffusers returns (B, F, C, H, W) in [0, 1]
    return (out.float() * 2 - 1).permute(0, 2, 1, 3, 4)


def _offset(on_step: StepCallback | None, phase: str, done: int, total: int) -> Callable[[int, int], None] | None:
    """A per-loop callback (step, steps) that reports progress of a whole phase made of several loops."""
    if on_step is None:
        return None
    return lambda step, _steps: on_step(phase, done + step, total)
