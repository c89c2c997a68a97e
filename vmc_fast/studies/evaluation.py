"""`vmc-fast eval`: does an adapter carry a motion to new appearances? Measured in the toy world, where every
track is known.

For each held-out motion (one the toy model never saw in pretraining) the shipped example clip is the reference.
Every variant tunes on it (or not), then renders new appearances (a shape, colour and background the reference
does not have) from two starting points:

- ``inversion``: the paper's inference, sampling from the DDIM inversion of the reference clip. The inversion alone
  already carries much of the motion, so this start cannot tell whether the adapter learned it.
- ``noise``: fresh Gaussian noise, the same draw for every variant (seeded by motion, seed and look), so only the
  adapter can carry a motion the model never saw.

Each video is scored against the reference's exact track (`vmc_fast.studies.metrics`): motion fidelity; colour,
shape and background adherence (is the object what was asked, on the asked background); colour leak (the
*reference's* colour shown instead); temporal consistency; CLIP text alignment and frame consistency with a CLIP
model. Claims are paired differences over the cases two rows share (motion, seed, look and start) and say "holds"
only beyond two standard errors. Results go to OUT/eval.md, OUT/eval.json (every sample, the config, machine and
git sha) and OUT/eval.png, all written atomically.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from vmc_fast.config import (
    RECIPE,
    DataConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    check_field,
    default_cache_dir,
    option,
)
from vmc_fast.inference.ddim import invert_clip, sample_frames
from vmc_fast.io.files import atomic_path, write_text_atomic
from vmc_fast.io.video import frames_to_uint8
from vmc_fast.runtime import git_sha, machine_description, utc_now
from vmc_fast.studies import metrics
from vmc_fast.toy import world
from vmc_fast.toy.examples import held_out_example
from vmc_fast.tuning.surgery import DEFAULT_TRAINABLE_PATTERN

SPATIAL_PATTERN = r"(^|\.)attentions\.\d+\.(transformer_blocks\.\d+\.attn\d\.)?to_[qkv]\.weight$"
"""Q/K/V of the spatial attention layers (Show-1's ``attentions.N.to_q``; ModelScope's ``attn1/attn2``), never
the temporal ones (``temp_attentions``)."""


@dataclass(frozen=True)
class Variant:
    """One row of the comparison."""

    name: str
    description: str
    tune: bool = True
    loss: str = "cos"
    trainable: str = DEFAULT_TRAINABLE_PATTERN
    prompt: str = "motion"
    """Tuning prompt: ``motion`` = the appearance-invariant caption, ``full`` = the faithful caption."""


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("no-tuning", "the untuned model", tune=False),
    Variant("cos", "VMC: cosine motion distillation on temporal Q/K/V, motion-only prompt"),
    Variant("l2", "l2 between frame residuals", loss="l2"),
    Variant("cos-frames-abs", "cosine on absolute per-frame noise", loss="cos-frames-abs"),
    Variant("eps-mse", "plain denoising loss (learns appearance too)", loss="eps-mse"),
    Variant("spatial", "cosine loss on spatial instead of temporal attention Q/K/V", trainable=SPATIAL_PATTERN),
    Variant("faithful-prompt", "cosine loss with the full caption (appearance words kept)", prompt="full"),
)}

SCORE_KEYS = ("motion_fidelity", "colour_adherence", "shape_adherence", "background_adherence", "colour_leak",
              "temporal_consistency", "clip_text_alignment", "clip_frame_consistency")
"""Per-sample scores averaged in the table (CLIP ones only with a CLIP model)."""

STARTS = ("inversion", "noise")
"""Where sampling starts: the DDIM inversion of the reference clip (the paper), or fresh Gaussian noise."""

ProgressCallback = Callable[[str, int, int], None]
"""progress(label, units_done, units_total): units are UNet calls (tuning steps and denoising steps)."""


@dataclass
class EvalConfig:
    """One `vmc-fast eval` run; tuning defaults are the paper's (RECIPE), inference the toy world's."""

    model_id: str = field(default="toy", metadata=option("--model"))
    """Base model; it must know the toy world (the references are toy clips)."""
    motions: tuple[str, ...] = world.HELD_OUT_MOTIONS
    """Comma-separated held-out motions, each with a shipped example clip (default: zigzag, figure-eight,
    spiral)."""
    variants: tuple[str, ...] = tuple(VARIANTS)
    """Comma-separated rows (default: all): no-tuning, cos, l2, cos-frames-abs, eps-mse, spatial,
    faithful-prompt."""
    starts: tuple[str, ...] = STARTS
    """Comma-separated starting points of sampling: inversion (DDIM inversion of the reference clip, the paper's)
    and noise (fresh Gaussian noise: only the adapter can carry the motion)."""
    samples: int = 3
    """New appearances per motion and seed."""
    seeds: tuple[int, ...] = (0, 1)
    """Comma-separated seeds; each tunes again (timesteps and noise) and draws other new appearances."""
    steps: int = RECIPE.steps
    """Tuning steps per variant and clip (paper: 400)."""
    learning_rate: float = field(default=RECIPE.learning_rate, metadata=option("--lr"))
    """Tuning learning rate (paper: 1e-4)."""
    inference_steps: int = RECIPE.toy_inference_steps
    """DDIM inversion and sampling steps (paper: 75)."""
    guidance_scale: float = RECIPE.toy_guidance_scale
    """Classifier-free guidance (paper: 9.0 for Show-1)."""
    clip_model: str | None = None
    """CLIP hub id or folder for the CLIP metrics (tiny-random: an untrained tiny CLIP, for smoke runs)."""
    out_dir: str = field(default="runs/eval", metadata=option("--out"))
    """Folder for eval.md, eval.json, eval.png (the committed results are benchmarks/eval: pass it to replace
    them)."""
    device: str = "cpu"
    """cpu | cuda."""
    cache_dir: str = field(default_factory=default_cache_dir)
    """Prompt-embedding cache (default: $VMC_FAST_CACHE or ~/.cache/vmc-fast)."""

    def __post_init__(self) -> None:
        unknown = [m for m in self.motions if m not in world.HELD_OUT_MOTIONS]
        check_field(bool(self.motions) and not unknown, "--motions",
                    f"{', '.join(unknown) or 'none given'}: choose from {', '.join(world.HELD_OUT_MOTIONS)}")
        unknown = [s for s in self.starts if s not in STARTS]
        check_field(bool(self.starts) and not unknown, "--starts",
                    f"{', '.join(unknown) or 'none given'}: choose from {', '.join(STARTS)}")
        unknown = [v for v in self.variants if v not in VARIANTS]
        check_field(bool(self.variants) and not unknown, "--variants",
                    f"{', '.join(unknown) or 'none given'}: choose from {', '.join(VARIANTS)}")
        check_field(1 <= self.samples <= 64, "--samples", "must be between 1 and 64")
        check_field(bool(self.seeds) and all(s >= 0 for s in self.seeds), "--seeds", "must be 0 or more")
        check_field(1 <= self.inference_steps <= 1000, "--inference-steps", "must be between 1 and 1000")
        check_field(self.guidance_scale >= 1, "--guidance-scale", "must be 1.0 or more")
        check_field(self.device in ("cpu", "cuda"), "--device", "must be cpu or cuda")
        TrainConfig(steps=self.steps, learning_rate=self.learning_rate)  # the same checks as `train`

    def run_config(self, variant: Variant, seed: int) -> RunConfig:
        """The tuning config of one variant and seed."""
        return RunConfig(
            data=DataConfig(), model=ModelConfig(model_id=self.model_id, trainable_pattern=variant.trainable),
            train=TrainConfig(steps=self.steps, learning_rate=self.learning_rate, loss=variant.loss, seed=seed),
            out_dir=self.out_dir, cache_dir=self.cache_dir)


# ------------------------------------------------------------------------------------------------ the plan


def new_appearances(reference: world.ClipSpec, count: int, seed: int) -> list[world.ClipSpec]:
    """`count` specs with the reference's motion (same path) and a shape, colour and background it lacks.

    Colours stay apart from the background (no white on grey, no blue on dark blue) so segmentation is fair.
    """
    rng = random.Random(f"{reference.motion}-{seed}")
    too_close = {("blue", "dark-blue"), ("white", "grey")}
    shapes = [s for s in world.SHAPES if s != reference.shape]
    colours = [c for c in world.COLOURS if c != reference.colour]
    backgrounds = [b for b in world.BACKGROUNDS if b != reference.background]
    specs = []
    while len(specs) < count:
        colour, background = rng.choice(colours), rng.choice(backgrounds)
        if (colour, background) in too_close:
            continue
        specs.append(dataclasses.replace(reference, shape=rng.choice(shapes), colour=colour, background=background))
    return specs


def unet_calls(cfg: EvalConfig, variant: Variant) -> int:
    """UNet calls of one (variant, motion, seed) job, for the progress bar: tuning, the inversion (once), and
    sampling every look from every start."""
    inversion = cfg.inference_steps if "inversion" in cfg.starts else 0
    return (cfg.steps if variant.tune else 0) + inversion + cfg.inference_steps * cfg.samples * len(cfg.starts)


def noise_seed(motion: str, seed: int, look: int) -> int:
    """The seed of look `look`'s starting noise: shared by every variant, so rows compare on the same draws."""
    return zlib.crc32(f"{motion}/{seed}/{look}".encode())


# ------------------------------------------------------------------------------------------------ running


def run_eval(cfg: EvalConfig, progress: ProgressCallback | None = None) -> dict:
    """Tune, generate and score every (variant, seed, motion); write eval.md/json/png; return the report."""
    from vmc_fast.tuning.session import TuningSession

    references = {m: held_out_example(m) for m in cfg.motions}
    clip_scorer = _clip_scorer(cfg.clip_model)
    total = sum(unet_calls(cfg, VARIANTS[v]) for v in cfg.variants) * len(cfg.motions) * len(cfg.seeds)
    done, samples, figure = 0, [], {}
    start = time.perf_counter()
    for name in cfg.variants:
        variant = VARIANTS[name]
        for seed in cfg.seeds:
            session = TuningSession(cfg.run_config(variant, seed), device=cfg.device, write_adapters=False)
            for motion in cfg.motions:
                label = f"{name} {motion} seed {seed}"
                path, reference = references[motion]

                def tick(units: int, _label=label) -> None:
                    nonlocal done
                    done += units
                    if progress is not None:
                        progress(_label, done, total)

                job = tune_and_generate(cfg, session, variant, seed, path, reference, clip_scorer, tick)
                samples.extend(job["samples"])
                for start_name, videos in job["frames"].items():
                    figure.setdefault(motion, {}).setdefault(f"{name}, {start_name}", videos[0])
            del session
    report = _report(cfg, samples, time.perf_counter() - start)
    write_outputs(report, figure, references, Path(cfg.out_dir))
    return report


def tune_and_generate(cfg: EvalConfig, session, variant: Variant, seed: int, path: Path, reference: world.Clip,
                      clip_scorer, tick: Callable[[int], None], adapter_path: Path | None = None) -> dict:
    """Tune one variant on one reference (or not), then render every new appearance from every start and score it.

    Returns {"samples": one record per look and start, "frames": {start: the (3, F, H, W) videos, one per look}}.
    The adapter is written to `adapter_path` when the session writes adapters.
    """
    prompt = reference.motion_caption if variant.prompt == "motion" else reference.caption
    targets = new_appearances(reference.spec, cfg.samples, seed)
    captions = [world.captions(spec)[0] for spec in targets]
    embeddings = session.prompt_embeddings(list(dict.fromkeys([prompt, "", *captions])))
    tune_seconds, final_loss = None, None
    if variant.tune:
        adapter_path = adapter_path or Path(cfg.out_dir) / "adapters" / f"{reference.spec.motion}.safetensors"
        result = session.tune_video(path, prompt, embeddings[prompt], adapter_path,
                                    on_step=lambda stats: tick(1)).result
        tune_seconds, final_loss = result.seconds, result.final_loss
    else:
        session.reset_trainable()
    backbone, device = session.backbone, session.device
    empty = embeddings[""].unsqueeze(0).to(device)
    clip = session.load_input(path)
    starts = {}
    if "inversion" in cfg.starts:
        inverted = invert_clip(backbone, clip, empty, cfg.inference_steps, on_step=lambda *_: tick(1))
        starts["inversion"] = lambda look: inverted
    if "noise" in cfg.starts:
        starts["noise"] = lambda look: torch.randn(
            clip.shape, generator=torch.Generator().manual_seed(noise_seed(reference.spec.motion, seed, look))
        ).to(device)
    records, frames = [], {start: [] for start in starts}
    for start, x_T in starts.items():
        for look, (spec, caption) in enumerate(zip(targets, captions)):
            cond = embeddings[caption].unsqueeze(0).to(device)
            video = sample_frames(backbone, x_T(look), cond, empty, cfg.inference_steps, cfg.guidance_scale,
                                  on_step=lambda *_: tick(1))
            frames[start].append(video)
            records.append({"variant": variant.name, "start": start, "motion": reference.spec.motion, "seed": seed,
                            "look": look, "prompt": caption, "tuning_prompt": prompt,
                            "target": {"shape": spec.shape, "colour": spec.colour, "background": spec.background},
                            "tune_seconds": tune_seconds, "final_loss": final_loss,
                            **score(video, reference, spec, clip_scorer)})
    return {"samples": records, "frames": frames}


def score(frames: torch.Tensor, reference: world.Clip, target: world.ClipSpec, clip_scorer=None) -> dict:
    """The scores of one generated video (3, F, H, W) in [-1, 1] asked to show `target`'s appearance."""
    # The track comes from saliency, not from the asked colour: a video that copies the motion in the wrong
    # colour scores on motion and fails on colour, rather than failing on both.
    report = metrics.motion_transfer_report(frames, reference)
    asked = metrics.appearance_adherence(frames, target.colour, target.shape)
    leak = metrics.appearance_adherence(frames, reference.spec.colour).colour
    scores = {**{k: _finite(v) for k, v in report.items()}, "colour_adherence": asked.colour,
              "shape_adherence": _finite(asked.shape), "colour_leak": leak,
              "background_adherence": metrics.background_adherence(frames, target.background)}
    if clip_scorer is not None:
        clip = clip_scorer(frames, world.captions(target)[0])
        scores.update(clip_text_alignment=clip.text_alignment, clip_frame_consistency=clip.frame_consistency)
    return scores


def _finite(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def _clip_scorer(name: str | None):
    """frames, prompt -> metrics.ClipScores, or None without a CLIP model (``tiny-random`` builds a tiny one)."""
    if name is None:
        return None
    if name == "tiny-random":
        model, tokenizer = metrics.tiny_random_clip()
        return lambda frames, prompt: metrics.clip_metrics(frames, prompt, model, tokenizer=tokenizer)
    model, processor = metrics.load_clip(name)
    return lambda frames, prompt: metrics.clip_metrics(frames, prompt, model, processor)


# ------------------------------------------------------------------------------------------------ the report


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summarize(samples: list[dict], variants: list[str], motions: list[str],
              starts: list[str] = list(STARTS)) -> dict:
    """{start: {variant: {score: mean over its samples, "per_motion": {motion: motion fidelity}, "samples": n}}}."""
    summary = {}
    for start in starts:
        summary[start] = {}
        for name in variants:
            rows = [s for s in samples if s["variant"] == name and s.get("start", "inversion") == start]
            entry = {key: _mean([r.get(key) for r in rows]) for key in SCORE_KEYS}
            entry["per_motion"] = {m: _mean([r.get("motion_fidelity") for r in rows if r["motion"] == m])
                                   for m in motions}
            entry["tune_seconds"] = _mean([r.get("tune_seconds") for r in rows])
            entry["samples"] = len(rows)
            summary[start][name] = entry
    return summary


@dataclass(frozen=True)
class Claim:
    """One claim of the paper, checked as a paired difference between two rows."""

    text: str
    """What the paper says, as a sentence."""
    better: str
    """The variant the claim favours."""
    worse: str
    """The variant it is compared with."""
    key: str
    """The score compared."""
    higher_is_better: bool = True
    """False for colour leak."""


CLAIMS = (
    Claim("Tuning (cos) beats the untuned model on motion fidelity", "cos", "no-tuning", "motion_fidelity"),
    Claim("The cosine loss beats l2 on motion fidelity", "cos", "l2", "motion_fidelity"),
    Claim("The cosine loss beats the absolute-frames cosine on motion fidelity", "cos", "cos-frames-abs",
          "motion_fidelity"),
    Claim("The motion loss shows the asked colour more than eps-mse", "cos", "eps-mse", "colour_adherence"),
    Claim("The motion loss leaks the reference's colour less than eps-mse", "cos", "eps-mse", "colour_leak",
          higher_is_better=False),
    Claim("Temporal attention beats spatial attention on motion fidelity", "cos", "spatial", "motion_fidelity"),
    Claim("The appearance-invariant prompt shows the asked colour more than the faithful caption", "cos",
          "faithful-prompt", "colour_adherence"),
    Claim("The appearance-invariant prompt leaks the reference's colour less than the faithful caption", "cos",
          "faithful-prompt", "colour_leak", higher_is_better=False),
)
"""The paper's claims the toy world can check (Jeong, Park and Ye, 2023, sections 4-5)."""


def verdict(stats: tuple[float, float, int] | None, higher_is_better: bool = True) -> str:
    """What the data say about "the first row is better": ``holds`` only beyond 2 standard errors of the paired
    difference, ``reversed`` beyond them the other way, ``not shown`` within (or with fewer than 2 cases)."""
    if stats is None:
        return "not shown"
    mean, se, _ = stats
    if abs(mean) <= 2 * se:
        return "not shown"
    return "holds" if (mean > 0) == higher_is_better else "reversed"


def findings(summary: dict, samples: list[dict]) -> list[str]:
    """Every claim whose two rows were run, for every start, with the paired statistics, whichever way it goes."""
    lines = []
    for start, rows in summary.items():
        for claim in CLAIMS:
            if claim.better not in rows or claim.worse not in rows:
                continue
            stats = paired_difference(samples, claim.better, claim.worse, claim.key, start)
            means = f"{claim.better} {_fmt(rows[claim.better][claim.key])} vs {claim.worse} " \
                    f"{_fmt(rows[claim.worse][claim.key])}"
            if stats is None:
                lines.append(f"From {start}: {claim.text}: not shown ({means}; fewer than 2 paired cases).")
                continue
            mean, se, n = stats
            lines.append(f"From {start}: {claim.text}: {verdict(stats, claim.higher_is_better)} ({means}; paired "
                         f"difference {mean:+.3f}, s.e. {se:.3f}, n {n}).")
    return lines


def paired_difference(samples: list[dict], a: str, b: str, key: str,
                      start: str | None = None) -> tuple[float, float, int] | None:
    """(mean of a - b, its standard error, n) over the cases both variants scored; None below 2 cases.

    A case is one motion, seed, asked appearance and start: every variant renders the same ones from the same
    noise, so the pairs share everything but the tuning. `start` keeps one starting point only.
    """
    def by_case(name: str) -> dict:
        return {(r["motion"], r["seed"], r["prompt"], r.get("start", "inversion")): r[key] for r in samples
                if r["variant"] == name and r.get(key) is not None
                and (start is None or r.get("start", "inversion") == start)}

    first, second = by_case(a), by_case(b)
    diffs = [first[case] - second[case] for case in sorted(first.keys() & second.keys())]
    n = len(diffs)
    if n < 2:
        return None
    mean = sum(diffs) / n
    variance = sum((d - mean) ** 2 for d in diffs) / (n - 1)
    return mean, math.sqrt(variance / n), n


TOY_MODEL_TARGETS = {"colour_adherence": 0.9, "shape_adherence": 0.6, "background_adherence": 0.8}
"""What the untuned toy model must render from fresh noise for the evaluation to mean something (issue 14)."""


def _report(cfg: EvalConfig, samples: list[dict], seconds: float) -> dict:
    summary = summarize(samples, list(cfg.variants), list(cfg.motions), list(cfg.starts))
    return {"date": utc_now(), "git_sha": git_sha(),
            "machine": machine_description(), "seconds": round(seconds, 1),
            "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "cache_dir"},
            "model_training": _model_training(cfg.model_id), "summary": summary,
            "findings": findings(summary, samples), "samples": samples}


def _model_training(model_id: str) -> dict | None:
    """The toy weights' training record (steps, loss, machine), so a table always says which weights it scored."""
    if model_id != "toy":
        return None
    from vmc_fast.toy.model import read_toy_config

    training = read_toy_config().get("training", {})
    return {k: training.get(k) for k in ("steps", "final_loss", "wall_s", "machine")}


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def markdown(report: dict) -> str:
    """eval.md: the setup, a table per start, motion fidelity per motion, the toy model's own adherence, and the
    findings."""
    cfg, summary = report["config"], report["summary"]
    lines = [
        "# Motion transfer in the toy world (`vmc-fast eval`)", "",
        f"- Date: {report['date']}; git {report['git_sha']}; machine: {report['machine']}; took "
        f"{report['seconds'] / 60:.1f} min",
        f"- Model: `{cfg['model_id']}`" + (f" (weights: {report['model_training']['steps']} pretraining steps, "
                                           f"loss {report['model_training']['final_loss']:.4f})"
                                           if report.get("model_training") else ""),
        f"- Held-out motions: {', '.join(cfg['motions'])}; one reference clip each (the shipped examples); "
        f"seeds {', '.join(map(str, cfg['seeds']))}; {cfg['samples']} new appearances per motion and seed, each "
        f"from {' and from '.join(cfg.get('starts', ['inversion']))}",
        f"- Tuning: {cfg['steps']} steps at lr {cfg['learning_rate']:g}; DDIM inversion and sampling "
        f"{cfg['inference_steps']} steps, guidance {cfg['guidance_scale']:g}",
        "- Scores are means over samples; all in [0, 1], higher is better except `colour_leak` (the reference's "
        "colour shown instead of the asked one).",
    ]
    for start, rows in summary.items():
        keys = [k for k in SCORE_KEYS if any(rows[v][k] is not None for v in rows)]
        head = ["variant", *keys, "tune s", "samples"]
        lines += ["", f"## From {start}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, entry in rows.items():
            cells = [name, *(_fmt(entry[k]) for k in keys), _fmt(entry["tune_seconds"]), str(entry["samples"])]
            lines.append("| " + " | ".join(cells) + " |")
        motions = cfg["motions"]
        lines += ["", "Motion fidelity per motion:", "", "| variant | " + " | ".join(motions) + " |",
                  "|" + "---|" * (len(motions) + 1)]
        for name, entry in rows.items():
            lines.append(f"| {name} | " + " | ".join(_fmt(entry["per_motion"][m]) for m in motions) + " |")
    untuned = summary.get("noise", {}).get("no-tuning")
    if untuned is not None:
        lines += ["", "The untuned model from fresh noise (what the toy model renders before any tuning), against "
                  "the targets it must meet for this evaluation to mean something:", ""]
        lines += [f"- {key}: {_fmt(untuned[key])} (target {target:.2f})" for key, target in TOY_MODEL_TARGETS.items()]
    lines += ["", "Variants:", ""] + [f"- `{n}`: {VARIANTS[n].description}" for n in next(iter(summary.values()))]
    lines += ["", "Findings (\"holds\" only beyond 2 standard errors of the paired difference):", ""]
    lines += [f"- {line}" for line in report["findings"]]
    return "\n".join(lines) + "\n"


def figure_image(figure: dict, references: dict, scale: int = 3):
    """A PIL image: per motion, the reference row then one generated row per variant and start (the first look);
    columns are frames."""
    from PIL import Image, ImageDraw

    rows = []
    for motion, by_variant in figure.items():
        rows.append((f"{motion}: reference", references[motion][1].frames))
        rows.extend((f"{motion}: {name}", frames) for name, frames in by_variant.items())
    label_w = 190
    frame_h, frame_w = rows[0][1].shape[2] * scale, rows[0][1].shape[3] * scale
    num_frames = rows[0][1].shape[1]
    image = Image.new("RGB", (label_w + num_frames * frame_w, len(rows) * frame_h), "white")
    draw = ImageDraw.Draw(image)
    for r, (label, frames) in enumerate(rows):
        draw.text((4, r * frame_h + frame_h // 2 - 6), label, fill="black")
        for f, pixels in enumerate(frames_to_uint8(frames)):
            tile = Image.fromarray(pixels.numpy()).resize((frame_w, frame_h), Image.NEAREST)
            image.paste(tile, (label_w + f * frame_w, r * frame_h))
    return image


def write_outputs(report: dict, figure: dict, references: dict, out_dir: Path) -> dict[str, Path]:
    """eval.json, eval.md and eval.png in out_dir, each written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "eval.json", "markdown": out_dir / "eval.md", "figure": out_dir / "eval.png"}
    write_text_atomic(paths["json"], json.dumps(report, indent=1) + "\n")
    write_text_atomic(paths["markdown"], markdown(report))
    with atomic_path(paths["figure"]) as tmp:
        figure_image(figure, references).save(tmp, format="PNG")
    return paths
