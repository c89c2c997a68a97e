"""The morning after: a library run's folder as one static page, ``DIR/report.html``, and as JSON.

The page opens offline in any browser: no external URL, script or font; CSS inline, loss curves as inline SVG,
previews as base64 GIFs. One card per video of the manifest: status, prompt, time, final loss, its loss curve
(from the per-video ``DIR/<adapter name>/metrics.jsonl``, one JSON line per step with ``step`` and ``loss``) and
the error of a failed video. With previews, each done video's reference clip (as it was tuned) is shown beside a
short sample rendered from its adapter (`vmc_fast.inference.generate.generate`, few steps, keyframes only).
"""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from vmc_fast.errors import VmcError
from vmc_fast.io.files import write_text_atomic
from vmc_fast.runs.library import MANIFEST, Manifest, RunSummary, recorded_name, strict_json
from vmc_fast.runs.metrics import metrics_path, read_metrics

REPORT = "report.html"
PREVIEW_STEPS = 4
"""DDIM steps (inversion and sampling) of a preview: a glance at the motion, not a finished video."""
PREVIEW_SIZE = 128
"""Previews are scaled up (nearest neighbour) to at least this many pixels on their shorter side."""


# --------------------------------------------------------------------------------------------- state


def read_library(out_dir: Path) -> RunSummary:
    """The run's manifest as a RunSummary (every video it records); VmcError when DIR has no manifest."""
    out_dir = Path(out_dir)
    if not (out_dir / MANIFEST).is_file():
        raise VmcError(f"{out_dir}: no {MANIFEST}; pass the --out folder of a `vmc-fast train` run")
    return RunSummary(out_dir=out_dir, entries=list(Manifest(out_dir).read().values()))


def library_json(out_dir: Path) -> str:
    """The library's state as strict JSON (NaN and inf as null): ``out_dir``, ``ok``, ``counts`` and ``videos``
    (the manifest entries, each with ``adapter_name`` and ``metrics``: its metrics file, or null)."""
    summary = read_library(out_dir)
    videos = []
    for entry in summary.entries:
        name = recorded_name(entry)
        path = metrics_path(summary.out_dir, name) if name else None
        videos.append({**entry, "adapter_name": name,
                       "metrics": str(path) if path is not None and path.is_file() else None})
    return strict_json({"out_dir": str(summary.out_dir), "ok": summary.ok, "counts": summary.counts,
                        "videos": videos})


# --------------------------------------------------------------------------------------------- cards


@dataclass
class Card:
    """What the page shows of one video."""

    entry: dict
    """Its manifest entry."""
    losses: list[tuple[int, float]] = field(default_factory=list)
    """(step, loss) from its metrics file; [] when there is none."""
    reference_gif: bytes | None = None
    """The clip as it was tuned, as a GIF (with previews)."""
    sample_gif: bytes | None = None
    """A sample rendered from its adapter, as a GIF (with previews)."""
    preview_error: str | None = None
    """Why a preview could not be made."""

    @property
    def name(self) -> str:
        return Path(self.entry["video"]).name


def cards(summary: RunSummary) -> list[Card]:
    """One card per manifest entry, with its loss curve read from its metrics file."""
    result = []
    for entry in summary.entries:
        name = recorded_name(entry)
        try:
            records = read_metrics(metrics_path(summary.out_dir, name)) if name else []
        except ValueError:  # a damaged metrics file costs the curve, never the report
            records = []
        losses = [(int(r.get("step", i + 1)), float(r["loss"])) for i, r in enumerate(records)
                  if isinstance(r.get("loss"), (int, float))]
        result.append(Card(entry=entry, losses=losses))
    return result


def add_previews(items: list[Card], steps: int = PREVIEW_STEPS,
                 on_card: Callable[[Card], None] | None = None) -> None:
    """Render each done card's reference clip and a sample from its adapter (one backbone per base model,
    loaded once; adapters applied one after another). A card whose preview fails keeps the reason."""
    backbones: dict[str, object] = {}
    for card in items:
        if card.entry.get("status") == "done" and card.entry.get("adapter"):
            try:
                card.reference_gif, card.sample_gif = _preview(card.entry, steps, backbones)
            except Exception as exc:  # a preview must never stop the report
                card.preview_error = f"{type(exc).__name__}: {exc}"
            if on_card is not None:
                on_card(card)


def _preview(entry: dict, steps: int, backbones: dict) -> tuple[bytes | None, bytes]:
    from vmc_fast.config import GenerateConfig
    from vmc_fast.inference.generate import generate
    from vmc_fast.io.video import load_video
    from vmc_fast.models.registry import LoadOptions, load_backbone
    from vmc_fast.runtime import compute_dtype, resolve_device
    from vmc_fast.tuning.adapters import read_adapter

    adapter = Path(entry["adapter"])
    _, info = read_adapter(adapter)
    video = Path(entry["video"])
    reference = None
    s = info.sampling
    if video.exists():
        clip = load_video(video, num_frames=info.num_frames, height=info.height, width=info.width,
                          frame_stride=s.get("frame_stride", 1), start_frame=s.get("start_frame", 0),
                          reverse=s.get("reverse", False), resize=s.get("resize", "crop"), fps=s.get("fps"),
                          background=s.get("background", "white"))
        reference = gif_bytes(clip)
    if info.base_model not in backbones:
        device = resolve_device("auto")
        backbones[info.base_model] = load_backbone(info.base_model, LoadOptions(
            dtype=compute_dtype("auto", device), device=str(device)))
    cfg = GenerateConfig(prompt=entry.get("prompt") or info.prompt, adapter=str(adapter), model_id=info.base_model,
                         video=str(video) if video.exists() else None, num_inference_steps=steps,
                         inversion_steps=steps, output=None, keyframes_only=True, num_frames=info.num_frames,
                         height=info.height, width=info.width)
    result = generate(cfg, backbone=backbones[info.base_model])
    return reference, gif_bytes(result.frames)


def gif_bytes(frames: torch.Tensor, fps: int = 8) -> bytes:
    """(3, F, H, W) float in [-1, 1] as a looping GIF, scaled up (nearest) to at least PREVIEW_SIZE pixels."""
    from PIL import Image

    from vmc_fast.io.video import frames_to_uint8

    images = [Image.fromarray(f.numpy()) for f in frames_to_uint8(frames)]
    scale = max(1, math.ceil(PREVIEW_SIZE / min(images[0].size)))
    images = [im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in images]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps),
                   loop=0)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------- page


def write_report(out_dir: Path, previews: bool = False, steps: int = PREVIEW_STEPS,
                 on_card: Callable[[Card], None] | None = None) -> Path:
    """Write ``DIR/report.html`` atomically and return its path (VmcError when DIR has no manifest)."""
    summary = read_library(out_dir)
    items = cards(summary)
    if previews:
        add_previews(items, steps, on_card)
    return write_text_atomic(Path(out_dir) / REPORT, render_page(summary, items))


STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:1.5em;background:#f6f7f9;color:#222}
h1{font-size:1.3em;margin:0 0 .2em}.summary{color:#555;margin-bottom:1em}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(360px,1fr));gap:1em}
.card{background:#fff;border:1px solid #ddd;border-radius:8px;padding:.8em 1em;border-left:6px solid #bbb}
.card.done{border-left-color:#2e9e4f}.card.failed{border-left-color:#d33}.card.pending{border-left-color:#e0a800}
.card h2{font-size:1em;margin:0 0 .3em;word-break:break-all}.status{font-weight:bold;text-transform:uppercase;
font-size:.8em}.done .status{color:#2e9e4f}.failed .status{color:#d33}.pending .status{color:#b08400}
.prompt{font-style:italic;margin:.3em 0}dl{display:grid;grid-template-columns:auto 1fr;gap:.1em .8em;margin:.4em 0;
font-size:.9em}dt{color:#666}dd{margin:0;word-break:break-all}.error{background:#fdecec;color:#900;padding:.4em;
border-radius:4px;white-space:pre-wrap;font-family:monospace;font-size:.85em}.note{color:#777;font-size:.85em}
.previews{display:flex;gap:.6em}.previews figure{margin:0;text-align:center;font-size:.8em;color:#555}
.previews img{image-rendering:pixelated;max-width:170px;border:1px solid #ccc}svg{background:#fafafa}
"""


def render_page(summary: RunSummary, items: list[Card]) -> str:
    """The whole page as a string: no external resources."""
    counts = ", ".join(f"{n} {s}" for s, n in sorted(summary.counts.items())) or "no videos"
    title = f"vmc-fast library: {summary.out_dir}"
    body = "\n".join(render_card(card) for card in items)
    return (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{_e(title)}</title>\n"
            f"<style>{STYLE}</style>\n</head>\n<body>\n<h1>{_e(title)}</h1>\n"
            f"<p class=\"summary\">{len(items)} videos: {_e(counts)}</p>\n<div class=\"cards\">\n{body}\n</div>\n"
            f"</body>\n</html>\n")


def render_card(card: Card) -> str:
    e = card.entry
    status = str(e.get("status", "pending"))
    facts = [("prompt", e.get("prompt")), ("time", _seconds(e.get("seconds"))),
             ("final loss", _number(e.get("final_loss"))), ("steps", e.get("steps")),
             ("adapter", e.get("adapter")), ("video", e.get("video"))]
    rows = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in facts if v not in (None, ""))
    parts = [f"<div class=\"card {_e(status)}\" id=\"{_e(recorded_name(e) or card.name)}\">",
             f"<h2>{_e(card.name)}</h2><span class=\"status\">{_e(status)}</span>", f"<dl>{rows}</dl>"]
    if status == "failed":
        parts.append(f"<div class=\"error\">{_e(e.get('error', 'failed without a recorded reason'))}</div>")
    parts.append(loss_svg(card.losses) if card.losses else "<p class=\"note\">no per-step metrics</p>")
    if card.reference_gif or card.sample_gif:
        figures = [f"<figure><img alt=\"{_e(label)}\" src=\"data:image/gif;base64,"
                   f"{base64.b64encode(gif).decode('ascii')}\"><figcaption>{_e(label)}</figcaption></figure>"
                   for label, gif in (("reference", card.reference_gif), ("sample", card.sample_gif)) if gif]
        parts.append(f"<div class=\"previews\">{''.join(figures)}</div>")
    if card.preview_error:
        parts.append(f"<p class=\"note\">no preview: {_e(card.preview_error)}</p>")
    parts.append("</div>")
    return "\n".join(parts)


def loss_svg(losses: list[tuple[int, float]], width: int = 340, height: int = 120) -> str:
    """An inline SVG line of loss against step, with its range labelled; non-finite losses are left out."""
    points = [(s, v) for s, v in losses if math.isfinite(v)]
    if not points:
        return "<p class=\"note\">no finite loss recorded</p>"
    pad_left, pad, inner_w, inner_h = 44, 14, width - 44 - 8, height - 2 * 14
    steps, values = [s for s, _ in points], [v for _, v in points]
    lo, hi, first, last = min(values), max(values), min(steps), max(steps)
    x = lambda s: pad_left + (inner_w * (s - first) / (last - first) if last > first else inner_w / 2)  # noqa: E731
    y = lambda v: pad + (inner_h * (hi - v) / (hi - lo) if hi > lo else inner_h / 2)  # noqa: E731
    line = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in points)
    text = "font-size=\"10\" fill=\"#555\" font-family=\"sans-serif\""
    return (f"<svg width=\"{width}\" height=\"{height}\" "
            f"viewBox=\"0 0 {width} {height}\" role=\"img\" aria-label=\"loss curve\">"
            f"<polyline fill=\"none\" stroke=\"#3366cc\" stroke-width=\"1.5\" points=\"{line}\"/>"
            f"<text x=\"2\" y=\"{pad + 4}\" {text}>{_number(hi)}</text>"
            f"<text x=\"2\" y=\"{pad + inner_h}\" {text}>{_number(lo)}</text>"
            f"<text x=\"{pad_left}\" y=\"{height - 1}\" {text}>step {first}</text>"
            f"<text x=\"{width - 8}\" y=\"{height - 1}\" text-anchor=\"end\" {text}>step {last} · loss</text></svg>")


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _number(value) -> str | None:
    return f"{value:.4g}" if isinstance(value, (int, float)) and math.isfinite(value) else None


def _seconds(value) -> str | None:
    if not isinstance(value, (int, float)):
        return None
    return f"{value:.1f} s" if value < 120 else f"{value / 60:.1f} min"
