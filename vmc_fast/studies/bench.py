"""`vmc-fast bench`: peak memory and wall-clock of VMC training per preset, against the paper's 15 GB / 300 s.

Every preset runs in its own fresh process (clean peak-memory counters, a cold compile), through the same
`TuningSession` setup as real training, on a random clip and random text states of the model's size. GPU runs
time with CUDA events after warm-up; CPU runs (a smaller model) report ratios between presets. Each run appends one
JSON line (config, git sha, library versions, device) to benchmarks/results/.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vmc_fast.config import check_field, option
from vmc_fast.runtime import cpu_name, git_sha, resolve_device, utc_now, versions

PAPER_MEMORY_BYTES = 15e9
"""The paper's training vRAM (one RTX 6000), bytes."""
PAPER_SECONDS = 300.0
"""The paper's training time for 400 steps, seconds."""
PAPER_STEPS = 400
"""The paper's step count; times are reported for this many steps."""
T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
              feed_forward_proj="gated-gelu", is_encoder_decoder=False)
"""Shape of Show-1's text encoder (T5-v1.1-XXL encoder), for the `paper` preset's resident encoder."""


@dataclass(frozen=True)
class Preset:
    """One set of levers."""

    name: str
    """Short name used on the command line."""
    frozen_dtype: str
    """fp32, bf16 or int8 storage of frozen weights."""
    precision: str
    """Autocast: fp16, bf16 or fp32 (also on CPU, where low-precision matmuls are slow: compare ratios)."""
    checkpointing: bool
    """Gradient checkpointing."""
    compile: str
    """off or regional."""
    attention: str = "sdpa"
    """Temporal attention backend."""
    optimizer: str = "adamw"
    """adamw or adamw8bit."""
    text_encoder_resident: bool = False
    """Keep the text encoder on the device during training (the public code did)."""
    about: str = ""
    """One line for the table."""


PAPER = Preset("paper", "fp32", "fp16", True, "off", text_encoder_resident=True,
               about="public code: fp32 UNet, fp16 autocast, checkpointing, eager, T5 resident")
FAST = Preset("fast", "bf16", "bf16", False, "regional", about="bf16 weights+autocast, regional compile, T5 freed")
# Names say what changed from their parent: `paper-X` / `fast-X` remove or swap one lever, `+X` adds one.
PRESETS: dict[str, Preset] = {p.name: p for p in (
    PAPER,
    dataclasses.replace(PAPER, name="paper-t5-freed", text_encoder_resident=False, about="paper, T5 freed"),
    dataclasses.replace(PAPER, name="paper+bf16", frozen_dtype="bf16", precision="bf16",
                        about="paper, bf16 weights and autocast"),
    dataclasses.replace(PAPER, name="paper-no-ckpt", checkpointing=False, about="paper, no checkpointing"),
    dataclasses.replace(PAPER, name="paper+compile", compile="regional", about="paper, regional compile"),
    FAST,
    dataclasses.replace(FAST, name="fast-eager", compile="off", about="fast, eager (no compile)"),
    dataclasses.replace(FAST, name="fast+ckpt", checkpointing=True, about="fast, checkpointing"),
    dataclasses.replace(FAST, name="fast+int8", frozen_dtype="int8", optimizer="adamw8bit",
                        about="fast, int8 linears + 8-bit convs, 8-bit AdamW"),
    dataclasses.replace(FAST, name="fast+triton", attention="triton", about="fast, Triton temporal attention"),
    dataclasses.replace(FAST, name="fast+xformers", attention="xformers", about="fast, xformers temporal attention"),
    dataclasses.replace(FAST, name="fast-eager+ckpt", compile="off", checkpointing=True,
                        about="fast eager, checkpointing"),
    dataclasses.replace(FAST, name="fast-eager+fp32", compile="off", frozen_dtype="fp32", precision="fp32",
                        about="fast eager, fp32 weights and compute (CPU --pack runs)"),
    dataclasses.replace(FAST, name="fast-eager+int8", compile="off", frozen_dtype="int8", optimizer="adamw8bit",
                        about="fast eager, int8 linears + 8-bit convs, 8-bit AdamW"),
)}
PACK_PRESETS = {"cuda": "fast-eager", "cpu": "fast-eager+fp32"}
"""The preset `--pack` runs by default: no compile (a pack size is one more graph to build), and on the CPU fp32
(bf16 matmuls are slow there, fp16 does not combine with packs)."""
DEFAULT_PRESETS_GPU = ("paper", "fast", "fast-eager", "fast+int8", "paper+bf16", "paper-t5-freed")
# Inductor needs many minutes per preset on a 2-core CPU, so CPU defaults compare the eager levers.
DEFAULT_PRESETS_CPU = ("paper", "paper-t5-freed", "paper-no-ckpt", "paper+bf16", "fast-eager", "fast-eager+int8")


def preset_requirements(preset: Preset) -> tuple[str, ...]:
    """Python modules a preset needs beyond torch (checked before its process starts)."""
    needs = []
    if preset.frozen_dtype == "int8" or preset.optimizer == "adamw8bit":
        needs.append("bitsandbytes")
    if preset.attention in ("triton", "xformers"):
        needs.append(preset.attention)
    return tuple(needs)


def unavailable_reason(preset: Preset, device: str) -> str | None:
    """Why `preset` cannot run here (a missing library, xformers without CUDA), else None."""
    import importlib.util

    missing = [m for m in preset_requirements(preset) if importlib.util.find_spec(m) is None]
    if missing:
        return f"needs {', '.join(missing)}, which is not installed"
    if preset.attention == "xformers" and device != "cuda":
        return "xformers runs on CUDA only"
    return None


def default_presets(device: str | None = None) -> tuple[str, ...]:
    device = device or resolve_device().type
    return DEFAULT_PRESETS_GPU if device == "cuda" else DEFAULT_PRESETS_CPU


@dataclass
class BenchOptions:
    """What to benchmark."""

    model_id: str
    """Backbone (default: show1-base-arch on GPU, show1-tiny-random on CPU)."""
    steps: int
    """Timed steps (times are also projected to the paper's 400)."""
    warmup: int
    """Untimed steps first (they include compilation)."""
    device: str
    """cuda or cpu."""
    seed: int = 0
    """Seeds the clip, text states and training."""
    pack: int = 1
    """Videos per pass (--pack K): the step tunes K videos at once; videos/hour is reported."""
    profile_dir: str | None = None
    """When set, 3 more steps run under torch.profiler after timing and their operator table (sorted by device
    time, with the kernel launches per step) goes to ``profile_dir/profile-<preset>.txt``."""


def default_options(device: str | None = None) -> BenchOptions:
    device = device or resolve_device().type
    if device == "cuda":
        return BenchOptions("show1-base-arch", steps=PAPER_STEPS, warmup=5, device=device)
    return BenchOptions("show1-tiny-random", steps=10, warmup=2, device=device)


@dataclass
class BenchConfig:
    """One `vmc-fast bench` invocation."""

    presets: tuple[str, ...] | None = None
    """Comma-separated presets; default: paper, fast, fast-eager, fast+int8, paper+bf16, paper-t5-freed on GPU and
    the eager ones on CPU. `-X` removes or swaps one lever of its parent, `+X` adds one; an unknown name lists
    them all."""
    model_id: str | None = field(default=None, metadata=option("--model"))
    """Backbone (default: show1-base-arch on GPU, show1-tiny-random on CPU)."""
    steps: int | None = None
    """Timed steps (default: 400 on GPU, 10 on CPU)."""
    warmup: int | None = None
    """Untimed warm-up steps (they include compilation)."""
    preset_timeout: float | None = None
    """Seconds one preset may take, its process start, model build and compilation included; a slower one is
    reported as timed out and the next one runs."""
    results: str = "benchmarks/results"
    """Folder for the JSON-lines records."""
    profile: str | None = None
    """After timing, profile 3 steps of each preset with torch.profiler and write FOLDER/profile-<preset>.txt."""
    pack: tuple[int, ...] | None = None
    """Comma-separated pack sizes (e.g. 1,2,4,8): run one preset (the first of --presets; default fast-eager on
    GPU, fast-eager+fp32 on CPU) once per size and report videos/hour for each."""

    def __post_init__(self) -> None:
        check_field(self.pack is None or (bool(self.pack) and all(1 <= k <= 256 for k in self.pack)), "--pack",
                    "give pack sizes from 1 to 256, comma-separated (e.g. 1,2,4,8)")
        unknown = [n for n in self.presets or () if n not in PRESETS]
        check_field(not unknown, "--presets", f"unknown {', '.join(unknown)}; choose from {', '.join(PRESETS)}")
        check_field(self.steps is None or self.steps >= 1, "--steps", "must be at least 1")
        check_field(self.warmup is None or self.warmup >= 0, "--warmup", "must be 0 or more")
        check_field(self.preset_timeout is None or self.preset_timeout > 0, "--preset-timeout",
                    "must be a positive number of seconds")

    def preset_names(self) -> list[str]:
        if self.pack is not None:
            return [self.presets[0] if self.presets else PACK_PRESETS[resolve_device().type]]
        return list(self.presets or default_presets())

    def bench_options(self) -> "BenchOptions":
        """What each preset runs: this machine's defaults with this config's choices on top."""
        options = default_options()
        return dataclasses.replace(
            options, model_id=self.model_id or options.model_id,
            steps=self.steps if self.steps is not None else options.steps,
            warmup=self.warmup if self.warmup is not None else options.warmup, profile_dir=self.profile)


@dataclass
class PresetFailure:
    """A preset that did not produce a record."""

    name: str
    """The preset."""
    status: str
    """``skipped`` (not runnable here), ``failed`` (raised) or ``timeout``."""
    reason: str
    """Why, in one line."""


def run_presets(names: list[str], options: BenchOptions, results_dir: Path | None, on_result=None,
                timeout_s: float | None = None, on_failure=None) -> tuple[list[dict], list[PresetFailure]]:
    """Run each preset in a fresh spawned process; append each record to results_dir as soon as it exists.

    A preset that cannot run here, raises (out of memory, a library error) or passes `timeout_s` seconds becomes a
    `PresetFailure` and the next preset runs: one broken lever never costs the others' figures.
    Raises ValueError for unknown preset names (before anything runs).
    """
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        raise ValueError(f"--presets: unknown {', '.join(unknown)}; choose from {', '.join(PRESETS)}")
    return _collect([(PRESETS[name], options, name) for name in names], options, results_dir, on_result, timeout_s,
                    on_failure)


def run_packs(name: str, sizes: list[int], options: BenchOptions, results_dir: Path | None, on_result=None,
              timeout_s: float | None = None, on_failure=None) -> tuple[list[dict], list[PresetFailure]]:
    """`run_presets` for one preset at each pack size: a fresh process per size, records with ``pack`` and
    ``videos_per_hour``."""
    runs = [(PRESETS[name], dataclasses.replace(options, pack=size), f"{name} --pack {size}") for size in sizes]
    return _collect(runs, options, results_dir, on_result, timeout_s, on_failure)


def _collect(runs: list[tuple[Preset, BenchOptions, str]], options: BenchOptions, results_dir: Path | None,
             on_result, timeout_s: float | None, on_failure) -> tuple[list[dict], list[PresetFailure]]:
    """Each (preset, options, label) in a fresh process; records get provenance and are appended to the results
    file as they come; a failure is named by its label."""
    records, failures = [], []
    for preset, run_options, label in runs:
        record, failure = _run_isolated(preset, run_options, timeout_s)
        if failure is not None:
            failure = dataclasses.replace(failure, name=label)
            failures.append(failure)
            if on_failure is not None:
                on_failure(failure)
            continue
        record = {**record, **_provenance(options)}
        if results_dir is not None:
            append_record(record, results_dir)
        records.append(record)
        if on_result is not None:
            on_result(record)
    return records, failures


def _run_isolated(preset: Preset, options: BenchOptions, timeout_s: float | None
                  ) -> tuple[dict | None, PresetFailure | None]:
    reason = unavailable_reason(preset, torch.device(options.device).type)
    if reason is not None:
        return None, PresetFailure(preset.name, "skipped", reason)
    context = multiprocessing.get_context("spawn")
    pool = context.Pool(1)
    try:
        return pool.apply_async(run_one, (preset, options)).get(timeout_s), None
    except multiprocessing.TimeoutError:
        return None, PresetFailure(preset.name, "timeout", f"did not finish within {timeout_s:.0f} s")
    except Exception as exc:  # raised in the preset's process: report it and go on with the next preset
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        return None, PresetFailure(preset.name, "failed", f"{type(exc).__name__}: {first}")
    finally:
        pool.terminate()
        pool.join()


def run_one(preset: Preset, options: BenchOptions) -> dict:
    """Train `options.steps` steps with `preset` in this process and measure it."""
    from vmc_fast.config import ModelConfig, ParallelConfig, RunConfig, TrainConfig
    from vmc_fast.tuning.loop import vmc_loss, vmc_losses
    from vmc_fast.tuning.session import TuningSession
    from vmc_fast.tuning.steps import PackedTorchStep, TorchStep

    device = torch.device(options.device)
    precision = preset.precision
    attention = preset.attention
    pack = options.pack
    cfg = RunConfig(model=ModelConfig(model_id=options.model_id, gradient_checkpointing=preset.checkpointing,
                                      frozen_dtype=preset.frozen_dtype, attention=attention, compile=preset.compile),
                    train=TrainConfig(steps=options.steps, precision=precision, optimizer=preset.optimizer,
                                      seed=options.seed),
                    parallel=ParallelConfig(pack=str(pack)))
    started = time.perf_counter()
    session = TuningSession(cfg, device=options.device, num_videos=pack)
    backbone = session.backbone
    encoder, states = _text_states(session, preset, device)
    s = session.sampling
    clip = torch.randn(pack, backbone.in_channels, s.num_frames, s.height, s.width,
                       generator=torch.Generator().manual_seed(options.seed)).to(device)
    abar = backbone.noise_scheduler.alphas_cumprod.to(device, torch.float32)
    generator = torch.Generator().manual_seed(options.seed)
    if pack > 1:  # one pass over K videos, each with its own slices, noise and timestep
        step = PackedTorchStep(session.params, cfg.train)
        states = states.expand(pack, *states.shape[1:])
        videos = list(range(pack))

        def one_step() -> None:
            t = torch.randint(0, len(abar), (pack,), generator=generator).to(device)
            noise = torch.randn(clip.shape, generator=generator).to(device)
            step(vmc_losses(backbone.unet, clip, noise, t, abar, states, cfg.train), videos)
    else:
        step = TorchStep(session.params, cfg.train)

        def one_step() -> None:
            t = torch.randint(0, len(abar), (1,), generator=generator).to(device)
            noise = torch.randn(clip.shape, generator=generator).to(device)
            step(vmc_loss(backbone.unet, clip, noise, t, abar, states, cfg.train))

    setup_seconds = time.perf_counter() - started
    backbone.unet.train()
    warm_start = time.perf_counter()
    for _ in range(options.warmup):
        one_step()
    _sync(device)
    warmup_seconds = time.perf_counter() - warm_start
    graphs_before = _compiled_graphs()
    step_seconds = _timed(one_step, options.steps, device)
    del encoder
    record = _record(preset, options, session, step_seconds, warmup_seconds, setup_seconds, precision)
    # Compilation inside the timed steps would make them meaningless: raise --warmup if this is ever non-zero.
    record["graphs_compiled_while_timed"] = _compiled_graphs() - graphs_before
    record["pack"] = pack
    if pack > 1 and record["flops_per_step"]:  # the step trains K videos
        record["flops_per_step"] *= pack
        record["mfu"] = record["mfu"] * pack if record["mfu"] is not None else None
    record["videos_per_hour"] = pack * 3600 / (step_seconds * PAPER_STEPS)  # 400 steps a video, setup excluded
    if options.profile_dir is not None:
        record["kernel_launches_per_step"] = profile_steps(one_step, device, preset.name, Path(options.profile_dir))
    return record


PROFILED_STEPS = 3


def profile_steps(one_step, device: torch.device, name: str, folder: Path) -> int:
    """Run PROFILED_STEPS steps under torch.profiler; write the operator table to folder/profile-<name>.txt.
    Returns the device kernels launched per step (0 on the CPU): a step of thousands of tiny kernels is bound by
    launch overhead, which CUDA graphs or compilation remove."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(PROFILED_STEPS):
            one_step()
        _sync(device)
    events = prof.key_averages()
    launches = sum(e.count for e in events if cuda and e.device_type == torch.autograd.DeviceType.CUDA)
    table = events.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=60,
                         max_name_column_width=70)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"profile-{name}.txt").write_text(
        f"# {name}: {PROFILED_STEPS} steps under torch.profiler on {device}; "
        f"{launches / PROFILED_STEPS:.0f} device kernels per step\n{table}\n")
    return round(launches / PROFILED_STEPS)


def _compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _text_states(session, preset: Preset, device: torch.device):
    """(1, 77, D) random-prompt states; with a resident encoder, the encoder stays allocated on the device."""
    backbone = session.backbone
    encoder = None
    if preset.text_encoder_resident:
        encoder = _resident_encoder(backbone, device)
    if backbone.model_id == "show1-base-arch":
        states = torch.randn(1, 77, 4096, generator=torch.Generator().manual_seed(1))
    else:
        states = backbone.load_text_encoder()(["a benchmark prompt"])
    return encoder, states.to(device)


def _resident_encoder(backbone, device: torch.device):
    if backbone.model_id != "show1-base-arch":
        return backbone.load_text_encoder()  # the tiny encoder, kept alive
    from transformers import T5Config, T5EncoderModel

    # Random weights of T5-XXL's shape in fp16, as the public code kept it on the GPU during training.
    with torch.device("meta"):
        encoder = T5EncoderModel(T5Config(**T5_XXL))
    return encoder.to_empty(device=device).half().requires_grad_(False)


def _timed(one_step, num_steps: int, device: torch.device) -> float:
    """Mean seconds per step over `num_steps` (CUDA events on GPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(num_steps):
            one_step()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000 / num_steps
    began = time.perf_counter()
    for _ in range(num_steps):
        one_step()
    return (time.perf_counter() - began) / num_steps


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _record(preset, options, session, step_seconds, warmup_seconds, setup_seconds, precision) -> dict:
    device = torch.device(options.device)
    s = session.sampling
    flops = step_flops(options.model_id, s.num_frames, s.height, s.width)
    peak_flops = device_peak_flops(device)
    train_400 = step_seconds * PAPER_STEPS
    compile_seconds = max(0.0, warmup_seconds - step_seconds * options.warmup) if preset.compile != "off" else 0.0
    record = {
        "preset": dataclasses.asdict(preset), "precision_used": precision, "model": options.model_id,
        "frames": s.num_frames, "height": s.height, "width": s.width, "steps_timed": options.steps,
        "warmup_steps": options.warmup, "step_seconds": step_seconds, "steps_per_second": 1 / step_seconds,
        "train_seconds_400": train_400, "compile_seconds": compile_seconds, "setup_seconds": setup_seconds,
        "total_seconds_400": train_400 + compile_seconds, "flops_per_step": flops,
        "mfu": (flops / step_seconds / peak_flops) if (flops and peak_flops) else None,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "trainable_parameters": session.surgery.num_trainable,
    }
    if device.type == "cuda":
        record["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        record["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
        record["vs_paper_memory"] = record["peak_allocated_bytes"] / PAPER_MEMORY_BYTES
        record["vs_paper_time"] = record["total_seconds_400"] / PAPER_SECONDS
    return record


def step_flops(model_id: str, num_frames: int, height: int, width: int, backward: bool = True) -> float | None:
    """FLOPs of one training step (forward + backward), counted by torch on an eager copy of the model.

    Backward runs to the activations only as far as the earliest trainable layer, with weight gradients only for
    Q/K/V, so a step costs a little under 2x the forward. The base architecture is counted on the meta device.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from vmc_fast.models.registry import LoadOptions, load_backbone
    from vmc_fast.tuning.surgery import prepare_for_motion_tuning

    device = "meta" if model_id == "show1-base-arch" else "cpu"
    try:
        backbone = load_backbone(model_id, LoadOptions(device=device))
    except Exception:  # a model we cannot rebuild cheaply: report no MFU rather than fail the benchmark
        return None
    prepare_for_motion_tuning(backbone.unet)
    c = backbone.in_channels
    sample = torch.randn(1, c, num_frames, height, width, device=device)
    states = torch.randn(1, 77, _text_width(backbone), device=device)
    with FlopCounterMode(display=False) as counter:
        out = backbone.unet(sample, torch.tensor([500], device=device), states)
        out = out.sample if hasattr(out, "sample") else out
        if backward:
            out.float().sum().backward()
    return float(counter.get_total_flops())


def _text_width(backbone) -> int:
    config = backbone.unet.config
    return int(getattr(config, "encoder_hid_dim", None) or config.cross_attention_dim)


def device_peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of known accelerators (FLOP/s); None when unknown (CPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12),
                      ("L40S", 362e12), ("RTX 6000 Ada", 364e12)):
        if key in name:
            return peak
    return None


def append_record(record: dict, results_dir: Path) -> Path:
    """Append one JSON line to results_dir/bench-<device>.jsonl."""
    results_dir.mkdir(parents=True, exist_ok=True)
    kind = "cuda" if record["device"]["type"] == "cuda" else "cpu"
    path = results_dir / f"bench-{kind}.jsonl"
    with open(path, "a") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")
    return path


def _provenance(options: BenchOptions) -> dict:
    device = torch.device(options.device)
    return {
        "date": utc_now(), "git_sha": git_sha(), "versions": versions(),
        "device": {"type": device.type,
                   "name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
                   "cpu_threads": torch.get_num_threads()},
    }
