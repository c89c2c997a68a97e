"""diffusers `UNet3DConditionModel` backbones (ModelScope / ZeroScope layout) and the `tiny-random` test model.

Repository layout read by `load_pretrained`: ``unet/``, ``vae/``, ``text_encoder/`` (CLIP), ``tokenizer/``,
``scheduler/``. Everything is loaded with diffusers/transformers ``from_pretrained``; no code from the folder runs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vmc_fast.errors import VmcError
from vmc_fast.io.prompts import TokenReport, token_report
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


def is_diffusers_unet3d(unet_config: dict) -> bool:
    """ModelScope/ZeroScope UNet3D configs; Show-1 configs carry Show-1-only keys and are excluded."""
    show1_keys = {"encoder_hid_dim_type", "transfromer_in_opt", "addition_embed_type"}
    return unet_config.get("_class_name") == "UNet3DConditionModel" and not show1_keys & unet_config.keys()


def load_pretrained(model_id: str, unet_config: dict, options: LoadOptions) -> Backbone:
    """Load a diffusers text-to-video repository (hub id or local folder) as a latent-space Backbone."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet3DConditionModel

    try:
        unet = UNet3DConditionModel.from_pretrained(model_id, subfolder="unet", torch_dtype=options.dtype)
        vae = AutoencoderKL.from_pretrained(model_id, subfolder="vae", torch_dtype=options.dtype)
        scheduler = DDPMScheduler.from_pretrained(model_id, subfolder="scheduler")
    except (OSError, ValueError, EnvironmentError) as exc:
        raise VmcError(f"model {model_id!r}: could not load unet/vae/scheduler ({exc}); check that the folder "
                       f"or hub repository has the ModelScope layout") from exc
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    sample = int(unet.config.sample_size or 32) * vae_scale
    return Backbone(
        model_id=model_id,
        family="diffusers-unet3d",
        unet=unet.to(options.device).eval(),
        vae=vae.to(options.device).eval(),
        vae_scaling_factor=float(vae.config.scaling_factor),
        noise_scheduler=scheduler,
        load_text_encoder=lambda: ClipPromptEncoder.from_pretrained(model_id),
        num_frames=8,
        height=sample,
        width=sample,
    )


class ClipPromptEncoder:
    """CLIP text encoder + tokenizer: list of B prompts -> (B, 77, D) last hidden states, float32, on CPU."""

    def __init__(self, tokenizer, text_encoder):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.eval()

    @classmethod
    def from_pretrained(cls, model_id: str) -> "ClipPromptEncoder":
        from transformers import CLIPTextModel, CLIPTokenizer

        try:
            tokenizer = CLIPTokenizer.from_pretrained(model_id, subfolder="tokenizer")
            text_encoder = CLIPTextModel.from_pretrained(model_id, subfolder="text_encoder")
        except (OSError, ValueError) as exc:
            raise VmcError(f"model {model_id!r}: could not load tokenizer/text_encoder ({exc})") from exc
        return cls(tokenizer, text_encoder)

    @property
    def max_length(self) -> int:
        """Tokens the encoder reads, start and end tokens included (77 for CLIP)."""
        return min(77, self.tokenizer.model_max_length)

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> torch.Tensor:
        # Longer prompts are cut at max_length; encoded_text says where, and the prompt cache warns.
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                                return_tensors="pt")
        device = next(self.text_encoder.parameters()).device
        return self.text_encoder(tokens.input_ids.to(device)).last_hidden_state.float().cpu()

    def encoded_text(self, prompt: str) -> TokenReport:
        """How much of `prompt` __call__ encodes (the rest is dropped)."""
        return token_report(self.tokenizer, prompt, self.max_length)


# --------------------------------------------------------------------------------------------- tiny-random


def build_tiny_random(options: LoadOptions) -> Backbone:
    """A seeded tiny ModelScope-style latent model: 8 frames at 32x32 pixels -> 16x16 latents. No downloads."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet3DConditionModel

    torch.manual_seed(tiny.DIFFUSERS_SEED)
    unet = UNet3DConditionModel(**tiny.UNET3D_CONFIG)
    vae = AutoencoderKL(**tiny.VAE_CONFIG)
    return Backbone(
        model_id="tiny-random",
        family="diffusers-unet3d",
        unet=place(unet, options),
        vae=place(vae, options),
        vae_scaling_factor=float(vae.config.scaling_factor),
        noise_scheduler=DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                                      beta_start=0.00085, beta_end=0.012, clip_sample=False),
        load_text_encoder=tiny_clip_prompt_encoder,
        num_frames=8,
        height=32,
        width=32,
    )


def place(module: torch.nn.Module, options: LoadOptions) -> torch.nn.Module:
    """Move to the device and frozen dtype, in eval mode.

    Plain `nn.Module.to`: diffusers' override warns about fp32-only modules, which these models do not have.
    """
    return torch.nn.Module.to(module, options.device, options.dtype).eval()


def tiny_clip_prompt_encoder() -> ClipPromptEncoder:
    """The tiny-random CLIP prompt encoder (byte-level tokenizer, 2-layer text model), seeded."""
    tokenizer = tiny.clip_tokenizer()
    return ClipPromptEncoder(tokenizer, tiny.clip_text_encoder(tokenizer))


def save_tiny_pretrained(folder: str | Path) -> Path:
    """Write the tiny-random model in the ModelScope repository layout (for tests of `load_pretrained`)."""
    folder = Path(folder)
    backbone = build_tiny_random(LoadOptions())
    backbone.unet.save_pretrained(folder / "unet")
    backbone.vae.save_pretrained(folder / "vae")
    backbone.noise_scheduler.save_pretrained(folder / "scheduler")
    encoder = backbone.load_text_encoder()
    encoder.tokenizer.save_pretrained(folder / "tokenizer")
    encoder.text_encoder.save_pretrained(folder / "text_encoder")
    return folder


def tiny_random_spec() -> ModelSpec:
    """The spec of tiny-random, from the configs `build_tiny_random` builds it with."""
    return spec_from_configs("tiny-random", "diffusers-unet3d", tiny.UNET3D_CONFIG, tiny.VAE_CONFIG,
                             {"num_train_timesteps": 1000}, num_frames=8, height=32, width=32)


def pretrained_spec(model_id: str, unet_config: dict) -> ModelSpec:
    """The spec of a ModelScope-layout repository, read from its unet, vae and scheduler configs (as
    `load_pretrained` sizes it)."""
    vae_config = read_config_file(model_id, "vae/config.json")
    if vae_config is None:
        raise VmcError(f"model {model_id!r}: no vae/config.json; a ModelScope-layout repository needs its vae/")
    return spec_from_configs(model_id, "diffusers-unet3d", unet_config, vae_config,
                             read_config_file(model_id, "scheduler/scheduler_config.json"), num_frames=8)


register("tiny-random", build_tiny_random, "tiny random ModelScope-style latent UNet3D (tests and smoke runs)",
         spec=tiny_random_spec)
register_family("diffusers-unet3d", is_diffusers_unet3d, load_pretrained, spec=pretrained_spec)
