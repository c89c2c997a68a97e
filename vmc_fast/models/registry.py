"""The backbone registry: a model id in, a `Backbone` out; or, without building any weights, its `ModelSpec`.

A model id is either a built-in name (``tiny-random``, ``show1-tiny-random``, ...) or a Hugging Face hub id /
local folder in a diffusers repository layout. For the latter the family is chosen from ``unet/config.json``.
Model code lives in sibling modules; this module only knows how to pick and call their loaders, and how to read
a model's sizes from its config files (`model_spec`), so that a run can be checked before anything is written.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from torch import nn

from vmc_fast.errors import VmcError

TEMPORAL_QKV_PATTERN = r"temp_attentions\..*\.to_[qkv]\.weight$"
"""The tuned tensors of Show-1 and diffusers UNet3D: the temporal attention Q/K/V projections
(``{down_blocks.i,mid_block,up_blocks.i}.temp_attentions.j.transformer_blocks.0.attn{1,2}.to_{q,k,v}.weight``)."""


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
    trainable_pattern: str = TEMPORAL_QKV_PATTERN
    """Regex (`re.search`) of the parameter names VMC tunes in this UNet: its temporal attention Q/K/V; what
    ``--trainable`` defaults to."""

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


@dataclass(frozen=True)
class ModelSpec:
    """What a run must know about a model before it loads any weights: its default clip size, the sizes it
    accepts and the length of its noise schedule. Read from config files only (`model_spec`)."""

    model_id_resolved: str
    """The built-in name, the hub id, or the local folder as an absolute path."""
    family: str
    """Architecture family, e.g. ``diffusers-unet3d`` or ``show1`` (as `Backbone.family`)."""
    num_frames: int
    """Default frames per clip (the model's training length)."""
    height: int
    """Default frame height in pixels."""
    width: int
    """Default frame width in pixels."""
    pixel_multiple: int
    """Frame height and width must be multiples of this: vae_factor * 2**(UNet levels - 1)."""
    num_train_timesteps: int
    """Length T of the training noise schedule; timesteps are drawn from [0, T)."""
    vae_factor: int = 1
    """Pixels per latent along a side (2**(VAE levels - 1)); 1 for pixel-space models."""
    unet_levels: int = 1
    """Resolution levels of the UNet (len(block_out_channels)); each but the last halves the size."""
    trainable_pattern: str = TEMPORAL_QKV_PATTERN
    """Regex of the tuned parameter names (as `Backbone.trainable_pattern`)."""
    max_frames: int | None = None
    """Most frames per clip the model can take (AnimateDiff: its motion modules' position table); None: any."""

    def frames_problem(self, option: str, value: int) -> str | None:
        """None when `value` frames fit the model, else the message naming `option` and the limit."""
        if self.max_frames is None or value <= self.max_frames:
            return None
        return (f"{option} {value}: {self.model_id_resolved} takes at most {self.max_frames} frames per clip "
                f"(its temporal position table); use --frames {self.max_frames} or fewer")

    def size_problem(self, option: str, value: int) -> str | None:
        """None when `value` pixels is a valid frame size along one side, else the message naming `option`,
        the rule and the nearest valid values below and above."""
        m = self.pixel_multiple
        if value % m == 0:
            return None
        below, above = value // m * m, (value // m + 1) * m
        why = (f"VAE {self.vae_factor}x, UNet {self.unet_levels} levels" if self.vae_factor > 1
               else f"UNet {self.unet_levels} levels")
        nearest = f"{below} or {above}" if below > 0 else f"{above}"
        return (f"{option} {value}: {self.model_id_resolved} needs a multiple of {m} ({why}); use {nearest}")


def spec_from_configs(model_id: str, family: str, unet_config: dict, vae_config: dict | None,
                      scheduler_config: dict | None, *, num_frames: int, height: int | None = None,
                      width: int | None = None, trainable_pattern: str = TEMPORAL_QKV_PATTERN,
                      max_frames: int | None = None) -> ModelSpec:
    """The spec of a model from its parsed ``unet/config.json``, ``vae/config.json`` (None: pixel space) and
    ``scheduler/scheduler_config.json`` (None: 1000 timesteps, diffusers' default).

    height/width None: the UNet's ``sample_size`` times the VAE factor (diffusers' convention, 32 latents when
    unset)."""
    vae_factor = 2 ** (len(vae_config["block_out_channels"]) - 1) if vae_config else 1
    unet_levels = len(unet_config.get("block_out_channels") or (0,))
    sample = int(unet_config.get("sample_size") or 32) * vae_factor
    return ModelSpec(
        model_id_resolved=model_id, family=family, num_frames=num_frames, height=height or sample,
        width=width or sample, pixel_multiple=vae_factor * 2 ** (unet_levels - 1),
        num_train_timesteps=int((scheduler_config or {}).get("num_train_timesteps", 1000)),
        vae_factor=vae_factor, unet_levels=unet_levels, trainable_pattern=trainable_pattern, max_frames=max_frames,
    )


BuiltinLoader = Callable[[LoadOptions], Backbone]
FolderLoader = Callable[[str, dict, LoadOptions], Backbone]
BuiltinSpec = Callable[[], ModelSpec]
FolderSpec = Callable[[str, dict], ModelSpec]
"""(model id, parsed unet/config.json) -> the spec, reading other config files with `read_config_file`."""


CompositeLoader = Callable[[str, LoadOptions], Backbone]
CompositeSpec = Callable[[str], ModelSpec]
"""(the whole composite id, its parts already resolved) -> the spec, from config files only."""
COMPOSITE_SEPARATOR = "+"
"""Joins the parts of a composite model id, e.g. AnimateDiff's ``BASE+MOTION_ADAPTER`` (hub ids never hold it;
an existing local folder whose name does is still a folder)."""


@dataclass
class _Family:
    name: str
    detect: Callable[[dict], bool]
    load: FolderLoader
    spec: FolderSpec | None = None


@dataclass
class _Composite:
    name: str
    load: CompositeLoader
    spec: CompositeSpec


_BUILTINS: dict[str, tuple[BuiltinLoader, str]] = {}
_BUILTIN_SPECS: dict[str, BuiltinSpec] = {}
_FAMILIES: list[_Family] = []
_COMPOSITE: list[_Composite] = []  # at most one: the separator says nothing about the family


def register(name: str, loader: BuiltinLoader, description: str, spec: BuiltinSpec | None = None) -> None:
    """Register a built-in model id (no download) with a one-line description for `--help` and errors, and
    `spec`, which gives its `ModelSpec` without building weights (required for `model_spec`)."""
    _BUILTINS[name] = (loader, description)
    if spec is not None:
        _BUILTIN_SPECS[name] = spec


def register_family(name: str, detect: Callable[[dict], bool], loader: FolderLoader,
                    spec: FolderSpec | None = None) -> None:
    """Register a repository family; `detect` receives the parsed ``unet/config.json``. First match wins.
    `spec(model_id, unet_config)` reads the family's sizes from its config files (required for `model_spec`)."""
    _FAMILIES.append(_Family(name, detect, loader, spec))


def register_composite(name: str, loader: CompositeLoader, spec: CompositeSpec) -> None:
    """Register the family of composite model ids, parts joined by COMPOSITE_SEPARATOR (AnimateDiff:
    ``BASE+MOTION_ADAPTER``, each part a hub id or local folder); `loader` and `spec` receive the whole id."""
    if _COMPOSITE and _COMPOSITE[0].name != name:
        raise ValueError(f"composite ids already belong to {_COMPOSITE[0].name}; {name} cannot register them")
    _COMPOSITE[:] = [_Composite(name, loader, spec)]


def is_composite(model_id: str) -> bool:
    """True for a composite id (``A+B``); built-in names and existing local folders never are."""
    if COMPOSITE_SEPARATOR not in model_id or Path(model_id).expanduser().is_dir():
        return False
    _import_backbones()
    return model_id not in _BUILTINS and bool(_COMPOSITE)


def _composite_of(model_id: str) -> _Composite | None:
    return _COMPOSITE[0] if is_composite(model_id) else None


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
    composite = _composite_of(model_id)
    if composite is not None:
        return composite.load(model_id, options)
    unet_config = read_unet_config(model_id)
    return _family_of(model_id, unet_config).load(model_id, unet_config, options)


def model_spec(model_id: str) -> ModelSpec:
    """The `ModelSpec` of a built-in name, local folder or hub id, from config files only (no weights).

    Raises VmcError naming the id and the fix (with the closest built-in name for a misspelled one) when the
    model cannot be found or its family is not supported.
    """
    _import_backbones()
    if model_id in _BUILTINS:
        if model_id not in _BUILTIN_SPECS:
            raise VmcError(f"model {model_id!r}: registered without a spec; pass spec= to register()")
        return _BUILTIN_SPECS[model_id]()
    composite = _composite_of(model_id)
    if composite is not None:
        return composite.spec(model_id)
    unet_config = read_unet_config(model_id)
    family = _family_of(model_id, unet_config)
    if family.spec is None:
        raise VmcError(f"model {model_id!r}: the {family.name} family registered no spec; pass spec= to "
                       f"register_family()")
    resolved = str(Path(model_id).expanduser().resolve()) if Path(model_id).expanduser().is_dir() else model_id
    return family.spec(resolved, unet_config)


def _family_of(model_id: str, unet_config: dict) -> _Family:
    for family in _FAMILIES:
        if family.detect(unet_config):
            return family
    raise VmcError(
        f"model {model_id!r}: unet/config.json describes {unet_config.get('_class_name')!r}, which no backbone "
        f"supports; supported: diffusers UNet3DConditionModel (ModelScope/ZeroScope layout), Show-1, and "
        f"AnimateDiff (a saved AnimateDiffPipeline, or BASE+MOTION_ADAPTER)"
    )


def read_config_file(model_id: str, rel: str) -> dict | None:
    """Parsed JSON file `rel` (e.g. ``vae/config.json``) of a local folder (None when it lacks the file) or a
    hub repository (VmcError when it cannot be fetched)."""
    path = Path(model_id).expanduser()
    if path.is_dir():
        file = path / rel
        if not file.is_file():
            return None
        try:
            return json.loads(file.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise VmcError(f"model folder {path}: {rel} is not valid JSON ({exc}); restore it from the "
                           f"model's repository") from exc
    return json.loads(Path(hub_file(model_id, rel)).read_text())


def _use_one_of(model_id: str) -> str:
    """The joint of an unknown-model message: a "did you mean" for a near miss of a built-in name."""
    names = {name.casefold(): name for name in _BUILTINS}
    close = difflib.get_close_matches(model_id.casefold(), list(names), n=1, cutoff=0.6)
    return f"; did you mean {names[close[0]]!r}? Use one of" if close else "; use one of"


def read_unet_config(model_id: str) -> dict:
    """Parsed ``unet/config.json`` of a local folder or hub repository."""
    path = Path(model_id).expanduser()
    if path.is_dir():
        config_file = path / "unet" / "config.json"
        if not config_file.is_file():
            raise VmcError(f"model folder {path}: no unet/config.json; expected a diffusers repository layout "
                           f"(unet/, scheduler/, text_encoder/, tokenizer/)")
        return read_config_file(model_id, "unet/config.json")
    if os.sep in model_id and not _looks_like_hub_id(model_id) or path.exists():
        raise VmcError(f"model {model_id!r}: no such folder{_use_one_of(path.name)} "
                       f"{', '.join(sorted(_BUILTINS))}, a hub id (org/name) or an existing local folder")
    if not _looks_like_hub_id(model_id):
        raise VmcError(f"unknown model {model_id!r}{_use_one_of(model_id)} {', '.join(sorted(_BUILTINS))}, "
                       f"a hub id (org/name) or a local folder")
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


BACKBONE_MODULES = ("vmc_fast.models.diffusers_unet3d", "vmc_fast.models.show1.backbones",
                    "vmc_fast.models.animatediff", "vmc_fast.toy.model")
"""Modules that register backbones when imported. Named, not imported here: they import this module (and
diffusers), and the toy model belongs to the harness, which the product never imports."""


def _import_backbones() -> None:
    """Import the backbone modules so that they register themselves (lazily: they import diffusers)."""
    import importlib

    for name in BACKBONE_MODULES:
        importlib.import_module(name)
