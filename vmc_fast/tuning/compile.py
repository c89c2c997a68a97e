"""torch.compile of the keyframe UNet, once per process, reused for every video.

Applied in the fixed setup order surgery -> checkpointing -> compile -> DeepSpeed (after surgery, because which
weights require grad is part of what a compiled graph assumes). Compilation is always in place (`nn.Module.compile`):
the module tree and parameter names stay exactly those of the base model, so adapters, `state_dict` and DeepSpeed
see the same names; `torch.compile(unet)` would wrap it and prefix every name with ``_orig_mod.``.

Swapping videos or adapters copies values into the same parameters (`TuningSession.reset_trainable`,
`vmc_fast.tuning.adapters.apply_adapter`): parameters are graph inputs, so that never recompiles. New input shapes
(another frame count or size) or toggling requires_grad do.
"""

from __future__ import annotations

from torch import nn

from vmc_fast.config import COMPILE_MODES


def compile_unet(unet: nn.Module, mode: str = "regional", **compile_kwargs) -> nn.Module:
    """Compile `unet` in place and return it; calling it again with the same mode is a no-op (compile once).

    `compile_kwargs` go to `torch.compile` (backend, mode, dynamic, fullgraph, options). ``dynamic`` defaults to
    False: blocks of one class share their code, so Dynamo would otherwise see a new shape from each instance,
    retrace with symbolic sizes, and inductor (torch 2.13) fails on them ("cannot determine truth value of
    Relational: 64*s80*s82 < 8"); shapes are fixed for a run anyway, so each block is specialised. Regional compilation
    compiles each of ``down_blocks``, ``mid_block`` and ``up_blocks``: on the tiny models each block is one graph
    with no graph break, cold compile time grows with the number of blocks rather than with one huge graph, and a
    block-level graph break cannot spread across the whole UNet.
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"--compile {mode!r} is not known; use one of {', '.join(COMPILE_MODES)}")
    if mode == "off":
        return unet
    done = getattr(unet, "_vmc_compile_mode", None)
    if done == mode:
        return unet
    if done is not None:
        raise ValueError(f"this UNet is already compiled with --compile {done}; load a fresh one to use {mode}")
    compile_kwargs.setdefault("dynamic", False)
    for module in ([unet] if mode == "full" else compile_regions(unet)):
        module.compile(**compile_kwargs)
    unet._vmc_compile_mode = mode
    return unet


def compile_regions(unet: nn.Module) -> list[nn.Module]:
    """The blocks regional compilation compiles: down_blocks.*, mid_block, up_blocks.* (Show-1 and diffusers)."""
    mid = getattr(unet, "mid_block", None)
    regions = [*getattr(unet, "down_blocks", ()), *([mid] if mid is not None else []), *getattr(unet, "up_blocks", ())]
    if not regions:
        raise ValueError(f"--compile regional: {type(unet).__name__} has no down_blocks/mid_block/up_blocks; "
                         f"use --compile full")
    return regions


def is_compiled(unet: nn.Module) -> str | None:
    """The mode `compile_unet` compiled `unet` with, or None."""
    return getattr(unet, "_vmc_compile_mode", None)
