"""Motion adapters: safetensors files of the tuned tensors under the base model's own names, plus metadata.

Files are written atomically (temporary file in the same folder, fsync, rename), so a crash never leaves a
half-written adapter. What the base model's frozen weights were travels in the metadata (`BaseReference`: a hash
of their names and shapes, and a few sampled values of each); loading into another base model is refused.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as _dt
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vmc_fast import __version__
from vmc_fast.errors import VmcError
from vmc_fast.io.files import atomic_save_file
from vmc_fast.tuning.lora import (
    LoraSettings,
    base_name,
    factor_pairs,
    is_lora_adapter,
    load_lora,
    lora_settings,
)

FORMAT = "vmc-fast-motion-adapter/1"
_SAMPLES_PER_TENSOR = 16


def base_fingerprint(unet: nn.Module, exclude: set[str] | frozenset[str] = frozenset(), legacy: bool = False) -> str:
    """A short hash of the base weights: names, shapes and a strided sample of values of every tensor.

    The tuned tensors (`exclude`, the adapter's own names) are left out so tuning does not change it. Sampled
    values are rounded to bf16, so fp32 and bf16 copies of one base agree; an fp16 copy may not (double rounding),
    which is why adapters now carry a `BaseReference` and are checked with a tolerance. The hash is still written
    (older vmc-fast versions check it), checks adapters without a BaseReference, and keys the latent cache.
    `legacy`: the scheme of adapters written before 2026-11-30 (fp16 cast, 3 significant digits), which told
    fp32 and bf16 copies of one base apart.
    """
    digest = hashlib.sha256()
    tensors = base_tensors(unet)
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


_VALUES_PER_TENSOR = 8
BASE_RTOL = 2.0 ** -7
"""Relative tolerance of sampled base values: one bf16 ulp. Rounding fp32 weights to bf16 moves them by at most
half of it, to fp16 by much less, so any two storage dtypes of one base agree; a base whose sampled weights all
moved by less than this (about 0.8%) would be accepted too."""
BASE_ATOL = 2.0 ** -14
"""Absolute tolerance: fp16's smallest normal number, below which fp16 keeps only a few bits."""


@dataclass(frozen=True, eq=False)  # eq=False: compared with a tolerance (base_difference), never with ==
class BaseReference:
    """The frozen weights of the base model an adapter was tuned on, as far as loading needs to know them.

    The structure hash is exact (names and shapes); the values are compared with a tolerance, because no exact
    hash can agree across storage dtypes: a bf16 copy and an fp16 copy of one base each keep bits the other lost.
    """

    structure: str
    """sha256 (16 hex digits) of every frozen tensor's name and shape, sorted by name."""
    samples: np.ndarray
    """float32 (N,): up to 8 evenly strided values of each frozen tensor, in name order (NaN for meta tensors)."""

    def encode(self) -> str:
        """`samples` as base64 of little-endian float32 (safetensors metadata holds only strings)."""
        return base64.b64encode(self.samples.astype("<f4").tobytes()).decode("ascii")

    @staticmethod
    def decode(structure: str, samples: str) -> "BaseReference":
        return BaseReference(structure, np.frombuffer(base64.b64decode(samples), dtype="<f4").astype(np.float32))


def base_tensors(unet: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers of `unet` under the base model's names: a LoRA-injected model's frozen
    ``….to_q.base_layer.weight`` as ``….to_q.weight``, its LoRA factors left out (`vmc_fast.tuning.lora.base_name`),
    so that it is identified as the model it was injected into."""
    tensors = {}
    for name, tensor in [*unet.named_parameters(), *unet.named_buffers()]:
        base = base_name(name)
        if base is not None:
            tensors[base] = tensor
    return tensors


def _frozen_tensors(unet: nn.Module, exclude: set[str] | frozenset[str]) -> list[tuple[str, torch.Tensor]]:
    tensors = base_tensors(unet)
    return [(name, tensors[name]) for name in sorted(tensors) if name not in exclude]


def _sample(tensor: torch.Tensor, count: int) -> torch.Tensor:
    """`count` evenly strided values of `tensor`, the same positions whatever its dtype or device."""
    flat = tensor.detach().reshape(-1)
    step = max(1, flat.numel() // count)
    return flat[::step][:count]


def base_reference(unet: nn.Module, exclude: set[str] | frozenset[str] = frozenset()) -> BaseReference:
    """The `BaseReference` of `unet` without the tensors named in `exclude` (the adapter's own). Independent of
    the storage dtype (values are compared with a tolerance) and of the device."""
    structure = hashlib.sha256()
    samples = []
    for name, tensor in _frozen_tensors(unet, exclude):
        structure.update(f"{name}:{tuple(tensor.shape)};".encode())
        count = min(_VALUES_PER_TENSOR, tensor.numel())
        if tensor.device.type == "meta":
            samples.append(np.full(count, np.nan, np.float32))
        else:
            samples.append(_sample(tensor, _VALUES_PER_TENSOR).to("cpu", torch.float32).numpy())
    values = np.concatenate(samples) if samples else np.zeros(0, np.float32)
    return BaseReference(structure.hexdigest()[:16], values)


def base_difference(unet: nn.Module, reference: BaseReference,
                    exclude: set[str] | frozenset[str] = frozenset()) -> str | None:
    """None when `unet` (without `exclude`) is the base of `reference` up to BASE_RTOL/BASE_ATOL; else what
    differs, e.g. "its frozen weights differ (max relative difference 0.05 in conv_in.weight)"."""
    now = base_reference(unet, exclude)
    if now.structure != reference.structure or now.samples.shape != reference.samples.shape:
        return (f"its frozen tensors have other names or shapes (structure {reference.structure}, this model's "
                f"{now.structure})")
    close = np.isclose(now.samples, reference.samples, rtol=BASE_RTOL, atol=BASE_ATOL, equal_nan=True)
    if close.all():
        return None
    names = [name for name, t in _frozen_tensors(unet, exclude) for _ in range(min(_VALUES_PER_TENSOR, t.numel()))]
    relative = np.abs(now.samples - reference.samples) / np.maximum(np.abs(reference.samples), BASE_ATOL)
    relative = np.where(close, 0.0, np.nan_to_num(relative, nan=np.inf))
    worst = int(np.argmax(relative))
    return (f"its frozen weights differ in {int((~close).sum())} of {close.size} sampled values (max relative "
            f"difference {relative[worst]:.3g} in {names[worst]})")


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
    base_reference: BaseReference | None = None
    """Structure hash and sampled values of the base's frozen weights; None in adapters written before 2026-12."""
    sampling: dict = field(default_factory=dict)
    """How the training frames were taken from the video (start_frame, frame_stride, reverse, num_frames, size,
    resize, ..., frames: the source frame indices in training order, video: its absolute path); {} in older
    adapters."""
    encoded_prompt: str | None = None
    """The part of `prompt` the text encoder read (shorter when the prompt was longer than it reads); None when
    not recorded."""
    lora_rank: int = 0
    """LoRA rank of the adapter's factors (``<module>.lora_A.weight`` (r, in), ``.lora_B.weight`` (out, r)); 0:
    a full adapter (the tuned tensors themselves)."""
    lora_alpha: float | None = None
    """LoRA alpha (a layer's change is (alpha / r) B A); None for a full adapter."""

    @property
    def lora(self) -> LoraSettings | None:
        """Rank and alpha of a LoRA adapter; None for a full one."""
        return LoraSettings(self.lora_rank, self.lora_alpha or self.lora_rank) if self.lora_rank else None

    @property
    def prompt_truncated(self) -> bool:
        return self.encoded_prompt is not None and self.encoded_prompt != self.prompt

    def summary(self) -> dict:
        """The metadata as JSON-ready values, without the sampled base values (for sidecars and reports)."""
        record = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "base_reference"}
        record["base_structure"] = self.base_reference.structure if self.base_reference is not None else None
        record["prompt_truncated"] = self.prompt_truncated
        return record


def sampled_frames(sampling) -> list[int]:
    """Source frame indices a `vmc_fast.io.video.FrameSampling` takes, in the order the clip holds them
    (reversed with `reverse`): what adapters and generate's sidecar record as ``frames``."""
    frames = [sampling.start + sampling.stride * k for k in range(sampling.num_frames)]
    return frames[::-1] if sampling.reverse else frames


def save_adapter(path: str | Path, tensors: dict[str, torch.Tensor], *, base_model: str, fingerprint: str,
                 prompt: str, steps: int, final_loss: float, loss: str, num_frames: int, height: int, width: int,
                 extra: dict | None = None, base: BaseReference | None = None, sampling: dict | None = None,
                 encoded_prompt: str | None = None, lora: LoraSettings | None = None) -> Path:
    """Write the tuned tensors (name -> tensor, base model names; LoRA factors under `vmc_fast.tuning.lora`'s
    ``<module>.lora_A.weight`` / ``.lora_B.weight`` names, with `lora` their rank and alpha) and metadata
    atomically.

    `base` (from `base_reference` before any requantising) lets the adapter load into the same base stored in
    any dtype; without it only `fingerprint` is checked. `sampling` and `encoded_prompt`: see AdapterInfo.
    """
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
        "sampling": json.dumps(sampling or {}, sort_keys=True),
    }
    if base is not None:
        metadata.update(base_structure=base.structure, base_samples=base.encode())
    if encoded_prompt is not None:
        metadata["encoded_prompt"] = encoded_prompt
    if lora is not None:
        metadata.update(lora_rank=str(lora.rank), lora_alpha=repr(float(lora.alpha)))
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
        base_reference=BaseReference.decode(meta["base_structure"], meta["base_samples"])
        if "base_samples" in meta else None,
        sampling=json.loads(meta.get("sampling", "{}")), encoded_prompt=meta.get("encoded_prompt"),
        lora_rank=int(meta.get("lora_rank", 0)),
        lora_alpha=float(meta["lora_alpha"]) if "lora_alpha" in meta else None,
    )
    return tensors, info


def apply_adapter(unet: nn.Module, path: str | Path, *, fingerprint: str | None = None) -> AdapterInfo:
    """Put an adapter into `unet` in place. A full adapter's tensors are copied into the tuned parameters (no new
    modules, so a compiled graph stays valid); a LoRA adapter's factors go into PEFT LoRA layers, injected on its
    modules first when `unet` carries none (`vmc_fast.tuning.lora.load_lora`; rank and alpha from its metadata).

    Refuses (VmcError, nothing copied or injected) an adapter holding NaN or inf (from a run that diverged), and
    one made for another base model: names or shapes it does not have,
    or frozen weights that differ from the adapter's `BaseReference` beyond BASE_RTOL/BASE_ATOL, whatever dtype
    either copy is stored in. Adapters without a BaseReference (written before 2026-12) are checked by their
    fingerprint hash (`base_fingerprint`, current or legacy scheme), which `fingerprint` may pass when known.
    """
    tensors, info = read_adapter(path)
    bad = [name for name, value in tensors.items() if not torch.isfinite(value).all()]
    if bad:
        raise VmcError(f"adapter {path}: {len(bad)} of {len(tensors)} tensors hold NaN or inf (e.g. {bad[0]}); "
                       f"it comes from a run that diverged; retrain it (lower --lr, or --precision bf16 or fp32)")
    if is_lora_adapter(tensors):
        return _apply_lora(unet, path, tensors, info, fingerprint)
    carried = lora_settings(unet)
    if carried is not None:
        raise VmcError(f"adapter {path} is a full adapter, and this model carries a LoRA (rank {carried.rank}) that "
                       f"would add its own change to it; load the adapter into a freshly loaded model")
    params = {base: p for name, p in unet.named_parameters() if (base := base_name(name)) is not None}
    unknown = [name for name in tensors if name not in params]
    wrong = [name for name in tensors if name in params and params[name].shape != tensors[name].shape]
    _refuse_mismatch(path, info, unknown, wrong)
    _check_base(unet, path, info, set(tensors), fingerprint)
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
    return info


def _apply_lora(unet: nn.Module, path: str | Path, tensors: dict[str, torch.Tensor], info: AdapterInfo,
                fingerprint: str | None) -> AdapterInfo:
    """`apply_adapter` of a LoRA adapter: its factors' modules must be linear layers of `unet` of matching sizes."""
    pairs = factor_pairs(tensors, str(path))
    modules = dict(unet.named_modules())
    unknown, wrong = [], []
    for name, (down, up) in pairs.items():
        layer = modules.get(name)
        layer = getattr(layer, "base_layer", layer)  # an already injected LoRA layer wraps the linear
        if not isinstance(layer, nn.Linear):
            unknown.append(f"{name}.lora_A.weight")
        elif (down.shape[1], up.shape[0]) != (layer.in_features, layer.out_features):
            wrong.append(f"{name}.lora_A.weight")
    _refuse_mismatch(path, info, unknown, wrong)
    _check_base(unet, path, info, set(), fingerprint)
    rank = next(iter(pairs.values()))[0].shape[0]
    settings = info.lora or LoraSettings(rank, rank)  # a file of another tool without our metadata: alpha = r
    if settings.rank != rank:
        raise VmcError(f"adapter {path}: its metadata says LoRA rank {settings.rank} but its factors have rank "
                       f"{rank}; the file is damaged, retrain it")
    load_lora(unet, pairs, settings)
    return info if info.lora is not None else dataclasses.replace(info, lora_rank=rank, lora_alpha=float(rank))


def _refuse_mismatch(path, info: AdapterInfo, unknown: list[str], wrong: list[str]) -> None:
    if unknown or wrong:
        example = (unknown or wrong)[0]
        raise VmcError(f"adapter {path} was made for another base model ({info.base_model}): "
                       f"{len(unknown)} unknown and {len(wrong)} mis-shaped tensors (e.g. {example}); "
                       f"load it into {info.base_model}")


def _check_base(unet: nn.Module, path, info: AdapterInfo, exclude: set[str], fingerprint: str | None) -> None:
    """VmcError when `unet`'s frozen weights (without `exclude`) are not the adapter's base."""
    if info.base_reference is not None:
        difference = base_difference(unet, info.base_reference, exclude=exclude)
    else:
        fingerprint = fingerprint or base_fingerprint(unet, exclude=exclude)
        mismatch = fingerprint != info.base_fingerprint and \
            base_fingerprint(unet, exclude, legacy=True) != info.base_fingerprint
        difference = f"this model's fingerprint is {fingerprint}" if mismatch else None
    if difference is not None:
        raise VmcError(f"adapter {path} was made for base model {info.base_model} (fingerprint "
                       f"{info.base_fingerprint}), not this one: {difference}; load it into the model it was "
                       f"trained on")
