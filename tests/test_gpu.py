"""The paths a CPU cannot run, on CUDA (`pytest -m gpu`; `benchmarks/gpu/run.sh` runs them on a GPU slot).

Every test here is marked `gpu` and skipped without CUDA. `VMC_FAST_GPU_TESTS_ON_CPU=1` rehearses them on the CPU
(tests of CUDA-only libraries and kernels skip; compile uses the aot_eager backend): their logic is debugged here
so that GPU minutes go to measuring. Tolerances are stated beside each test with what they were set from.
"""

from __future__ import annotations

import copy
import importlib
import json
import logging
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import moving_square_frames, write_frame_folder

REHEARSAL = os.environ.get("VMC_FAST_GPU_TESTS_ON_CPU") == "1" and not torch.cuda.is_available()
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() and not REHEARSAL, reason="needs CUDA")]
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def cuda_only(what: str):
    """Skip in a CPU rehearsal: `what` exists on CUDA only."""
    return pytest.mark.skipif(DEVICE.type != "cuda", reason=f"{what} runs on CUDA only")


def _library(name: str):
    """The module, or a skip naming what is missing (benchmarks/gpu/run.sh carries it as a wheel)."""
    return pytest.importorskip(name, reason=f"{name} is not installed (carried by benchmarks/gpu/fetch-wheels.sh)")


def usable_xformers():
    """xformers.ops, or a skip naming why it cannot run here: a wheel built for another torch or CUDA imports but
    has no CUDA kernels ("xFormers wasn't build with CUDA support")."""
    xops = _library("xformers.ops")
    x = torch.zeros(1, 8, 1, 32, device=DEVICE, dtype=torch.bfloat16)
    try:
        xops.memory_efficient_attention(x, x, x)
    except (NotImplementedError, RuntimeError) as exc:
        pytest.skip(f"xformers cannot run on this machine: {str(exc).strip().splitlines()[0][:200]}")
    return xops


def _backbone(model_id: str, dtype: torch.dtype = torch.float32):
    from vmc_fast.models.registry import LoadOptions, load_backbone

    return load_backbone(model_id, LoadOptions(dtype=dtype, device=str(DEVICE)))


def _inputs(backbone, num_frames: int = 4, seed: int = 1):
    """sample (1, C, F, h, w), timestep (1,), text states (1, L, D), all on DEVICE, seeded."""
    gen = torch.Generator().manual_seed(seed)
    states = backbone.load_text_encoder()(["a square is moving to the right"]).float()
    height, width = (backbone.height, backbone.width) if backbone.family == "show1" else (8, 8)
    sample = torch.randn(1, backbone.in_channels, num_frames, height, width, generator=gen)
    return sample.to(DEVICE), torch.tensor([500], device=DEVICE), states.to(DEVICE)


def _forward_backward(unet: nn.Module, inputs, dtype: torch.dtype | None = torch.bfloat16):
    """fp32 output and {name: grad} of the trainable parameters after a mean-square backward, under autocast."""
    unet.zero_grad(set_to_none=True)
    with torch.autocast(DEVICE.type, dtype or torch.float32, enabled=dtype is not None):
        out = unet(*inputs)
    out = (out.sample if hasattr(out, "sample") else out).float()
    out.square().mean().backward()
    return out.detach(), {n: p.grad.detach().clone() for n, p in unet.named_parameters() if p.requires_grad}


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


def _min_grad_cos(grads: dict, ref: dict) -> float:
    return min(F.cosine_similarity(grads[n].flatten().float(), ref[n].flatten().float(), dim=0).item() for n in ref)


# ------------------------------------------------------------------------------------------ training in bf16


@pytest.mark.parametrize("model_id", ["tiny-random", "show1-tiny-random"])
def test_bf16_autocast_training_changes_only_temporal_qkv(model_id):
    """The session's real setup (bf16 frozen weights, bf16 autocast) for 3 steps: finite losses, every temporal
    Q/K/V tensor moved, every other tensor bit-identical."""
    from vmc_fast.config import ModelConfig, RunConfig, TrainConfig
    from vmc_fast.tuning.loop import tune
    from vmc_fast.tuning.session import TuningSession
    from vmc_fast.tuning.steps import TorchStep
    from vmc_fast.tuning.surgery import temporal_qkv_parameters

    cfg = RunConfig(model=ModelConfig(model_id=model_id, frozen_dtype="bf16"),
                    train=TrainConfig(steps=3, precision="bf16", learning_rate=1e-3))
    session = TuningSession(cfg, device=str(DEVICE))
    unet = session.backbone.unet
    assert {p.dtype for p in unet.parameters() if not p.requires_grad} == {torch.bfloat16}
    before = {n: t.detach().clone() for n, t in [*unet.named_parameters(), *unet.named_buffers()]}
    sample, _, states = _inputs(session.backbone, num_frames=session.sampling.num_frames)
    result = tune(unet, session.backbone.noise_scheduler.alphas_cumprod, sample, states, cfg.train,
                  TorchStep(session.params, cfg.train))
    assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    trainable = {n for n, _ in temporal_qkv_parameters(unet)}
    after = dict([*unet.named_parameters(), *unet.named_buffers()])
    changed = {n for n, t in after.items() if not torch.equal(t.detach(), before[n])}
    assert changed == trainable
    assert all(after[n].dtype == torch.float32 for n in trainable)  # fp32 master weights under bf16 autocast


# ------------------------------------------------------------------------------------------ 8-bit levers

INT8_VS_BF16_OUT_TOL = 0.08
"""Relative output error of int8 frozen weights against bf16 frozen weights, both under bf16 autocast. On the CPU
int8 was within 0.036 (train mode) and 0.046 (int8 activations, as CUDA always runs) of fp32, bf16 within 0.021."""
INT8_GRAD_COS_MIN = 0.99
"""Lowest cosine between a Q/K/V gradient with int8 and with bf16 frozen weights (CPU: at least 0.994 vs fp32)."""


@pytest.mark.parametrize("model_id", ["tiny-random", "show1-tiny-random"])
def test_int8_frozen_weights_match_bf16(model_id):
    _library("bitsandbytes")
    from vmc_fast.tuning.precision import QuantizedConv, apply_frozen_precision
    from vmc_fast.tuning.surgery import prepare_for_motion_tuning

    backbone = _backbone(model_id)
    prepare_for_motion_tuning(backbone.unet)
    inputs = _inputs(backbone)
    int8 = copy.deepcopy(backbone.unet).train()
    bf16 = backbone.unet.train()
    apply_frozen_precision(bf16, "bf16")
    report = apply_frozen_precision(int8, "int8", torch.bfloat16 if DEVICE.type == "cuda" else torch.float32)
    assert report.num_linear_replaced > 0 and report.num_conv_replaced > 0
    assert any(isinstance(m, QuantizedConv) for m in int8.modules())
    ref_out, ref_grads = _forward_backward(bf16, inputs)
    out, grads = _forward_backward(int8, inputs)
    error, cos = _relative_error(out, ref_out), _min_grad_cos(grads, ref_grads)
    print(f"{model_id} int8 vs bf16: output relative error {error:.4f}, lowest Q/K/V grad cosine {cos:.5f}")
    assert error < INT8_VS_BF16_OUT_TOL and cos > INT8_GRAD_COS_MIN


def test_adamw8bit_follows_adamw():
    """vmc-fast's `--optimizer adamw8bit` (bitsandbytes AdamW8bit) against torch AdamW for 20 steps on the same
    gradients: its moments are really 8-bit, and the weights stay within 2% of AdamW's update (blockwise 8-bit
    moments, bitsandbytes' paper: the update differs by quantization noise, not by a bias)."""
    _library("bitsandbytes")
    from vmc_fast.config import TrainConfig
    from vmc_fast.tuning.steps import build_optimizer

    gen = torch.Generator().manual_seed(0)
    start = torch.randn(128, 256, generator=gen).to(DEVICE)
    grads = [torch.randn(128, 256, generator=gen).to(DEVICE) for _ in range(20)]
    weights = {}
    for name in ("adamw", "adamw8bit"):
        param = nn.Parameter(start.clone())
        optimizer = build_optimizer([param], TrainConfig(optimizer=name, learning_rate=1e-2))
        for grad in grads:
            param.grad = grad.clone()
            optimizer.step()
        weights[name] = param.detach()
        if name == "adamw8bit":
            assert optimizer.state[param]["state1"].dtype == torch.uint8
    moved = (weights["adamw"] - start).norm()
    assert (weights["adamw8bit"] - weights["adamw"]).norm() / moved < 0.02


# ------------------------------------------------------------------------------------------ attention kernels


@cuda_only("xformers")
def test_xformers_matches_sdpa_in_a_training_step():
    usable_xformers()
    from vmc_fast.models.attention import set_temporal_attention_backend
    from vmc_fast.tuning.surgery import prepare_for_motion_tuning

    backbone = _backbone("show1-tiny-random")
    prepare_for_motion_tuning(backbone.unet)
    inputs = _inputs(backbone)
    ref_out, ref_grads = _forward_backward(backbone.unet, inputs)
    set_temporal_attention_backend(backbone.unet, "xformers")
    out, grads = _forward_backward(backbone.unet, inputs)
    # bf16 autocast: two fused kernels summing in different orders; 1e-2 is about 3 bf16 ulps of the output.
    assert _relative_error(out, ref_out) < 1e-2 and _min_grad_cos(grads, ref_grads) > 0.999


def _compiled_kernels():
    """vmc_fast.kernels.temporal_attention, compiled for the GPU (tests/conftest.py never sets TRITON_INTERPRET
    where CUDA is available)."""
    _library("triton")
    module = importlib.import_module("vmc_fast.kernels.temporal_attention")
    assert type(module._fwd_kernel).__name__ != "InterpretedFunction", "TRITON_INTERPRET is set in this process"
    return module


@cuda_only("the compiled Triton kernel")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_temporal_attention_matches_sdpa_past_65536_rows(dtype):
    """Show-1's temporal shape (F=8, D=5 is its smallest head) with 70,000 x 2 = 140,000 (n, h) rows: three launches
    of at most 65,535 rows, and past the grid limit at which fused kernels fail; forward and all three gradients
    against SDPA (chunked by vmc_fast.models.attention) in fp32."""
    from vmc_fast.models.attention import attention

    ta = _compiled_kernels()
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(70_000, 2, 8, 5, generator=gen).to(DEVICE, dtype).requires_grad_() for _ in range(3))
    grad_out = torch.randn(70_000, 2, 8, 5, generator=gen).to(DEVICE, dtype)
    assert q.shape[0] * q.shape[1] > ta.MAX_ROWS_PER_LAUNCH
    out = ta.temporal_attention(q, k, v)
    got = (out, *torch.autograd.grad(out, (q, k, v), grad_out))
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = attention(q32, k32, v32, backend="sdpa")
    want = (ref, *torch.autograd.grad(ref, (q32, k32, v32), grad_out.float()))
    # Error relative to each tensor's largest entry (elementwise rtol is meaningless for tiny gradient entries).
    # fp32: reassociation only. bf16: the kernel computes in fp32 from the same rounded inputs, so only the final
    # rounding to bf16 differs (2**-8 of the largest entry at most).
    limit = 1e-5 if dtype == torch.float32 else 2**-7
    errors = [((a.float() - b).abs().max() / b.abs().max()).item() for a, b in zip(got, want)]
    print(f"triton vs sdpa, {dtype}: max error / max |ref| for out, dq, dk, dv: {errors}")
    assert all(a.dtype == dtype for a in got)
    assert max(errors) < limit, errors


# ------------------------------------------------------------------------------------------ compile


def _compile_backend() -> str:
    return "inductor" if DEVICE.type == "cuda" else "aot_eager"  # inductor takes ~9 min per model on this CPU


def test_regional_compile_swaps_adapters_without_recompiling(tmp_path):
    from torch._dynamo.utils import counters

    from vmc_fast.tuning.adapters import apply_adapter, base_fingerprint, save_adapter
    from vmc_fast.tuning.compile import compile_unet
    from vmc_fast.tuning.surgery import (
        prepare_for_motion_tuning,
        temporal_qkv_parameters,
        trainable_state,
    )

    backbone = _backbone("tiny-random", torch.bfloat16)
    unet = backbone.unet
    prepare_for_motion_tuning(unet)
    inputs = _inputs(backbone, num_frames=8)
    torch._dynamo.reset()
    counters.clear()
    compile_unet(unet, "regional", backend=_compile_backend())
    first_out, _ = _forward_backward(unet.train(), inputs)
    with torch.compiler.set_stance("force_eager"):
        eager_out, _ = _forward_backward(unet, inputs)
    # bf16 autocast, fused vs unfused kernels: a few bf16 ulps of the output.
    assert _relative_error(first_out, eager_out) < 2e-2
    graphs = dict(counters["stats"])

    params = dict(temporal_qkv_parameters(unet))
    gen = torch.Generator().manual_seed(5)
    tuned = {n: (p.detach().float().cpu() + 0.05 * torch.randn(p.shape, generator=gen)) for n, p in params.items()}
    adapter = save_adapter(tmp_path / "a.safetensors", tuned, base_model="tiny-random",
                           fingerprint=base_fingerprint(unet, exclude=set(trainable_state(unet))), prompt="p",
                           steps=1, final_loss=0.0, loss="cos", num_frames=8, height=8, width=8)
    apply_adapter(unet, adapter)
    with torch._dynamo.config.patch(error_on_recompile=True):
        second_out, _ = _forward_backward(unet, inputs)
    assert dict(counters["stats"]) == graphs  # no new graph
    assert _relative_error(second_out, first_out) > 1e-3  # the swapped-in weights are used


def test_compile_with_int8_frozen_weights():
    _library("bitsandbytes")
    from vmc_fast.tuning.compile import compile_unet
    from vmc_fast.tuning.precision import apply_frozen_precision
    from vmc_fast.tuning.surgery import prepare_for_motion_tuning

    backbone = _backbone("tiny-random")
    unet = backbone.unet
    prepare_for_motion_tuning(unet)
    apply_frozen_precision(unet, "int8", torch.bfloat16 if DEVICE.type == "cuda" else torch.float32)
    inputs = _inputs(backbone, num_frames=8)
    torch._dynamo.reset()
    compile_unet(unet, "regional", backend=_compile_backend())
    out, grads = _forward_backward(unet.train(), inputs)
    with torch.compiler.set_stance("force_eager"):
        eager_out, eager_grads = _forward_backward(unet, inputs)
    assert torch.isfinite(out).all()
    assert _relative_error(out, eager_out) < 2e-2 and _min_grad_cos(grads, eager_grads) > 0.999


# ------------------------------------------------------------------------------------------ DeepSpeed ZeRO


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_on_one_rank(tmp_path, stage):
    """`train --gpus 1 --strategy zero`: one rank through DeepSpeed (NCCL on CUDA, gloo in a CPU rehearsal);
    two videos, so the engine is reset between them; whole adapters that moved from the base."""
    _library("deepspeed")
    from safetensors.torch import load_file

    videos = tmp_path / "videos"
    for name, step in (("a", 3), ("b", 2)):
        write_frame_folder(videos / name, moving_square_frames(step=step))
    out = tmp_path / "out"
    env = {**os.environ, "VMC_FAST_CACHE": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "vmc_fast.cli", "train", "--videos", str(videos), "--prompt", "a square",
               "--out", str(out), "--steps", "3", "--gpus", "1", "--strategy", "zero", "--zero-stage", str(stage),
               "--json"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    backend = "nccl" if DEVICE.type == "cuda" else "gloo"
    assert f"backend {backend}" in done.stderr + done.stdout
    entries = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(e["status"] for e in entries) == ["done", "done"]
    from vmc_fast.models import load_backbone

    base = dict(load_backbone("tiny-random").unet.named_parameters())
    a = load_file(out / "adapters" / "a.safetensors")
    assert a and all(a[k].shape == base[k].shape for k in a)  # whole tensors, not ZeRO-3 partitions
    assert not all(torch.equal(a[k], base[k].detach()) for k in a)


# ------------------------------------------------------------------------------------------ generate


@pytest.mark.parametrize("model_id", ["tiny-random", "show1-tiny-random"])
def test_generate_keyframes(tmp_path, model_id):
    """DDIM inversion of a clip and guided sampling on the device, with and without an adapter."""
    from vmc_fast.config import GenerateConfig
    from vmc_fast.inference.generate import generate
    from vmc_fast.tuning.adapters import base_fingerprint, save_adapter
    from vmc_fast.tuning.surgery import temporal_qkv_parameters

    video = write_frame_folder(tmp_path / "clip", moving_square_frames(num_frames=6))
    common = dict(model_id=model_id, prompt="a ball is moving", num_inference_steps=3, inversion_steps=3,
                  num_frames=4, device=DEVICE.type, cache_dir=str(tmp_path / "cache"), video=str(video),
                  keyframes_only=model_id.startswith("show1"))
    plain = generate(GenerateConfig(**common, output=str(tmp_path / "plain.gif")))
    assert plain.frames.shape[:2] == (3, 4) and torch.isfinite(plain.frames).all()
    assert (tmp_path / "plain.gif").is_file()

    backbone = _backbone(model_id)
    params = dict(temporal_qkv_parameters(backbone.unet))
    gen = torch.Generator().manual_seed(0)
    tensors = {n: p.detach().cpu() + 0.5 * torch.randn(p.shape, generator=gen) for n, p in params.items()}
    adapter = save_adapter(tmp_path / "m.safetensors", tensors, base_model=model_id, prompt="p", steps=1,
                           fingerprint=base_fingerprint(backbone.unet, exclude=set(params)), final_loss=0.0,
                           loss="cos", num_frames=4, height=plain.frames.shape[2], width=plain.frames.shape[3])
    tuned = generate(GenerateConfig(**common, adapter=str(adapter), output=None))
    assert (tuned.frames - plain.frames).pow(2).mean().sqrt() > 1e-3


# ------------------------------------------------------------------------------------------ bench


@pytest.mark.parametrize("preset", ["fast-eager", "fast-eager+int8"])
def test_bench_measures_a_preset(preset):
    """The bench's measuring path on the device before the long run: peak memory and a step time."""
    from vmc_fast.studies.bench import (
        PRESETS,
        BenchOptions,
        preset_requirements,
        run_one,
    )

    for module in preset_requirements(PRESETS[preset]):
        _library(module)
    record = run_one(PRESETS[preset], BenchOptions("show1-tiny-random", steps=2, warmup=1, device=DEVICE.type))
    assert record["step_seconds"] > 0 and record["trainable_parameters"] > 0
    if DEVICE.type == "cuda":
        assert 0 < record["peak_allocated_bytes"] <= record["peak_reserved_bytes"]
