"""Motion adapters: safetensors files of the tuned tensors under the base model's own names, plus metadata.

Files are written atomically (temporary file in the same folder, fsync, rename), so a crash never leaves a
half-written adapter. A fingerprint of the base model's frozen weights travels in the metadata; loading into
another base model is refused.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vmc_fast import __version__
from vmc_fast.errors import VmcError
from vmc_fast.io.files import atomic_save_file

FORMAT = "vmc-fast-motion-adapter/1"
_SAMPLES_PER_TENSOR = 16


def base_fingerprint(unet: nn.Module, exclude: set[str] | frozenset[str] = frozenset(), legacy: bool = False) -> str:
    """A short hash of the base weights: names, shapes and a strided sample of values of every tensor.

    The tuned tensors (`exclude`, the adapter's own names) are left out so tuning does not change it. Sampled
    values are rounded to bf16, the coarsest dtype frozen weights are stored in, so the same base loaded in fp32
    (CPU) or bf16 (the GPU default) gives the same fingerprint: an adapter tuned on one loads on the other.
    `legacy`: the scheme of adapters written before 2026-11-30 (fp16 cast, 3 significant digits), which told
    fp32 and bf16 copies of one base apart.
    """
    digest = hashlib.sha256()
    tensors = {**dict(unet.named_parameters()), **dict(unet.named_buffers())}
    for name, tensor in sorted(tensors.items()):
        if name in exclude:
            continue
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
        flat = tensor.detach().reshape(-1)
        if flat.device.type == "meta" or flat.numel() == 0:
            continue
        step = max(1, flat.numel() // _SAMPLES_PER_TENSOR)
        sample = flat[::step][:_SAMPLES_PER_TENSOR]
        if legacy:
            digest.update(",".join(f"{v:.3g}" for v in sample.to("cpu", torch.float16).float().tolist()).encode())
        else:
            digest.update(sample.to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class AdapterInfo:
    """What an adapter file says about itself."""

    base_model: str
    base_fingerprint: str
    prompt: str
    steps: int
    final_loss: float
    loss: str
    num_frames: int
    height: int
    width: int
    version: str
    created: str
    extra: dict


def save_adapter(path: str | Path, tensors: dict[str, torch.Tensor], *, base_model: str, fingerprint: str,
                 prompt: str, steps: int, final_loss: float, loss: str, num_frames: int, height: int, width: int,
                 extra: dict | None = None) -> Path:
    """Write the tuned tensors (name -> tensor, base model names) and metadata atomically."""
    metadata = {
        "format": FORMAT,
        "base_model": base_model,
        "base_fingerprint": fingerprint,
        "prompt": prompt,
        "steps": str(steps),
        "final_loss": repr(float(final_loss)),
        "loss": loss,
        "num_frames": str(num_frames),
        "height": str(height),
        "width": str(width),
        "version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "extra": json.dumps(extra or {}, sort_keys=True),
    }
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return atomic_save_file(tensors, path, metadata)


def read_adapter(path: str | Path) -> tuple[dict[str, torch.Tensor], AdapterInfo]:
    """Tensors and metadata of an adapter file; VmcError when it is not one."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise VmcError(f"adapter {path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises several unrelated types for a damaged file
        raise VmcError(f"adapter {path}: not a readable safetensors file ({exc})") from exc
    if meta.get("format") != FORMAT:
        raise VmcError(f"adapter {path}: not a vmc-fast motion adapter (format {meta.get('format')!r})")
    info = AdapterInfo(
        base_model=meta["base_model"], base_fingerprint=meta["base_fingerprint"], prompt=meta["prompt"],
        steps=int(meta["steps"]), final_loss=float(meta["final_loss"]), loss=meta["loss"],
        num_frames=int(meta["num_frames"]), height=int(meta["height"]), width=int(meta["width"]),
        version=meta["version"], created=meta["created"], extra=json.loads(meta.get("extra", "{}")),
    )
    return tensors, info


def apply_adapter(unet: nn.Module, path: str | Path, *, fingerprint: str | None = None) -> AdapterInfo:
    """Copy an adapter's tensors into `unet` in place (no new modules, so a compiled graph stays valid).

    Refuses an adapter made for another base model: different fingerprint, or names/shapes it does not have;
    and one holding NaN or inf (from a run that diverged): VmcError, nothing copied.
    `fingerprint` may be passed when already known (it costs one pass over the weights' samples).
    """
    tensors, info = read_adapter(path)
    bad = [name for name, value in tensors.items() if not torch.isfinite(value).all()]
    if bad:
        raise VmcError(f"adapter {path}: {len(bad)} of {len(tensors)} tensors hold NaN or inf (e.g. {bad[0]}); "
                       f"it comes from a run that diverged; retrain it (lower --lr, or --precision bf16 or fp32)")
    params = dict(unet.named_parameters())
    unknown = [name for name in tensors if name not in params]
    wrong = [name for name in tensors if name in params and params[name].shape != tensors[name].shape]
    if unknown or wrong:
        example = (unknown or wrong)[0]
        raise VmcError(f"adapter {path} was made for another base model ({info.base_model}): "
                       f"{len(unknown)} unknown and {len(wrong)} mis-shaped tensors (e.g. {example}); "
                       f"load it into {info.base_model}")
    fingerprint = fingerprint or base_fingerprint(unet, exclude=set(tensors))
    if fingerprint != info.base_fingerprint and base_fingerprint(unet, set(tensors), legacy=True) != \
            info.base_fingerprint:
        raise VmcError(f"adapter {path} was made for base model {info.base_model} (fingerprint "
                       f"{info.base_fingerprint}), not this one (fingerprint {fingerprint}); "
                       f"load it into the model it was trained on")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
    return info
