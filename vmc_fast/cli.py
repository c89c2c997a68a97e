"""The `vmc-fast` command line: parse, build the config, call one library function, render with rich.

Each command's options are generated from its config dataclass (`vmc_fast.config.options`): one option per
field, the help text from the field's docstring, nested sections shown as panels. Nothing here re-declares a
setting or its default.
"""

from __future__ import annotations

import contextlib
import inspect
import shlex
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape

from vmc_fast.config import (
    CONFIG_FILE_OPTION,
    ExportConfig,
    GenerateConfig,
    Option,
    RunConfig,
    config_from_file,
    from_options,
    options,
)
from vmc_fast.errors import VmcError

app = typer.Typer(
    name="vmc-fast",
    help="Teach a text-to-video diffusion model a motion from one short video (VMC), fast and in little memory.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _fail(message: str, console: Console) -> None:
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


LOG_WIDTH = 1000
"""Console width when output is not a terminal: rich would otherwise assume 80 columns and cut tables in logs."""


def _console(stderr: bool = False) -> Console:
    """The console of every command: a terminal's own width, or LOG_WIDTH in a log, a pipe or CI."""
    console = Console(stderr=stderr)
    if not console.is_terminal:
        console.width = LOG_WIDTH
    return console


@contextlib.contextmanager
def _interruptible(what: str | Callable[[], str]) -> Iterator[None]:
    """On Ctrl-C: print "interrupted: <what>" (a callable is asked then) on stderr and exit with status 130.

    Typer turns a KeyboardInterrupt that reaches it into a silent exit 130, so it is caught here, in the command.
    """
    try:
        yield
    except KeyboardInterrupt:
        text = what() if callable(what) else what
        _console(stderr=True).print(f"[yellow]interrupted:[/] {escape(text)}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=130) from None


# ------------------------------------------------------------------------------------------------ options


def _cli_type(option: Option) -> tuple[Any, Any, Callable[[Any], Any]]:
    """(annotation typer sees, its default, parse: CLI value -> field value) for one config field."""
    annotation, default = option.annotation, option.default
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    optional = type(None) in args
    inner = next((a for a in args if a is not type(None)), annotation) if optional else annotation
    if typing.get_origin(inner) is tuple:  # comma-separated on the command line
        item = typing.get_args(inner)[0]
        return Optional[str], ",".join(map(str, default)) if default else None, _comma_list(option.flag, item)
    if origin is dict or typing.get_origin(inner) is dict:  # NAME=ID, repeatable
        return list[str], [f"{k}={v}" for k, v in default.items()], _name_values(option.flag)
    return (Optional[inner] if optional else inner), default, lambda value: value


def _comma_list(flag: str, item: type) -> Callable[[str | None], tuple | None]:
    def parse(value: str | None) -> tuple | None:
        if value is None:
            return None
        parts = [part.strip() for part in value.split(",") if part.strip()]
        try:
            return tuple(item(part) for part in parts)
        except ValueError:
            raise ValueError(f"{flag}: {value!r} is not a comma-separated list of {item.__name__} values, e.g. "
                             f"{'0,1,2' if item is int else 'a,b'}") from None
    return parse


def _name_values(flag: str) -> Callable[[list[str]], dict[str, str]]:
    def parse(values: list[str]) -> dict[str, str]:
        pairs = {}
        for value in values:
            name, sep, source = value.partition("=")
            if not sep or not name.strip() or not source.strip():
                raise ValueError(f"{flag}: {value!r} is not NAME=ID, e.g. {flag} sr1=/models/show-1-sr1")
            pairs[name.strip()] = source.strip()
        return pairs
    return parse


def config_command(name: str, cls: type, run: Callable[..., None], *, epilog: str = "", help: str = "",
                   required: tuple[str, ...] = (), extra: tuple[inspect.Parameter, ...] = ()) -> None:
    """Register command `name`: the options of dataclass `cls` (plus `extra` parameters; a field whose option name
    has no dashes, e.g. ``option("ADAPTER")``, is a positional argument) and ``--config FILE``; on call, the config
    is built and passed to run(cfg, console, **extra values). A ValueError or VmcError ends in one red line, exit 2.

    With ``--config`` the config is the file's (`vmc_fast.config.config_from_file`), overridden by the options
    given on the command line (click's parameter source tells them from defaults). A `required` field must be
    given on the command line or by the file.
    """
    fields = options(cls)
    parsers, params = {}, []
    for field_option in fields:
        key = "_".join(field_option.path)
        annotation, default, parsers[key] = _cli_type(field_option)
        panel = field_option.path[0].title() if len(field_option.path) > 1 else None
        must = field_option.path[-1] in required
        text = field_option.help + (" Required (unless --config gives it)." if must else "")
        default = None if must else default  # checked in `command`: the file may give it
        if field_option.flag.startswith("-"):
            parameter = typer.Option(default, field_option.flag, help=text, rich_help_panel=panel,
                                     show_default=not must and default != "")
        else:  # a name without dashes (``ADAPTER``) is a positional argument
            parameter = typer.Argument(default, help=text, show_default=False, metavar=field_option.flag)
        params.append(inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                        default=parameter))
    by_key = {"_".join(f.path): f for f in fields}
    must_give = {"_".join(f.path) for f in fields if f.path[-1] in required}

    def command(ctx: typer.Context, config_file: Optional[Path], **kwargs) -> None:
        from vmc_fast.reporting import print_warnings_as_lines

        console = _console(stderr=bool(kwargs.get("json_output")))
        print_warnings_as_lines(_console(stderr=True))
        extras = {p.name: kwargs.pop(p.name) for p in extra}
        given = {k for k in kwargs if _given_on_command_line(ctx, k)}
        try:
            values = {by_key[k].path: parsers[k](v) for k, v in kwargs.items() if k in given or config_file is None}
            cfg = _build_config(cls, values, config_file, [by_key[k] for k in sorted(must_give - given)])
        except (VmcError, ValueError) as exc:
            _fail(str(exc), console)
        run(cfg, console, **extras)

    context = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
    config_param = inspect.Parameter("config_file", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
                                     default=typer.Option(None, CONFIG_FILE_OPTION, help=CONFIG_HELP))
    command.__signature__ = inspect.Signature([context, config_param, *params, *extra])
    command.__doc__ = help
    app.command(name, epilog=epilog, help=help)(command)


CONFIG_HELP = ("Settings from a file: a run folder's config.json (or the folder), or YAML with the same names; "
               "options given here override it.")


def _given_on_command_line(ctx: typer.Context, key: str) -> bool:
    """Whether option `key` was given (command line, environment or prompt), not left at its default. (By the
    source's name: typer 0.2x ships its own copy of click, whose ParameterSource is another enum.)"""
    source = ctx.get_parameter_source(key)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def _build_config(cls: type, values: dict, config_file: Path | None, missing: list[Option]) -> Any:
    """The config of one command: from `values` ({option path: value}) alone, or from `config_file` with `values`
    overriding it. `missing`: required options not given on the command line (ValueError unless the file gives
    them)."""
    if config_file is None:
        if missing:
            raise ValueError(f"{missing[0].flag}: required; give it (or a {CONFIG_FILE_OPTION} file that sets it)")
        return from_options(cls, values)
    cfg = config_from_file(cls, config_file, values)
    for field_option in missing:
        value = cfg
        for name in field_option.path:
            value = getattr(value, name)
        if value in ("", None):
            raise ValueError(f"{field_option.flag}: required; neither the command line nor {CONFIG_FILE_OPTION} "
                             f"{config_file} gives it")
    return cfg


def _flag(name: str, flag: str, help: str, default: Any = False, annotation: Any = bool) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                             default=typer.Option(default, flag, help=help))


JSON_FLAG = _flag("json_output", "--json", "Print machine-readable JSON on stdout (progress goes to stderr).")


# ------------------------------------------------------------------------------------------------ train

TRAIN_EXAMPLES = """
Examples:\n
  # the built-in example clip on the tiny built-in model\n
  vmc-fast train\n
  # one video, a local ZeroScope folder\n
  vmc-fast train --videos bird.mp4 --prompt "a bird is flying" --model ./zeroscope_v2_576w\n
  # a library: one adapter per video, 4 GPUs, resumable\n
  vmc-fast train --videos clips/ --gpus 4 --out library/\n
  # captions in clips/NAME.txt made motion-only\n
  vmc-fast train --videos clips/ --derive-prompt\n
  # a LoRA of rank 16 on the same temporal Q/K/V (PEFT): adapters of a few MB instead of hundreds\n
  vmc-fast train --videos bird.mp4 --prompt "a bird is flying" --lora-rank 16\n
  # 8 videos per pass of the frozen UNet on each of 4 GPUs (auto: as many as fit)\n
  vmc-fast train --videos clips/ --gpus 4 --pack 8 --out library/\n
  # machine 1 of 2 (the same command with --node-rank 0 on node0); folders shared\n
  vmc-fast train --videos /shared/clips --out /shared/library --gpus 8 --nodes 2 --node-rank 1 --master-addr node0\n
  # AnimateDiff: a Stable Diffusion 1.5 base + a motion adapter (its motion modules' attention Q/K/V are tuned)\n
  vmc-fast train --videos bird.mp4 --prompt "a bird is flying" --model stable-diffusion-v1-5/stable-diffusion-v1-5+guoyww/animatediff-motion-adapter-v1-5-2 --height 256 --width 256
"""


def _train(cfg: RunConfig, console: Console, json_output: bool) -> None:
    from vmc_fast.reporting import RichReporter, summary_json
    from vmc_fast.runs.launch import train

    try:
        with _interruptible(lambda: _kept_after_interrupt(cfg)):
            if cfg.data.videos == "":
                from vmc_fast.toy.examples import default_example

                cfg.data.videos, default_prompt = default_example(Path(cfg.out_dir) / "example")
                cfg.prompt = cfg.prompt or default_prompt
            reporter = RichReporter(console)
            try:
                summary = train(cfg, reporter)
            finally:
                reporter.close()
            reporter.finish(summary)
    except (VmcError, ValueError) as exc:
        _fail(str(exc), console)
    if json_output:
        print(summary_json(summary))
    if not summary.ok:
        raise typer.Exit(code=1)


def _kept_after_interrupt(cfg: RunConfig) -> str:
    from vmc_fast.runs.library import Manifest

    out = Path(cfg.out_dir).expanduser()
    entries = Manifest(out).read().values() if out.is_dir() else []
    num_done = sum(1 for e in entries if e.get("status") == "done")
    if not num_done:
        return f"no adapter was finished; rerun the same command to start again (--out {out})"
    return (f"{num_done} finished adapter{'s are' if num_done > 1 else ' is'} kept in {out}; the video being "
            f"tuned stays pending; rerun the same command to resume")


config_command("train", RunConfig, _train, epilog=TRAIN_EXAMPLES, help="Tune one motion adapter per video.",
               extra=(JSON_FLAG,))


@app.command(hidden=True)
def rank(plan_file: Path = typer.Argument(..., help="the plan the launcher wrote for its ranks")) -> None:
    """One launched rank of `vmc-fast train --gpus N` (started by torch.distributed.run, not by hand)."""
    from vmc_fast.reporting import NoiseFilteredLines, RichReporter, print_warnings_as_lines
    from vmc_fast.runs.launch import worker
    from vmc_fast.runs.library import QuietReporter

    # Rank 0 draws on stderr: the launcher's stdout carries the summary (and --json's one line), so whatever a
    # library prints on a rank's stdout goes to stderr too, less the known noise.
    print_warnings_as_lines(_console(stderr=True))
    sys.stdout = NoiseFilteredLines(sys.stderr)
    worker(str(plan_file), lambda r: RichReporter(_console(stderr=True)) if r == 0 else QuietReporter())


class _DefaultShowGroup(typer.core.TyperGroup):
    """`vmc-fast library DIR` is `vmc-fast library show DIR`: a first word that is not a sub-command (nor --help)
    is a folder, so the command from before `report` existed keeps working."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ("--help", "-h")):
            args = ["show", *args]
        return super().parse_args(ctx, args)


LIBRARY_EXAMPLES = """
Examples:\n
  # done, failed and pending videos of a run\n
  vmc-fast library vmc-out\n
  # the same as JSON, for scripts\n
  vmc-fast library vmc-out --json\n
  # a page that opens offline: vmc-out/report.html, with a short sample from every adapter\n
  vmc-fast library report vmc-out --previews
"""


library_app = typer.Typer(cls=_DefaultShowGroup, epilog=LIBRARY_EXAMPLES, no_args_is_help=False, add_completion=False,
                          help="A library run's folder: its state (`library DIR`, `--json` for scripts), or a "
                               "static HTML report (`library report DIR`).")
app.add_typer(library_app, name="library")



@library_app.command("show", epilog=LIBRARY_EXAMPLES)
def library_show(out: Path = typer.Argument(Path("vmc-out"), help="A training output folder."),
                 json_output: bool = typer.Option(False, "--json", help="Print the library's state as JSON.")) -> None:
    """Show the state of a tuning run (its manifest.jsonl): done, failed and pending videos."""
    from vmc_fast.reporting import summary_table
    from vmc_fast.runs.report import library_json, read_library

    console = _console(stderr=json_output)
    try:
        summary = read_library(out)
        if json_output:
            print(library_json(out))
            return
    except VmcError as exc:
        _fail(str(exc), console)
    console.print(summary_table(summary))
    console.print(", ".join(f"{n} {s}" for s, n in sorted(summary.counts.items())))


@library_app.command("report", epilog=LIBRARY_EXAMPLES)
def library_report(out: Path = typer.Argument(Path("vmc-out"), help="A training output folder."),
                   previews: bool = typer.Option(False, "--previews", help="Show each done video's reference "
                                                 "clip beside a short sample rendered from its adapter (slow: "
                                                 "loads the model)."),
                   steps: int = typer.Option(4, "--steps", min=1, max=1000,
                                             help="DDIM steps of each preview sample.")) -> None:
    """Write DIR/report.html, a page that opens offline: one card per video (status, prompt, time, loss)."""
    from vmc_fast.runs.report import write_report

    console = _console()
    try:
        with _interruptible("the report was not written"):
            path = write_report(out, previews=previews, steps=steps, on_card=lambda c: console.print(
                f"preview {c.name}: {c.preview_error or 'done'}", soft_wrap=True, highlight=False, markup=False))
    except (VmcError, ValueError) as exc:
        _fail(str(exc), console)
    console.print(f"[green]wrote[/] {escape(str(path))}", soft_wrap=True)


# ------------------------------------------------------------------------------------------------ generate

GENERATE_EXAMPLES = """
Examples:\n
  # the paper's recipe: invert the training clip, sample with the tuned adapter and a new prompt\n
  vmc-fast generate --adapter vmc-out/adapters/bird.safetensors --video bird.mp4 --prompt "an airplane is flying"\n
  # quick look on the CPU, the built-in example's adapter with a new subject\n
  vmc-fast generate --adapter vmc-out/adapters/example_zigzag.safetensors --prompt "a red square moving in a zigzag" --steps 20 --out zigzag.gif\n
  # invert the clip as it was tuned (the adapter's start, stride and direction), but from frame 0\n
  vmc-fast generate --adapter vmc-out/adapters/bird.safetensors --video bird.mp4 --prompt "a plane is flying" --start-frame 0\n
  # Show-1: keyframes, then interpolation and super-resolution from downloaded folders, IF-II skipped\n
  vmc-fast generate --adapter bird.safetensors --prompt "a plane is flying" --stage interpolation=/models/show-1-interpolation --stage sr1=/models/show-1-sr1 --stage sr1_first_frame=none --stage sr2=/models/show-1-sr2\n
  # the whole Show-1 cascade on the tiny random family, in seconds on a CPU\n
  vmc-fast generate --model show1-tiny-random --prompt "a dog" --steps 5 --inversion-steps 5 --cascade-steps 2
"""


def _generate(cfg: GenerateConfig, console: Console) -> None:
    from vmc_fast.inference.generate import generate
    from vmc_fast.reporting import PhaseProgress

    try:
        with _interruptible("nothing was written"), PhaseProgress(console) as on_step:
            result = generate(cfg, on_step=on_step)
    except (VmcError, ValueError) as exc:
        _fail(str(exc), console)
    console.print(f"[green]wrote[/] {escape(str(result.output))}  ({sum(result.seconds.values()):.1f} s)")
    if result.note:
        console.print(f"[yellow]note:[/] {escape(result.note)}")


config_command("generate", GenerateConfig, _generate, epilog=GENERATE_EXAMPLES, required=("prompt",),
               help="Generate a video with a motion adapter: DDIM inversion, guided sampling with the tuned UNet, "
                    "then (Show-1) the frozen interpolation and super-resolution stages.")


# ------------------------------------------------------------------------------------------------ export

EXPORT_EXAMPLES = """
Examples:\n
  # an AnimateDiff adapter for diffusers: AnimateDiffPipeline.load_lora_weights("bird-lora")\n
  vmc-fast export vmc-out/adapters/bird.safetensors --format diffusers --out bird-lora\n
  # the same for ComfyUI (copy the .safetensors to ComfyUI/models/animatediff_motion_lora/)\n
  vmc-fast export vmc-out/adapters/bird.safetensors --format comfyui --out comfy-loras\n
  # a ZeroScope or Show-1 adapter for PEFT, rank 128 (a --lora-rank adapter is written as is, at its own rank)\n
  vmc-fast export vmc-out/adapters/bird.safetensors --format peft --rank 128 --out bird-peft
"""


def _export(cfg: ExportConfig, console: Console) -> None:
    from vmc_fast.tuning.export import export_adapter

    try:
        with _interruptible("files written so far are whole; rerun to write the rest"):
            result = export_adapter(cfg)
    except (VmcError, ValueError) as exc:
        _fail(str(exc), console)
    console.print(f"[green]wrote[/] {escape(', '.join(str(f) for f in result.files))}", soft_wrap=True)
    console.print(escape(result.summary()), soft_wrap=True, highlight=False)


config_command("export", ExportConfig, _export, epilog=EXPORT_EXAMPLES, required=("adapter", "format", "out_dir"),
               help="Write a motion adapter as a LoRA for diffusers (AnimateDiff), PEFT (any model) or ComfyUI "
                    "(AnimateDiff); a full adapter becomes the truncated SVD of its change at --rank, a LoRA adapter is "
                    "written as it was trained.")


# ------------------------------------------------------------------------------------------------ studies

BENCH_EXAMPLES = """
Examples:\n
  # the default presets side by side (Show-1 base architecture on a GPU, a tiny model on CPU)\n
  vmc-fast bench\n
  # two presets, 50 timed steps, machine-readable\n
  vmc-fast bench --presets paper,fast --steps 50 --json\n
  # videos/hour when 1, 2, 4 or 8 videos share one pass (--pack)\n
  vmc-fast bench --pack 1,2,4,8 --steps 20
"""


def _bench(cfg, console: Console, json_output: bool) -> None:
    import json
    from functools import partial

    from vmc_fast.reporting import bench_table, pack_table
    from vmc_fast.studies.bench import run_packs, run_presets

    options, names = cfg.bench_options(), cfg.preset_names()
    what = f"{len(names)} presets" if cfg.pack is None else f"{names[0]} at --pack {','.join(map(str, cfg.pack))}"
    console.print(f"[bold]vmc-fast bench[/] {options.model_id} on {options.device}: {what}, "
                  f"{options.warmup} warm-up + {options.steps} timed steps each, one fresh process per run",
                  soft_wrap=True)
    run = run_presets if cfg.pack is None else partial(run_packs, names[0], list(cfg.pack))
    try:
        with _interruptible(f"runs finished so far are in {cfg.results}"):
            records, failures = run(
                *([names] if cfg.pack is None else []), options, Path(cfg.results), timeout_s=cfg.preset_timeout,
                on_result=lambda r: console.print(f"  {r['preset']['name']} --pack {r['pack']}: "
                                                  f"{r['step_seconds'] * 1000:.1f} ms/step, "
                                                  f"{r['compile_seconds']:.0f} s compiling", soft_wrap=True),
                on_failure=lambda f: console.print(f"  {f.name}: {f.status}: {f.reason}", soft_wrap=True))
    except (VmcError, ValueError) as exc:
        _fail(str(exc), console)
    if records:
        console.print(bench_table(records) if cfg.pack is None else pack_table(records))
    for failure in failures:
        console.print(f"[yellow]{failure.name}: {failure.status}[/]: {escape(failure.reason)}", soft_wrap=True)
    if json_output:
        for record in records:
            print(json.dumps(record, sort_keys=True))
    if not records or any(f.status != "skipped" for f in failures):
        raise typer.Exit(1)


def _register_studies() -> None:
    """bench, demo, eval and toy-pretrain: their configs live with the studies and the toy world."""
    from vmc_fast.studies.bench import BenchConfig
    from vmc_fast.studies.demo import DemoConfig
    from vmc_fast.studies.evaluation import EvalConfig
    from vmc_fast.toy.pretrain import PretrainConfig

    config_command("bench", BenchConfig, _bench, epilog=BENCH_EXAMPLES, extra=(JSON_FLAG,),
                   help="Peak memory and wall-clock of training per preset, against the paper's 15 GB / 5 min.")
    config_command("demo", DemoConfig, _demo, epilog=DEMO_EXAMPLES,
                   help="Tune the built-in toy model on a motion it never saw, render it with new appearances, "
                        "and score it.")
    config_command("eval", EvalConfig, _eval, epilog=EVAL_EXAMPLES,
                   help="Measure motion transfer on held-out toy motions: tuning variants side by side, as "
                        "markdown, JSON and PNG.")
    config_command("toy-pretrain", PretrainConfig, _toy_pretrain, epilog=PRETRAIN_EXAMPLES, required=("out",),
                   help="Pretrain the built-in toy model on procedural toy-world clips (resumable), and export it.",
                   extra=(_flag("resume", "--resume", "Continue the checkpoint in --out."),
                          _flag("export", "--export", "After training, write the shipped files."),
                          _flag("export_only", "--export-only", "Only export --out's latest checkpoint."),
                          _flag("export_dir", "--export-dir", "Where --export writes (default: the package's toy "
                                "assets).", default=None, annotation=Optional[str])))


DEMO_EXAMPLES = """
Examples:\n
  # the built-in default: tune on the shipped zigzag clip, render it in new colours and shapes (CPU, minutes)\n
  vmc-fast demo --out runs/demo\n
  # another held-out motion, a quicker look\n
  vmc-fast demo --motion spiral --steps 100 --samples 2
"""


def _demo(cfg, console: Console) -> None:
    from vmc_fast.reporting import scores_table, units_progress
    from vmc_fast.studies.demo import run_demo

    console = Console(width=None if sys.stdout.isatty() else 200)  # the side-by-side table is wide
    try:
        console.print(f"[bold]vmc-fast demo[/]: tune the toy model on the shipped [cyan]{cfg.motion}[/] clip "
                      f"({cfg.steps} steps), then render it with {cfg.samples} new appearances")
        progress, on_progress = units_progress(console, cfg.motion)
        with _interruptible(f"the demo stopped; files already written are in {cfg.out_dir}"), progress:
            result = run_demo(cfg, on_progress)
    except (VmcError, ValueError) as exc:
        _fail(str(exc), console)
    console.print(scores_table(result["samples"], title=f"tuned on {result['prompt']!r}"))
    console.print(f"[green]wrote[/] {result['gif']} (reference, then per look untuned and tuned, from noise and from inversion), {result['adapter']}, "
                  f"{result['json']}")


EVAL_EXAMPLES = """
Examples:\n
  # the whole comparison (7 variants x 3 held-out motions), tables and figure under benchmarks/eval\n
  vmc-fast eval\n
  # two variants, one motion, quick\n
  vmc-fast eval --variants no-tuning,cos --motions zigzag --steps 100 --samples 2 --out /tmp/eval
"""


def _eval(cfg, console: Console) -> None:
    from vmc_fast.reporting import eval_table, units_progress
    from vmc_fast.studies.evaluation import run_eval

    try:
        console.print(f"[bold]vmc-fast eval[/]: {len(cfg.variants)} variants x {len(cfg.motions)} motions x "
                      f"{len(cfg.seeds)} seed(s), {cfg.samples} new appearances each")
        progress, on_progress = units_progress(console, "eval")
        with _interruptible(f"the evaluation stopped; files already written are in {cfg.out_dir}"), progress:
            report = run_eval(cfg, on_progress)
    except (VmcError, ValueError) as exc:
        _fail(str(exc), console)
    console.print(eval_table(report["summary"]))
    for line in report["findings"]:
        console.print(f"- {line}")
    console.print(f"[green]wrote[/] {cfg.out_dir}/eval.md, {cfg.out_dir}/eval.json, {cfg.out_dir}/eval.png")


PRETRAIN_EXAMPLES = """
Examples:\n
  # a short run, then ship its weights into the package\n
  vmc-fast toy-pretrain --out runs/toy --steps 300 --export\n
  # continue it to 600 steps\n
  vmc-fast toy-pretrain --out runs/toy --steps 600 --resume
"""


def _toy_pretrain(cfg, console: Console, resume: bool, export: bool, export_only: bool,
                  export_dir: str | None) -> None:
    from vmc_fast.toy.pretrain import export as export_weights
    from vmc_fast.toy.pretrain import pretrain

    destination = {} if export_dir is None else {"dest": export_dir}
    command = shlex.join(["vmc-fast", *sys.argv[1:]])
    try:
        if not export_only:
            pretrain(cfg, resume=resume, log=lambda line: console.print(line, soft_wrap=True, highlight=False),
                     command=command)
        if export or export_only:
            console.print(f"exported to {export_weights(cfg.out, **destination, command=command)}")
    except (VmcError, ValueError) as exc:
        _fail(str(exc), console)


_register_studies()


def main() -> None:
    app()  # Ctrl-C: each long command says what it keeps (`_interruptible`)


if __name__ == "__main__":
    main()
