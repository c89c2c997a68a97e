"""`vmc-fast demo`: the built-in default job. Tune a motion adapter on a shipped clip of a motion the toy model
never saw, then render that motion with new shapes, colours and backgrounds, and score it.

Everything runs on the shipped toy model and example clips (no downloads, a few minutes on a CPU). The outputs
are OUT/adapters/MOTION.safetensors, OUT/demo.gif (the reference, then each new appearance, side by side) and
OUT/demo.json (the prompts and scores); all are written atomically.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

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
        return EvalConfig(motions=(self.motion,), variants=("cos",), samples=self.samples, seeds=(self.seed,),
                          steps=self.steps, learning_rate=self.learning_rate, inference_steps=self.inference_steps,
                          guidance_scale=self.guidance_scale, out_dir=self.out_dir, device=self.device)


def run_demo(cfg: DemoConfig, progress: ProgressCallback | None = None) -> dict:
    """Tune, render, score, write; returns {"adapter", "gif", "json", "prompt", "samples"}."""
    from vmc_fast.tuning.session import TuningSession

    eval_cfg, variant = cfg.eval_config(), VARIANTS["cos"]
    path, reference = held_out_example(cfg.motion)
    out = Path(cfg.out_dir)
    adapter = out / "adapters" / f"{cfg.motion}.safetensors"
    total = unet_calls(eval_cfg, variant)
    done = 0

    def tick(units: int) -> None:
        nonlocal done
        done += units
        if progress is not None:
            progress(f"{cfg.motion}", done, total)

    session = TuningSession(eval_cfg.run_config(variant, cfg.seed), device=cfg.device)
    job = tune_and_generate(eval_cfg, session, variant, cfg.seed, path, reference, None, tick, adapter)
    gif = write_video_atomic(side_by_side([reference.frames, *job["frames"]]), out / "demo.gif")
    record = {"reference": str(path), "tuning_prompt": reference.motion_caption, "adapter": str(adapter),
              "gif": str(gif), "config": dataclasses.asdict(cfg), "samples": job["samples"]}
    json_path = write_text_atomic(out / "demo.json", json.dumps(record, indent=1, default=str) + "\n")
    return {"adapter": adapter, "gif": gif, "json": json_path, "prompt": reference.motion_caption,
            "samples": job["samples"]}


def side_by_side(videos: list[torch.Tensor], gap: int = 2) -> torch.Tensor:
    """(3, F, H, W) videos in [-1, 1] -> one (3, F, H, N*W + gaps) video, white gaps between them."""
    parts = []
    for index, video in enumerate(videos):
        if index:
            parts.append(torch.ones(*video.shape[:3], gap))
        parts.append(video)
    return torch.cat(parts, dim=3)
