"""A motion library: plan the videos, tune each, record every outcome in DIR/manifest.jsonl.

The plan comes first and writes nothing: the model's spec (`vmc_fast.models.registry.model_spec`) is read and
the options checked against it, every video gets a stable adapter name and a *request key* (everything that
decides its adapter), and the folder's manifest is compared with it. Only then is anything written.

Resumable (videos already `done` with their adapter on disk, asked for with the same request, are skipped), a
bad video is recorded as `failed` and never stops the rest, and nothing finished is lost: adapters are written
atomically and the manifest is rewritten atomically under a file lock, so several ranks can share one output
folder. A run holds --out (`running`): a second run on it is refused while the first lives, a killed run's
leftovers (temporary files, lock files) are removed by the next one, and an adapter the killed run finished but
did not record is recorded from its own metadata, never tuned or written again. A rerun that asks for something else for a video already tuned is refused unless --retune is given, so
the folder's records always describe its adapters. Nothing here knows about ranks: `vmc_fast.runs.launch`
decides which jobs a process runs and hands in the reporter.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import tempfile
import time
import traceback
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol

from vmc_fast.config import RunConfig, options
from vmc_fast.errors import NonFiniteError, VmcError
from vmc_fast.io.files import LockHeld, held_lock, remove_stale_temporaries, strict_json, write_text_atomic
from vmc_fast.io.prompts import derive_prompt, resolve_prompt_sources
from vmc_fast.io.video import ClipInfo, find_videos
from vmc_fast.models.registry import ModelSpec, model_spec
from vmc_fast.tuning.adapters import read_adapter, written_request
from vmc_fast.tuning.loop import StepStats

MANIFEST = "manifest.jsonl"
CONFIG = "config.json"
"""The run's whole RunConfig, paths absolute: `vmc-fast train --config DIR/config.json` reruns it."""
RUN_LOCK = ".vmc-fast-run.lock"
"""Held (flock) by the process that runs `vmc-fast train` on a folder, for the whole run."""
RANKS_LOCK = ".vmc-fast-ranks.lock"
"""Held shared by every launched rank while it lives: a rank that outlived its launcher keeps the folder busy."""


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
    request: dict = field(default_factory=dict)
    """Everything that decides this video's adapter (`request_key`)."""
    request_hash: str = ""
    """Short hash of `request`, recorded in the manifest and the adapter."""

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "video": str(self.video), "adapter": str(self.adapter)}

    @classmethod
    def from_dict(cls, data: dict) -> "Job":
        return cls(**{**data, "video": Path(data["video"]), "adapter": Path(data["adapter"])})


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


@dataclass
class RunProgress:
    """Where a whole run stands, from the manifest (so rank 0 sees every rank's videos): for progress displays.

    `poll` reads the manifest; rate and ETA count the videos this run finished since `started` (time.monotonic).
    """

    out_dir: Path
    videos: list[str]
    """The videos this run tunes (their manifest keys)."""
    num_before: int = 0
    """Videos of the run already done before it started."""
    started: float = field(default_factory=time.monotonic)
    """When the run started (time.monotonic)."""
    done: int = 0
    """Videos done, those done before the run included."""
    failed: int = 0
    """Videos of this run recorded failed."""

    @property
    def total(self) -> int:
        return self.num_before + len(self.videos)

    @property
    def finished_now(self) -> int:
        """Videos this run finished (done or failed)."""
        return self.done - self.num_before + self.failed

    def poll(self) -> "RunProgress":
        """Count the run's done and failed videos in the manifest now; returns self."""
        entries = Manifest(self.out_dir).read()
        statuses = Counter(entries.get(v, {}).get("status") for v in self.videos)
        self.done, self.failed = self.num_before + statuses["done"], statuses["failed"]
        return self

    def per_hour(self, now: float | None = None) -> float | None:
        """Videos finished per hour in this run; None before the first."""
        elapsed = (now or time.monotonic()) - self.started
        return self.finished_now * 3600 / elapsed if self.finished_now and elapsed > 0 else None

    def eta_seconds(self, now: float | None = None) -> float | None:
        rate = self.per_hour(now)
        remaining = self.total - self.done - self.failed
        return 0.0 if remaining <= 0 else (remaining * 3600 / rate if rate else None)

    def rate_text(self, now: float | None = None) -> str:
        """``12.0 videos/hour`` (``- videos/hour`` before the first video finished)."""
        rate = self.per_hour(now)
        return f"{rate:.1f} videos/hour" if rate else "- videos/hour"

    def eta_text(self, now: float | None = None) -> str:
        """``ETA 35 min``, ``ETA 2.5 h``, ``ETA -`` (unknown)."""
        return f"ETA {_duration(self.eta_seconds(now))}"

    def line(self, now: float | None = None) -> str:
        """``videos 3/10 done, 1 failed, 12.0 videos/hour, ETA 35 min``."""
        failed = f", {self.failed} failed" if self.failed else ""
        return f"videos {self.done}/{self.total} done{failed}, {self.rate_text(now)}, {self.eta_text(now)}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


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
            if "recovered" not in fields:  # says how this entry became done, not an earlier one
                entry.pop("recovered", None)
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


# --------------------------------------------------------------------------------------------- planning


@dataclass
class Plan:
    """What a run will do, decided before anything is written."""

    jobs: list[Job]
    """Every video of the run, in order."""
    todo: list[Job]
    """The jobs to tune now: not done yet, or (with --retune) done with another request."""
    spec: ModelSpec
    """The model's sizes and schedule."""
    strategy: str
    """``videos`` or ``zero`` (``auto`` resolved)."""
    recovered: list[Job] = field(default_factory=list)
    """Jobs not recorded `done` whose adapter is on disk with this run's request (a run killed between writing
    the adapter and recording it): `running` records them from the adapter, nothing is tuned again."""

    @property
    def num_done(self) -> int:
        return len(self.jobs) - len(self.todo)


def plan_run(cfg: RunConfig, *, held: bool = False) -> Plan:
    """Check everything that can be checked without weights, and decide the jobs; writes nothing.

    held: this process holds --out already (`running` plans again under its hold); otherwise a live run holding
    it is refused here.

    Raises ValueError naming an option that does not fit the model, and VmcError for an unknown model, unusable
    videos, an output folder that cannot be written, or videos of --out tuned with another request (unless
    ``cfg.retune``).
    """
    if cfg.tensorboard:
        from vmc_fast.runs.metrics import check_tensorboard

        check_tensorboard()
    spec = model_spec(cfg.model.model_id)
    check_against_model(cfg, spec)
    check_out_dir(cfg)
    if not held and cfg.parallel.node_rank == 0:  # on the other nodes of a run, node 0 holds the shared --out
        check_not_running(Path(cfg.out_dir).expanduser())
    manifest = Manifest(Path(cfg.out_dir).expanduser())
    entries = manifest.read()
    jobs = plan_jobs(cfg, entries)
    strategy = resolve_strategy(cfg, len(jobs))
    zero_ranks = cfg.parallel.world_size if strategy == "zero" else None
    for job in jobs:
        job.request = request_key(cfg, job, spec, zero_ranks=zero_ranks)
        job.request_hash = request_hash(job.request)
    todo, changed = pending_jobs(jobs, manifest)
    if changed and not cfg.retune:
        raise VmcError(_changed_message(cfg, changed))
    recovered = [job for job in todo if _finished_unrecorded(job, entries)]
    todo = [job for job in todo if job not in recovered]
    return Plan(jobs=jobs, todo=todo, spec=spec, strategy=strategy, recovered=recovered)


def _finished_unrecorded(job: Job, entries: dict[str, dict]) -> bool:
    return entries.get(str(job.video), {}).get("status") != "done" and written_request(job.adapter) == job.request_hash


def resolve_strategy(cfg: RunConfig, num_videos: int) -> str:
    """``auto`` picks ``videos`` when every rank gets at least one video, else ``zero``."""
    if cfg.parallel.strategy != "auto":
        return cfg.parallel.strategy
    return "videos" if num_videos >= cfg.parallel.world_size else "zero"


def plan_jobs(cfg: RunConfig, entries: dict[str, dict] | None = None) -> list[Job]:
    """All videos of the run with their prompts and adapter paths (raises VmcError on unusable input).

    entries: the manifest of --out, whose recorded adapter names are kept (`adapter_names`).
    """
    videos = find_videos(cfg.data.videos)
    prompts = resolve_prompt_sources(videos, cfg.prompt)
    names = adapter_names([v.resolve() for v in videos], entries or {})
    adapters_dir = Path(cfg.out_dir) / "adapters"
    jobs = []
    for video in videos:
        prompt = prompts[video].text
        derived = derive_prompt(prompt, video) if (prompt and cfg.derive_prompt) else prompt
        jobs.append(Job(video=video.resolve(), prompt=derived, source_prompt=prompt,
                        adapter=adapters_dir / f"{names[video.resolve()]}.safetensors",
                        no_prompt=None if prompt else prompts[video].problem(video)))
    if len(jobs) == 1 and jobs[0].prompt is None:
        raise VmcError(jobs[0].no_prompt)
    return jobs


def adapter_names(videos: list[Path], entries: dict[str, dict]) -> dict[Path, str]:
    """A unique, stable adapter name (file stem) for every video, unique also when case is ignored.

    A video already in the manifest keeps the name recorded there. A new one gets its stem (a frame folder its
    name) unless another video of the run has the same stem, else its whole name with dots as underscores
    (``bird_mp4``); then ``_2``, ``_3``, ... until no video of the run or of the manifest uses it.
    """
    recorded = {video: recorded_name(entry) for video, entry in entries.items()}
    taken = {name.casefold() for name in recorded.values() if name}
    names: dict[Path, str] = {}
    kept: set[str] = set()
    for video in videos:
        name = recorded.get(str(video))
        if name and name.casefold() not in kept:  # (a manifest from before unique names may hold one twice)
            names[video] = name
            kept.add(name.casefold())
    stems = Counter(_stem(v).casefold() for v in videos)
    for video in videos:
        if video in names:
            continue
        whole = video.name.replace(".", "_")
        candidates = ([_stem(video)] if stems[_stem(video).casefold()] == 1 else []) + [whole]
        candidates += (f"{whole}_{number}" for number in range(2, len(taken) + len(videos) + 3))
        names[video] = next(c for c in candidates if c.casefold() not in taken)
        taken.add(names[video].casefold())
    return names


def _stem(video: Path) -> str:
    return video.name if video.is_dir() else video.stem


def recorded_name(entry: dict) -> str | None:
    """The adapter's name (file stem) a manifest entry records; None before it has one."""
    if entry.get("adapter_name"):
        return entry["adapter_name"]
    return Path(entry["adapter"]).stem if entry.get("adapter") else None  # manifests written before names were


def check_against_model(cfg: RunConfig, spec: ModelSpec) -> None:
    """ValueError naming the option when a setting does not fit the model: the loss stride against the number
    of frames, the timestep range against the schedule, the frame size against what the model can divide, the
    number of frames against what it can take."""
    num_frames, height, width = frame_size(cfg, spec)
    stride = cfg.train.loss_stride
    frames = "--frames" if cfg.data.num_frames else f"--frames (now the model's default, {num_frames})"
    if stride >= num_frames:
        raise ValueError(f"--loss-stride {stride}: must be less than the number of frames ({num_frames} frames "
                         f"allow 1..{num_frames - 1}); lower --loss-stride or raise {frames}")
    num_timesteps = spec.num_train_timesteps
    if cfg.train.timestep_range is not None and cfg.train.timestep_range[1] > num_timesteps:
        raise ValueError(f"timestep_range {tuple(cfg.train.timestep_range)}: the model's schedule has "
                         f"{num_timesteps} timesteps; use 0 <= lo < hi <= {num_timesteps}")
    for option, given, value in (("--height", cfg.data.height, height), ("--width", cfg.data.width, width)):
        problem = spec.size_problem(option if given else f"{option} (the model's default)", value)
        if problem:
            raise ValueError(problem)
    problem = spec.frames_problem("--frames", num_frames)
    if problem:
        raise ValueError(problem)


def frame_size(cfg: RunConfig, spec: ModelSpec) -> tuple[int, int, int]:
    """(frames, height, width) a run tunes on: the options, or the model's defaults where they are unset."""
    data = cfg.data
    return data.num_frames or spec.num_frames, data.height or spec.height, data.width or spec.width


def check_out_dir(cfg: RunConfig) -> None:
    """VmcError when --out cannot be created or written; creates nothing (that is `prepare_out_dir`)."""
    out = Path(cfg.out_dir).expanduser()
    existing = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        why = "is a file" if not existing.is_dir() else "is not writable"
        raise VmcError(f"--out {out}: not writable ({existing} {why}); choose a folder you can write to")


def prepare_out_dir(cfg: RunConfig) -> Path:
    """Create the output folders, check they are writable, save the config beside the outputs."""
    out = Path(cfg.out_dir).expanduser()
    try:
        (out / "adapters").mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out / "adapters", prefix=".probe", delete=True)
        probe.close()
    except OSError as exc:
        raise VmcError(f"--out {out}: not writable ({exc.strerror or exc}); choose a folder you can write to") from exc
    write_text_atomic(out / CONFIG, cfg.with_absolute_paths().to_json() + "\n")  # reruns with --config
    return out


@contextmanager
def running(cfg: RunConfig, plan: Plan) -> Iterator[Plan]:
    """Hold --out for a run and yield its plan, made again under the hold (a run that ended meanwhile changed
    the manifest). With nothing to tune or record, nothing is written or held.

    Under the hold: temporary files a killed run left in --out and in the cache are removed, adapters it finished
    but did not record are recorded `done` (`Plan.recovered`), config.json is saved and the jobs to tune are
    recorded `pending`. On the way out the lock files are removed. Raises VmcError when another run holds --out,
    or ranks of an earlier run are still alive.
    """
    if not plan.todo and not plan.recovered:
        yield plan
        return
    out = Path(cfg.out_dir).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise VmcError(f"--out {out}: not writable ({exc.strerror or exc}); choose a folder you can write to") from exc
    with _holding(out):
        plan = plan_run(cfg, held=True)
        for folder, depth in ((out, 2), (Path(cfg.cache_dir).expanduser(), 1)):
            remove_stale_temporaries(folder, depth)
        manifest = Manifest(out)
        for job in plan.recovered:
            record_recovered(job, manifest)
        if plan.todo:
            prepare_out_dir(cfg)
            mark_pending(plan.todo, manifest)
        try:
            yield plan
        finally:
            for name in (f".{MANIFEST}.lock", RANKS_LOCK):
                (out / name).unlink(missing_ok=True)


def check_not_running(out: Path) -> None:
    """VmcError when a live run holds `out` (writes nothing; `running` takes the hold itself). Checked while
    planning, so a second run is refused before it loads any weights."""
    if (out / RUN_LOCK).is_file():
        with _holding(out, remove=False, ranks=False):
            pass


@contextmanager
def _holding(out: Path, remove: bool = True, ranks: bool = True) -> Iterator[None]:
    try:
        with held_lock(out / RUN_LOCK, remove=remove, record=remove):
            if ranks:
                with held_lock(out / RANKS_LOCK, remove=False):
                    pass  # no rank of an earlier run is alive
            yield
    except LockHeld as exc:
        who = "ranks of an earlier run are still running" if exc.path.name == RANKS_LOCK else \
            f"another vmc-fast train is running on it ({exc.holder or 'a live process'})"
        raise VmcError(f"--out {out}: {who}; wait for it to finish (or stop it), or choose another --out") from None


@contextmanager
def rank_hold(out_dir: str | Path) -> Iterator[None]:
    """Held by a launched rank while it runs: keeps --out busy for the next run if the rank outlives its
    launcher (VmcError when a run is starting on the folder at that moment). Holds nothing when the folder does
    not exist (a rank started by hand, without a launcher)."""
    out = Path(out_dir).expanduser()
    if not out.is_dir():
        yield
        return
    try:
        with held_lock(out / RANKS_LOCK, shared=True, remove=False):
            yield
    except LockHeld as exc:
        raise VmcError(f"--out {out_dir}: another run is starting on it ({exc.holder})") from None


def record_recovered(job: Job, manifest: Manifest) -> dict:
    """Record `done` a job whose adapter a killed run wrote but did not record, from the adapter's metadata."""
    _, info = read_adapter(job.adapter)
    return manifest.update(job.video, status="done", adapter=str(job.adapter.resolve()), final_loss=info.final_loss,
                           steps=info.steps, prompt=job.prompt, adapter_name=job.adapter.stem, request=job.request,
                           request_hash=job.request_hash, source_prompt=job.source_prompt, recovered=True)


# --------------------------------------------------------------------------------------------- requests

REQUEST_EXCLUDED = {
    "data.videos": "each video is keyed by its own file (path, size, modification time) instead",
    "model.model_id": "keyed by the resolved id and the family instead",
    "model.attention": "speed only: every kernel computes the same attention",
    "model.compile": "speed only: the compiled graph computes the same function",
    "model.gradient_checkpointing": "speed only: recomputes the same activations",
    "parallel": "how ranks share the work; under zero the number of ranks is keyed (it sets the batch)",
    "prompt": "keyed as each video's final prompt instead",
    "derive_prompt": "keyed as each video's final prompt instead",
    "out_dir": "where results go, not what they are",
    "cache_dir": "a cache holds the same values wherever it is",
    "retune": "how a rerun treats old results, not what they are",
    "tensorboard": "what is logged beside the adapters, not what they are",
}
"""RunConfig fields (dotted paths) left out of the request key, and why. Every other field, including fields
added later, is in it: a setting is assumed to change the adapter unless it is listed here (a record made before
a field existed still matches while the field is at its default). The frozen weights' dtype and the precision
are in it (bf16 or int8 storage and autocast change the numbers)."""


def request_key(cfg: RunConfig, job: Job, spec: ModelSpec, *, zero_ranks: int | None = None) -> dict[str, Any]:
    """Everything that decides `job`'s adapter, flat {name: JSON value}: the video file, its final prompt, the
    resolved model, and every RunConfig field not in REQUEST_EXCLUDED, with defaults resolved (frame size from
    the model, ``auto`` precision for this machine, the full timestep range). zero_ranks: the number of ranks
    under --strategy zero (each adds one sample to the batch); None otherwise."""
    from vmc_fast.runtime import resolve_device, resolve_precision

    key = {name: value for name, value in _fields(cfg) if name not in REQUEST_EXCLUDED}
    key["data.num_frames"], key["data.height"], key["data.width"] = frame_size(cfg, spec)
    precision = resolve_precision(cfg.train.precision, resolve_device())
    key["train.precision"] = precision
    if cfg.model.frozen_dtype == "auto":  # stored in the compute dtype (TuningSession._load)
        key["model.frozen_dtype"] = precision
    key["train.timestep_range"] = list(cfg.train.timestep_range or (0, spec.num_train_timesteps))
    key["model.trainable_pattern"] = cfg.model.trainable_pattern or spec.trainable_pattern
    key.update({"video": str(job.video), **_file_identity(job.video), "prompt": job.prompt,
                "model": spec.model_id_resolved, "model.family": spec.family})
    if zero_ranks is not None:
        key["parallel.zero_ranks"] = zero_ranks
    return json.loads(json.dumps(key))  # tuples as lists, as it reads back from the manifest


def request_hash(key: dict) -> str:
    """16 hex digits of sha256 over the key's sorted JSON."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _fields(obj, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for f in dataclasses.fields(obj):
        name, value = prefix + f.name, getattr(obj, f.name)
        if name in REQUEST_EXCLUDED:
            continue
        if dataclasses.is_dataclass(value):
            yield from _fields(value, name + ".")
        else:
            yield name, value


def _file_identity(video: Path) -> dict[str, Any]:
    """Size and modification time of a video file, or of every file of a frame folder (a digest of them)."""
    if video.is_file():
        stat = video.stat()
        return {"video.size": stat.st_size, "video.mtime_ns": stat.st_mtime_ns}
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in video.iterdir() if p.is_file())
    return {"video.files": len(files), "video.digest": request_hash({"files": files})}


def _changed_message(cfg: RunConfig, changed: list[tuple[Job, list[str]]]) -> str:
    shown = "; ".join(f"{job.video.name}: {', '.join(diffs)}" for job, diffs in changed[:3])
    more = f"; and {len(changed) - 3} more" if len(changed) > 3 else ""
    if len(changed) == 1:
        videos, adapters, replaced = "1 video was", "its adapter", "it is replaced"
    else:
        videos, adapters, replaced = f"{len(changed)} videos were", "their adapters", "they are replaced"
    return (f"--out {cfg.out_dir}: {videos} tuned with other settings ({shown}{more}); {adapters} would no "
            f"longer match this run. Use another --out folder, or pass --retune to tune again ({replaced})")


def describe_changes(old: dict, new: dict) -> list[str]:
    """Human words for the fields whose values differ, named as their options: ``--steps 2 → 3``."""
    flags = {".".join(o.path): o.flag for o in options(RunConfig)}
    diffs = []
    if any(old.get(k) != new.get(k) for k in new if k.startswith("video.")):
        diffs.append("the video file changed (size or modification time)")
    for name in sorted(set(old) | set(new), key=lambda n: (n != "prompt", n != "model", n)):
        if name.startswith("video") or old.get(name) == new.get(name):
            continue
        label = {"prompt": "prompt", "model": "--model", "model.family": "model family",
                 "parallel.zero_ranks": "ranks under --strategy zero"}.get(name, flags.get(name, name))
        before, after = (_short(d[name]) if name in d else "unset" for d in (old, new))
        diffs.append(f"{label} {before} → {after}")
    return diffs


def _short(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 40 else text[:38] + "…" + text[-1]


# --------------------------------------------------------------------------------------------- running


def pending_jobs(jobs: list[Job], manifest: Manifest) -> tuple[list[Job], list[tuple[Job, list[str]]]]:
    """(todo, changed): the jobs to tune (not done, or done but their adapter file is missing; with the
    changed ones among them, in order), and the done jobs whose request differs from the one recorded in the
    manifest or in their adapter, each with the differences in words (`describe_changes`).

    A manifest entry written before requests were recorded counts as changed only when its recorded prompt or
    steps differ.
    """
    entries = manifest.read()
    todo, changed = [], []
    for job in jobs:
        entry = entries.get(str(job.video), {})
        if entry.get("status") != "done" or not job.adapter.is_file():
            todo.append(job)
            continue
        diffs = _request_changes(job, entry)
        if diffs:
            changed.append((job, diffs))
            todo.append(job)
    return todo, changed


def _request_changes(job: Job, entry: dict) -> list[str]:
    if "request_hash" not in entry:  # a manifest from before request keys: compare what it recorded
        legacy = {"prompt": entry.get("prompt"), "train.steps": entry.get("steps", job.request.get("train.steps"))}
        return describe_changes(legacy, {k: job.request.get(k) for k in legacy})
    written = written_request(job.adapter)
    if written is not None and written != entry["request_hash"]:
        return [f"{job.adapter.name} was written by another run (request {written}, manifest "
                f"{entry['request_hash']})"]
    if entry["request_hash"] == job.request_hash:
        return []
    # A setting added to vmc-fast after the run is missing from its record: at its default it changed nothing.
    old, defaults = entry.get("request", {}), _default_settings()
    added = {k for k, v in job.request.items() if k not in old and k in defaults and v == defaults[k]}
    return describe_changes(old, {k: v for k, v in job.request.items() if k not in added})


def _default_settings() -> dict[str, Any]:
    return json.loads(json.dumps(dict(_fields(RunConfig()))))


def mark_pending(jobs: list[Job], manifest: Manifest) -> None:
    """Record every job of the run as `pending` before any work starts, so the manifest shows the whole plan,
    with each job's adapter name (kept across reruns) and request."""
    for job in jobs:
        manifest.update(job.video, status="pending", prompt=job.prompt, adapter_name=job.adapter.stem,
                        request=job.request, request_hash=job.request_hash)


def run_jobs(session, jobs: list[Job], manifest: Manifest, reporter: Reporter, *, write_metrics: bool = True,
             tensorboard: bool = False) -> None:
    """Tune every job in order with one prepared session, recording each outcome; never raises for a video.

    write_metrics: write each video's DIR/NAME/metrics.jsonl (`vmc_fast.runs.metrics`), and with `tensorboard`
    its TensorBoard event files; False on the ranks that tune alongside rank 0 under ZeRO. A session with
    `pack_size` K > 1 tunes the jobs K at a time (`_run_pack`), each video's metrics in its own file.
    """
    metrics = {"tensorboard": tensorboard} if write_metrics else None
    with_prompt = [j for j in jobs if j.prompt]
    embeddings = session.prompt_embeddings(sorted({j.prompt for j in with_prompt})) if with_prompt else {}
    size = getattr(session, "pack_size", 1)
    if size > 1:
        for start in range(0, len(jobs), size):
            _run_pack(session, jobs[start:start + size], start, len(jobs), embeddings, manifest, reporter, metrics)
        return
    for index, job in enumerate(jobs, 1):
        reporter.video_started(job, index, len(jobs))
        entry = _run_one(session, job, embeddings, manifest, reporter, metrics)
        reporter.video_finished(job, entry)


def _run_one(session, job: Job, embeddings: dict, manifest: Manifest, reporter: Reporter,
             metrics: dict | None = None) -> dict:
    if not job.prompt:
        return _no_prompt(job, manifest)
    manifest.update(job.video, status="pending", prompt=job.prompt)
    try:
        with _step_metrics(metrics, job, reporter) as on_step:
            done = session.tune_video(job.video, job.prompt, embeddings[job.prompt], job.adapter, on_step,
                                      on_clip=lambda info: _clip_loaded(reporter, job, info),
                                      request_hash=job.request_hash)
    except Exception as exc:
        return _record_failure(job, exc, manifest)
    return _record_done(job, done, manifest)


def _run_pack(session, jobs: list[Job], offset: int, total: int, embeddings: dict, manifest: Manifest,
              reporter: Reporter, metrics: dict | None = None) -> None:
    """Tune `jobs` (at most the session's pack size) in one pass; each outcome is recorded on its own."""
    from vmc_fast.tuning.session import PackItem

    for index, job in enumerate(jobs, offset + 1):
        reporter.video_started(job, index, total)
    packed = [job for job in jobs if job.prompt]
    for job in jobs:
        if not job.prompt:
            reporter.video_finished(job, _no_prompt(job, manifest))
        else:
            manifest.update(job.video, status="pending", prompt=job.prompt)
    items = [PackItem(j.video, j.prompt, embeddings[j.prompt], j.adapter, j.request_hash) for j in packed]
    try:
        with _pack_metrics(metrics, packed, reporter) as on_step:
            outcomes = session.tune_pack(items, on_step, lambda k, info: _clip_loaded(reporter, packed[k], info))
    except Exception as exc:  # the whole pass failed (e.g. out of memory): every video of the pack failed
        outcomes = [exc] * len(packed)
    for job, outcome in zip(packed, outcomes):
        entry = _record_failure(job, outcome, manifest) if isinstance(outcome, BaseException) else \
            _record_done(job, outcome, manifest)
        reporter.video_finished(job, entry)


def _no_prompt(job: Job, manifest: Manifest) -> dict:
    return manifest.update(job.video, status="failed", error=job.no_prompt or f"video {job.video}: no prompt; "
                           f"pass --prompt, or put it in a caption file beside the video")


def _record_failure(job: Job, exc: BaseException, manifest: Manifest) -> dict:
    if isinstance(exc, NonFiniteError):  # the step it stopped at goes into the record; no adapter was written
        return manifest.update(job.video, status="failed", error=f"video {job.video.name}: {exc}",
                               nonfinite_step=exc.step)
    if isinstance(exc, VmcError):
        return manifest.update(job.video, status="failed", error=str(exc))
    if not isinstance(exc, Exception):  # KeyboardInterrupt, RankStopped: not a video's failure
        raise exc
    # a bad video must never stop the rest; the traceback goes to the log
    log = job.adapter.parent / f"{job.adapter.stem}.error.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("".join(traceback.format_exception(exc)))
    return manifest.update(job.video, status="failed", error=f"{type(exc).__name__}: {exc} (traceback: {log})")


def _record_done(job: Job, done, manifest: Manifest) -> dict:
    return manifest.update(
        job.video, status="done", adapter=str(Path(done.adapter).resolve()), final_loss=done.result.final_loss,
        seconds=round(done.result.seconds, 3), steps=len(done.result.losses),
        peak_memory_bytes=done.peak_memory_bytes, source_prompt=job.source_prompt,
        **(done.clip.manifest_fields() if getattr(done, "clip", None) else {}),
        skipped_steps=done.result.skipped_steps,
        encoded_prompt=done.encoded_prompt, prompt_truncated=done.encoded_prompt not in (None, job.prompt),
    )


@contextmanager
def _step_metrics(metrics: dict | None, job: Job, reporter: Reporter) -> Iterator:
    """The on_step of one video: the reporter's, and (`metrics` given: MetricsWriter's keyword arguments) the
    metrics writer's, closed when tuning ends. The run folder is the adapter's folder's parent."""
    if metrics is None:
        yield reporter.step
        return
    from vmc_fast.runs.metrics import MetricsWriter

    with MetricsWriter(job.adapter.parent.parent, job.adapter.stem, **metrics) as write:
        def on_step(stats: StepStats) -> None:
            write(stats)
            reporter.step(stats)

        yield on_step


@contextmanager
def _pack_metrics(metrics: dict | None, jobs: list[Job], reporter: Reporter) -> Iterator:
    """The on_step of a pack: the reporter hears the pack's step, and (`metrics` given) each video's writer its own
    loss and gradient norm (`StepStats.videos`; a video that failed earlier in the pack writes no more lines)."""
    if metrics is None:
        yield reporter.step
        return
    from vmc_fast.runs.metrics import MetricsWriter

    writers = [MetricsWriter(job.adapter.parent.parent, job.adapter.stem, **metrics) for job in jobs]
    try:
        def on_step(stats: StepStats) -> None:
            for writer, own in zip(writers, stats.videos or ()):
                if own is not None:
                    writer(dataclasses.replace(stats, loss=own[0], grad_norm=own[1], videos=None))
            reporter.step(stats)

        yield on_step
    finally:
        for writer in writers:
            writer.close()


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
