"""Reading and writing Show-1 repositories: the keyframe UNet's weights, its DDPM scheduler, the original layout.

Repository layout (hub id or local folder), as published for ``showlab/show-1-base``::

    unet/config.json                     unet/diffusion_pytorch_model[.fp16].{safetensors,bin}[.index.json]
    scheduler/scheduler_config.json      text_encoder/ (T5)      tokenizer/

Only JSON and tensors are read from a repository: nothing in it is ever executed (``.bin`` goes through
``torch.load(weights_only=True)``, transformers loads with ``trust_remote_code`` off).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from vmc_fast.errors import VmcError
from vmc_fast.models.registry import LoadOptions, hub_file
from vmc_fast.models.show1.unet import Show1Config, Show1UNet3D

WEIGHTS_STEM = "diffusion_pytorch_model"
SHOW1_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "beta_start": 0.0001, "beta_end": 0.02,
    "variance_type": "learned_range", "prediction_type": "epsilon", "clip_sample": True, "clip_sample_range": 1.0,
    "thresholding": True, "dynamic_thresholding_ratio": 0.95, "sample_max_value": 1.5,
}
"""Show-1's (IF-I's) DDPM settings, used for the built-ins; real repositories use their own file's values."""


# ----------------------------------------------------------------------------------------------------------------
# Where the files come from


class RepositorySource:
    """A Show-1 repository: a local folder or a hub id; `path` gives a local file for a relative name."""

    def __init__(self, model_id: str):
        self.model_id = model_id
        folder = Path(model_id).expanduser()
        self.folder = folder if folder.is_dir() else None
        self._hub_files: set[str] | None = None

    def exists(self, rel: str) -> bool:
        if self.folder is not None:
            return (self.folder / rel).is_file()
        return rel in self._list_hub()

    def path(self, rel: str) -> Path:
        if self.folder is None:
            return Path(hub_file(self.model_id, rel))
        path = self.folder / rel
        if not path.is_file():
            raise VmcError(f"model {self.model_id!r}: {rel} is missing; expected a Show-1 repository layout "
                           f"(unet/, scheduler/, text_encoder/, tokenizer/)")
        return path

    def subfolder_args(self, sub: str) -> tuple[str, dict]:
        """(location, kwargs) for a transformers ``from_pretrained`` of one subfolder."""
        if self.folder is not None:
            return str(self.folder / sub), {}
        return self.model_id, {"subfolder": sub}

    def _list_hub(self) -> set[str]:
        if self._hub_files is None:
            from huggingface_hub import list_repo_files

            try:
                self._hub_files = set(list_repo_files(self.model_id))
            except Exception as exc:  # network, auth or a missing repository all end the same way
                raise VmcError(f"model {self.model_id!r}: could not list the hub repository "
                               f"({type(exc).__name__}); check the id and your network, or download it and pass "
                               f"the local folder") from exc
        return self._hub_files


def _weight_file_names(prefer_half: bool) -> list[str]:
    """Candidate weight files, most wanted first: safetensors before .bin, single file before shards."""
    suffixes = ("safetensors", "safetensors.index.json", "bin", "bin.index.json")
    full = [f"unet/{WEIGHTS_STEM}.{s}" for s in suffixes]
    half = [f"unet/{WEIGHTS_STEM}.fp16.{s}" for s in suffixes]
    return half + full if prefer_half else full + half


def _weight_files(source: RepositorySource, prefer_half: bool) -> list[Path]:
    """Local paths of the UNet weights (several when sharded)."""
    for rel in _weight_file_names(prefer_half):
        if not source.exists(rel):
            continue
        if not rel.endswith(".index.json"):
            return [source.path(rel)]
        weight_map = json.loads(source.path(rel).read_text())["weight_map"]
        return [source.path(f"unet/{shard}") for shard in sorted(set(weight_map.values()))]
    raise VmcError(f"model {source.model_id!r}: no UNet weights found; expected one of "
                   f"{', '.join(_weight_file_names(False))}")


# ----------------------------------------------------------------------------------------------------------------
# UNet


def _read_tensors(path: Path, dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    """One weight file -> {name: tensor} already in `dtype` on `device`, one tensor at a time (no full copy)."""
    if path.name.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device=str(device)) as f:
            return {name: f.get_tensor(name).to(dtype) for name in f.keys()}
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
        state = torch.load(path, map_location="cpu", weights_only=True)
    return {name: t.to(device=device, dtype=dtype) for name, t in state.items()}


def _check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], model_id: str) -> None:
    """VmcError naming counts and examples when keys or shapes differ from the model's."""
    expected = {name: t.shape for name, t in model.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise VmcError(f"model {model_id!r}: UNet weights do not fit unet/config.json: {len(missing)} missing "
                       f"(e.g. {', '.join(missing[:3]) or '-'}), {len(unexpected)} unexpected (e.g. "
                       f"{', '.join(unexpected[:3]) or '-'}); check that the folder is a complete Show-1 "
                       f"repository whose config matches its weights")
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(s)}" for k, s in expected.items() if state[k].shape != s]
    if wrong:
        raise VmcError(f"model {model_id!r}: {len(wrong)} UNet weights have the wrong shape (e.g. "
                       f"{'; '.join(wrong[:3])}); the config does not describe these weights")


def load_show1_unet(model_id: str, options: LoadOptions | None = None, *, config: dict | None = None) -> Show1UNet3D:
    """Show-1 UNet from a hub id or local folder, in options.dtype on options.device, in eval mode.

    Built on the meta device and filled with ``load_state_dict(assign=True)``: the weights exist once in memory.
    """
    options = options or LoadOptions()
    source = RepositorySource(model_id)
    config = config if config is not None else json.loads(source.path("unet/config.json").read_text())
    try:
        show1_config = Show1Config.from_dict(config)
    except ValueError as exc:
        raise VmcError(f"model {model_id!r}: unet/config.json: {exc}") from exc
    with torch.device("meta"):
        unet = Show1UNet3D(show1_config)
    prefer_half = options.dtype in (torch.float16, torch.bfloat16)
    state: dict[str, torch.Tensor] = {}
    for path in _weight_files(source, prefer_half):
        state.update(_read_tensors(path, options.dtype, options.device))
    _check_state_dict(unet, state, model_id)
    unet.load_state_dict(state, assign=True)
    return unet.eval()


# ----------------------------------------------------------------------------------------------------------------
# Scheduler


def show1_scheduler(config: dict | None = None):
    """A diffusers DDPMScheduler with Show-1's settings (or those of `config`, a scheduler_config.json)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(dict(config) if config is not None else SHOW1_SCHEDULER_CONFIG)


def load_show1_scheduler(model_id: str):
    """DDPMScheduler from ``scheduler/scheduler_config.json`` (its values; the class is always DDPM)."""
    config = json.loads(RepositorySource(model_id).path("scheduler/scheduler_config.json").read_text())
    return show1_scheduler(config)


# ----------------------------------------------------------------------------------------------------------------
# Saving (original layout)


def save_show1_pretrained(folder: str | Path, unet: Show1UNet3D, *, scheduler=None, text_encoder=None,
                          tokenizer=None, variant: str | None = None, safe_serialization: bool = True) -> Path:
    """Write a Show-1 repository layout that `load_show1_unet` (and the original code) can read.

    variant "fp16" stores float16 tensors under ``diffusion_pytorch_model.fp16.*``.
    """
    folder = Path(folder)
    (folder / "unet").mkdir(parents=True, exist_ok=True)
    (folder / "unet" / "config.json").write_text(json.dumps(unet.config.to_dict(), indent=2) + "\n")
    dtype = torch.float16 if variant == "fp16" else None
    state = {k: v.detach().to(dtype=dtype or v.dtype, device="cpu").contiguous() for k, v in unet.state_dict().items()}
    name = WEIGHTS_STEM + (f".{variant}" if variant else "") + (".safetensors" if safe_serialization else ".bin")
    if safe_serialization:
        from safetensors.torch import save_file

        save_file(state, str(folder / "unet" / name), metadata={"format": "pt"})
    else:
        torch.save(state, folder / "unet" / name)
    for sub, part in (("scheduler", scheduler), ("text_encoder", text_encoder), ("tokenizer", tokenizer)):
        if part is not None:
            part.save_pretrained(str(folder / sub))
    return folder
