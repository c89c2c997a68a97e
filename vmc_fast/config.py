"""One config tree for a tuning run: dataclasses validated when built, printed at start, saved beside outputs.

User mistakes raise ValueError naming the field; the CLI turns them into one clear line.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from vmc_fast.tuning.compile import COMPILE_MODES
from vmc_fast.tuning.losses import LOSS_KINDS
from vmc_fast.models.attention import BACKENDS
from vmc_fast.tuning.precision import FROZEN_DTYPES as PRECISION_FROZEN_DTYPES
from vmc_fast.tuning.surgery import DEFAULT_TRAINABLE_PATTERN

RESIZE_MODES = ("crop", "squash")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
OPTIMIZERS = ("adamw", "adamw8bit")
STRATEGIES = ("auto", "videos", "zero")
# The modules that implement each lever own its list of choices; the config only adds "auto" / hides "math".
FROZEN_DTYPES = ("auto", *PRECISION_FROZEN_DTYPES)
ATTENTION_BACKENDS = tuple(b for b in BACKENDS if b != "math")  # "math" is the test reference, not a user choice



def check_field(condition: bool, field_name: str, message: str) -> None:
    """ValueError naming the option when `condition` fails (the CLI shows it as one line)."""
    if not condition:
        raise ValueError(f"{field_name}: {message}")


@dataclass
class DataConfig:
    """Which frames of which videos, at what size."""

    videos: str = ""
    """A video file (mp4, webm, mov, gif), a folder of frame images, or a folder of those."""
    num_frames: int | None = None
    """Frames sampled per video; None = the model's own (8 for Show-1)."""
    frame_stride: int = 1
    """Take every k-th frame of the source."""
    start_frame: int = 0
    """First source frame to take."""
    height: int | None = None
    """Training height in pixels; None = the model's own."""
    width: int | None = None
    """Training width in pixels; None = the model's own."""
    resize: str = "crop"
    """``crop``: keep the aspect by center-cropping; ``squash``: stretch (the paper's code)."""
    reverse: bool = False
    """Play the clip backwards (the paper's "walking backward" experiment)."""

    def __post_init__(self) -> None:
        check_field(self.num_frames is None or 2 <= self.num_frames <= 64, "--frames", "must be between 2 and 64")
        check_field(self.frame_stride >= 1, "--frame-stride", "must be at least 1")
        check_field(self.start_frame >= 0, "--start-frame", "must be 0 or more")
        for name in ("height", "width"):
            value = getattr(self, name)
            check_field(value is None or 8 <= value <= 4096, f"--{name}", "must be between 8 and 4096 pixels")
        check_field(self.resize in RESIZE_MODES, "--resize", f"must be one of {', '.join(RESIZE_MODES)}")


@dataclass
class ModelConfig:
    """Which backbone and what to tune in it."""

    model_id: str = "tiny-random"
    """Built-in name, hub id or local folder."""
    trainable_pattern: str = DEFAULT_TRAINABLE_PATTERN
    """Regex over parameter names selecting the tuned tensors."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (less memory, about a third more compute)."""
    frozen_dtype: str = "auto"
    """Storage of frozen weights: ``auto`` (bf16 on GPU, fp32 on CPU), fp32, bf16, or int8 (8-bit linears via
    bitsandbytes, fp8 convolutions upcast per layer). Trainable Q/K/V always stay fp32."""
    attention: str = "sdpa"
    """Temporal attention backend: sdpa, xformers (CUDA, optional) or triton (kernels/)."""
    compile: str = "off"
    """torch.compile of the UNet: off, regional (repeated blocks) or full."""

    def __post_init__(self) -> None:
        check_field(bool(self.model_id.strip()), "--model", "must not be empty")
        check_field(self.frozen_dtype in FROZEN_DTYPES, "--frozen-dtype", f"must be one of {', '.join(FROZEN_DTYPES)}")
        check_field(self.attention in ATTENTION_BACKENDS, "--attention", f"must be one of {', '.join(ATTENTION_BACKENDS)}")
        check_field(self.compile in COMPILE_MODES, "--compile", f"must be one of {', '.join(COMPILE_MODES)}")
        import re

        try:
            re.compile(self.trainable_pattern)
        except re.error as exc:
            raise ValueError(f"--trainable: {self.trainable_pattern!r} is not a valid regex ({exc})") from exc


@dataclass
class TrainConfig:
    """The optimisation recipe; defaults are the paper's."""

    steps: int = 400
    """Optimizer steps per video."""
    learning_rate: float = 1e-4
    """AdamW learning rate (constant)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    optimizer: str = "adamw"
    """``adamw`` (torch) or ``adamw8bit`` (bitsandbytes)."""
    grad_clip: float = 1.0
    """Max global gradient norm; 0 disables clipping."""
    loss: str = "cos"
    """Loss kind: cos, l2, cos-frames-abs or eps-mse."""
    loss_stride: int = 1
    """Frame offset c of the noise residuals."""
    snr_weight: bool = False
    """Weight the l2 loss by (1 - abar_t) / abar_t."""
    seed: int = 0
    """Seeds noise, timesteps and everything random in a run."""
    precision: str = "auto"
    """Compute precision: ``auto`` = bf16 autocast on GPU, fp32 on CPU; ``fp16`` autocast is what the paper's
    code used (kept for comparison; bf16 needs no loss scaling)."""
    timestep_range: tuple[int, int] | None = None
    """Sample t uniformly in [lo, hi); None = [0, T)."""

    def __post_init__(self) -> None:
        check_field(1 <= self.steps <= 1_000_000, "--steps", "must be between 1 and 1,000,000")
        check_field(0 < self.learning_rate < 1, "--lr", "must be in (0, 1)")
        check_field(self.weight_decay >= 0, "--weight-decay", "must be 0 or more")
        check_field(self.grad_clip >= 0, "--grad-clip", "must be 0 or more (0 disables)")
        check_field(self.loss in LOSS_KINDS, "--loss", f"must be one of {', '.join(LOSS_KINDS)}")
        check_field(self.loss_stride >= 1, "--loss-stride", "must be at least 1")
        check_field(self.precision in PRECISIONS, "--precision", f"must be one of {', '.join(PRECISIONS)}")
        check_field(self.optimizer in OPTIMIZERS, "--optimizer", f"must be one of {', '.join(OPTIMIZERS)}")
        check_field(self.seed >= 0, "--seed", "must be 0 or more")
        if self.timestep_range is not None:
            lo, hi = self.timestep_range
            check_field(0 <= lo < hi, "timestep_range", "must satisfy 0 <= lo < hi")


@dataclass
class ParallelConfig:
    """How ranks share the work."""

    num_ranks: int = 1
    """Processes (one per GPU; CPU ranks with gloo when there is no CUDA)."""
    strategy: str = "auto"
    """``videos``: each rank tunes its own videos; ``zero``: all ranks tune one video with DeepSpeed ZeRO;
    ``auto``: videos when there are at least as many videos as ranks, else zero."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage for the ``zero`` strategy (0-3)."""
    deepspeed_config: str | None = None
    """A DeepSpeed JSON config to start from (ds_configs/ has examples)."""

    def __post_init__(self) -> None:
        check_field(1 <= self.num_ranks <= 1024, "--gpus", "must be between 1 and 1024")
        check_field(self.strategy in STRATEGIES, "--strategy", f"must be one of {', '.join(STRATEGIES)}")
        check_field(self.zero_stage in (0, 1, 2, 3), "--zero-stage", "must be 0, 1, 2 or 3")
        if self.deepspeed_config is not None:
            check_field(Path(self.deepspeed_config).is_file(), "--deepspeed-config",
                   f"{self.deepspeed_config} is not a file")


@dataclass
class RunConfig:
    """A whole `vmc-fast train` run."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    prompt: str | None = None
    """The prompt for every video without its own (sidecar NAME.txt or prompts.yaml/json)."""
    derive_prompt: bool = False
    """Turn each prompt into an appearance-invariant one by dropping place phrases."""
    out_dir: str = "vmc-out"
    """Where adapters, manifest.jsonl and config.json go."""
    cache_dir: str = field(default_factory=lambda: os.environ.get(
        "VMC_FAST_CACHE", str(Path.home() / ".cache" / "vmc-fast")))
    """Prompt-embedding and latent cache."""

    def __post_init__(self) -> None:
        check_field(bool(self.out_dir.strip()), "--out", "must not be empty")
        check_field(self.prompt is None or bool(self.prompt.strip()), "--prompt", "must not be empty")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        sections = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "parallel": ParallelConfig}
        kwargs = {k: (sections[k](**_tuples(v)) if k in sections else v) for k, v in data.items()}
        return cls(**kwargs)


def _tuples(section: dict) -> dict:
    # JSON turns tuples into lists; the dataclasses declare tuples.
    return {k: tuple(v) if isinstance(v, list) else v for k, v in section.items()}
