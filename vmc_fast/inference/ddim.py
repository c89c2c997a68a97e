"""DDIM on a backbone's own noise schedule: deterministic inversion of a clip into x_T, and guided sampling back.

Both schedulers are built from the backbone's training schedule (``backbone.noise_scheduler.config``); the
authors' public code inverted on a different schedule, which vmc-fast does not repeat (docs/design.md section 1).
`generate` and the toy-world evaluation both run these functions.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import nn

from vmc_fast.tuning.losses import epsilon_half

StepCallback = Callable[[str, int, int], None]
"""on_step(phase, step, total): phase is ``invert`` or ``sample``; step counts from 1 to total."""


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

    The timesteps are `sampling_scheduler`'s, reversed, whatever the config's ``timestep_spacing``: for
    ``leading`` and ``trailing`` that is what DDIMInverseScheduler computes itself; ``linspace`` (AnimateDiff's)
    it refuses, so it is built with ``leading`` (the same step size) and given sampling's timesteps.
    """
    from diffusers import DDIMInverseScheduler

    config = {**_known_keys(DDIMInverseScheduler, scheduler_config), "clip_sample": False}
    if config.get("timestep_spacing", "leading") not in ("leading", "trailing"):
        config["timestep_spacing"] = "leading"
    scheduler = DDIMInverseScheduler.from_config(config)
    scheduler.set_timesteps(num_steps)
    scheduler.timesteps = sampling_scheduler(scheduler_config, num_steps).timesteps.flip(0)
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



def latent_shape(backbone, size: tuple[int, int, int]) -> tuple[int, ...]:
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


def invert_clip(backbone, x0: torch.Tensor, text_states: torch.Tensor, steps: int,
                on_step: StepCallback | None = None) -> torch.Tensor:
    """`ddim_invert` of x0 (1, C, F, h, w) in the backbone's input space on its own schedule -> x_T, float32."""
    return ddim_invert(backbone.unet, x0, text_states, backbone.noise_scheduler.config, steps, on_step)


def sample_frames(backbone, x_T: torch.Tensor, cond_states: torch.Tensor, uncond_states: torch.Tensor | None,
                  steps: int, guidance_scale: float, generator: torch.Generator | None = None,
                  on_step: StepCallback | None = None) -> torch.Tensor:
    """`sample` from x_T on the backbone's own schedule, then `decode`: float32 (3, F, H, W) in [-1, 1] on the
    CPU."""
    x0 = sample(backbone.unet, x_T, cond_states, uncond_states, backbone.noise_scheduler.config, steps,
                guidance_scale, generator, on_step)
    return decode(backbone, x0)
