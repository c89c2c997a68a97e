"""`vmc-fast demo`: the built-in default job. Tune a motion adapter on a shipped clip of a motion the toy model
never saw, then render that motion with new shapes, colours and backgrounds, untuned and tuned side by side.

For every new look the demo renders four videos: the untuned and the tuned model, each from fresh noise (where
only the adapter can carry the motion) and from the DDIM inversion of the reference clip (the paper's inference).
Everything runs on the shipped toy model and example clips (no downloads, minutes on a CPU). The outputs are
OUT/adapters/MOTION.safetensors, OUT/demo.gif (the reference, then per look the four videos, labelled and upscaled
SCALE times) and OUT/demo.json (the prompts and every score); all are written atomically.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vmc_fast.config import RECIPE, check_field, option
from vmc_fast.io.files import write_text_atomic
from vmc_fast.io.video import write_video_atomic
from vmc_fast.studies.evaluation import (
    VARIANTS,
    EvalConfig,
    ProgressCallback,
    tune_and_generate,
    unet_calls,
)
from vmc_fast.toy import world
from vmc_fast.toy.examples import held_out_example


@dataclass
class DemoConfig:
    """One `vmc-fast demo` run; tuning defaults are the paper's (RECIPE), inference the toy world's."""

    out_dir: str = field(default="runs/demo", metadata=option("--out"))
    """Output folder: adapters/, demo.gif, demo.json."""
    motion: str = "zigzag"
    """Held-out motion of the shipped example: zigzag | figure-eight | spiral."""
    samples: int = 3
    """New appearances to render."""
    steps: int = RECIPE.steps
    """Tuning steps (paper: 400)."""
    learning_rate: float = field(default=RECIPE.learning_rate, metadata=option("--lr"))
    """Tuning learning rate (paper: 1e-4)."""
    seed: int = 0
    """Seed of tuning and of the new appearances."""
    inference_steps: int = RECIPE.toy_inference_steps
    """DDIM inversion and sampling steps (paper: 75)."""
    guidance_scale: float = RECIPE.toy_guidance_scale
    """Classifier-free guidance."""
    device: str = "cpu"
    """cpu | cuda."""

    def __post_init__(self) -> None:
        check_field(self.motion in world.HELD_OUT_MOTIONS, "--motion",
                    f"{self.motion!r} has no shipped example; choose one of {', '.join(world.HELD_OUT_MOTIONS)}")
        self.eval_config()  # the remaining checks are evaluation's

    def eval_config(self) -> EvalConfig:
        return EvalConfig(motions=(self.motion,), variants=("no-tuning", "cos"), samples=self.samples,
                          seeds=(self.seed,), steps=self.steps, learning_rate=self.learning_rate,
                          inference_steps=self.inference_steps, guidance_scale=self.guidance_scale,
                          out_dir=self.out_dir, device=self.device)


COLUMNS = (("untuned", "noise"), ("tuned", "noise"), ("untuned", "inversion"), ("tuned", "inversion"))
"""The four videos of each look, left to right, after the reference: (model, start)."""
SCALE = 4
"""Upscaling of the toy model's 32x32 frames in demo.gif (nearest neighbour), so a person can see them."""
LABEL_HEIGHT = 12
"""Height of the label strip above each video, in pixels of the gif."""
GAP = 2
"""White pixels between videos."""


def run_demo(cfg: DemoConfig, progress: ProgressCallback | None = None) -> dict:
    """Render every look untuned, tune, render every look tuned; score, write; returns {"adapter", "gif", "json",
    "prompt", "samples"} (samples: one record per look, start and model)."""
    from vmc_fast.tuning.session import TuningSession

    eval_cfg = cfg.eval_config()
    path, reference = held_out_example(cfg.motion)
    out = Path(cfg.out_dir)
    adapter = out / "adapters" / f"{cfg.motion}.safetensors"
    total = sum(unet_calls(eval_cfg, VARIANTS[name]) for name in eval_cfg.variants)
    done = 0

    def tick(units: int) -> None:
        nonlocal done
        done += units
        if progress is not None:
            progress(f"{cfg.motion}", done, total)

    session = TuningSession(eval_cfg.run_config(VARIANTS["cos"], cfg.seed), device=cfg.device)
    jobs = {model: tune_and_generate(eval_cfg, session, VARIANTS[name], cfg.seed, path, reference, None, tick,
                                     adapter)
            for model, name in (("untuned", "no-tuning"), ("tuned", "cos"))}
    samples = [record for job in jobs.values() for record in job["samples"]]
    rows = [[("reference", reference.frames)] +
            [(f"{model}, {start}", jobs[model]["frames"][start][look]) for model, start in COLUMNS]
            for look in range(cfg.samples)]
    gif = write_video_atomic(labelled_grid(rows), out / "demo.gif")
    record = {"reference": str(path), "tuning_prompt": reference.motion_caption, "adapter": str(adapter),
              "gif": str(gif), "layout": {"columns": ["reference", *(f"{m}, {s}" for m, s in COLUMNS)],
                                          "rows": [s["prompt"] for s in jobs["tuned"]["samples"][:cfg.samples]],
                                          "scale": SCALE},
              "config": dataclasses.asdict(cfg), "samples": samples}
    json_path = write_text_atomic(out / "demo.json", json.dumps(record, indent=1, default=str) + "\n")
    return {"adapter": adapter, "gif": gif, "json": json_path, "prompt": reference.motion_caption,
            "samples": samples}


def labelled_grid(rows: list[list[tuple[str, torch.Tensor]]]) -> torch.Tensor:
    """Rows of labelled (3, F, H, W) videos in [-1, 1] -> one (3, F, H', W') video: each video upscaled SCALE
    times, under a white strip of LABEL_HEIGHT pixels holding its label, GAP white pixels between them."""
    tiles = [[_labelled(label, video) for label, video in row] for row in rows]
    white_column = torch.ones(*tiles[0][0].shape[:3], GAP)
    lines = [torch.cat([t for tile in row for t in (white_column, tile)][1:], dim=3) for row in tiles]
    white_row = torch.ones(*lines[0].shape[:2], GAP, lines[0].shape[3])
    return torch.cat([part for line in lines for part in (white_row, line)][1:], dim=2)


def _labelled(label: str, video: torch.Tensor) -> torch.Tensor:
    from PIL import Image, ImageDraw

    big = video.repeat_interleave(SCALE, dim=2).repeat_interleave(SCALE, dim=3)
    strip = Image.new("L", (big.shape[3], LABEL_HEIGHT), 255)
    ImageDraw.Draw(strip).text((2, 0), label, fill=0)
    text = torch.from_numpy(np.asarray(strip)).float() / 127.5 - 1  # (LABEL_HEIGHT, W)
    strip_video = text[None, None].expand(3, big.shape[1], -1, -1)
    return torch.cat([strip_video, big], dim=2)
