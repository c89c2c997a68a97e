"""Run by tests/test_parallel.py under torch.distributed.run (2 gloo ranks, DS_ACCELERATOR=cpu): for each ZeRO
stage, one backward through `DeepSpeedStep`'s engine and the full gradient of every trainable tensor, next to the
average of the single-rank gradients computed in plain torch. Rank 0 writes DIR/stage<k>.pt.

A gradient, not the weights after a step: Adam's first update is about lr * sign(g), which would hide a sum
where a mean belongs.
"""

import datetime
import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

WORLD_SIZE = 2


def model() -> nn.Module:
    """A frozen layer under a trainable one, seeded: the same on every rank and for every stage."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    for param in net[0].parameters():
        param.requires_grad_(False)
    return net


def batch(rank: int) -> torch.Tensor:
    return torch.randn(2, 4, generator=torch.Generator().manual_seed(100 + rank))


def loss_of(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return (net(x) ** 2).mean()


def reference() -> dict[str, torch.Tensor]:
    """mean over ranks r of grad loss(x_r), every rank's batch being known."""
    grads = {}
    for rank in range(WORLD_SIZE):
        net = model()
        loss_of(net, batch(rank)).backward()
        for name, param in net.named_parameters():
            if param.requires_grad:
                grads[name] = grads.get(name, 0) + param.grad / WORLD_SIZE
    return grads


def rank0_alone() -> dict[str, torch.Tensor]:
    net = model()
    loss_of(net, batch(0)).backward()
    return {name: p.grad.clone() for name, p in net.named_parameters() if p.requires_grad}


def zero_gradients(stage: int, folder: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_grad

    from vmc_fast.config import ParallelConfig, RunConfig, TrainConfig
    from vmc_fast.tuning.steps import DeepSpeedStep

    config = folder / f"ds{stage}.json"  # ZeRO-3: partition even these tiny tensors, as a real model's are
    config.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    cfg = RunConfig(train=TrainConfig(grad_clip=0.0), parallel=ParallelConfig(
        num_ranks=WORLD_SIZE, strategy="zero", zero_stage=stage, deepspeed_config=str(config)))
    net = model()
    names = {id(p): n for n, p in net.named_parameters()}
    params = [p for p in net.parameters() if p.requires_grad]
    step = DeepSpeedStep(net, params, cfg)
    step.engine.backward(loss_of(step.engine, batch(torch.distributed.get_rank())))
    return {names[id(p)]: safe_get_full_grad(p).detach().clone().float().cpu() for p in params}  # collective


def main(folder: Path) -> None:
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    for stage in (0, 1, 2, 3):
        found = {"zero": zero_gradients(stage, folder), "reference": reference(), "rank0_alone": rank0_alone()}
        if torch.distributed.get_rank() == 0:
            torch.save(found, folder / f"stage{stage}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main(Path(sys.argv[1]))
