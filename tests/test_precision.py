"""--frozen-dtype: frozen weights in fp32 / bf16 / int8 (bitsandbytes Linear8bitLt + 8-bit convs) against fp32.

Measured on this CPU (2 cores, torch 2.13, bitsandbytes 0.50), inputs as in `_inputs`, fp32 model as reference;
"out" = ||out - ref|| / ||ref||, "grad cos" = the lowest cosine over the temporal Q/K/V weight gradients:

    model               variant                          out     grad cos
    tiny-random         bf16 (autocast)                  0.015   0.9990
    tiny-random         int8, train mode (weight-only)   0.014   0.9991
    tiny-random         int8, eval mode (int8 acts)      0.020   0.9985
    show1-tiny-random   bf16 (autocast)                  0.021   0.9990
    show1-tiny-random   int8, train mode                 0.036   0.9964
    show1-tiny-random   int8, eval mode                  0.046   0.9944

(conv_format="fp8" instead of the default int8 convs, 8 frames: out 0.08 / 0.11, grad cos 0.978 / 0.982.)
Tolerances below: about 1.5x the measured output error, grad cos > 0.99 (1 - cos at most 0.0056 measured).
Frozen bytes vs fp32: bf16 exactly 2x; int8 3.74x (tiny-random), 3.75x (show1-tiny-random), 3.99x (Show-1 base,
counted on the meta device) — norms and biases stay in the compute dtype and weigh more in tiny models.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vmc_fast.models import load_backbone
from vmc_fast.models.registry import LoadOptions
from vmc_fast.tuning.precision import (
    QuantizedConv,
    apply_frozen_precision,
    dequantize_per_channel,
    frozen_bytes_by_kind,
    frozen_weight_bytes,
)
from vmc_fast.tuning.surgery import prepare_for_motion_tuning

# bitsandbytes logs one warning per int8 matmul about casting activations to fp16 for quantization.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

MODELS = ("tiny-random", "show1-tiny-random")
OUT_TOL = {"bf16": 0.03, "int8": 0.07}
"""Relative output error allowed vs fp32 (measured at most 0.021 for bf16, 0.046 for int8)."""
GRAD_COS_MIN = 0.99
"""Lowest cosine allowed between a Q/K/V gradient and its fp32 reference (measured at least 0.9944)."""
INT8_RATIO_MIN = 3.7
"""Frozen fp32 bytes / int8 bytes on the tiny models (measured 3.74 and 3.75)."""


@pytest.fixture(scope="module", params=MODELS)
def reference(request):
    """(backbone, fp32 model after surgery, inputs, fp32 output, fp32 Q/K/V gradients)."""
    backbone = load_backbone(request.param)
    prepare_for_motion_tuning(backbone.unet)
    inputs = _inputs(backbone)
    out, grads = _forward_backward(backbone.unet.train(), inputs)
    return backbone, backbone.unet, inputs, out, grads


def _inputs(backbone) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """sample (1, C, 4, h, w), timestep (1,), text (1, L, D): seeded, small enough for a 2-core CPU."""
    gen = torch.Generator().manual_seed(1)
    config = backbone.unet.config
    if backbone.family == "show1":
        size, text_shape = (backbone.height, backbone.width), (1, 16, config.encoder_hid_dim)
    else:
        size, text_shape = (8, 8), (1, 12, config.cross_attention_dim)
    sample = torch.randn(1, backbone.in_channels, 4, *size, generator=gen)
    return sample, torch.tensor([500]), torch.randn(*text_shape, generator=gen)


def _forward_backward(unet: nn.Module, inputs, autocast: bool = False):
    """fp32 output (B, C, F, H, W) and {name: grad} of the trainable parameters after a mean-square backward."""
    unet.zero_grad(set_to_none=True)
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        out = unet(*inputs)
    out = (out.sample if hasattr(out, "sample") else out[0]).float()
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad}


def _variant(reference, frozen_dtype: str, train: bool = True):
    """A copy of the fp32 reference model with `frozen_dtype` applied; (model, report, trainable before)."""
    _, fp32_unet, *_ = reference
    unet = copy.deepcopy(fp32_unet).train(train)
    before = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    report = apply_frozen_precision(unet, frozen_dtype, torch.float32 if frozen_dtype == "int8" else None)
    return unet, report, before


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


def _min_grad_cos(grads: dict, ref: dict) -> float:
    return min(F.cosine_similarity(grads[n].flatten(), ref[n].flatten(), dim=0).item() for n in ref)


@pytest.mark.parametrize("frozen_dtype,train", [("bf16", True), ("int8", True), ("int8", False)],
                         ids=["bf16", "int8-train", "int8-eval"])
def test_outputs_and_qkv_grads_match_fp32(reference, frozen_dtype, train):
    # eval mode matters for int8: bitsandbytes on CPU dequantizes the weight in training mode, but quantizes the
    # activations too in eval mode (the int8 x int8 path it always takes on CUDA).
    _, _, inputs, ref_out, ref_grads = reference
    unet, _, _ = _variant(reference, frozen_dtype, train)
    out, grads = _forward_backward(unet, inputs, autocast=frozen_dtype == "bf16")
    assert _relative_error(out, ref_out) < OUT_TOL[frozen_dtype]
    assert grads.keys() == ref_grads.keys()
    assert _min_grad_cos(grads, ref_grads) > GRAD_COS_MIN


@pytest.mark.parametrize("frozen_dtype", ["fp32", "bf16", "int8"])
def test_trainable_parameters_untouched(reference, frozen_dtype):
    _, fp32_unet, *_ = reference
    unet, _, before = _variant(reference, frozen_dtype)
    after = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    assert after.keys() == before.keys()
    reference_values = dict(fp32_unet.named_parameters())
    for name, param in after.items():
        assert param is before[name]  # the same Parameter object: never replaced or wrapped
        assert param.dtype == torch.float32
        assert torch.equal(param, reference_values[name])


def test_frozen_bytes_shrink(reference):
    _, fp32_unet, *_ = reference
    fp32_bytes = frozen_weight_bytes(fp32_unet)
    reports = {dtype: _variant(reference, dtype)[1] for dtype in ("fp32", "bf16", "int8")}
    assert all(r.bytes_before == fp32_bytes for r in reports.values())
    assert reports["fp32"].bytes_after == fp32_bytes
    assert reports["bf16"].bytes_after * 2 == fp32_bytes
    int8 = reports["int8"]
    assert int8.ratio > INT8_RATIO_MIN
    assert int8.num_linear_replaced > 0 and int8.num_conv_replaced > 0
    assert int8.bytes_after == int8.linear_bytes + int8.conv_bytes + int8.other_bytes
    assert str(int8).startswith("frozen weights int8:") and "\n" not in str(int8)


def test_int8_layout(reference):
    unet, report, _ = _variant(reference, "int8")
    linears = [m for m in unet.modules() if type(m) is nn.Linear]
    assert linears and all(m.weight.requires_grad for m in linears)  # only the trainable Q/K/V stay plain
    assert not any(type(m) in (nn.Conv2d, nn.Conv3d) for m in unet.modules())
    assert unet.dtype == torch.float32  # models take their compute dtype from their first weights
    scales = [getattr(m._parameters.get("weight"), "SCB", None) for m in unet.modules()]
    scales = [s for s in scales if s is not None]
    assert len(scales) == report.num_linear_replaced  # row scales are counted until the first forward moves them


def test_int8_training_step_changes_only_qkv(reference):
    _, _, inputs, *_ = reference
    unet, report, _ = _variant(reference, "int8")
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    trainable = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    _forward_backward(unet, inputs)
    optimizer.step()
    after = unet.state_dict()
    assert after.keys() == before.keys()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == {n for n, p in unet.named_parameters() if p.requires_grad}
    # The first forward moved each bitsandbytes row scale from the weight into the layer's state: still counted.
    assert frozen_weight_bytes(unet) == report.bytes_after


def test_unknown_frozen_dtype_names_the_option():
    with pytest.raises(ValueError, match="--frozen-dtype"):
        apply_frozen_precision(nn.Linear(2, 2), "fp8", torch.float32)


def test_ignored_compute_dtype_warns():
    with pytest.warns(UserWarning, match="compute_dtype"):
        apply_frozen_precision(nn.Linear(2, 2), "bf16", torch.float32)


def test_applying_twice_is_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.Conv1d(4, 4, 1))
    apply_frozen_precision(model.requires_grad_(False), "int8")
    with pytest.raises(ValueError, match="already holds 8-bit layers"):
        apply_frozen_precision(model, "bf16")


@pytest.mark.parametrize("conv_format", ["int8", "fp8"])
@pytest.mark.parametrize("make", [
    lambda: nn.Conv1d(6, 8, 3, padding=1),
    lambda: nn.Conv2d(6, 8, 3, stride=2, padding=1, groups=2),
    lambda: nn.Conv3d(6, 8, (3, 1, 1), padding=(1, 0, 0), dilation=(2, 1, 1), bias=False),
], ids=["conv1d", "conv2d-groups-stride", "conv3d-dilation"])
def test_quantized_conv_matches_conv_with_dequantized_weight(make, conv_format):
    torch.manual_seed(0)
    conv = make().requires_grad_(False)
    quantized = QuantizedConv(conv, torch.float32, conv_format)
    x = torch.randn(2, 6, *([6] * (conv.weight.dim() - 2)), requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = quantized(x)
    # Only the 8-bit weight and its fp32 (C_out,) scale are kept for backward: no fp copy of the weight.
    assert {t.dtype for t in saved} == {quantized.qweight.dtype, torch.float32}
    assert all(t.dtype != torch.float32 or t.shape == (conv.out_channels,) for t in saved)
    weight = dequantize_per_channel(quantized.qweight, quantized.weight_scale, torch.float32)
    x_ref = x.detach().clone().requires_grad_(True)
    ref = quantized.conv(x_ref, weight, conv.bias)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, x_ref.grad)
    # Weight error of the 8-bit storage itself (Gaussian-like weights): int8 ~0.8%, fp8 e4m3 ~2.6%.
    assert _relative_error(weight, conv.weight) < {"int8": 0.015, "fp8": 0.04}[conv_format]


def test_show1_base_frozen_bytes_on_meta():
    # Full Show-1 base (1.73 B parameters) built on the meta device: shapes only, no weights in memory.
    counts = {}
    for frozen_dtype in ("bf16", "int8"):
        unet = load_backbone("show1-base-arch", LoadOptions(device="meta")).unet
        prepare_for_motion_tuning(unet)
        counts[frozen_dtype] = apply_frozen_precision(unet, frozen_dtype, torch.bfloat16)
    bf16, int8 = counts["bf16"], counts["int8"]
    assert bf16.bytes_after == 3_184_589_580  # 1,592,294,790 frozen parameters x 2 bytes
    assert int8.bytes_after == 1_596_221_668  # measured: 3.99x less than fp32, 1.995x less than bf16
    assert frozen_bytes_by_kind(unet) == {"linear": int8.linear_bytes, "conv": int8.conv_bytes,
                                          "other": int8.other_bytes}
