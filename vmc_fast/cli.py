"""The `vmc-fast` command line: parse, build the config, call one library function, render with rich."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from vmc_fast.errors import VmcError

app = typer.Typer(
    name="vmc-fast",
    help="Teach a text-to-video diffusion model a motion from one short video (VMC), fast and in little memory.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

TRAIN_EXAMPLES = """
Examples:\n
  # the built-in example clip on the tiny built-in model\n
  vmc-fast train\n
  # one video, a local ZeroScope folder\n
  vmc-fast train --videos bird.mp4 --prompt "a bird is flying" --model ./zeroscope_v2_576w\n
  # a library: one adapter per video, 4 GPUs, resumable\n
  vmc-fast train --videos clips/ --gpus 4 --out library/\n
  # captions in clips/NAME.txt made motion-only\n
  vmc-fast train --videos clips/ --derive-prompt
"""


def _fail(message: str, console: Console) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


@app.command(epilog=TRAIN_EXAMPLES)
def train(
    videos: Optional[Path] = typer.Option(None, "--videos", help="Video file (mp4/webm/mov/gif), frame folder, or "
                                          "folder of those. Default: the built-in example clip."),
    prompt: Optional[str] = typer.Option(None, help="Prompt for videos without their own NAME.txt / prompts.yaml."),
    derive_prompt: bool = typer.Option(False, "--derive-prompt", help="Make prompts appearance-invariant by "
                                       "dropping place phrases ('a bird flying above a lake' -> 'a bird flying')."),
    out: Path = typer.Option(Path("vmc-out"), "--out", help="Output folder: adapters/, manifest.jsonl, config.json."),
    model: str = typer.Option("tiny-random", "--model", help="Built-in name, hub id or local folder."),
    steps: int = typer.Option(400, help="Optimizer steps per video (paper: 400)."),
    seed: int = typer.Option(0, help="Random seed."),
    gpus: int = typer.Option(1, "--gpus", help="Ranks (GPUs; CPU ranks with gloo when there is no CUDA)."),
    strategy: str = typer.Option("auto", help="videos: one rank per video; zero: DeepSpeed ZeRO on one video."),
    zero_stage: int = typer.Option(2, help="DeepSpeed ZeRO stage for --strategy zero."),
    deepspeed_config: Optional[Path] = typer.Option(None, help="DeepSpeed JSON config to start from "
                                                    "(see ds_configs/); our recipe's fields override it."),
    loss: str = typer.Option("cos", help="cos | l2 | cos-frames-abs | eps-mse."),
    loss_stride: int = typer.Option(1, help="Frame offset of the noise residuals."),
    lr: float = typer.Option(1e-4, "--lr", help="AdamW learning rate."),
    optimizer: str = typer.Option("adamw", help="adamw | adamw8bit."),
    precision: str = typer.Option("auto", help="auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16."),
    frames: Optional[int] = typer.Option(None, "--frames", help="Frames per clip (default: the model's)."),
    frame_stride: int = typer.Option(1, help="Take every k-th frame."),
    start_frame: int = typer.Option(0, help="First frame to take."),
    height: Optional[int] = typer.Option(None, help="Frame height (default: the model's)."),
    width: Optional[int] = typer.Option(None, help="Frame width (default: the model's)."),
    resize: str = typer.Option("crop", help="crop (keep aspect) | squash (the paper's code)."),
    reverse: bool = typer.Option(False, "--reverse", help="Play the clip backwards."),
    checkpointing: bool = typer.Option(False, "--checkpointing", help="Gradient checkpointing."),
    frozen_dtype: str = typer.Option("auto", help="Frozen weights: auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | "
                                     "int8 (8-bit linears + fp8 convs)."),
    attention: str = typer.Option("sdpa", help="Temporal attention: sdpa | xformers | triton."),
    compile_mode: str = typer.Option("off", "--compile", help="torch.compile: off | regional | full."),
    trainable: Optional[str] = typer.Option(None, help="Regex of tuned parameter names (default: temporal Q/K/V)."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON summary on stdout (progress to stderr)."),
) -> None:
    """Tune one motion adapter per video."""
    console = Console(stderr=json_output)
    try:
        cfg = _train_config(locals())
        if cfg.data.videos == "":
            from vmc_fast.toy.examples import default_example

            cfg.data.videos, default_prompt = default_example(Path(cfg.out_dir) / "example")
            cfg.prompt = cfg.prompt or default_prompt
        summary = _run_train(cfg, console, json_output)
    except (VmcError, ValueError) as exc:
        _fail(str(exc), console)
    if json_output:
        from vmc_fast.reporting import summary_json

        print(summary_json(summary))
    if not summary.ok:
        raise typer.Exit(code=1)


def _train_config(args: dict):
    from vmc_fast.config import DataConfig, ModelConfig, ParallelConfig, RunConfig, TrainConfig
    from vmc_fast.tuning.surgery import DEFAULT_TRAINABLE_PATTERN

    return RunConfig(
        data=DataConfig(videos=str(args["videos"] or ""), num_frames=args["frames"],
                        frame_stride=args["frame_stride"], start_frame=args["start_frame"], height=args["height"],
                        width=args["width"], resize=args["resize"], reverse=args["reverse"]),
        model=ModelConfig(model_id=args["model"], trainable_pattern=args["trainable"] or DEFAULT_TRAINABLE_PATTERN,
                          gradient_checkpointing=args["checkpointing"], frozen_dtype=args["frozen_dtype"],
                          attention=args["attention"], compile=args["compile_mode"]),
        train=TrainConfig(steps=args["steps"], learning_rate=args["lr"], loss=args["loss"],
                          loss_stride=args["loss_stride"], seed=args["seed"], precision=args["precision"],
                          optimizer=args["optimizer"]),
        parallel=ParallelConfig(num_ranks=args["gpus"], strategy=args["strategy"], zero_stage=args["zero_stage"],
                                deepspeed_config=str(args["deepspeed_config"]) if args["deepspeed_config"] else None),
        prompt=args["prompt"], derive_prompt=args["derive_prompt"], out_dir=str(args["out"]),
    )


def _run_train(cfg, console: Console, json_output: bool):
    from vmc_fast.runs.launch import train
    from vmc_fast.reporting import RichReporter

    reporter = RichReporter(console)
    try:
        summary = train(cfg, reporter)
    finally:
        reporter.progress.stop()
    reporter.finish(summary)
    return summary


@app.command()
def library(out: Path = typer.Argument(Path("vmc-out"), help="A training output folder.")) -> None:
    """Show the state of a tuning run (its manifest.jsonl): done, failed and pending videos."""
    from vmc_fast.runs.library import Manifest, RunSummary
    from vmc_fast.reporting import summary_table

    console = Console()
    if not (out / "manifest.jsonl").is_file():
        _fail(f"{out}: no manifest.jsonl; pass the --out folder of a `vmc-fast train` run", console)
    summary = RunSummary(out_dir=out, entries=list(Manifest(out).read().values()))
    console.print(summary_table(summary))
    console.print(", ".join(f"{n} {s}" for s, n in sorted(summary.counts.items())))


GENERATE_EXAMPLES = """
Examples:\n
  # the paper's recipe: invert the training clip, sample with the tuned adapter and a new prompt\n
  vmc-fast generate --adapter vmc-out/adapters/bird.safetensors --video bird.mp4 --prompt "an airplane is flying"\n
  # quick look on the CPU\n
  vmc-fast generate --adapter vmc-out/adapters/example_zigzag.safetensors --steps 20 --out zigzag.gif\n
  # Show-1: keyframes, then interpolation and super-resolution from downloaded folders, IF-II skipped\n
  vmc-fast generate --adapter bird.safetensors --prompt "a plane is flying" --stage interpolation=/models/show-1-interpolation --stage sr1=/models/show-1-sr1 --stage sr1_first_frame=none --stage sr2=/models/show-1-sr2\n
  # the whole Show-1 cascade on the tiny random family, in seconds on a CPU\n
  vmc-fast generate --model show1-tiny-random --prompt "a dog" --steps 5 --inversion-steps 5 --cascade-steps 2
"""


@app.command(epilog=GENERATE_EXAMPLES)
def generate(
    prompt: str = typer.Option(..., help="Target prompt, e.g. 'an airplane is flying in the sky'."),
    adapter: Optional[Path] = typer.Option(None, help="Motion adapter from `vmc-fast train` (none: untuned)."),
    video: Optional[Path] = typer.Option(None, help="Clip to DDIM-invert into the starting noise (the paper "
                                         "inverts the training clip); none: pure noise."),
    model: Optional[str] = typer.Option(None, "--model", help="Base model (default: the adapter's)."),
    out: Path = typer.Option(Path("vmc-out/generated.gif"), "--out", help="Output video (.gif or .mp4)."),
    steps: int = typer.Option(75, help="DDIM sampling steps (paper: 75)."),
    inversion_steps: int = typer.Option(75, help="DDIM inversion steps (paper: 75)."),
    guidance_scale: float = typer.Option(9.0, help="Classifier-free guidance (paper: 9.0)."),
    negative_prompt: str = typer.Option("", help="Unconditional prompt."),
    seed: int = typer.Option(0, help="Seed of the starting noise without --video."),
    frames: Optional[int] = typer.Option(None, "--frames", help="Frames (default: the adapter's)."),
    height: Optional[int] = typer.Option(None, help="Height (default: the adapter's)."),
    width: Optional[int] = typer.Option(None, help="Width (default: the adapter's)."),
    precision: str = typer.Option("auto", help="auto | fp32 | bf16 | fp16."),
    keyframes_only: bool = typer.Option(False, "--keyframes-only", help="Show-1: stop after the keyframes (skip "
                                        "interpolation and super-resolution)."),
    cascade_steps: Optional[int] = typer.Option(None, help="Show-1: steps of every cascade stage (default: the "
                                                "public script's 75 / 70 / 125 / 50)."),
    stage: list[str] = typer.Option([], "--stage", help="Show-1: NAME=ID to load a cascade stage from a hub id "
                                    "or folder (interpolation, sr1_first_frame, sr1, sr2); sr1_first_frame=none "
                                    "skips IF-II. Repeatable."),
) -> None:
    """Generate a video with a motion adapter: DDIM inversion, guided sampling with the tuned UNet, then (Show-1)
    the frozen interpolation and super-resolution stages."""
    from vmc_fast.inference.generate import GenerateConfig
    from vmc_fast.inference.generate import generate as run_generate

    console = Console()
    try:
        model_id = model or (_adapter_base(adapter) if adapter else "tiny-random")
        cfg = GenerateConfig(model_id=model_id, prompt=prompt, adapter=str(adapter) if adapter else None,
                             video=str(video) if video else None, negative_prompt=negative_prompt,
                             num_inference_steps=steps, inversion_steps=inversion_steps,
                             guidance_scale=guidance_scale, seed=seed, num_frames=frames, height=height,
                             width=width, output=str(out), precision=precision, keyframes_only=keyframes_only,
                             cascade_steps=cascade_steps, stages=_stage_sources(stage))
        with _phase_progress(console) as on_step:
            result = run_generate(cfg, on_step=on_step)
    except (VmcError, ValueError) as exc:
        _fail(str(exc), console)
    console.print(f"[green]wrote[/] {result.output}  ({sum(result.seconds.values()):.1f} s)")
    if result.note:
        console.print(f"[yellow]note:[/] {result.note}")


def _stage_sources(values: list[str]) -> dict[str, str]:
    """['interpolation=/models/x', ...] -> {'interpolation': '/models/x'}; ValueError naming the bad one."""
    sources = {}
    for value in values:
        name, sep, source = value.partition("=")
        if not sep or not name.strip() or not source.strip():
            raise ValueError(f"--stage: {value!r} is not NAME=ID, e.g. --stage sr1=/models/show-1-sr1")
        sources[name.strip()] = source.strip()
    return sources


def _adapter_base(adapter: Path) -> str:
    from vmc_fast.tuning.adapters import read_adapter

    return read_adapter(adapter)[1].base_model


class _phase_progress:
    """A rich bar per phase (invert, sample) fed by generate's on_step(phase, step, total)."""

    def __init__(self, console: Console):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(bar_width=24),
                                 MofNCompleteColumn(), TextColumn("ETA"), TimeRemainingColumn(compact=True),
                                 console=console)
        self.tasks: dict[str, int] = {}

    def __enter__(self):
        self.progress.start()
        return self.on_step

    def __exit__(self, *exc):
        self.progress.stop()

    def on_step(self, phase: str, step: int, total: int) -> None:
        if phase not in self.tasks:
            self.tasks[phase] = self.progress.add_task(phase, total=total)
        self.progress.update(self.tasks[phase], completed=step)


BENCH_EXAMPLES = """
Examples:\n
  # the default presets side by side (Show-1 base architecture on a GPU, a tiny model on CPU)\n
  vmc-fast bench\n
  # two presets, 50 timed steps, machine-readable\n
  vmc-fast bench --presets paper,fast --steps 50 --json
"""


@app.command(epilog=BENCH_EXAMPLES)
def bench(
    presets: Optional[str] = typer.Option(None, help="Comma-separated presets (default: paper, fast, fast-eager, "
                                          "fast+int8, paper+bf16, paper-t5-freed on GPU; eager ones on CPU). All: "
                                          "paper, paper-t5-freed, paper+bf16, paper-no-ckpt, paper+compile, fast, "
                                          "fast-eager, fast+ckpt, fast+int8, fast+triton, fast+xformers, "
                                          "fast-eager+ckpt, fast-eager+int8. `-X` removes or swaps one lever of its parent, `+X` "
                                          "adds one."),
    model: Optional[str] = typer.Option(None, help="Backbone (default: show1-base-arch on GPU, "
                                        "show1-tiny-random on CPU)."),
    steps: Optional[int] = typer.Option(None, help="Timed steps (default: 400 on GPU, 10 on CPU)."),
    warmup: Optional[int] = typer.Option(None, help="Untimed warm-up steps (they include compilation)."),
    preset_timeout: Optional[float] = typer.Option(None, help="Seconds one preset may take, its process start, "
                                                   "model build and compilation included; a slower one is "
                                                   "reported as timed out and the next one runs."),
    results: Path = typer.Option(Path("benchmarks/results"), help="Folder for the JSON-lines records."),
    profile: Optional[Path] = typer.Option(None, help="After timing, profile 3 steps of each preset with "
                                           "torch.profiler and write FOLDER/profile-<preset>.txt."),
    json_output: bool = typer.Option(False, "--json", help="Print the records as JSON lines on stdout."),
) -> None:
    """Peak memory and wall-clock of training per preset, against the paper's 15 GB / 5 min."""
    from vmc_fast.studies.bench import default_options, default_presets, run_presets
    from vmc_fast.reporting import bench_table

    # In a log (no terminal) rich would cut the table to 80 columns; records are read from logs of GPU slots.
    console = Console(stderr=json_output, width=None if sys.stdout.isatty() else 200)
    options = default_options()
    options.model_id = model or options.model_id
    options.steps = steps if steps is not None else options.steps
    options.warmup = warmup if warmup is not None else options.warmup
    options.profile_dir = str(profile) if profile is not None else None
    if options.steps < 1 or options.warmup < 0:
        _fail("--steps must be at least 1 and --warmup 0 or more", console)
    if preset_timeout is not None and preset_timeout <= 0:
        _fail("--preset-timeout must be a positive number of seconds", console)
    names = [n.strip() for n in presets.split(",") if n.strip()] if presets else list(default_presets())
    console.print(f"[bold]vmc-fast bench[/] {options.model_id} on {options.device}: {len(names)} presets, "
                  f"{options.warmup} warm-up + {options.steps} timed steps each, one fresh process per preset",
                  soft_wrap=True)
    try:
        records, failures = run_presets(
            names, options, results, timeout_s=preset_timeout,
            on_result=lambda r: console.print(f"  {r['preset']['name']}: {r['step_seconds'] * 1000:.1f} ms/step, "
                                              f"{r['compile_seconds']:.0f} s compiling", soft_wrap=True),
            on_failure=lambda f: console.print(f"  {f.name}: {f.status}: {f.reason}", soft_wrap=True))
    except (VmcError, ValueError) as exc:
        _fail(str(exc), console)
    if records:
        console.print(bench_table(records))
    for failure in failures:
        console.print(f"[yellow]{failure.name}: {failure.status}[/]: {failure.reason}", soft_wrap=True)
    if json_output:
        import json

        for record in records:
            print(json.dumps(record, sort_keys=True))
    if not records or any(f.status != "skipped" for f in failures):
        raise typer.Exit(1)


DEMO_EXAMPLES = """
Examples:\n
  # the built-in default: tune on the shipped zigzag clip, render it in new colours and shapes (CPU, minutes)\n
  vmc-fast demo --out runs/demo\n
  # another held-out motion, a quicker look\n
  vmc-fast demo --motion spiral --steps 100 --samples 2
"""


PLAIN_PROGRESS_EVERY_S = 60.0
"""Without a terminal (a log file, CI), long commands print a progress line at most this often."""


def _units_progress(console: Console, description: str):
    """A rich bar over UNet calls (tuning and denoising steps) with ETA; returns (progress, callback).

    Rich draws nothing live without a terminal, so there the callback also prints a plain line now and then.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(),
                        TextColumn("UNet calls  ETA"), TimeRemainingColumn(compact=True), console=console)
    task = progress.add_task(description, total=None)
    start = last = time.monotonic()

    def on_progress(label: str, done: int, total: int) -> None:
        nonlocal last
        progress.update(task, description=label, completed=done, total=total)
        now = time.monotonic()
        if not console.is_terminal and (now - last >= PLAIN_PROGRESS_EVERY_S or done == total) and done:
            last = now
            eta = (now - start) / done * (total - done)
            console.print(f"{label}: {done}/{total} UNet calls, {now - start:.0f} s elapsed, ETA {eta / 60:.1f} min",
                          soft_wrap=True)  # one line per report in a log, whatever width rich guesses

    return progress, on_progress


@app.command(epilog=DEMO_EXAMPLES)
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Output folder: adapters/, demo.gif, demo.json."),
    motion: str = typer.Option("zigzag", help="Held-out motion of the shipped example: zigzag | figure-eight | "
                               "spiral."),
    steps: int = typer.Option(400, help="Tuning steps (paper: 400)."),
    samples: int = typer.Option(3, help="New appearances to render."),
    seed: int = typer.Option(0, help="Seed of tuning and of the new appearances."),
    inference_steps: int = typer.Option(25, help="DDIM inversion and sampling steps (paper: 75)."),
    guidance_scale: float = typer.Option(4.0, help="Classifier-free guidance."),
) -> None:
    """Tune the built-in toy model on a motion it never saw, render it with new appearances, and score it."""
    from vmc_fast.studies.demo import DemoConfig, run_demo
    from vmc_fast.reporting import scores_table

    console = Console()
    try:
        cfg = DemoConfig(out_dir=str(out), motion=motion, steps=steps, samples=samples, seed=seed,
                         inference_steps=inference_steps, guidance_scale=guidance_scale)
        console.print(f"[bold]vmc-fast demo[/]: tune the toy model on the shipped [cyan]{motion}[/] clip "
                      f"({steps} steps), then render it with {samples} new appearances")
        progress, on_progress = _units_progress(console, motion)
        with progress:
            result = run_demo(cfg, on_progress)
    except (VmcError, ValueError) as exc:
        _fail(str(exc), console)
    console.print(scores_table(result["samples"], title=f"tuned on {result['prompt']!r}"))
    console.print(f"[green]wrote[/] {result['gif']} (reference, then each new appearance), {result['adapter']}, "
                  f"{result['json']}")


EVAL_EXAMPLES = """
Examples:\n
  # the whole comparison (7 variants x 3 held-out motions), tables and figure under benchmarks/eval\n
  vmc-fast eval\n
  # two variants, one motion, quick\n
  vmc-fast eval --variants no-tuning,cos --motions zigzag --steps 100 --samples 2 --out /tmp/eval
"""


def _names(value: Optional[str]) -> Optional[tuple[str, ...]]:
    return tuple(n.strip() for n in value.split(",") if n.strip()) if value is not None else None


@app.command("eval", epilog=EVAL_EXAMPLES)
def eval_command(
    out: Path = typer.Option(Path("benchmarks/eval"), "--out", help="Folder for eval.md, eval.json, eval.png."),
    variants: Optional[str] = typer.Option(None, help="Comma-separated rows (default: all): no-tuning, cos, l2, "
                                           "cos-frames-abs, eps-mse, spatial, faithful-prompt."),
    motions: Optional[str] = typer.Option(None, help="Comma-separated held-out motions (default: zigzag, "
                                          "figure-eight, spiral)."),
    samples: int = typer.Option(3, help="New appearances per motion and seed."),
    seeds: str = typer.Option("0", help="Comma-separated seeds; each tunes again and draws new appearances."),
    steps: int = typer.Option(400, help="Tuning steps per variant and clip (paper: 400)."),
    lr: float = typer.Option(1e-4, "--lr", help="Tuning learning rate (paper: 1e-4)."),
    inference_steps: int = typer.Option(25, help="DDIM inversion and sampling steps (paper: 75)."),
    guidance_scale: float = typer.Option(4.0, help="Classifier-free guidance."),
    clip_model: Optional[str] = typer.Option(None, help="CLIP hub id or folder for the CLIP metrics "
                                             "(tiny-random: an untrained tiny CLIP, for smoke runs)."),
    model: str = typer.Option("toy", "--model", help="Base model; must know the toy world."),
) -> None:
    """Measure motion transfer on held-out toy motions: tuning variants side by side, as markdown, JSON and PNG."""
    from vmc_fast.studies.evaluation import EvalConfig, run_eval

    console = Console()
    try:
        seed_list = tuple(int(s) for s in _names(seeds))
    except ValueError:
        _fail(f"--seeds: {seeds!r} is not a comma-separated list of integers, e.g. 0,1,2", console)
    try:
        chosen = {name: value for name, value in (("variants", _names(variants)), ("motions", _names(motions)))
                  if value}  # the rest: EvalConfig's defaults
        cfg = EvalConfig(model_id=model, **chosen, samples=samples, seeds=seed_list,
                         steps=steps, learning_rate=lr, inference_steps=inference_steps,
                         guidance_scale=guidance_scale, clip_model=clip_model, out_dir=str(out))
        console.print(f"[bold]vmc-fast eval[/]: {len(cfg.variants)} variants x {len(cfg.motions)} motions x "
                      f"{len(cfg.seeds)} seed(s), {cfg.samples} new appearances each")
        progress, on_progress = _units_progress(console, "eval")
        with progress:
            report = run_eval(cfg, on_progress)
    except (VmcError, ValueError) as exc:
        _fail(str(exc), console)
    from vmc_fast.reporting import eval_table

    console.print(eval_table(report["summary"]))
    for line in report["findings"]:
        console.print(f"- {line}")
    console.print(f"[green]wrote[/] {out}/eval.md, {out}/eval.json, {out}/eval.png")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        print("interrupted; finished adapters are kept, rerun the same command to resume", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
