"""The backbone registry: a model id in, a `Backbone` out.

A model id is either a built-in name (``tiny-random``, ``show1-tiny-random``, ...) or a Hugging Face hub id /
local folder in a diffusers repository layout. For the latter the family is chosen from ``unet/config.json``.
Model code lives in sibling modules; this module only knows how to pick and call their loaders.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from torch import nn

from vmc_fast.errors import VmcError


class PromptEncoder(Protocol):
    """Turns prompts into the text states the UNet expects: list of B strings -> (B, L, D) float tensor."""

    def __call__(self, prompts: list[str]) -> torch.Tensor: ...


@dataclass
class Backbone:
    """Everything training and generation need from one text-to-video model.

    The text encoder is not held: `load_text_encoder` builds it on demand so that it can be released before the
    training loop (and skipped entirely when the prompt embedding is already cached).
    """

    model_id: str
    """The id the user passed (built-in name, hub id or local folder)."""
    family: str
    """Architecture family, e.g. ``diffusers-unet3d`` or ``show1``."""
    unet: nn.Module
    """forward(sample (B,C,F,H,W), timestep (B,), encoder_hidden_states (B,L,D)) -> tensor or object with .sample."""
    noise_scheduler: Any
    """A diffusers scheduler carrying the training noise schedule (``alphas_cumprod``, ``num_train_timesteps``)."""
    load_text_encoder: Callable[[], PromptEncoder]
    """Builds the prompt encoder; call once, use, drop."""
    num_frames: int = 8
    """Keyframes the model was trained on."""
    height: int = 40
    """Training frame height in pixels."""
    width: int = 64
    """Training frame width in pixels."""
    vae: nn.Module | None = None
    """Latent models only: encodes (N, 3, H, W) pixels in [-1, 1] into latents. None for pixel-space models."""
    vae_scaling_factor: float = 1.0
    """Latents are multiplied by this after encoding (diffusers convention)."""
    cascade: Any = None
    """Frozen stages `generate` runs after the keyframes (a `vmc_fast.models.show1.stages.Show1Cascade`); None: single-stage."""
    benchmark_only: bool = False
    """True for random-weight builds of a real architecture: fine for speed/memory, meaningless outputs."""

    @property
    def in_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def learned_variance(self) -> bool:
        """IF/Show-1-style models output 2x channels: epsilon first, variance interpolation second."""
        return int(self.unet.config.out_channels) == 2 * self.in_channels

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, F, H, W) in [-1, 1] -> the UNet's input space (B, C, F, h, w).

        Pixel-space models return the pixels unchanged; latent models run their VAE frame by frame.
        """
        if self.vae is None:
            return pixels
        b, c, f, h, w = pixels.shape
        frames = pixels.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        param = next(self.vae.parameters())
        latents = self.vae.encode(frames.to(param.device, param.dtype)).latent_dist.mean
        latents = latents * self.vae_scaling_factor
        return latents.reshape(b, f, *latents.shape[1:]).permute(0, 2, 1, 3, 4).contiguous()


@dataclass
class LoadOptions:
    """How to load a backbone."""

    dtype: torch.dtype = torch.float32
    """Storage and compute dtype of the frozen weights."""
    device: str = "cpu"
    """Where the UNet (and VAE) live."""


BuiltinLoader = Callable[[LoadOptions], Backbone]
FolderLoader = Callable[[str, dict, LoadOptions], Backbone]


@dataclass
class _Family:
    name: str
    detect: Callable[[dict], bool]
    load: FolderLoader


_BUILTINS: dict[str, tuple[BuiltinLoader, str]] = {}
_FAMILIES: list[_Family] = []


def register(name: str, loader: BuiltinLoader, description: str) -> None:
    """Register a built-in model id (no download) with a one-line description for `--help` and errors."""
    _BUILTINS[name] = (loader, description)


def register_family(name: str, detect: Callable[[dict], bool], loader: FolderLoader) -> None:
    """Register a repository family; `detect` receives the parsed ``unet/config.json``. First match wins."""
    _FAMILIES.append(_Family(name, detect, loader))


def available_models() -> dict[str, str]:
    """Built-in model ids and their descriptions."""
    _import_backbones()
    return {name: desc for name, (_, desc) in sorted(_BUILTINS.items())}


def load_backbone(model_id: str, options: LoadOptions | None = None) -> Backbone:
    """Load a backbone by built-in name, local folder or hub id; raise VmcError with the fix otherwise."""
    _import_backbones()
    options = options or LoadOptions()
    if model_id in _BUILTINS:
        return _BUILTINS[model_id][0](options)
    unet_config = read_unet_config(model_id)
    for family in _FAMILIES:
        if family.detect(unet_config):
            return family.load(model_id, unet_config, options)
    raise VmcError(
        f"model {model_id!r}: unet/config.json describes {unet_config.get('_class_name')!r}, which no backbone "
        f"supports; supported: diffusers UNet3DConditionModel (ModelScope/ZeroScope layout) and Show-1"
    )


def read_unet_config(model_id: str) -> dict:
    """Parsed ``unet/config.json`` of a local folder or hub repository."""
    path = Path(model_id).expanduser()
    if path.is_dir():
        config_file = path / "unet" / "config.json"
        if not config_file.is_file():
            raise VmcError(f"model folder {path}: no unet/config.json; expected a diffusers repository layout "
                           f"(unet/, scheduler/, text_encoder/, tokenizer/)")
        return json.loads(config_file.read_text())
    if os.sep in model_id and not _looks_like_hub_id(model_id) or path.exists():
        raise VmcError(f"model {model_id!r}: no such folder; pass an existing local folder, a hub id, or one of "
                       f"{', '.join(sorted(_BUILTINS))}")
    if not _looks_like_hub_id(model_id):
        raise VmcError(f"unknown model {model_id!r}; use one of {', '.join(sorted(_BUILTINS))}, a hub id "
                       f"(org/name) or a local folder")
    return json.loads(Path(hub_file(model_id, "unet/config.json")).read_text())


def hub_file(repo_id: str, filename: str) -> str:
    """Download (or find in the local cache) one file of a hub repository; VmcError when it cannot."""
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id, filename)
    except Exception as exc:  # network, auth, missing repo: all end the same way for the user
        raise VmcError(f"model {repo_id!r}: could not fetch {filename} from the hub ({type(exc).__name__}); "
                       f"check the id and your network, or download the repository and pass its local folder") from exc


def _looks_like_hub_id(model_id: str) -> bool:
    parts = model_id.split("/")
    return len(parts) == 2 and all(parts) and not model_id.startswith((".", "/", "~"))


BACKBONE_MODULES = ("vmc_fast.models.diffusers_unet3d", "vmc_fast.models.show1.backbones", "vmc_fast.toy.model")
"""Modules that register backbones when imported. Named, not imported here: they import this module (and
diffusers), and the toy model belongs to the harness, which the product never imports."""


def _import_backbones() -> None:
    """Import the backbone modules so that they register themselves (lazily: they import diffusers)."""
    import importlib

    for name in BACKBONE_MODULES:
        importlib.import_module(name)
