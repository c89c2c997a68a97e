"""Adapter file size, full Q/K/V vs LoRA (--lora-rank), measured and counted.

show1-tiny-random: two real adapters, one training step each on the CPU (full and LoRA rank R), their file sizes.
show1-base-arch: counted on the meta device (no weights, no download): the temporal Q/K/V tensors' fp32 bytes
(what a full adapter holds) and the fp32 bytes of rank-R factors A (r, in) and B (out, r) on the same layers.

Run from outside the repository root (its kernels/ folder would shadow Hugging Face's):
    cd /tmp && python /path/to/benchmarks/lora/sizes.py [--rank 16]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np


def counted(model: str, rank: int) -> dict:
    from vmc_fast.models import load_backbone
    from vmc_fast.models.registry import LoadOptions
    from vmc_fast.tuning.surgery import temporal_qkv_parameters

    unet = load_backbone(model, LoadOptions(device="meta")).unet
    tensors = temporal_qkv_parameters(unet)
    full = sum(p.numel() * 4 for _, p in tensors)
    lora = sum(rank * (p.shape[0] + p.shape[1]) * 4 for _, p in tensors)
    return {"model": model, "tensors": len(tensors), "full_bytes": full, f"lora{rank}_bytes": lora,
            "ratio": full / lora}


def measured(model: str, rank: int, folder: Path) -> dict:
    import torch

    from vmc_fast.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from vmc_fast.io.video import write_video_atomic
    from vmc_fast.tuning.session import TuningSession

    frames = np.full((8, 3, 16, 24), -0.8, np.float32)
    for f in range(8):
        frames[f, :, 4:10, 2 + 2 * f: 8 + 2 * f] = 0.9
    video = write_video_atomic(torch.from_numpy(frames).permute(1, 0, 2, 3), folder / "square.mp4", 8)
    sizes = {}
    for r in (0, rank):
        cfg = RunConfig(data=DataConfig(videos=str(video)), model=ModelConfig(model_id=model, lora_rank=r),
                        train=TrainConfig(steps=1), prompt="a square", out_dir=str(folder / "out"),
                        cache_dir=str(folder / "cache"))
        session = TuningSession(cfg)
        states = session.prompt_embeddings(["a square"])["a square"]
        path = session.tune_video(video, "a square", states, folder / f"r{r}.safetensors").adapter
        sizes["full_file_bytes" if r == 0 else f"lora{rank}_file_bytes"] = path.stat().st_size
    return {"model": model, **sizes, "ratio": sizes["full_file_bytes"] / sizes[f"lora{rank}_file_bytes"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        rows = [measured("show1-tiny-random", args.rank, Path(folder)), counted("show1-base-arch", args.rank)]
    for row in rows:
        json.dump(row, sys.stdout)
        print()


if __name__ == "__main__":
    main()
