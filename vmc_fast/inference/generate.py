"""`vmc-fast generate`: a motion adapter in, a video out (docs/design.md section 1, "Inference").

Steps: load the backbone, copy the motion adapter into its temporal Q/K/V, encode the prompts once (then free the
encoder), DDIM-invert the input clip with the empty prompt into x_T (`vmc_fast.inference.ddim`), sample from x_T
with the target prompt and classifier-free guidance, decode (latent models), run the frozen cascade when the model
has one (`vmc_fast.inference.cascade`: Show-1's interpolation and two super-resolution stages), and write the
video and its JSON sidecar atomically.

Only the keyframe UNet carries the motion adapter; the cascade stages are used frozen, as published.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from vmc_fast import __version__
from vmc_fast.config import GENERATE_SAMPLING_DEFAULTS, RECORDED_AS, GenerateConfig
from vmc_fast.errors import VmcError
from vmc_fast.inference.ddim import (
    StepCallback,
    decode,
    invert_clip,
    latent_shape,
    sample,
)
from vmc_fast.io.files import write_text_atomic
from vmc_fast.io.video import write_video_atomic
from vmc_fast.runtime import autocast, compute_dtype, resolve_device, resolve_precision

DEFAULT_MODEL = "tiny-random"
"""The base model when neither --model nor an adapter names one."""


@dataclass
class GenerateResult:
    """What `generate` produced."""

    frames: torch.Tensor
    """float32 (3, F, H, W) in [-1, 1] on the CPU: the video written. Single-stage models: the sampled frames
    (decoded through the VAE for latent models); Show-1: the cascade's 4F-3 frames at its final size, or the
    keyframes with keyframes_only."""
    x_T: torch.Tensor
    """float32 (1, C, F, h, w) on the CPU: the starting point of sampling (inverted clip or seeded noise)."""
    output: Path | None
    """The written video, or None when no output was asked for."""
    seconds: dict[str, float]
    """Wall time per phase: load, adapter, prompts, invert, sample, decode, then interpolate, sr1, sr2 (cascade
    models), write."""
    note: str = ""
    """What this run left out (e.g. the cascade with keyframes_only); empty when nothing was left out."""
    inverted: dict | None = None
    """--video: what was inverted: ``video`` (absolute path), ``sampling`` (as used) and ``frames`` (source frame
    indices in clip order); None when sampling started from noise."""
    prompts: dict = dataclasses.field(default_factory=dict)
    """Role (prompt, negative, inversion) -> what its text encoder read (`TokenReport` fields), or None."""


# ---------------------------------------------------------------------------------------------- generate


def generate(cfg: GenerateConfig, backbone=None, on_step: StepCallback | None = None) -> GenerateResult:
    """Run VMC inference for the keyframe model and write the video (see the module docstring).

    `backbone` may be passed to reuse a loaded model (it must be the config's base model; the adapter is copied
    into its UNet in place). Models with a cascade (Show-1) then run it unless cfg.keyframes_only.
    Raises VmcError for an adapter of another base model, ValueError for options that do not fit the model.
    """
    model_from_adapter = cfg.model_id is None and cfg.adapter is not None
    cfg = resolve_model(cfg)
    _warn_ignored(cfg)
    seconds: dict[str, float] = {}
    with timed(seconds, "load"):
        backbone = backbone or _load(cfg, model_from_adapter)
        device = next(backbone.unet.parameters()).device
    with timed(seconds, "adapter"):
        info = _apply_adapter(backbone, cfg.adapter)
    from_adapter = [name for name in GENERATE_SAMPLING_DEFAULTS if getattr(cfg, name) is None and info is not None]
    cfg = resolve_sampling(cfg, info)
    size = _size(cfg, backbone, info)
    with timed(seconds, "prompts"):
        states, token_reports = _prompt_states(cfg, backbone, device)
    with autocast(cfg.precision, device):
        with timed(seconds, "invert"):
            x_T, inverted = _starting_point(cfg, backbone, states, size, device, on_step, from_adapter)
        with timed(seconds, "sample"):
            generator = torch.Generator(device).manual_seed(cfg.seed)
            guided = cfg.guidance_scale != 1.0
            x0 = sample(backbone.unet, x_T, states["prompt"], states["negative"] if guided else None,
                        backbone.noise_scheduler.config, cfg.num_inference_steps, cfg.guidance_scale, generator,
                        on_step)
    with timed(seconds, "decode"):  # outside autocast: the VAE decodes in its own dtype
        frames = decode(backbone, x0)
    _check_finite(frames, "sampled frames", cfg.precision, device)  # before a cascade spends minutes on them
    with autocast(cfg.precision, device):
        frames, note = _cascade(cfg, backbone, frames, states, seconds, on_step)
    _check_finite(frames, "final frames", cfg.precision, device)
    result = GenerateResult(frames=frames, x_T=x_T.cpu(), output=None, seconds=seconds, note=note,
                            inverted=inverted, prompts=token_reports)
    with timed(seconds, "write"):
        result.output = _write(cfg, result, info) if cfg.output else None
    return result


def _check_finite(frames: torch.Tensor, what: str, precision: str, device: torch.device) -> None:
    """VmcError when `frames` hold NaN or inf (a black or garbled video would otherwise be written)."""
    if torch.isfinite(frames).all():
        return
    precision = resolve_precision(precision, device)
    fix = ("use --precision bf16 or fp32" if precision == "fp16" else
           "use --precision fp32" if precision == "bf16" else "check the adapter and the model's weights")
    raise VmcError(f"generate: the {what} hold NaN or inf (precision {precision}); nothing was written; {fix}")


def resolve_model(cfg: GenerateConfig) -> GenerateConfig:
    """The config with its base model filled in: --model, else the adapter's base, else DEFAULT_MODEL."""
    if cfg.model_id is not None:
        return cfg
    if cfg.adapter is None:
        return dataclasses.replace(cfg, model_id=DEFAULT_MODEL)
    from vmc_fast.tuning.adapters import read_adapter

    return dataclasses.replace(cfg, model_id=read_adapter(Path(cfg.adapter).expanduser())[1].base_model)


def resolve_sampling(cfg: GenerateConfig, info) -> GenerateConfig:
    """--video sampling (start_frame, frame_stride, reverse, resize, background, sample_fps) filled in: each option
    given, else the adapter's record of how its training frames were taken, else GENERATE_SAMPLING_DEFAULTS.
    Without --video the config is returned unchanged."""
    if cfg.video is None:
        return cfg
    recorded = dict(info.sampling) if info is not None else {}
    if info is not None and "reverse" in info.extra:  # adapters before 2026-12 recorded only this one
        recorded.setdefault("reverse", info.extra["reverse"])
    values = {name: getattr(cfg, name) if getattr(cfg, name) is not None
              else recorded.get(RECORDED_AS.get(name, name), default)
              for name, default in GENERATE_SAMPLING_DEFAULTS.items()}
    return dataclasses.replace(cfg, **values)


def _cascade(cfg: GenerateConfig, backbone, keyframes: torch.Tensor, states: dict[str, torch.Tensor],
             seconds: dict[str, float], on_step: StepCallback | None) -> tuple[torch.Tensor, str]:
    """(video (3, F', H', W'), note): the keyframes through the backbone's frozen cascade, unless it has none."""
    if backbone.cascade is None:
        if cfg.keyframes_only or cfg.cascade_steps is not None or cfg.stages:
            warnings.warn(f"--keyframes-only/--cascade-steps/--stage: ignored, {cfg.model_id} has no cascade stages",
                          stacklevel=3)
        return keyframes, ""
    if cfg.keyframes_only:
        return keyframes, ("keyframes only (--keyframes-only): the interpolation and super-resolution stages "
                           "were not run")
    from vmc_fast.inference.cascade import CascadeSettings, run_cascade

    video = run_cascade(backbone.cascade.with_sources(cfg.stages), keyframes, states, cfg.prompt,
                        CascadeSettings().with_steps(cfg.cascade_steps), cfg.seed, on_step,
                        timer=functools.partial(timed, seconds))
    return video, ""


def _warn_ignored(cfg: GenerateConfig) -> None:
    defaults = GenerateConfig.__dataclass_fields__
    if cfg.video is None:
        unused = [name for name in ("inversion_prompt", "inversion_steps", *GENERATE_SAMPLING_DEFAULTS)
                  if getattr(cfg, name) != defaults[name].default]
        if unused:
            warnings.warn(f"{', '.join(unused)}: ignored without --video (sampling starts from noise)", stacklevel=3)
    elif cfg.inversion_steps != cfg.num_inference_steps:
        warnings.warn(f"--inversion-steps {cfg.inversion_steps} differs from --steps {cfg.num_inference_steps}: "
                      f"x_T is then taken at another noise level than sampling starts from", stacklevel=3)


def _load(cfg: GenerateConfig, model_from_adapter: bool = False):
    from vmc_fast.models.registry import LoadOptions, load_backbone

    # Nothing is trained here, so the frozen weights are stored in the compute dtype.
    device = resolve_device(cfg.device)
    try:
        return load_backbone(cfg.model_id, LoadOptions(dtype=compute_dtype(cfg.precision, device),
                                                       device=str(device)))
    except VmcError as exc:
        if not model_from_adapter:
            raise
        raise VmcError(f"adapter {cfg.adapter} names base model {cfg.model_id!r} (recorded when it was trained), "
                       f"which cannot be loaded here: {exc}; pass --model with its location") from exc


def _apply_adapter(backbone, adapter: str | None):
    """Copy the adapter into the UNet (refused for another base model); its metadata, or None."""
    if adapter is None:
        return None
    from vmc_fast.tuning.adapters import apply_adapter

    return apply_adapter(backbone.unet, Path(adapter).expanduser())


def _size(cfg: GenerateConfig, backbone, info) -> tuple[int, int, int]:
    """(num_frames, height, width) in pixels: the config's, else the adapter's, else the model's. ValueError
    naming --height/--width/--frames when the model cannot take that size (`ModelSpec.size_problem`,
    `ModelSpec.frames_problem`)."""
    from vmc_fast.models.registry import model_spec

    def pick(name: str) -> int:
        value = getattr(cfg, name)
        if value is not None:
            return value
        return getattr(info, name) if info is not None else getattr(backbone, name)

    size = pick("num_frames"), pick("height"), pick("width")
    spec = model_spec(cfg.model_id)
    problems = [spec.size_problem(option, value) for option, value in (("--height", size[1]), ("--width", size[2]))]
    problems.append(spec.frames_problem("--frames", size[0]))
    if any(problems):
        raise ValueError(next(p for p in problems if p))
    return size


def _prompt_states(cfg: GenerateConfig, backbone, device: torch.device) -> tuple[dict[str, torch.Tensor], dict]:
    """({"prompt", "negative", "inversion"} -> (1, L, D) float32 states, role -> what its encoder read (a dict of
    `TokenReport` fields, or None)); the encoder is built at most once, and long prompts warn."""
    from vmc_fast.io.prompts import embedding_model_key, encode_prompts

    texts = {"prompt": cfg.prompt, "negative": cfg.negative_prompt, "inversion": cfg.inversion_prompt}
    encoded = encode_prompts(list(dict.fromkeys(texts.values())), embedding_model_key(cfg.model_id, backbone.family),
                             cfg.cache_dir, backbone.load_text_encoder)
    states = {role: encoded[text].states.unsqueeze(0).to(device) for role, text in texts.items()}
    reports = {role: dataclasses.asdict(encoded[text].tokens) if encoded[text].tokens is not None else None
               for role, text in texts.items()}
    return states, reports


def _starting_point(cfg: GenerateConfig, backbone, states: dict[str, torch.Tensor], size: tuple[int, int, int],
                    device: torch.device, on_step: StepCallback | None,
                    from_adapter: list[str] = ()) -> tuple[torch.Tensor, dict | None]:
    """(x_T (1, C, F, h, w) float32, what was inverted): the inverted input clip, sampled as `resolve_sampling`
    chose (`from_adapter`: the settings taken from the adapter, named when the clip cannot give them), or seeded
    Gaussian noise without one (then None)."""
    if cfg.video is None:
        generator = torch.Generator("cpu").manual_seed(cfg.seed)
        return torch.randn(latent_shape(backbone, size), generator=generator).to(device), None
    from vmc_fast.io.video import FrameSampling, read_clip

    num_frames, height, width = size
    sampling = FrameSampling(num_frames=num_frames, height=height, width=width, stride=cfg.frame_stride,
                             start=cfg.start_frame, resize=cfg.resize, reverse=cfg.reverse,
                             background=cfg.background, fps=cfg.sample_fps)
    video = Path(cfg.video).expanduser().resolve()
    try:
        pixels, clip = read_clip(video, sampling)
    except VmcError as exc:
        if not from_adapter:
            raise
        taken = ", ".join(_as_option(name, getattr(cfg, name)) for name in from_adapter if getattr(cfg, name) is not None)
        raise VmcError(f"{exc} (generate took {taken} from the adapter, as it was tuned; pass them to override)") \
            from exc
    x_T = invert_clip(backbone, backbone.encode_pixels(pixels.unsqueeze(0).to(device)).float(), states["inversion"],
                      cfg.inversion_steps, on_step)
    return x_T, {"video": str(video), "sampling": dataclasses.asdict(sampling), "frames": list(clip.frame_indices)}


def _as_option(name: str, value) -> str:
    """How `value` of field `name` is written on the command line: ``--start-frame 30``, ``--no-reverse``."""
    flag = name.replace("_", "-")
    if isinstance(value, bool):
        return f"--{flag}" if value else f"--no-{flag}"
    return f"--{flag} {value}"


def _write(cfg: GenerateConfig, result: GenerateResult, info) -> Path:
    """The video, then its JSON sidecar (same name, .json): every setting (resolved: model, sampling), the seed,
    where sampling started and the frames inverted, what the text encoder read of each prompt, the adapter's
    metadata, the output size, timings and versions."""
    output = write_video_atomic(result.frames, cfg.output, cfg.fps)
    record = {
        "video": str(output), "frames": list(result.frames.shape[1:]), "config": dataclasses.asdict(cfg),
        "model": cfg.model_id, "seed": cfg.seed, "start": "noise" if result.inverted is None else "inversion",
        "inverted": result.inverted, "prompts": result.prompts,
        "adapter_path": str(Path(cfg.adapter).expanduser().resolve()) if cfg.adapter else None,
        "adapter": info.summary() if info is not None else None, "note": result.note,
        "seconds": {k: round(v, 3) for k, v in result.seconds.items()}, "versions": _versions(),
        "vmc_fast": __version__,
    }
    write_text_atomic(output.with_suffix(".json"), json.dumps(record, indent=1, default=str) + "\n")
    return output


def _versions() -> dict[str, str]:
    import importlib.metadata

    versions = {"vmc_fast": __version__, "torch": torch.__version__}
    for name in ("diffusers", "transformers", "av"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


@contextlib.contextmanager
def timed(seconds: dict[str, float], name: str):
    """Records the wall time of the block as seconds[name]."""
    start = time.perf_counter()
    yield
    seconds[name] = time.perf_counter() - start
