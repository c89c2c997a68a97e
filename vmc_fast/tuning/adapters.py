"""Motion adapters: safetensors files under the base model's own tensor names, plus metadata.

Two storages (metadata ``storage``; files without it are ``full``):
- ``delta`` (the default, ``--adapter-dtype bf16``): each tensor holds the change W - W0 from the base value W0
  in bfloat16, half the bytes of full fp32 tensors (Show-1: 134,553,600 tuned values, 538 MB -> 269 MB). Loading
  adds it to the base value. The reconstruction error of W0 + bf16(W - W0) against the tuned W is measured when
  the file is written and recorded (``reconstruction``: relative to the change's norm, and the largest absolute
  error of a weight). The base values of the tuned tensors travel as a `BaseReference` too.
- ``full`` (``--adapter-dtype fp32``, and every adapter written before 2026-12): the tuned tensors themselves, fp32.

Files are written atomically (temporary file in the same folder, fsync, rename), so a crash never leaves a
half-written adapter, and an adapter already written for the same request is never rewritten (write-once). What
the base model's frozen weights were travels in the metadata (`BaseReference`: a hash of their names and shapes,
and a few sampled values of each); loading into another base model is refused.
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
STORAGES = {"bf16": "delta", "fp32": "full"}
"""--adapter-dtype -> how the tensors are stored: bf16 changes from the base, or the fp32 tensors themselves."""


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
    return tensors_reference(_frozen_tensors(unet, exclude))


def tensors_reference(tensors: list[tuple[str, torch.Tensor]]) -> BaseReference:
    """The `BaseReference` of (name, tensor) pairs in the order given (`base_reference` sorts them by name)."""
    structure = hashlib.sha256()
    samples = []
    for name, tensor in tensors:
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
    storage: str = "full"
    """``full``: the tensors are the tuned values; ``delta``: they are changes from the base values (bf16)."""
    reconstruction: dict = field(default_factory=dict)
    """A delta adapter's error measured when written: ``relative_error`` (||W0 + d - W||_F / ||W - W0||_F over all
    tensors), ``max_abs_error`` (max |W0 + d - W|), ``dtype``; {} for full adapters."""
    delta_base: BaseReference | None = None
    """A delta adapter's reference of the base values W0 of its own tensors (names sorted); None for full ones."""
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
        record = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name not in ("base_reference", "delta_base")}
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
                 encoded_prompt: str | None = None, base_tensors: dict[str, torch.Tensor] | None = None,
                 dtype: str = "fp32", lora: LoraSettings | None = None) -> Path:
    """Write the tuned tensors (name -> tensor, base model names; LoRA factors under `vmc_fast.tuning.lora`'s
    ``<module>.lora_A.weight`` / ``.lora_B.weight`` names, with `lora` their rank and alpha) and metadata
    atomically.

    `base` (from `base_reference` before any requantising) lets the adapter load into the same base stored in
    any dtype; without it only `fingerprint` is checked. `sampling` and `encoded_prompt`: see AdapterInfo.
    dtype ``bf16`` stores each tensor as its change from `base_tensors` (the same names: the values before
    tuning) in bfloat16 and records the reconstruction error; ``fp32`` stores the tensors themselves. LoRA factors
    are already the change: ``bf16`` stores them rounded to bfloat16 (error recorded the same way). An adapter
    already at `path` with the same ``extra["request_hash"]`` (not None) is kept as it is (write-once).
    Raises ValueError for another dtype, or bf16 without the base value of every tensor.
    """
    if dtype not in STORAGES:
        raise ValueError(f"--adapter-dtype {dtype}: must be one of {', '.join(STORAGES)}")
    request = (extra or {}).get("request_hash")
    if request is not None and written_request(path) == request:
        return Path(path)  # written by an earlier run for the same request: finished adapters are never rewritten
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
        "storage": STORAGES[dtype] if lora is None else STORAGES["fp32"],
    }
    if base is not None:
        metadata.update(base_structure=base.structure, base_samples=base.encode())
    if encoded_prompt is not None:
        metadata["encoded_prompt"] = encoded_prompt
    if lora is not None:
        metadata.update(lora_rank=str(lora.rank), lora_alpha=repr(float(lora.alpha)))
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    if dtype == "bf16" and lora is not None:  # the factors are already the change: stored themselves, in bf16
        tensors, reconstruction = rounded_tensors(tensors)
        metadata.update(reconstruction=json.dumps(reconstruction, sort_keys=True))
    elif dtype == "bf16":
        tensors, reconstruction, delta_base = delta_tensors(tensors, base_tensors or {})
        metadata.update(reconstruction=json.dumps(reconstruction, sort_keys=True),
                        delta_base_structure=delta_base.structure, delta_base_samples=delta_base.encode())
    return atomic_save_file(tensors, path, metadata)


def delta_tensors(tensors: dict[str, torch.Tensor], base_tensors: dict[str, torch.Tensor],
                  dtype: torch.dtype = torch.bfloat16) -> tuple[dict[str, torch.Tensor], dict, BaseReference]:
    """(name -> bf16 change d = W - W0, the reconstruction error of W0 + d against W, the `BaseReference` of the
    W0 by sorted name). Errors are measured in float64 on the CPU; the relative error is over all tensors,
    ||W0 + d - W||_F / ||W - W0||_F (0 when nothing changed). ValueError when a base value is missing or
    mis-shaped."""
    missing = [n for n in tensors if n not in base_tensors or base_tensors[n].shape != tensors[n].shape]
    if missing:
        raise ValueError(f"a bf16 delta adapter needs the base value of every tuned tensor; {len(missing)} missing "
                         f"or mis-shaped (e.g. {missing[0]})")
    deltas, lost, total, worst = {}, 0.0, 0.0, 0.0
    for name, tuned in tensors.items():
        before = base_tensors[name].detach().to("cpu", torch.float64)
        change = tuned.double() - before
        deltas[name] = change.to(dtype).contiguous()
        # W0 + d in float32, as apply_adapter adds them
        error = (base_tensors[name].to("cpu", torch.float32) + deltas[name].float()).double() - tuned.double()
        lost, total = lost + error.square().sum().item(), total + change.square().sum().item()
        worst = max(worst, error.abs().max().item() if error.numel() else 0.0)
    reference = tensors_reference([(n, base_tensors[n]) for n in sorted(tensors)])
    reconstruction = {"dtype": str(dtype).removeprefix("torch."), "max_abs_error": worst,
                      "relative_error": (lost / total) ** 0.5 if total > 0 else 0.0}
    return deltas, reconstruction, reference


def rounded_tensors(tensors: dict[str, torch.Tensor],
                    dtype: torch.dtype = torch.bfloat16) -> tuple[dict[str, torch.Tensor], dict]:
    """(the tensors rounded to `dtype`, the error: ``relative_error`` ||round(x) - x||_F / ||x||_F over all tensors
    (0 when all are zero), ``max_abs_error``, ``dtype``), measured in float64 on the CPU."""
    rounded, lost, total, worst = {}, 0.0, 0.0, 0.0
    for name, value in tensors.items():
        rounded[name] = value.to(dtype).contiguous()
        error = rounded[name].double() - value.double()
        lost, total = lost + error.square().sum().item(), total + value.double().square().sum().item()
        worst = max(worst, error.abs().max().item() if error.numel() else 0.0)
    return rounded, {"dtype": str(dtype).removeprefix("torch."), "max_abs_error": worst,
                     "relative_error": (lost / total) ** 0.5 if total > 0 else 0.0}


def written_request(path: str | Path) -> str | None:
    """The request hash recorded in the adapter at `path` (None: no file, not recorded, or unreadable)."""
    from safetensors import safe_open

    if not Path(path).is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            extra = json.loads((handle.metadata() or {}).get("extra", "{}"))
    except Exception:  # a file we cannot read is not ours to judge here; loading it will say what is wrong
        return None
    return extra.get("request_hash")


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
        storage=meta.get("storage", "full"), reconstruction=json.loads(meta.get("reconstruction", "{}")),
        delta_base=BaseReference.decode(meta["delta_base_structure"], meta["delta_base_samples"])
        if "delta_base_samples" in meta else None,
        lora_rank=int(meta.get("lora_rank", 0)),
        lora_alpha=float(meta["lora_alpha"]) if "lora_alpha" in meta else None,
    )
    if info.storage not in STORAGES.values():
        raise VmcError(f"adapter {path}: unknown storage {info.storage!r} (written by a newer vmc-fast?); upgrade "
                       f"vmc-fast")
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

    A delta adapter (bf16 changes) sets each tensor to W0 + d, W0 being the base value: the value the tensor had
    before the first adapter was applied to this `unet` (kept on the CPU, see `_base_values`), so applying one
    adapter after another gives the last one, as full adapters do. Its W0 must match the adapter's
    `AdapterInfo.delta_base` within the same tolerance, else it is refused too.
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
    base_values = _base_values(unet, params, tensors)
    if info.storage == "delta":
        tensors = _reconstructed(path, info, tensors, base_values)
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
_BASE_VALUES = "_vmc_fast_base_values"
"""Attribute of a UNet holding {name: CPU copy} of the values its adapted tensors had before any adapter."""


def _base_values(unet: nn.Module, params: dict[str, nn.Parameter], names) -> dict[str, torch.Tensor]:
    """The base value of each of `names` in `unet`: kept from before the first adapter touched it (a CPU copy,
    made now for tensors no adapter has touched yet)."""
    kept = unet.__dict__.setdefault(_BASE_VALUES, {})
    for name in names:
        if name not in kept:
            kept[name] = params[name].detach().to("cpu", copy=True)
    return {name: kept[name] for name in names}


def _reconstructed(path, info: AdapterInfo, deltas: dict[str, torch.Tensor],
                   base_values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """W0 + d of each delta, float32 (VmcError when the W0 are not the adapter's base values)."""
    if info.delta_base is not None:
        names = sorted(deltas)
        now = tensors_reference([(n, base_values[n]) for n in names])
        close = now.samples.shape == info.delta_base.samples.shape and np.isclose(
            now.samples, info.delta_base.samples, rtol=BASE_RTOL, atol=BASE_ATOL, equal_nan=True).all()
        if now.structure != info.delta_base.structure or not close:
            raise VmcError(f"adapter {path} was made for base model {info.base_model}, not this one: the base values "
                           f"of its tuned tensors differ; load it into the model it was trained on")
    return {name: base_values[name].float() + delta.float() for name, delta in deltas.items()}
