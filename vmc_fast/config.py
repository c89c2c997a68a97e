"""Every setting of a run, declared once: dataclasses validated when built, printed at the start, saved beside the
outputs, and turned into command-line options (`vmc_fast.cli`), each option's help being its field's docstring.

User mistakes raise ValueError naming the option; the CLI turns them into one clear line. A field's option name
is ``--`` plus its name with dashes, unless `option` gives another (``learning_rate`` is ``--lr``); `option(None)`
keeps a field off the command line.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import math
import os
import re
import textwrap
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from vmc_fast.io.video import background_rgb
from vmc_fast.models.attention import BACKENDS
from vmc_fast.models.registry import TEMPORAL_QKV_PATTERN

LOSS_KINDS = ("cos", "l2", "cos-frames-abs", "eps-mse")
"""Kinds of `vmc_fast.losses.motion_distillation_loss` (docs/design.md section 1)."""
LOSS_WEIGHTS = ("none", "snr")
"""Per-timestep weights of the ``l2`` loss: ``none``, or ``snr`` = (1 - abar_t) / abar_t (the paper's eq. 16)."""
COMPILE_MODES = ("regional", "full", "off")
"""``regional``: each down/mid/up block separately; ``full``: the whole forward; ``off``: eager."""
STORAGE_DTYPES = ("fp32", "bf16", "int8")
"""How frozen weights can be stored (`vmc_fast.tuning.precision`)."""
DEFAULT_TRAINABLE_PATTERN = TEMPORAL_QKV_PATTERN
"""Names of the tuned tensors of Show-1 and UNet3D: the temporal attention Q/K/V projections
(`vmc_fast.tuning.surgery`); each backbone says its own (`Backbone.trainable_pattern`)."""
RESIZE_MODES = ("crop", "squash")
"""Named colours of --background; #RRGGBB is accepted too."""
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
OPTIMIZERS = ("adamw", "adamw8bit")
STRATEGIES = ("auto", "videos", "zero")
ADAPTER_DTYPES = ("bf16", "fp32")
"""How adapters are stored (`vmc_fast.tuning.adapters`): bf16 changes from the base, or fp32 tensors."""
DEVICES = ("auto", "cpu", "cuda")
OUTPUT_SUFFIXES = (".gif", ".mp4")
# The config adds "auto" to the storage choices and hides the "math" attention reference.
FROZEN_DTYPES = ("auto", *STORAGE_DTYPES)
ATTENTION_BACKENDS = tuple(b for b in BACKENDS if b != "math")  # "math" is the test reference, not a user choice


def check_field(condition: bool, option_name: str, message: str) -> None:
    """ValueError naming the option when `condition` fails (the CLI shows it as one line)."""
    if not condition:
        raise ValueError(f"{option_name}: {message}")


def option(name: str | None) -> dict:
    """Field metadata: the field's command-line option name (``"--lr"``), or None to keep it off the CLI."""
    return {"option": name}


def default_cache_dir() -> str:
    """$VMC_FAST_CACHE, else ~/.cache/vmc-fast: prompt embeddings and encoded latents."""
    return os.environ.get("VMC_FAST_CACHE", str(Path.home() / ".cache" / "vmc-fast"))


# ------------------------------------------------------------------------------------------------ the recipe


@dataclass(frozen=True)
class Recipe:
    """The paper's recipe (Jeong, Park and Ye, 2023, section 5.1 and the public code), the defaults of every
    command; the toy world's inference defaults are shorter because its clips are tiny."""

    steps: int = 400
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    inference_steps: int = 75
    guidance_scale: float = 9.0
    toy_inference_steps: int = 25
    toy_guidance_scale: float = 4.0


RECIPE = Recipe()


# ------------------------------------------------------------------------------------------------ training


@dataclass
class FrameOptions:
    """How frames are taken from a video and sized (shared by `train` and `generate`)."""

    num_frames: int | None = field(default=None, metadata=option("--frames"))
    """Frames per clip; default: the model's own (8 for Show-1), or the adapter's for generate."""
    height: int | None = None
    """Frame height in pixels; default: the model's own (or the adapter's)."""
    width: int | None = None
    """Frame width in pixels; default: the model's own (or the adapter's)."""
    frame_stride: int = 1
    """Take every k-th source frame."""
    resize: str = "crop"
    """crop: keep the aspect by centre-cropping | squash: stretch (what the paper's code did)."""
    background: str = "white"
    """Colour that transparent pixels (RGBA/LA/palette images, GIF, alpha video) are composited onto: white |
    black | gray | #RRGGBB."""

    def __post_init__(self) -> None:
        if self.background is not None:  # None: generate takes the adapter's
            background_rgb(self.background)
        check_field(self.num_frames is None or 2 <= self.num_frames <= 64, "--frames", "must be between 2 and 64")
        for name in ("height", "width"):
            value = getattr(self, name)
            check_field(value is None or 8 <= value <= 4096, f"--{name}", "must be between 8 and 4096 pixels")
        check_field(self.frame_stride is None or self.frame_stride >= 1, "--frame-stride", "must be at least 1")
        check_field(self.resize is None or self.resize in RESIZE_MODES, "--resize",
                    f"must be one of {', '.join(RESIZE_MODES)}")


@dataclass
class DataConfig(FrameOptions):
    """Which videos, and which of their frames."""

    videos: str = ""
    """Video file (mp4, webm, mov, gif), folder of frame images, or folder of those; default: the built-in
    example clip."""
    start_frame: int = 0
    """First source frame to take."""
    reverse: bool = False
    """Play the clip backwards (the paper's "walking backward" experiment)."""
    fps: float | None = None
    """Sample by time: resample the clip's timeline at this rate (the frame shown at each tick, held frames
    repeated), then --start-frame, --frame-stride and --frames count those ticks; default: take frames by index.
    Ignored for frame folders."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_field(self.start_frame >= 0, "--start-frame", "must be 0 or more")
        check_field(self.fps is None or 0 < self.fps <= 1000, "--fps", "must be above 0 and at most 1000")


@dataclass
class ModelConfig:
    """Which backbone, what to tune in it, and the memory and speed levers."""

    model_id: str = field(default="tiny-random", metadata=option("--model"))
    """Built-in name, hub id or local folder."""
    trainable_pattern: str | None = field(default=None, metadata=option("--trainable"))
    """Regex of the tuned parameter names; default: the model's temporal attention Q/K/V (temp_attentions.* in
    Show-1 and UNet3D, motion_modules.* in AnimateDiff)."""
    gradient_checkpointing: bool = field(default=False, metadata=option("--checkpointing"))
    """Gradient checkpointing: recompute activations in backward (less memory, about a third more compute)."""
    frozen_dtype: str = "auto"
    """Frozen weights: auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | int8 (bitsandbytes 8-bit linears, 8-bit
    convolutions). Tuned Q/K/V always stay fp32."""
    attention: str = "sdpa"
    """Temporal attention kernel: sdpa | xformers (CUDA) | triton."""
    compile: str = "off"
    """torch.compile: off | regional (each block, once per process) | full."""
    lora_rank: int = 0
    """Train a LoRA of this rank on the same temporal Q/K/V (through PEFT; adapters of a few MB); 0: tune the Q/K/V
    weights themselves, as the paper does."""
    lora_alpha: float | None = None
    """LoRA alpha: a layer's change is (alpha / rank) B A; default: the rank (scale 1). Needs --lora-rank."""

    def __post_init__(self) -> None:
        check_field(bool(self.model_id.strip()), "--model", "must not be empty")
        check_field(isinstance(self.lora_rank, int) and 0 <= self.lora_rank <= 4096, "--lora-rank",
                    f"{self.lora_rank} is not a rank; use 0 (tune Q/K/V fully) or a LoRA rank from 1 to 4096 "
                    f"(e.g. 16)")
        check_field(self.lora_alpha is None or self.lora_rank > 0, "--lora-alpha",
                    "applies to a LoRA only; pass --lora-rank R with it (e.g. --lora-rank 16)")
        check_field(self.lora_alpha is None or 0 < self.lora_alpha < math.inf, "--lora-alpha",
                    f"{self.lora_alpha} must be a positive number (default: the rank)")
        if self.lora_rank and self.lora_alpha is None:
            self.lora_alpha = float(self.lora_rank)
        self.model_id = resolve_model_id(self.model_id)
        check_field(self.frozen_dtype in FROZEN_DTYPES, "--frozen-dtype",
                    f"must be one of {', '.join(FROZEN_DTYPES)}")
        check_field(self.attention in ATTENTION_BACKENDS, "--attention",
                    f"must be one of {', '.join(ATTENTION_BACKENDS)}")
        check_field(self.compile in COMPILE_MODES, "--compile", f"must be one of {', '.join(COMPILE_MODES)}")
        try:
            re.compile(self.trainable_pattern or "")
        except re.error as exc:
            raise ValueError(f"--trainable: {self.trainable_pattern!r} is not a valid regex ({exc})") from exc


@dataclass
class TrainConfig:
    """The optimisation recipe; defaults are the paper's (RECIPE)."""

    steps: int = RECIPE.steps
    """Optimizer steps per video (paper: 400)."""
    learning_rate: float = field(default=RECIPE.learning_rate, metadata=option("--lr"))
    """AdamW learning rate, constant (paper: 1e-4)."""
    weight_decay: float = RECIPE.weight_decay
    """AdamW weight decay."""
    betas: tuple[float, float] = field(default=RECIPE.betas, metadata=option(None))
    """AdamW betas."""
    adam_eps: float = field(default=RECIPE.adam_eps, metadata=option(None))
    """AdamW epsilon."""
    optimizer: str = "adamw"
    """adamw | adamw8bit (bitsandbytes: 8-bit moments)."""
    grad_clip: float = RECIPE.grad_clip
    """Largest global gradient norm; 0 disables clipping."""
    loss: str = "cos"
    """cos (the paper's eq. 17: 1 - cosine of the frame residuals of true and predicted noise) | l2 (mean over
    frame pairs of ||d_eps - d_eps_theta||^2: eq. 16 without its weight, see --loss-weight) | cos-frames-abs (the
    authors' public code) | eps-mse (plain denoising loss, the baseline)."""
    loss_stride: int = 1
    """Frame offset of the noise residuals."""
    loss_weight: str = "none"
    """Per-timestep weight of --loss l2: none | snr, (1 - abar_t) / abar_t, which makes it the paper's eq. 16
    (the weight reaches about 4e8 near t = T on Show-1's schedule; --grad-clip keeps steps bounded)."""
    seed: int = 0
    """Random seed of noise, timesteps and everything random in a run."""
    precision: str = "auto"
    """auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16 | fp16 (the paper's code, with dynamic loss scaling;
    not with --strategy zero)."""
    timestep_range: tuple[int, int] | None = field(default=None, metadata=option(None))
    """Sample t uniformly in [lo, hi); None = [0, T)."""

    def __post_init__(self) -> None:
        check_field(1 <= self.steps <= 1_000_000, "--steps", "must be between 1 and 1,000,000")
        check_field(0 < self.learning_rate < 1, "--lr", "must be in (0, 1)")
        check_field(self.weight_decay >= 0, "--weight-decay", "must be 0 or more")
        check_field(self.grad_clip >= 0, "--grad-clip", "must be 0 or more (0 disables)")
        check_field(self.loss in LOSS_KINDS, "--loss", f"must be one of {', '.join(LOSS_KINDS)}")
        check_field(self.loss_stride >= 1, "--loss-stride", "must be at least 1")
        check_field(self.loss_weight in LOSS_WEIGHTS, "--loss-weight", f"must be one of {', '.join(LOSS_WEIGHTS)}")
        check_field(self.loss_weight == "none" or self.loss == "l2", "--loss-weight",
                    f"{self.loss_weight} applies to --loss l2 only (the paper's eq. 16), not --loss {self.loss}")
        check_field(self.precision in PRECISIONS, "--precision", f"must be one of {', '.join(PRECISIONS)}")
        check_field(self.optimizer in OPTIMIZERS, "--optimizer", f"must be one of {', '.join(OPTIMIZERS)}")
        check_field(self.seed >= 0, "--seed", "must be 0 or more")
        if self.timestep_range is not None:
            lo, hi = self.timestep_range
            check_field(0 <= lo < hi, "timestep_range", "must satisfy 0 <= lo < hi")


@dataclass
class ParallelConfig:
    """How ranks share the work."""

    num_ranks: int = field(default=1, metadata=option("--gpus"))
    """Ranks: one per GPU (CPU ranks over gloo when there is no CUDA)."""
    strategy: str = "auto"
    """videos: each rank tunes its own videos | zero: all ranks tune one video with DeepSpeed ZeRO | auto:
    videos when there are at least as many videos as ranks."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage for --strategy zero (0-3)."""
    deepspeed_config: str | None = None
    """DeepSpeed JSON config to start from (see ds_configs/); our recipe's fields override it."""
    timeout_s: int = field(default=1800, metadata=option("--dist-timeout"))
    """Seconds a rank waits for the others in one collective before the run stops with an error."""
    nodes: int = 1
    """Machines of one run (torchrun rendezvous): run the same command on each, with its --node-rank and the same
    --master-addr and --master-port; --gpus ranks on each."""
    node_rank: int = 0
    """This machine's index among --nodes (0 is the one at --master-addr, which plans and records the run)."""
    master_addr: str | None = None
    """Address of node 0 that every node can reach (needed with --nodes above 1 or several hosts in --hostfile)."""
    master_port: int = 29500
    """Free TCP port on node 0 for the rendezvous, the same on every node (one machine: a free port is picked)."""
    hostfile: str | None = None
    """DeepSpeed hostfile ('HOST slots=N' per line, # comments): the DeepSpeed launcher starts N ranks on each
    host over passwordless ssh (run from the first host; the folders must be shared)."""
    pack: str = "1"
    """Videos tuned together in one forward and backward pass of the shared frozen UNet, each with its own Q/K/V
    (1-256) | auto: as many as fit in free memory (the estimate is printed). Adapters equal those tuned one at a
    time."""

    def __post_init__(self) -> None:
        check_field(1 <= self.nodes <= 1024, "--nodes", "must be between 1 and 1024")
        check_field(0 <= self.node_rank < self.nodes, "--node-rank",
                    f"{self.node_rank} must be 0..{self.nodes - 1} (one less than --nodes {self.nodes})")
        check_field(1 <= self.master_port <= 65535, "--master-port", "must be a TCP port, 1..65535")
        check_field(self.nodes == 1 or bool(self.master_addr), "--master-addr",
                    f"--nodes {self.nodes} needs the address of node 0, the same on every node (e.g. its hostname)")
        if self.hostfile is not None:
            check_field(self.nodes == 1, "--nodes", "--hostfile names the machines itself; drop --nodes/--node-rank")
            check_field(self.num_ranks == 1, "--gpus", "with --hostfile the slots of each host are its ranks; "
                        "drop --gpus")
            hosts = read_hostfile(self.hostfile)
            check_field(len(hosts) == 1 or bool(self.master_addr), "--master-addr",
                        f"--hostfile {self.hostfile} names {len(hosts)} hosts: pass the address of the first one")
        self.pack = str(self.pack).strip().lower()
        check_field(self.pack == "auto" or (self.pack.isdigit() and 1 <= int(self.pack) <= 256), "--pack",
                    f"{self.pack!r} must be a number of videos from 1 to 256, or auto")
        check_field(1 <= self.num_ranks <= 1024, "--gpus", "must be between 1 and 1024")
        check_field(1 <= self.timeout_s <= 7 * 24 * 3600, "--dist-timeout", "must be between 1 second and 7 days")
        check_field(self.strategy in STRATEGIES, "--strategy", f"must be one of {', '.join(STRATEGIES)}")
        check_field(self.zero_stage in (0, 1, 2, 3), "--zero-stage", "must be 0, 1, 2 or 3")
        if self.deepspeed_config is not None:
            check_field(Path(self.deepspeed_config).is_file(), "--deepspeed-config",
                        f"{self.deepspeed_config} is not a file")


    @property
    def world_size(self) -> int:
        """Ranks of the whole run: the hostfile's slots, else --nodes x --gpus."""
        if self.hostfile is not None:
            return sum(read_hostfile(self.hostfile).values())
        return self.nodes * self.num_ranks

    @property
    def multi_rank(self) -> bool:
        """Whether the run goes through a launcher (more than one rank, or more than one machine)."""
        return self.world_size > 1 or self.hostfile is not None


def read_hostfile(path: str) -> dict[str, int]:
    """{host: slots} of a DeepSpeed hostfile: one ``HOST slots=N`` per line (N >= 1), blank lines and ``#``
    comments ignored. ValueError naming --hostfile, the line and the fix for anything else."""
    file = Path(path).expanduser()
    check_field(file.is_file(), "--hostfile", f"{path} is not a file; write one 'HOST slots=N' line per machine")
    hosts: dict[str, int] = {}
    for number, raw in enumerate(file.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"(\S+)\s+slots=(\d+)", line)
        check_field(match is not None, "--hostfile", f"{path} line {number}: {raw.strip()!r} is not 'HOST slots=N' "
                    f"(e.g. 'worker-1 slots=8')")
        host, slots = match.group(1), int(match.group(2))
        check_field(slots >= 1, "--hostfile", f"{path} line {number}: {host} has slots={slots}; give it 1 or more")
        check_field(host not in hosts, "--hostfile", f"{path} line {number}: {host} is listed twice; list each "
                    f"machine once with all its slots")
        hosts[host] = slots
    check_field(bool(hosts), "--hostfile", f"{path} names no host; write one 'HOST slots=N' line per machine")
    return hosts


@dataclass
class RunConfig:
    """A whole `vmc-fast train` run."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    prompt: str | None = None
    """Prompt for every video without its own NAME.txt / prompts.yaml entry."""
    derive_prompt: bool = False
    """Make prompts appearance-invariant by dropping place phrases ('a bird flying above a lake' -> 'a bird
    flying')."""
    out_dir: str = field(default="vmc-out", metadata=option("--out"))
    """Output folder: adapters/, manifest.jsonl, config.json."""
    adapter_dtype: str = "bf16"
    """How adapters are stored: bf16 (each tuned tensor's change from the base in bfloat16, half the size; the
    reconstruction error is measured and recorded in the adapter) | fp32 (the tuned tensors themselves, exact)."""
    cache_dir: str = field(default_factory=default_cache_dir)
    """Prompt-embedding and latent cache (default: $VMC_FAST_CACHE or ~/.cache/vmc-fast)."""
    retune: bool = False
    """Tune again the videos of --out that were tuned with other settings (their adapters are replaced);
    without it such a rerun is refused."""
    tensorboard: bool = False
    """Also write each video's loss, gradient norm and learning rate as TensorBoard event files, in
    DIR/NAME/tensorboard/ beside DIR/NAME/metrics.jsonl (needs `pip install tensorboard`)."""

    def __post_init__(self) -> None:
        check_field(bool(self.out_dir.strip()), "--out", "must not be empty")
        check_field(self.adapter_dtype in ADAPTER_DTYPES, "--adapter-dtype",
                    f"must be one of {', '.join(ADAPTER_DTYPES)}")
        if self.prompt is not None:
            self.prompt = normalized_prompt(self.prompt)
        check_field(self.prompt is None or bool(self.prompt), "--prompt", "must not be empty")
        check_field(self.parallel.pack == "1" or not self.model.lora_rank, "--pack",
                    f"{self.parallel.pack} does not combine with --lora-rank yet (PEFT's LoRA layers train one "
                    f"adapter per pass); use --pack 1 with --lora-rank, or full tuning (--lora-rank 0) with --pack")
        check_field(self.parallel.pack == "1" or self.train.precision != "fp16", "--pack",
                    f"{self.parallel.pack} does not combine with --precision fp16 (one loss scale would be shared "
                    f"by every video of a pack); use --precision bf16 or fp32, or --pack 1")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def with_absolute_paths(self) -> "RunConfig":
        """A copy whose file and folder settings (videos, --out, cache, DeepSpeed config) are absolute, so that
        the saved config.json reruns the same from any working directory."""
        data = self.to_dict()
        for section, name in (("data", "videos"), (None, "out_dir"), (None, "cache_dir"),
                              ("parallel", "deepspeed_config")):
            holder = data[section] if section else data
            if holder[name]:  # "" (the built-in example) and None (unset) stay as they are
                holder[name] = absolute_path(holder[name])
        return RunConfig.from_dict(data)

    @staticmethod
    def migrate_dict(data: dict) -> dict:
        """A saved config in today's names: older files' ``train.snr_weight`` becomes ``train.loss_weight``."""
        train = data.get("train")
        if isinstance(train, dict) and "snr_weight" in train:  # before 2026-11-30: a bool, only ever for l2
            train = dict(train)
            snr = train.pop("snr_weight") and train.get("loss", "cos") == "l2"
            train.setdefault("loss_weight", "snr" if snr else "none")
            data = {**data, "train": train}
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        """Rebuild a saved config (config.json), older names included (`migrate_dict`)."""
        return from_dict(cls, cls.migrate_dict(data))


# ------------------------------------------------------------------------------------------------ generating


@dataclass
class GenerateConfig(FrameOptions):
    """One `vmc-fast generate` run; defaults are the paper's (RECIPE)."""

    prompt: str = ""
    """Target prompt, e.g. 'an airplane is flying in the sky'."""
    adapter: str | None = None
    """Motion adapter from `vmc-fast train` (none: the untuned model)."""
    video: str | None = None
    """Clip to DDIM-invert into the starting noise (the paper inverts the training clip); none: pure noise."""
    model_id: str | None = field(default=None, metadata=option("--model"))
    """Base model; default: the adapter's base, else tiny-random."""
    output: str | None = field(default="vmc-out/generated.gif", metadata=option("--out"))
    """Output video (.gif or .mp4), written atomically with a JSON sidecar; None writes nothing."""
    num_inference_steps: int = field(default=RECIPE.inference_steps, metadata=option("--steps"))
    """DDIM sampling steps (paper: 75)."""
    inversion_steps: int = RECIPE.inference_steps
    """DDIM inversion steps (paper: 75; the same as --steps so x_T lands where sampling starts)."""
    guidance_scale: float = RECIPE.guidance_scale
    """Classifier-free guidance w: eps = eps_uncond + w (eps_cond - eps_uncond) (paper: 9.0)."""
    negative_prompt: str = ""
    """Unconditional prompt of classifier-free guidance."""
    inversion_prompt: str = ""
    """Prompt used while inverting the input clip (the paper uses the empty prompt)."""
    seed: int = 0
    """Seed of the starting noise without --video."""
    fps: int = 8
    """Frames per second of the written video."""
    precision: str = "auto"
    """auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16."""
    device: str = "auto"
    """auto (CUDA when available) | cpu | cuda."""
    cache_dir: str = field(default_factory=default_cache_dir)
    """Prompt-embedding cache, shared with training."""
    keyframes_only: bool = False
    """Show-1: stop after the keyframes (skip interpolation and super-resolution)."""
    cascade_steps: int | None = None
    """Show-1: steps of every cascade stage (default: the public script's 75 / 70 / 125 / 50)."""
    stages: dict[str, str] = field(default_factory=dict, metadata=option("--stage"))
    """Show-1: NAME=ID loads a cascade stage from a hub id or folder (interpolation, sr1_first_frame, sr1, sr2);
    sr1_first_frame=none skips IF-II. Repeatable."""
    sample_fps: float | None = None
    """Sample the --video clip by time at this rate, as `train --fps` does (--fps here is the output's rate);
    default: by index."""
    frame_stride: int | None = None
    """--video: take every k-th source frame; default: the adapter's (as it was tuned), else 1."""
    resize: str | None = None
    """--video: crop (keep the aspect) | squash (stretch); default: the adapter's, else crop."""
    start_frame: int | None = None
    """--video: first source frame; default: the adapter's (as it was tuned), else 0."""
    reverse: bool | None = field(default=None, metadata=option("--reverse/--no-reverse"))
    """--video: play the clip backwards (or not); default: the adapter's (as it was tuned), else forwards."""
    background: str | None = None
    """--video: colour transparent pixels are composited onto (white | black | gray | #RRGGBB); default: the
    adapter's (as it was tuned), else white."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_field(self.model_id is None or bool(self.model_id.strip()), "--model", "must not be empty")
        if self.model_id is not None:
            self.model_id = resolve_model_id(self.model_id)
        self.prompt, self.negative_prompt, self.inversion_prompt = map(
            normalized_prompt, (self.prompt, self.negative_prompt, self.inversion_prompt))
        check_field(self.start_frame is None or self.start_frame >= 0, "--start-frame", "must be 0 or more")
        check_field(1 <= self.num_inference_steps <= 1000, "--steps", "must be between 1 and 1000")
        check_field(1 <= self.inversion_steps <= 1000, "--inversion-steps", "must be between 1 and 1000")
        check_field(0.0 <= self.guidance_scale <= 100.0, "--guidance-scale", "must be between 0 and 100")
        check_field(self.seed >= 0, "--seed", "must be 0 or more")
        check_field(1 <= self.fps <= 120, "--fps", "must be between 1 and 120")
        check_field(self.sample_fps is None or 0 < self.sample_fps <= 1000, "--sample-fps",
                    "must be above 0 and at most 1000")
        check_field(self.precision in PRECISIONS, "--precision", f"must be one of {', '.join(PRECISIONS)}")
        check_field(self.device in DEVICES, "--device", f"must be one of {', '.join(DEVICES)}")
        check_field(self.cascade_steps is None or 1 <= self.cascade_steps <= 1000, "--cascade-steps",
                    "must be between 1 and 1000")
        from vmc_fast.models.show1.stages import check_stage_sources

        check_stage_sources(self.stages)
        if self.output is not None:
            check_field(Path(self.output).suffix.lower() in OUTPUT_SUFFIXES, "--out",
                        f"{self.output!r} must end in {' or '.join(OUTPUT_SUFFIXES)}")
        if self.adapter is not None:
            check_field(Path(self.adapter).expanduser().is_file(), "--adapter", f"no such file: {self.adapter}")
        if self.video is not None:
            check_field(Path(self.video).expanduser().exists(), "--video", f"{self.video} does not exist")


def resolve_model_id(model_id: str) -> str:
    """A model id as recorded: an existing local folder as its absolute path (so that adapters and run records
    name it from anywhere), each part of a composite id (``BASE+MOTION_ADAPTER``) likewise, anything else
    (built-in names, hub ids) unchanged."""
    from vmc_fast.models.registry import COMPOSITE_SEPARATOR, available_models, is_composite

    folder = Path(model_id).expanduser()
    if not folder.is_dir():
        if not is_composite(model_id):
            return model_id
        parts = model_id.split(COMPOSITE_SEPARATOR)  # AnimateDiff's BASE+MOTION_ADAPTER: each part resolved
        return COMPOSITE_SEPARATOR.join(resolve_model_id(part.strip()) if part.strip() else part for part in parts)
    return model_id if model_id in available_models() else str(folder.resolve())  # built-in names come first


def absolute_path(path: str) -> str:
    """`path` with ``~`` expanded, made absolute against the working directory and normalised (no ``..``)."""
    return os.path.abspath(os.path.expanduser(path))


def normalized_prompt(text: str) -> str:
    """`vmc_fast.io.prompts.normalize_prompt`: typed prompts take the same form as prompts read from files."""
    from vmc_fast.io.prompts import normalize_prompt

    return normalize_prompt(text)


GENERATE_SAMPLING_DEFAULTS = {"frame_stride": 1, "resize": "crop", "start_frame": 0, "reverse": False,
                              "background": "white", "sample_fps": None}
"""`vmc-fast generate --video` sampling without the option and without an adapter that records it."""
RECORDED_AS = {"sample_fps": "fps"}
"""GenerateConfig sampling fields that an adapter's sampling record (train's DataConfig) holds under another name."""


# ------------------------------------------------------------------------------------------------ exporting

EXPORT_FORMATS = ("diffusers", "peft", "comfyui")
"""`vmc-fast export --format` choices (`vmc_fast.tuning.export`)."""


@dataclass
class ExportConfig:
    """One `vmc-fast export` run: a motion adapter as a LoRA that another library loads."""

    adapter: str = field(default="", metadata=option("ADAPTER"))
    """Motion adapter from `vmc-fast train` (.safetensors)."""
    format: str = ""
    """diffusers: AnimateDiff, for AnimateDiffPipeline.load_lora_weights(DIR) | peft: any model, for PEFT's
    PeftModel.from_pretrained / set_peft_model_state_dict (ModelScope, ZeroScope, Show-1) | comfyui: AnimateDiff,
    a motion LoRA for ComfyUI-AnimateDiff-Evolved."""
    out_dir: str = field(default="", metadata=option("--out"))
    """Folder to write into (created; files of the same names are replaced)."""
    rank: int = 64
    """LoRA rank of a full adapter: the truncated SVD of its change from the base, whose relative error is printed
    and recorded (rank at least the layers' size: exact). A --lora-rank adapter is written at its own rank."""
    model_id: str | None = field(default=None, metadata=option("--model"))
    """Base model the adapter was tuned on (its change is measured against it); default: the one it records."""

    def __post_init__(self) -> None:
        check_field(bool(self.adapter.strip()), "ADAPTER", "name the adapter file to export")
        check_field(Path(self.adapter).expanduser().is_file(), "ADAPTER", f"no such file: {self.adapter}")
        check_field(self.format in EXPORT_FORMATS, "--format", f"must be one of {', '.join(EXPORT_FORMATS)}")
        check_field(bool(self.out_dir.strip()), "--out", "name the folder to write into")
        check_field(not Path(self.out_dir).expanduser().is_file(), "--out", f"{self.out_dir} is a file, not a folder")
        check_field(1 <= self.rank <= 65536, "--rank", "must be between 1 and 65536")
        check_field(self.model_id is None or bool(self.model_id.strip()), "--model", "must not be empty")
        if self.model_id is not None:
            self.model_id = resolve_model_id(self.model_id)


# ------------------------------------------------------------------------------------------------ options


@dataclass(frozen=True)
class Option:
    """One command-line option of a config dataclass (nested sections flattened)."""

    path: tuple[str, ...]
    """Field names from the root dataclass down to the leaf."""
    flag: str
    """``--name``."""
    annotation: Any
    """The leaf field's type."""
    default: Any
    """The leaf field's default value."""
    help: str
    """The leaf field's docstring."""


def options(cls: type, prefix: tuple[str, ...] = ()) -> list[Option]:
    """The command-line options of dataclass `cls`, nested dataclass sections flattened, in declaration order."""
    import typing

    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    own = cls.__dict__.get("__annotations__", {})
    result = []
    for f in sorted(dataclasses.fields(cls), key=lambda f: f.name not in own):  # a section's own fields first
        if dataclasses.is_dataclass(hints[f.name]):
            result.extend(options(hints[f.name], prefix + (f.name,)))
            continue
        flag = f.metadata.get("option", "--" + f.name.replace("_", "-"))
        if flag is None:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        result.append(Option(prefix + (f.name,), flag, hints[f.name], default, docs.get(f.name, "")))
    return result


def from_options(cls: type, values: dict[tuple[str, ...], Any]) -> Any:
    """Build dataclass `cls` from {option path: value}, nested sections included (validation runs as usual)."""
    import typing

    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            sub = {path[1:]: v for path, v in values.items() if path[0] == f.name}
            kwargs[f.name] = from_options(hints[f.name], sub)
        elif (f.name,) in values:
            kwargs[f.name] = values[(f.name,)]
    return cls(**kwargs)


def from_dict(cls: type, data: dict) -> Any:
    """Rebuild dataclass `cls` from its `dataclasses.asdict` (JSON turns tuples into lists)."""
    import typing

    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        if dataclasses.is_dataclass(hints.get(name)):
            kwargs[name] = from_dict(hints[name], value)
        else:
            kwargs[name] = tuple(value) if isinstance(value, list) else value
    return cls(**kwargs)


# ------------------------------------------------------------------------------------------------ config files

CONFIG_FILE_OPTION = "--config"
"""The option every config command takes: a JSON or YAML file of the command's config tree."""


def config_from_file(cls: type, path: str | Path, overrides: dict[tuple[str, ...], Any] | None = None) -> Any:
    """Dataclass `cls` built from a config file (the run folder's config.json, or YAML with the same names),
    `overrides` ({option path: value}, the options given on the command line) taking precedence.

    Raises ValueError naming the file: unreadable or not a mapping, a key that is no field of `cls` (with the
    nearest valid name), a value of the wrong type; and as building `cls` does, naming the option.
    """
    data = read_config_file(path)
    migrate = getattr(cls, "migrate_dict", None)
    data = migrate(data) if migrate is not None else data
    values = config_file_values(cls, data, f"{CONFIG_FILE_OPTION} {path}")
    for option_path, value in (overrides or {}).items():
        holder = values
        for name in option_path[:-1]:
            holder = holder.setdefault(name, {})
        holder[option_path[-1]] = value
    return from_dict(cls, values)


def read_config_file(path: str | Path) -> dict:
    """The mapping in a JSON (``.json``) or YAML (any other suffix) file; ValueError naming the file."""
    import yaml

    where = f"{CONFIG_FILE_OPTION} {path}"
    file = Path(path).expanduser()
    if file.is_dir():  # a run folder: its saved config
        check_field((file / "config.json").is_file(), where, "a folder without config.json; pass a run folder "
                    "(--out of `vmc-fast train`), its config.json or a YAML file")
        file = file / "config.json"
    check_field(file.is_file(), where, "no such file; pass a run folder's config.json or a YAML file")
    text = file.read_text()
    try:
        data = json.loads(text) if file.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        kind = "JSON" if file.suffix.lower() == ".json" else "YAML"
        raise ValueError(f"{where}: not valid {kind} ({' '.join(str(exc).split())})") from None
    check_field(isinstance(data, dict), where, f"must hold a mapping of setting names, not {type(data).__name__}")
    return data


def config_file_values(cls: type, data: dict, where: str, prefix: str = "", root: type | None = None) -> dict:
    """`data` checked against dataclass `cls`: every key a field (ValueError naming the nearest valid name
    otherwise), nested sections as mappings, each leaf of its field's type (JSON lists become tuples, ints are
    accepted for floats). prefix, root: where a nested section sits in the root dataclass."""
    import typing

    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        dotted = prefix + str(name)
        if name not in hints or name not in {f.name for f in dataclasses.fields(cls)}:
            raise ValueError(f"{where}: unknown setting {dotted!r}; did you mean {nearest_setting(root or cls, dotted)!r}?")
        if dataclasses.is_dataclass(hints[name]):
            check_field(isinstance(value, dict), where, f"{dotted} must be a mapping of its settings")
            values[name] = config_file_values(hints[name], value, where, dotted + ".", root or cls)
        else:
            values[name] = _file_value(value, hints[name], f"{where}: {dotted}")
    return values


def setting_names(cls: type, prefix: str = "") -> list[str]:
    """Every field of dataclass `cls` as a dotted name (``train.steps``), nested sections walked."""
    import typing

    hints = typing.get_type_hints(cls)
    names = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            names.extend(setting_names(hints[f.name], f"{prefix}{f.name}."))
        else:
            names.append(prefix + f.name)
    return names


def nearest_setting(cls: type, name: str) -> str:
    """The valid dotted name closest to `name`: a field of that last name in any section (``steps`` ->
    ``train.steps``), or one named by that option (``lr`` -> ``train.learning_rate``), else the most similar
    setting or section (``modle`` -> ``model``)."""
    import difflib

    names = setting_names(cls)
    leaf = name.rsplit(".", 1)[-1]
    by_leaf = [n for n in names if n.rsplit(".", 1)[-1] == leaf]
    by_option = [".".join(o.path) for o in options(cls) if o.flag.lstrip("-").replace("-", "_") == leaf]
    if by_leaf or by_option:
        return (by_leaf or by_option)[0]
    sections = sorted({n.rsplit(".", 1)[0] for n in names if "." in n})
    return difflib.get_close_matches(name, names + sections, n=1, cutoff=0.0)[0]


def _file_value(value: Any, annotation: Any, where: str) -> Any:
    """One leaf value of a config file as its field's type (ValueError naming `where` when it is not)."""
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if type(None) in args:
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _file_value(value, inner[0] if len(inner) == 1 else typing.Union[tuple(inner)], where)
    if origin is tuple:
        check_field(isinstance(value, (list, tuple)), where, f"must be a list, not {value!r}")
        items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        check_field(len(items) == len(value), where, f"must be a list of {len(items)} values, not {value!r}")
        return tuple(_file_value(v, a, where) for v, a in zip(value, items))
    if origin is dict or annotation is dict:
        check_field(isinstance(value, dict), where, f"must be a mapping, not {value!r}")
        return dict(value)
    if annotation is float:
        check_field(isinstance(value, (int, float)) and not isinstance(value, bool), where,
                    f"must be a number, not {value!r}")
        return float(value)
    if annotation in (int, str, bool):
        ok = isinstance(value, annotation) and (annotation is bool or not isinstance(value, bool))
        check_field(ok, where, f"must be {'an' if annotation is int else 'a'} {annotation.__name__}, not {value!r}")
    return value


@cache
def field_docs(cls: type) -> dict[str, str]:
    """{field name: its docstring} for dataclass `cls` and its bases: the string literal under each field."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, after in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and \
                    isinstance(after, ast.Expr) and isinstance(getattr(after, "value", None), ast.Constant) and \
                    isinstance(after.value.value, str):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs
