"""Rich rendering of a run: the config at start, a progress bar with loss, steps/s, ETA and peak memory, a summary."""

from __future__ import annotations

import io
import logging
import re
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from vmc_fast.config import RunConfig
from vmc_fast.io.video import ClipInfo
from vmc_fast.runs.library import Job, RunProgress, RunSummary, strict_json
from vmc_fast.tuning.loop import StepStats


def peak_memory_text() -> str:
    """Peak accelerator memory allocated so far, or the process's peak RSS on the CPU."""
    if torch.cuda.is_available():
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB vRAM"
    import resource

    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS"


class RichReporter:
    """Draws one bar per video (steps) under one bar for the run (videos done of total, videos/hour, ETA; counted
    from the manifest, so on rank 0 it counts every rank's videos). Rich draws no live bar without a terminal, so
    there (a log file, CI) it prints plain lines instead: one when a video starts, one at most every
    PLAIN_PROGRESS_EVERY_S while it is tuned and one at its last step, and one for the run whenever a video of
    any rank finishes."""

    def __init__(self, console: Console, show_progress: bool = True):
        self.console = console
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(bar_width=16), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]}"),
            TextColumn("ETA"), TimeRemainingColumn(compact=True), TextColumn("{task.fields[memory]}"),
            console=console, disable=not show_progress, transient=False,
        )
        self._run_task = None
        self._video_task = None
        self._video_name = ""
        self._last_line = 0.0
        self.run_progress: RunProgress | None = None
        self._last_poll = 0.0
        self._finished = 0

    def run_started(self, cfg: RunConfig, jobs: list[Job], num_skipped: int) -> None:
        saved = f"saved to {cfg.out_dir}/config.json" if jobs else "nothing to tune, nothing written"
        self.console.print(f"[bold]vmc-fast train[/] config ({escape(saved)}):")
        self.console.print_json(cfg.with_absolute_paths().to_json())  # as config.json holds it
        if num_skipped:
            self.console.print(f"resuming: {num_skipped} video(s) already done, {len(jobs)} to tune")
        for job in jobs:
            if job.prompt and job.source_prompt != job.prompt:
                self.console.print(f"prompt for {escape(job.video.name)}: [cyan]{escape(repr(job.prompt))}[/] "
                                   f"(derived from {escape(repr(job.source_prompt))})")
        self.progress.start()
        self.run_progress = RunProgress(Path(cfg.out_dir).expanduser(), [str(j.video) for j in jobs], num_skipped)
        self._run_task = self.progress.add_task("videos", total=self.run_progress.total, completed=num_skipped,
                                                loss="-", rate="", memory="")

    def video_started(self, job: Job, index: int, total: int) -> None:
        if self._video_task is not None:
            self.progress.remove_task(self._video_task)
        self._video_task = self.progress.add_task(escape(job.video.name[:20]), total=None, loss="-", rate="",
                                                  memory="")
        self._video_name, self._last_line = job.video.name, time.monotonic()
        if not self.console.is_terminal:
            self._plain(f"video {index}/{total}: {job.video.name} -> {job.adapter}")

    def clip_loaded(self, job: Job, info: ClipInfo) -> None:
        """One plain line: which frames were taken, how they were turned, cropped and resized."""
        self.progress.console.print(info.summary(), soft_wrap=True, highlight=False, markup=False)

    def step(self, stats: StepStats) -> None:
        rate = stats.step / stats.seconds if stats.seconds > 0 else 0.0
        memory = peak_memory_text()
        self.progress.update(self._video_task, total=stats.num_steps, completed=stats.step,
                             loss=f"{stats.loss:.4f}", rate=f"{rate:.2f} steps/s", memory=memory)
        now = time.monotonic()
        if now - self._last_poll >= RUN_POLL_EVERY_S:
            self._update_run()
        if self.console.is_terminal or (now - self._last_line < PLAIN_PROGRESS_EVERY_S and
                                        stats.step < stats.num_steps):
            return
        self._last_line = now
        eta = (stats.num_steps - stats.step) / rate / 60 if rate > 0 else float("nan")
        self._plain(f"{self._video_name}: step {stats.step}/{stats.num_steps}, loss {stats.loss:.4f}, "
                    f"{rate:.2f} steps/s, ETA {eta:.1f} min, {memory}")

    def _plain(self, line: str) -> None:
        self.console.print(line, soft_wrap=True, highlight=False, markup=False)  # one line, whatever the width

    def video_finished(self, job: Job, entry: dict) -> None:
        if entry["status"] == "failed":
            self.progress.console.print(f"[red]failed[/] {escape(job.video.name)}: {escape(entry['error'])}",
                                        soft_wrap=True)
        else:
            self.progress.console.print(f"[green]done[/] {escape(job.video.name)} -> {escape(entry['adapter'])} "
                                        f"(final loss {entry['final_loss']:.4f}, {entry['seconds']:.1f} s)")
        self._update_run()

    def _update_run(self) -> None:
        """Count the run's finished videos (every rank's) in the manifest; a plain line when that changed."""
        if self.run_progress is None:
            return
        self._last_poll = time.monotonic()
        run = self.run_progress.poll()
        self.progress.update(self._run_task, completed=run.done + run.failed,
                             description=f"videos · {run.rate_text()} · {run.eta_text()}")
        if run.finished_now != self._finished:
            self._finished = run.finished_now
            if not self.console.is_terminal:
                self._plain(run.line())

    def close(self) -> None:
        """Stop the live display if it was started (stopping one that never started prints a blank line)."""
        if self.progress.live.is_started:
            self.progress.stop()

    def finish(self, summary: RunSummary) -> None:
        self.close()
        self.console.print(summary_table(summary))


def summary_table(summary: RunSummary) -> Table:
    table = Table(title=f"vmc-fast: {summary.out_dir}/manifest.jsonl")
    for column in ("video", "status", "final loss", "seconds", "adapter / error"):
        table.add_column(column)
    for e in summary.entries:
        loss = f"{e['final_loss']:.4f}" if "final_loss" in e and e["status"] == "done" else ""
        secs = f"{e['seconds']:.1f}" if "seconds" in e and e["status"] == "done" else ""
        style = {"done": "green", "failed": "red"}.get(e["status"], "yellow")
        table.add_row(escape(e["video"]), f"[{style}]{e['status']}[/]", loss, secs,
                      escape(e.get("adapter") or e.get("error", "")))
    return table


def summary_json(summary: RunSummary) -> str:
    """The run's summary as strict JSON (a NaN or inf value is written as null, never as a bare NaN)."""
    return strict_json({"out_dir": str(summary.out_dir), "ok": summary.ok, "counts": summary.counts,
                        "videos": summary.entries})


def bench_table(records: list[dict]) -> Table:
    """One row per preset; on the CPU, ratios to the first preset stand in for absolute vRAM figures."""
    first = records[0]
    cuda = "peak_allocated_bytes" in first
    table = Table(title=f"vmc-fast bench: {first['model']} {first['frames']}x{first['height']}x{first['width']}, "
                        f"{first['device']['name']}")
    columns = ["preset", "ms/step", "steps/s", "400 steps (s)", "compile (s)"]
    columns += ["peak alloc (GiB)", "reserved (GiB)", "MFU", "vs 15 GB", "vs 300 s"] if cuda else \
        ["peak RSS (GiB)", "time vs first", "RSS vs first"]
    for column in columns + ["levers"]:
        table.add_column(column, justify="left" if column in ("preset", "levers") else "right",
                         no_wrap=column != "levers")
    for r in records:
        row = [r["preset"]["name"], f"{r['step_seconds'] * 1000:.1f}", f"{r['steps_per_second']:.2f}",
               f"{r['total_seconds_400']:.1f}", f"{r['compile_seconds']:.1f}"]
        if cuda:
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
            row += [f"{r['peak_allocated_bytes'] / 2**30:.2f}", f"{r['peak_reserved_bytes'] / 2**30:.2f}", mfu,
                    f"{r['vs_paper_memory']:.2f}x", f"{r['vs_paper_time']:.3f}x"]
        else:
            row += [f"{r['peak_rss_bytes'] / 2**30:.2f}", f"{r['step_seconds'] / first['step_seconds']:.2f}x",
                    f"{r['peak_rss_bytes'] / first['peak_rss_bytes']:.2f}x"]
        table.add_row(*row, r["preset"]["about"])
    return table


def pack_table(records: list[dict]) -> Table:
    """One row per pack size: ms per step, videos/hour (400 steps a video) and its ratio to the first row."""
    first = records[0]
    cuda = "peak_allocated_bytes" in first
    table = Table(title=f"vmc-fast bench --pack: {first['model']} {first['frames']}x{first['height']}x"
                        f"{first['width']}, {first['preset']['name']}, {first['device']['name']}")
    columns = ["K", "ms/step", "ms/step/video", "videos/hour", "vs first", "peak alloc (GiB)" if cuda else
               "peak RSS (GiB)"] + (["MFU"] if cuda else [])
    for column in columns:
        table.add_column(column, justify="right")
    for r in records:
        memory = r["peak_allocated_bytes"] if cuda else r["peak_rss_bytes"]
        row = [str(r["pack"]), f"{r['step_seconds'] * 1000:.1f}", f"{r['step_seconds'] * 1000 / r['pack']:.1f}",
               f"{r['videos_per_hour']:.1f}", f"{r['videos_per_hour'] / first['videos_per_hour']:.2f}x",
               f"{memory / 2**30:.2f}"]
        if cuda:
            row.append(f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-")
        table.add_row(*row)
    return table


def _score(value) -> str:
    return "-" if value is None else f"{value:.3f}"


DEMO_SCORES = ("motion_fidelity", "colour_adherence", "shape_adherence", "background_adherence", "colour_leak")


def scores_table(samples: list[dict], title: str = "") -> Table:
    """`vmc-fast demo`: per look and start, each score of the untuned and the tuned model side by side."""
    table = Table(title=title or None)
    table.add_column("prompt")
    table.add_column("start")
    for key in DEMO_SCORES:
        table.add_column(f"{key.replace('_', ' ')}\nuntuned / tuned", justify="right")
    by_case = {}
    for s in samples:
        by_case.setdefault((s["prompt"], s.get("start", "inversion")), {})[s["variant"]] = s
    for (prompt, start), rows in by_case.items():
        untuned, tuned = rows.get("no-tuning", {}), rows.get("cos", {})
        table.add_row(prompt, start, *(f"{_score(untuned.get(k))} / {_score(tuned.get(k))}" for k in DEMO_SCORES))
    return table


def eval_table(summary: dict) -> Table:
    """`vmc-fast eval`: one row per start and variant, mean scores over its samples."""
    keys = [k for k in ("motion_fidelity", "colour_adherence", "shape_adherence", "background_adherence",
                        "colour_leak", "temporal_consistency", "clip_text_alignment", "clip_frame_consistency")
            if any(entry.get(k) is not None for rows in summary.values() for entry in rows.values())]
    table = Table(title="vmc-fast eval: means over samples (colour leak: lower is better)")
    for column in ("start", "variant", *(k.replace("_", " ") for k in keys), "samples"):
        table.add_column(column, justify="left" if column in ("start", "variant") else "right")
    for start, rows in summary.items():
        for name, entry in rows.items():
            table.add_row(start, name, *(_score(entry[k]) for k in keys), str(entry["samples"]))
    return table


# --------------------------------------------------------------------------------------------- progress


class PhaseProgress:
    """A rich bar per phase (invert, sample) fed by generate's on_step(phase, step, total)."""

    def __init__(self, console: Console):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

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


PLAIN_PROGRESS_EVERY_S = 60.0
"""Without a terminal (a log file, CI), long commands print a progress line at most this often."""
RUN_POLL_EVERY_S = 5.0
"""How often a run's display reads the manifest to count every rank's finished videos."""


def units_progress(console: Console, description: str):
    """A rich bar over UNet calls (tuning and denoising steps) with ETA; returns (progress, callback).

    Rich draws nothing live without a terminal, so there the callback also prints a plain line now and then.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

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


# --------------------------------------------------------------------------------------------- warnings

KNOWN_NOISE = (
    (FutureWarning, r"`torch_dtype` is deprecated"),
    (DeprecationWarning, r"`torch\.jit\.script_method` is deprecated"),
    (UserWarning, r"MatMul8bitLt: inputs will be cast from"),
    (FutureWarning, r".*TRANSFORMERS_CACHE.*"),
    (FutureWarning, r"`torch\.distributed\.\w+` is deprecated"),  # DeepSpeed's collectives under ZeRO
)
"""(category, message regex) of other packages' warnings that mean nothing to a user of vmc-fast: deprecations
inside the pipelines and engines we wrap, bitsandbytes' note on the dtype it quantizes in. Our own warnings always
show."""
KNOWN_NOISE_LOGS = (
    ("diffusers.pipelines.pipeline_utils", r"The (TextToVideoSD|VideoToVideoSD)Pipeline has been deprecated"),
    ("transformers.utils.import_utils", r"requires torchvision \(not installed\); falling back"),
    ("DeepSpeed", r"Setting accelerator to CPU"),
    ("bitsandbytes.backends.cpu.ops", r"from kernels-community"),
)
"""(logger, message regex) of other packages' log lines that mean nothing to a user: the deprecation notice of
diffusers' ModelScope pipelines (which Show-1's cascade stages build on), transformers' note that it reads images
without torchvision, DeepSpeed's CPU fallback (CPU ranks are what --gpus N means without CUDA), bitsandbytes'
probe for the optional `kernels` package."""
KNOWN_NOISE_LINES = (r"^DeepSpeed [\w.]+ built successfully$",)
"""Regexes of lines other packages print on stdout in a launched rank (DeepSpeed's JIT op loader)."""
NOISY_LOGGERS = ("bitsandbytes",)
"""Loggers whose warnings are only about optional kernels ("Failed to load CPU gemm_4bit_forward from
kernels-community"): shown from ERROR up."""


class _DropMatching(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def print_warnings_as_lines(console: Console) -> None:
    """Show every warning as one line, ``warning: <message>``, on `console`, and drop the known noise (warnings
    and log lines of other packages: KNOWN_NOISE, KNOWN_NOISE_LOGS, NOISY_LOGGERS). Call it before those packages
    are imported or after: filters on a logger stay when the package sets it up."""
    import warnings

    from rich.markup import escape

    for category, pattern in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=pattern, category=category)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for name, pattern in KNOWN_NOISE_LOGS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMatching) and f.pattern.pattern == pattern for f in logger.filters):
            logger.addFilter(_DropMatching(pattern))

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        console.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True)

    warnings.showwarning = show


class NoiseFilteredLines(io.TextIOBase):
    """A text stream that passes whole lines on to `target`, except those matching KNOWN_NOISE_LINES. A launched
    rank's stdout is this onto stderr: the launcher's stdout carries the summary and --json's line, and nothing
    a library prints may mix into it."""

    def __init__(self, target):
        super().__init__()
        self.target = target
        self._pending = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        *lines, self._pending = (self._pending + text).split("\n")
        for line in lines:
            if not any(re.search(pattern, line) for pattern in KNOWN_NOISE_LINES):
                self.target.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.target.flush()
