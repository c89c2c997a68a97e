"""`vmc-fast export`: a motion adapter as a LoRA that other libraries load.

Formats (`EXPORT_FORMATS`):

- ``diffusers`` (AnimateDiff): ``DIR/pytorch_lora_weights.safetensors`` with PEFT keys under ``unet.``
  (``unet.<module>.lora_A.weight`` (r, in), ``unet.<module>.lora_B.weight`` (out, r)) and diffusers' adapter
  metadata, for ``AnimateDiffPipeline.load_lora_weights(DIR)``. UNet3D (ModelScope/ZeroScope) and Show-1 have no
  diffusers LoRA loader: use ``peft`` there.
- ``peft`` (every backbone): ``DIR/adapter_config.json`` and ``DIR/adapter_model.safetensors`` (keys
  ``base_model.model.<module>.lora_{A,B}.weight``), what ``PeftModel.save_pretrained`` writes, for
  ``PeftModel.from_pretrained(unet, DIR)`` or ``inject_adapter_in_model`` + ``set_peft_model_state_dict``.
- ``comfyui`` (AnimateDiff): ``DIR/<adapter name>.safetensors``, a motion LoRA in the original AnimateDiff names
  (`comfy_key`), which ComfyUI-AnimateDiff-Evolved's "Load AnimateDiff LoRA" node reads from
  ``ComfyUI/models/animatediff_motion_lora/``.

Every format stores alpha / r folded into ``lora_B`` (``up``): the change of a layer is exactly B @ A, whatever a
loader does with alpha (diffusers assumes alpha = r without metadata; ComfyUI and AnimateDiff apply up @ down).
diffusers and PEFT files also say so in their config (lora_alpha = r).

A LoRA adapter (trained with ``--lora-rank``) is written as it is, at its own rank (``--rank`` does not apply; the
relative error is 0). A full adapter (the tuned Q/K/V themselves) becomes the truncated SVD of its change from the base at the asked
rank, computed in float64 on the CPU: with U S V^T = ΔW, B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T. By Eckart-Young
this is the closest rank-r matrix in the Frobenius norm; the relative error ||ΔW - BA||_F / ||ΔW||_F (over all
tensors, and per tensor) is measured on the factors as written, printed and recorded (`RECORD_SUFFIX` beside the
weights, and in their metadata under `METADATA_KEY`). How each kind of adapter becomes factors is one function per
kind (`LORA_OF_KIND`).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from vmc_fast import __version__
from vmc_fast.config import ExportConfig
from vmc_fast.errors import VmcError
from vmc_fast.io.files import atomic_save_file, write_text_atomic
from vmc_fast.tuning.adapters import AdapterInfo, apply_adapter, read_adapter

DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
"""The file name `load_lora_weights(DIR)` looks for."""
PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"
RECORD_SUFFIX = ".vmc_export.json"
"""The export record beside the weights: ``<weights file stem>.vmc_export.json``."""
METADATA_KEY = "vmc_fast_export"
"""safetensors metadata key of the export record (without per-tensor errors) in every written weights file."""
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
"""diffusers' key (`diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY`): the LoraConfig, keys under ``unet.``."""
FORMAT_FAMILIES = {"diffusers": ("animatediff",), "comfyui": ("animatediff",), "peft": None}
"""Families each format loads into (None: every family)."""


@dataclass
class LoraFactors:
    """An adapter as low-rank factors, one pair per tuned linear layer; the layer's change is ``up @ down``."""

    rank: int
    """r: columns of every up, rows of every down (layers of lower rank are padded with zeros)."""
    down: dict[str, torch.Tensor]
    """Module name (``…attn1.to_q``) -> A, float32 (r, in)."""
    up: dict[str, torch.Tensor]
    """Module name -> B with alpha / r folded in, float32 (out, r)."""
    source: str
    """How they were made, e.g. "truncated SVD of a full adapter's change from the base"."""
    relative_error: float = 0.0
    """||ΔW - up @ down||_F / ||ΔW||_F over all layers together (0 for a LoRA adapter passed as is)."""
    errors: dict[str, float] = field(default_factory=dict)
    """Module name -> its own relative error."""


@dataclass
class ExportResult:
    """What `export_adapter` wrote."""

    files: list[Path]
    """The weights file(s), then the record."""
    record: dict
    """The export record (as written to the record file)."""

    @property
    def relative_error(self) -> float:
        return self.record["relative_error"]

    def summary(self) -> str:
        """One line: rank, error, worst layer, where it loads."""
        r = self.record
        worst = f"; worst layer {r['worst_layer']} {r['worst_error']:.3g}" if r["worst_layer"] else ""
        return (f"{r['format']} LoRA of rank {r['rank']} over {r['layers']} layers, relative error "
                f"{r['relative_error']:.3g} ({r['source']}{worst}); loads with {r['loads_with']}")


# ------------------------------------------------------------------------------------------------ entry point


def export_adapter(cfg: ExportConfig) -> ExportResult:
    """Write the adapter `cfg.adapter` as a LoRA in `cfg.format` under `cfg.out_dir` (each file atomically).

    Raises VmcError for an unreadable adapter, a format that does not load into its model's family, or a base
    model that is not the adapter's; ValueError naming the option for bad settings.
    """
    path = Path(cfg.adapter).expanduser()
    tensors, info = read_adapter(path)
    base_model = cfg.model_id or info.base_model
    family = _family(info, base_model)
    _check_format(cfg.format, family, path)
    kind = adapter_kind(tensors)
    if kind not in LORA_OF_KIND:
        raise VmcError(f"adapter {path}: a {kind} adapter cannot be exported by this version of vmc-fast")
    factors = LORA_OF_KIND[kind](path, tensors, info, base_model, cfg.rank)
    if not factors.up:
        raise VmcError(f"adapter {path} holds no tensors; retrain it")
    record = _record(cfg, path, info, base_model, family, factors)
    files = WRITERS[cfg.format](factors, Path(cfg.out_dir).expanduser(), path, record)
    record_file = files[0].with_name(files[0].stem + RECORD_SUFFIX)
    write_text_atomic(record_file, json.dumps({**record, "files": [str(f) for f in files]}, indent=1) + "\n")
    return ExportResult(files=[*files, record_file], record=record)


def _family(info: AdapterInfo, base_model: str) -> str:
    """The adapter's model family: recorded by training, else read from the base model's config files."""
    if info.extra.get("family"):
        return info.extra["family"]
    from vmc_fast.models.registry import model_spec

    return model_spec(base_model).family


def _check_format(fmt: str, family: str, path: Path) -> None:
    families = FORMAT_FAMILIES[fmt]
    if families is not None and family not in families:
        raise VmcError(f"--format {fmt}: adapter {path} is for a {family} model, and {fmt} files load into "
                       f"AnimateDiff only (diffusers has no LoRA loader for {family}); use --format peft")


def adapter_kind(tensors: dict[str, torch.Tensor]) -> str:
    """``lora`` when the adapter holds LoRA factors (``…lora_A.weight`` / ``…lora_B.weight``), else ``full``
    (the tuned tensors themselves, under the base model's names)."""
    return "lora" if any(re.search(r"\.lora_[AB]\.", name) for name in tensors) else "full"


# ------------------------------------------------------------------------------------------------ full adapters


def lora_of_full_adapter(path: Path, tensors: dict[str, torch.Tensor], info: AdapterInfo, base_model: str,
                         rank: int) -> LoraFactors:
    """The truncated SVD at `rank` of a full adapter's change from `base_model` (loaded on the CPU in float32;
    the adapter is applied with `apply_adapter`, which refuses another base)."""
    from vmc_fast.models.registry import LoadOptions, load_backbone

    not_linear = [f"{name} {tuple(t.shape)}" for name, t in tensors.items()
                  if t.dim() != 2 or not name.endswith(".weight")]
    if not_linear:
        raise VmcError(f"adapter {path}: LoRA export takes linear weights (out, in) only; it holds "
                       f"{', '.join(not_linear[:3])}{' ...' if len(not_linear) > 3 else ''} (tuned with --trainable)")
    try:
        unet = load_backbone(base_model, LoadOptions(dtype=torch.float32, device="cpu")).unet
    except VmcError as exc:
        raise VmcError(f"adapter {path}: its base model {base_model!r} cannot be loaded ({exc}); pass --model with "
                       f"its location") from exc
    return low_rank(adapter_changes(unet, path), rank)


def adapter_changes(unet: torch.nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """Module name -> ΔW, float64 (out, in): what applying the adapter at `path` changes in `unet` (which is
    changed in place). VmcError when the adapter is for another base model (`apply_adapter`)."""
    tensors, _ = read_adapter(path)
    params = dict(unet.named_parameters())
    before = {name: params[name].detach().to(torch.float64, copy=True) for name in tensors if name in params}
    apply_adapter(unet, path)
    return {name.removesuffix(".weight"): params[name].detach().double() - value for name, value in before.items()}


def low_rank(changes: dict[str, torch.Tensor], rank: int) -> LoraFactors:
    """Truncated SVD of each change (float64, CPU) at `rank`, capped at the largest rank any layer has; layers of
    lower rank are padded with zero rows and columns so that one rank holds for the whole file. The errors are
    measured on the float32 factors."""
    if rank < 1:
        raise ValueError(f"--rank {rank}: must be at least 1")
    rank = min(rank, max(min(delta.shape) for delta in changes.values()))
    down, up, errors, lost, total = {}, {}, {}, 0.0, 0.0
    for name, delta in changes.items():
        delta = delta.to("cpu", torch.float64)
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        k = min(rank, s.numel())
        root = s[:k].sqrt()
        b = torch.zeros(delta.shape[0], rank, dtype=torch.float32)
        a = torch.zeros(rank, delta.shape[1], dtype=torch.float32)
        b[:, :k] = (u[:, :k] * root).float()
        a[:k] = (root[:, None] * vh[:k]).float()
        residual = (delta - b.double() @ a.double()).square().sum().item()
        norm = delta.square().sum().item()
        down[name], up[name] = a, b
        errors[name] = math.sqrt(residual / norm) if norm > 0 else 0.0
        lost, total = lost + residual, total + norm
    if total == 0:
        warnings.warn("the adapter does not change its base model (every change is zero); the export holds "
                      "zeros", stacklevel=2)
    return LoraFactors(rank=rank, down=down, up=up, source="truncated SVD of a full adapter's change",
                       relative_error=math.sqrt(lost / total) if total > 0 else 0.0, errors=errors)


# ------------------------------------------------------------------------------------------------ LoRA adapters


def lora_of_lora_adapter(path: Path, tensors: dict[str, torch.Tensor], info: AdapterInfo, base_model: str,
                         rank: int) -> LoraFactors:
    """A LoRA adapter (`--lora-rank`) as it is: its own rank (`rank`, --rank, does not apply), A as down and
    (alpha / r) B as up, so that up @ down is exactly the change it trained; no base model is loaded."""
    from vmc_fast.tuning.lora import LoraSettings, factor_pairs

    if base_model != info.base_model:
        warnings.warn(f"--model {base_model}: not used; a LoRA adapter is exported as it is, without loading a base "
                      f"model, and its factors are for {info.base_model}", stacklevel=3)
    pairs = factor_pairs(tensors, str(path))
    r = next(iter(pairs.values()))[0].shape[0] if pairs else 0
    scale = (info.lora or LoraSettings(r, r)).scale if r else 1.0
    down = {name: a.float().contiguous() for name, (a, _) in pairs.items()}
    up = {name: (b.float() * scale).contiguous() for name, (_, b) in pairs.items()}
    return LoraFactors(rank=r, down=down, up=up, source="a LoRA adapter, as it was trained",
                       errors={name: 0.0 for name in pairs})


LORA_OF_KIND: dict[str, Callable[[Path, dict, AdapterInfo, str, int], LoraFactors]] = {
    "full": lora_of_full_adapter,
    "lora": lora_of_lora_adapter,
}
"""Adapter kind (`adapter_kind`) -> how it becomes `LoraFactors` (path, tensors, info, base model, rank): a full
adapter by the truncated SVD of its change, a LoRA adapter as is (its own rank; alpha / r folded into up)."""


# ------------------------------------------------------------------------------------------------ the record


def _record(cfg: ExportConfig, path: Path, info: AdapterInfo, base_model: str, family: str,
            factors: LoraFactors) -> dict:
    worst = max(factors.errors, key=factors.errors.get) if factors.errors else None
    return {
        "format": cfg.format, "adapter": str(path.resolve()), "base_model": base_model, "family": family,
        "prompt": info.prompt, "rank": factors.rank, "requested_rank": cfg.rank, "lora_alpha": factors.rank,
        "layers": len(factors.up), "source": factors.source, "relative_error": factors.relative_error,
        "worst_layer": worst, "worst_error": factors.errors.get(worst, 0.0) if worst else 0.0,
        "loads_with": LOADS_WITH[cfg.format], "vmc_fast": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "errors": factors.errors,
    }


def _metadata(record: dict) -> dict[str, str]:
    return {METADATA_KEY: json.dumps({k: v for k, v in record.items() if k != "errors"}, sort_keys=True)}


LOADS_WITH = {
    "diffusers": "AnimateDiffPipeline.load_lora_weights(DIR)",
    "peft": "PeftModel.from_pretrained(unet, DIR), or inject_adapter_in_model + set_peft_model_state_dict",
    "comfyui": "ComfyUI-AnimateDiff-Evolved's Load AnimateDiff LoRA (copy it to ComfyUI/models/animatediff_motion_lora/)",
}


# ------------------------------------------------------------------------------------------------ writers


def lora_config(factors: LoraFactors, base_model: str | None = None):
    """The `peft.LoraConfig` of `factors`: rank r, lora_alpha = r (scale 1: alpha / r is folded into up), the
    exact module names as targets."""
    from peft import LoraConfig

    return LoraConfig(r=factors.rank, lora_alpha=factors.rank, target_modules=sorted(factors.up), lora_dropout=0.0,
                      bias="none", base_model_name_or_path=base_model)


def _config_dict(config) -> dict:
    """`LoraConfig.to_dict` as `save_pretrained` writes it (sets as sorted lists)."""
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}


def _peft_state(factors: LoraFactors, prefix: str) -> dict[str, torch.Tensor]:
    state = {}
    for name in sorted(factors.up):
        state[f"{prefix}{name}.lora_A.weight"] = factors.down[name].contiguous()
        state[f"{prefix}{name}.lora_B.weight"] = factors.up[name].contiguous()
    return state


def write_diffusers(factors: LoraFactors, out: Path, adapter: Path, record: dict) -> list[Path]:
    """``out/pytorch_lora_weights.safetensors`` as `AnimateDiffPipeline.save_lora_weights` writes it."""
    config = _config_dict(lora_config(factors))
    metadata = {"format": "pt", **_metadata(record),
                DIFFUSERS_METADATA_KEY: json.dumps({f"unet.{k}": v for k, v in config.items()}, indent=2,
                                                   sort_keys=True, default=str)}
    target = atomic_save_file(_peft_state(factors, "unet."), out / DIFFUSERS_WEIGHTS, metadata)
    others = sorted(p.name for p in out.glob("*.safetensors") if p.name != DIFFUSERS_WEIGHTS)
    if others:
        warnings.warn(f"--out {out} also holds {', '.join(others)}; load_lora_weights({out}) then picks one of the "
                      f"files: pass weight_name={DIFFUSERS_WEIGHTS!r}, or export into an empty folder", stacklevel=3)
    return [target]


def write_peft(factors: LoraFactors, out: Path, adapter: Path, record: dict) -> list[Path]:
    """``out/adapter_model.safetensors`` and ``out/adapter_config.json``, as `PeftModel.save_pretrained` writes
    them."""
    weights = atomic_save_file(_peft_state(factors, "base_model.model."), out / PEFT_WEIGHTS,
                               {"format": "pt", **_metadata(record)})
    config = _config_dict(lora_config(factors, record["base_model"]))
    write_text_atomic(out / PEFT_CONFIG, json.dumps(config, indent=2, sort_keys=True, default=str))
    return [weights, out / PEFT_CONFIG]


def write_comfyui(factors: LoraFactors, out: Path, adapter: Path, record: dict) -> list[Path]:
    """``out/<adapter name>.safetensors``: ``down`` = A, ``up`` = B under the original AnimateDiff names
    (`comfy_key`), no alpha keys (ComfyUI-AnimateDiff-Evolved and AnimateDiff apply up @ down as it is; an
    ``alpha`` key would hold "temporal" and be taken for a down weight)."""
    state = {}
    for name in sorted(factors.up):
        state[comfy_key(name, "down")] = factors.down[name].contiguous()
        state[comfy_key(name, "up")] = factors.up[name].contiguous()
    return [atomic_save_file(state, out / f"{adapter.stem}.safetensors", _metadata(record))]


WRITERS: dict[str, Callable[[LoraFactors, Path, Path, dict], list[Path]]] = {
    "diffusers": write_diffusers, "peft": write_peft, "comfyui": write_comfyui,
}


# ------------------------------------------------------------------------------------------------ ComfyUI names

_DIFFUSERS_MODULE = re.compile(r"(?P<block>.+\.motion_modules\.\d+)\.(?P<layer>transformer_blocks\.\d+)\.attn"
                               r"(?P<attn>[12])\.(?P<proj>to_[qkv])")
_COMFY_KEY = re.compile(r"(?P<block>.+\.motion_modules\.\d+)\.temporal_transformer\.(?P<layer>transformer_blocks\.\d+)"
                        r"\.attention_blocks\.(?P<attn>[01])\.processor\.(?P<proj>to_[qkv])_lora\.(?P<part>down|up)"
                        r"\.weight")


def comfy_key(module: str, part: str) -> str:
    """The original AnimateDiff motion-LoRA key of a diffusers motion-module projection, `part` ``down`` (A) or
    ``up`` (B): ``down_blocks.0.motion_modules.0.transformer_blocks.0.attn1.to_q`` ->
    ``down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.processor.to_q_lora.down.weight``.

    The inverse of diffusers' `convert_animatediff_checkpoint_to_diffusers` (``attention_blocks.0/1`` are
    ``attn1/2``, ``temporal_transformer`` is dropped), plus the LoRA processor naming AnimateDiff's motion LoRAs
    use; block indices are the same. VmcError for a module that is not a motion-module Q/K/V projection.
    """
    match = _DIFFUSERS_MODULE.fullmatch(module)
    if match is None or part not in ("down", "up"):
        raise VmcError(f"{module}: not an AnimateDiff motion-module Q/K/V projection; the comfyui format holds "
                       f"only those (use --format peft)")
    return (f"{match['block']}.temporal_transformer.{match['layer']}.attention_blocks.{int(match['attn']) - 1}"
            f".processor.{match['proj']}_lora.{part}.weight")


def diffusers_module(key: str) -> tuple[str, str]:
    """The inverse of `comfy_key`: an original AnimateDiff motion-LoRA key -> (diffusers module name, ``down`` or
    ``up``). VmcError for another key."""
    match = _COMFY_KEY.fullmatch(key)
    if match is None:
        raise VmcError(f"{key}: not an AnimateDiff motion-LoRA Q/K/V key")
    return (f"{match['block']}.{match['layer']}.attn{int(match['attn']) + 1}.{match['proj']}", match["part"])
