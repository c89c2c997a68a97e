"""A motion library: plan the videos, tune each, record every outcome in DIR/manifest.jsonl.

Resumable (videos already `done` with their adapter on disk are skipped), a bad video is recorded as `failed`
and never stops the rest, and nothing finished is lost: adapters are written atomically and the manifest is
rewritten atomically under a file lock, so several ranks can share one output folder. Nothing here knows about
ranks: `vmc_fast.runs.launch` decides which jobs a process runs and hands in the reporter.
"""

from __future__ import annotations

import fcntl
import json
import math
import tempfile
import traceback
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol

from vmc_fast.config import RunConfig
from vmc_fast.errors import NonFiniteError, VmcError
from vmc_fast.io.files import write_text_atomic
from vmc_fast.io.prompts import derive_prompt, resolve_prompt_sources
from vmc_fast.io.video import ClipInfo, find_videos
from vmc_fast.tuning.loop import StepStats

MANIFEST = "manifest.jsonl"


@dataclass
class Job:
    """One video to tune."""

    video: Path
    """The video file or frame folder."""
    prompt: str | None
    """Its (possibly derived) prompt; None when it has none."""
    adapter: Path
    """Where its adapter goes."""
    source_prompt: str | None = None
    """The prompt before --derive-prompt rewrote it."""
    no_prompt: str | None = None
    """Why it has no prompt, and the fix (None when it has one)."""


class Reporter(Protocol):
    """Progress callbacks; the CLI renders them with rich, tests pass `QuietReporter`."""

    def run_started(self, cfg: RunConfig, jobs: list[Job], num_skipped: int) -> None: ...
    def video_started(self, job: Job, index: int, total: int) -> None: ...
    def step(self, stats: StepStats) -> None: ...
    def video_finished(self, job: Job, entry: dict) -> None: ...
    def clip_loaded(self, job: Job, info: ClipInfo) -> None: ...  # what was taken from the video, before tuning


class QuietReporter:
    def run_started(self, cfg, jobs, num_skipped): pass
    def video_started(self, job, index, total): pass
    def step(self, stats): pass
    def video_finished(self, job, entry): pass
    def clip_loaded(self, job, info): pass


@dataclass
class RunSummary:
    """How a run ended."""

    out_dir: Path
    entries: list[dict] = field(default_factory=list)
    """Manifest entries of this run's videos (all ranks)."""

    @property
    def counts(self) -> dict[str, int]:
        return dict(Counter(e["status"] for e in self.entries))

    @property
    def ok(self) -> bool:
        return all(e["status"] == "done" for e in self.entries)


# --------------------------------------------------------------------------------------------- manifest


class Manifest:
    """DIR/manifest.jsonl: one JSON object per video, keyed by the video path; safe across processes."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / MANIFEST
        self._lock_path = out_dir / f".{MANIFEST}.lock"

    def read(self) -> dict[str, dict]:
        if not self.path.is_file():
            return {}
        entries = {}
        for line in self.path.read_text().splitlines():
            if line.strip():
                entry = json.loads(line)
                entries[entry["video"]] = entry
        return entries

    def update(self, video: Path, **fields) -> dict:
        """Merge `fields` into the video's entry and rewrite the file atomically; returns the entry."""
        with self._locked():
            entries = self.read()
            entry = {**entries.get(str(video), {"video": str(video)}), **fields}
            if entry.get("status") != "failed":
                entry.pop("error", None)
                entry.pop("nonfinite_step", None)
            else:  # a failed video has no adapter: an earlier run's results must not describe it
                for stale in DONE_FIELDS:
                    entry.pop(stale, None)
            entries[str(video)] = entry
            self._write(entries.values())
        return entry

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self._lock_path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _write(self, entries) -> None:
        write_text_atomic(self.path, "".join(strict_json(e) + "\n" for e in entries))


DONE_FIELDS = ("adapter", "final_loss", "seconds", "steps", "peak_memory_bytes", "skipped_steps", "frames", "crop_box",
               "displayed_size", "clip")
"""Fields of a `done` entry, which describe its adapter; a later failure removes them."""


def strict_json(obj) -> str:
    """JSON that every parser reads: NaN and inf floats become null (Python's json would write bare NaN)."""
    return json.dumps(_finite_or_none(obj), allow_nan=False, sort_keys=True)


def _finite_or_none(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


# --------------------------------------------------------------------------------------------- planning


def plan_jobs(cfg: RunConfig) -> list[Job]:
    """All videos of the run with their prompts and adapter paths (raises VmcError on unusable input)."""
    videos = find_videos(cfg.data.videos)
    prompts = resolve_prompt_sources(videos, cfg.prompt)
    names = _adapter_names(videos)
    adapters_dir = Path(cfg.out_dir) / "adapters"
    jobs = []
    for video in videos:
        prompt = prompts[video].text
        derived = derive_prompt(prompt, video) if (prompt and cfg.derive_prompt) else prompt
        jobs.append(Job(video=video.resolve(), prompt=derived, adapter=adapters_dir / f"{names[video]}.safetensors",
                        source_prompt=prompt, no_prompt=None if prompt else prompts[video].problem(video)))
    if len(jobs) == 1 and jobs[0].prompt is None:
        raise VmcError(jobs[0].no_prompt)
    return jobs


def _adapter_names(videos: list[Path]) -> dict[Path, str]:
    # Stems, unless two videos share one (bird.mp4 and bird.gif): then the whole file name.
    stems = Counter(v.stem for v in videos)
    return {v: v.stem if stems[v.stem] == 1 else v.name.replace(".", "_") for v in videos}


def prepare_out_dir(cfg: RunConfig) -> Path:
    """Create the output folders, check they are writable, save the config beside the outputs."""
    out = Path(cfg.out_dir).expanduser()
    try:
        (out / "adapters").mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out / "adapters", prefix=".probe", delete=True)
        probe.close()
    except OSError as exc:
        raise VmcError(f"--out {out}: not writable ({exc.strerror or exc}); choose a folder you can write to") from exc
    write_text_atomic(out / "config.json", cfg.to_json() + "\n")
    return out


# --------------------------------------------------------------------------------------------- running


def pending_jobs(jobs: list[Job], manifest: Manifest) -> list[Job]:
    """Jobs not already done (a `done` entry whose adapter file is missing is redone)."""
    entries = manifest.read()
    return [j for j in jobs if not (entries.get(str(j.video), {}).get("status") == "done" and j.adapter.is_file())]


def mark_pending(jobs: list[Job], manifest: Manifest) -> None:
    """Record every job of the run as `pending` before any work starts, so the manifest shows the whole plan."""
    for job in jobs:
        manifest.update(job.video, status="pending", prompt=job.prompt)


def run_jobs(session, jobs: list[Job], manifest: Manifest, reporter: Reporter) -> None:
    """Tune every job in order with one prepared session, recording each outcome; never raises for a video."""
    with_prompt = [j for j in jobs if j.prompt]
    embeddings = session.prompt_embeddings(sorted({j.prompt for j in with_prompt})) if with_prompt else {}
    for index, job in enumerate(jobs, 1):
        reporter.video_started(job, index, len(jobs))
        entry = _run_one(session, job, embeddings, manifest, reporter)
        reporter.video_finished(job, entry)


def _run_one(session, job: Job, embeddings: dict, manifest: Manifest, reporter: Reporter) -> dict:
    if not job.prompt:
        return manifest.update(job.video, status="failed", error=job.no_prompt or f"video {job.video}: no prompt; "
                               f"pass --prompt, or put it in a caption file beside the video")
    manifest.update(job.video, status="pending", prompt=job.prompt)
    try:
        done = session.tune_video(job.video, job.prompt, embeddings[job.prompt], job.adapter, reporter.step,
                                  on_clip=lambda info: _clip_loaded(reporter, job, info))
    except NonFiniteError as exc:  # the step it stopped at goes into the record; no adapter was written
        return manifest.update(job.video, status="failed", error=f"video {job.video.name}: {exc}",
                               nonfinite_step=exc.step)
    except VmcError as exc:
        return manifest.update(job.video, status="failed", error=str(exc))
    except Exception as exc:  # a bad video must never stop the rest; the traceback goes to the log
        log = job.adapter.parent / f"{job.adapter.stem}.error.log"
        log.write_text(traceback.format_exc())
        return manifest.update(job.video, status="failed", error=f"{type(exc).__name__}: {exc} (traceback: {log})")
    return manifest.update(
        job.video, status="done", adapter=str(Path(done.adapter).resolve()), final_loss=done.result.final_loss,
        seconds=round(done.result.seconds, 3), steps=len(done.result.losses),
        peak_memory_bytes=done.peak_memory_bytes, source_prompt=job.source_prompt,
        **(done.clip.manifest_fields() if getattr(done, "clip", None) else {}),
        skipped_steps=done.result.skipped_steps,
        encoded_prompt=done.encoded_prompt, prompt_truncated=done.encoded_prompt not in (None, job.prompt),
    )


def _clip_loaded(reporter: Reporter, job: Job, info: ClipInfo) -> None:
    # Reporters written before clip_loaded existed simply do not hear it.
    hook = getattr(reporter, "clip_loaded", None)
    if hook is not None:
        hook(job, info)


def summarize(out: Path, jobs: list[Job]) -> RunSummary:
    entries = Manifest(out).read()
    return RunSummary(out_dir=out, entries=[entries.get(str(j.video), {"video": str(j.video), "status": "pending"})
                                            for j in jobs])


class ReadOnlyManifest:
    """For ranks that tune alongside rank 0 (ZeRO): they read but never write the manifest."""

    def __init__(self, manifest: Manifest):
        self._manifest = manifest

    def update(self, video: Path, **fields) -> dict:
        return {"video": str(video), **fields}
