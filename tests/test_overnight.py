"""An overnight library (issue 13 items 4 and 5): a run that survives a kill, refuses a second run on its folder,
never rewrites a finished adapter, shows its progress; and adapters stored as bf16 changes from the base."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import moving_square_frames, write_video
from vmc_fast.config import DataConfig, RunConfig, TrainConfig
from vmc_fast.errors import VmcError
from vmc_fast.models import load_backbone
from vmc_fast.tuning.adapters import apply_adapter, base_fingerprint, base_reference, read_adapter, save_adapter
from vmc_fast.tuning.session import TuningSession
from vmc_fast.tuning.surgery import temporal_qkv_parameters

PROMPT = "a square moving right"


# --------------------------------------------------------------------------------------------- bf16 delta adapters


def _tuned(unet, scale: float = 1e-3, seed: int = 0) -> tuple[dict, dict]:
    """(base values, tuned values) of `unet`'s temporal Q/K/V: the base plus a small random change, fp32."""
    generator = torch.Generator().manual_seed(seed)
    base = {n: p.detach().float().clone() for n, p in temporal_qkv_parameters(unet)}
    return base, {n: v + scale * torch.randn(v.shape, generator=generator) for n, v in base.items()}


def _save(unet, path, tuned, base_values, dtype: str, **extra):
    names = set(tuned)
    return save_adapter(path, tuned, base_model="tiny-random", fingerprint=base_fingerprint(unet, names),
                        base=base_reference(unet, names), prompt="p", steps=1, final_loss=0.0, loss="cos",
                        num_frames=8, height=32, width=32, base_tensors=base_values, dtype=dtype, extra=extra)


@pytest.mark.parametrize("model_id", ["tiny-random", "show1-tiny-random"])
def test_a_bf16_delta_adapter_applies_within_its_recorded_error(tmp_path, model_id):
    unet = load_backbone(model_id).unet
    base, tuned = _tuned(unet)
    path = _save(unet, tmp_path / "d.safetensors", tuned, base, "bf16")
    stored, info = read_adapter(path)
    assert info.storage == "delta" and set(stored) == set(tuned) <= set(unet.state_dict())  # the base's own names
    assert all(t.dtype == torch.bfloat16 for t in stored.values())
    error = info.reconstruction
    largest_change = max((tuned[n] - base[n]).abs().max().item() for n in tuned)
    assert 0 < error["relative_error"] < 2 ** -8 and 0 < error["max_abs_error"] < 2 ** -8 * largest_change

    apply_adapter(unet, path)
    params = dict(unet.named_parameters())
    worst = max((params[n].detach() - tuned[n]).abs().max().item() for n in tuned)
    lost = sum((params[n].detach().double() - tuned[n].double()).square().sum().item() for n in tuned)
    change = sum((tuned[n].double() - base[n].double()).square().sum().item() for n in tuned)
    assert worst <= error["max_abs_error"] and worst > 0  # the error recorded is the error loaded
    assert (lost / change) ** 0.5 == pytest.approx(error["relative_error"], rel=1e-6)

    # Half the bytes of the exact fp32 tensors.
    full = _save(unet, tmp_path / "f.safetensors", tuned, base, "fp32")
    tensor_bytes = lambda p: sum(t.numel() * t.element_size() for t in load_file(p).values())  # noqa: E731
    assert tensor_bytes(path) * 2 == tensor_bytes(full)
    assert read_adapter(full)[1].storage == "full" and read_adapter(full)[1].reconstruction == {}


def test_applying_delta_adapters_one_after_another_gives_the_last_one(tmp_path):
    unet = load_backbone("tiny-random").unet
    base, first = _tuned(unet, seed=1)
    _, second = _tuned(unet, seed=2)
    a = _save(unet, tmp_path / "a.safetensors", first, base, "bf16")
    b = _save(unet, tmp_path / "b.safetensors", second, base, "bf16")
    full = _save(unet, tmp_path / "f.safetensors", first, base, "fp32")
    apply_adapter(unet, a)
    apply_adapter(unet, full)
    apply_adapter(unet, b)  # added to the base values, not to what a or the full adapter left
    fresh = load_backbone("tiny-random").unet
    apply_adapter(fresh, b)
    assert all(torch.equal(p, dict(fresh.named_parameters())[n]) for n, p in unet.named_parameters())


def test_a_bf16_delta_adapter_refuses_another_base(tmp_path):
    unet = load_backbone("tiny-random").unet
    base, tuned = _tuned(unet)
    path = _save(unet, tmp_path / "d.safetensors", tuned, base, "bf16")
    other = load_backbone("tiny-random").unet
    with torch.no_grad():
        next(p for n, p in other.named_parameters() if n not in tuned).mul_(1.5)  # a frozen weight differs
    with pytest.raises(VmcError, match="not this one"):
        apply_adapter(other, path)
    moved = load_backbone("tiny-random").unet
    with torch.no_grad():
        for _, p in temporal_qkv_parameters(moved):
            p.add_(0.1)  # the tuned tensors' own base values differ: a delta would land elsewhere
    with pytest.raises(VmcError, match="base values of its tuned tensors differ"):
        apply_adapter(moved, path)


def test_an_adapter_of_the_previous_format_still_loads(tmp_path):
    """Full fp32 tensors and no storage marker, as adapters were written before 2026-12."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    unet = load_backbone("tiny-random").unet
    base, tuned = _tuned(unet)
    path = _save(unet, tmp_path / "new.safetensors", tuned, base, "fp32")
    with safe_open(str(path), framework="pt") as handle:
        metadata = {k: v for k, v in handle.metadata().items() if k != "storage"}
    old = tmp_path / "old.safetensors"
    save_file(load_file(path), old, metadata)
    info = apply_adapter(unet, old)
    assert info.storage == "full"
    params = dict(unet.named_parameters())
    assert all(torch.equal(params[n], tuned[n]) for n in tuned)


def test_training_writes_bf16_deltas_by_default_and_fp32_by_option(square_video, tmp_path):
    adapters = {}
    for dtype in ("bf16", "fp32"):
        cfg = RunConfig(data=DataConfig(videos=str(square_video)), train=TrainConfig(steps=2, learning_rate=1e-2),
                        prompt=PROMPT, out_dir=str(tmp_path / dtype), cache_dir=str(tmp_path / "c"),
                        **({} if dtype == "bf16" else {"adapter_dtype": "fp32"}))
        session = TuningSession(cfg)
        done = session.tune_video(square_video, PROMPT, session.prompt_embeddings([PROMPT])[PROMPT],
                                  tmp_path / f"{dtype}.safetensors")
        adapters[dtype] = done.adapter
    exact, _ = read_adapter(adapters["fp32"])
    info = read_adapter(adapters["bf16"])[1]
    assert info.storage == "delta" and info.reconstruction["relative_error"] < 2 ** -8
    unet = load_backbone("tiny-random").unet
    apply_adapter(unet, adapters["bf16"])
    params = dict(unet.named_parameters())
    assert max((params[n] - exact[n]).abs().max().item() for n in exact) <= info.reconstruction["max_abs_error"]


def test_an_adapter_written_for_the_same_request_is_never_rewritten(tmp_path):
    unet = load_backbone("tiny-random").unet
    base, tuned = _tuned(unet)
    path = _save(unet, tmp_path / "a.safetensors", tuned, base, "bf16", request_hash="abc")
    before = path.stat()
    _save(unet, path, _tuned(unet, seed=5)[1], base, "bf16", request_hash="abc")
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    _save(unet, path, tuned, base, "bf16", request_hash="other")  # another request (--retune) replaces it
    assert path.stat().st_ino != before.st_ino
