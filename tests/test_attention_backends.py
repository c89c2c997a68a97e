"""Temporal attention backends (sdpa, xformers, triton) against the fp32 SDPA reference, on both tiny backbones.

The triton backend runs on the CPU through Triton's interpreter, which tests/conftest.py switches on for the whole
process on machines without CUDA (with CUDA, tests/test_gpu.py runs the compiled kernel instead).
"""

import importlib
import sys

import pytest
import torch

from conftest import TRITON_INTERPRETED
from vmc_fast.errors import VmcError
from vmc_fast.models import attention as attn_mod
from vmc_fast.models import load_backbone
from vmc_fast.models.attention import (
    TemporalAttnProcessor,
    attention,
    set_temporal_attention_backend,
)
from vmc_fast.tuning.surgery import prepare_for_motion_tuning, temporal_qkv_parameters

HAS_TRITON = importlib.util.find_spec("triton") is not None and TRITON_INTERPRETED
HAS_XFORMERS = importlib.util.find_spec("xformers") is not None

TOLERANCE = {"sdpa": 1e-6, "math": 1e-5, "triton": 1e-5, "xformers": 1e-3}
"""Largest allowed max|got - ref| / max|ref| per tensor against the fp32 SDPA reference (output, each Q/K/V grad).

Relative to the tensor's largest entry: fp32 reassociation errors scale with the values summed, and tiny gradient
entries make elementwise rtol meaningless."""


def _interpreted_kernel_module():
    """vmc_fast.kernels.temporal_attention, reloaded if it was imported (compiled) before TRITON_INTERPRET."""
    module = importlib.import_module("vmc_fast.kernels.temporal_attention")
    if type(module._fwd_kernel).__name__ != "InterpretedFunction":
        module = importlib.reload(module)
    return module


def _available_backends():
    backends = ["sdpa", "math"]
    if HAS_TRITON:
        backends.append("triton")
    if HAS_XFORMERS and torch.cuda.is_available():
        backends.append("xformers")
    return backends


# ------------------------------------------------------------------------------------------ model fixtures


def _tiny_random():
    """tiny-random (diffusers UNet3D): latents (1, 4, 8, 8, 8), CLIP-width text states (1, 5, 32)."""
    unet = load_backbone("tiny-random").unet
    gen = torch.Generator().manual_seed(0)
    inputs = (torch.randn(1, 4, 8, 8, 8, generator=gen), torch.tensor([500]), torch.randn(1, 5, 32, generator=gen))
    return unet, inputs


def _show1_tiny_random():
    """show1-tiny-random (our Show-1 UNet): pixels (1, 3, 8, 8, 8), T5-width text states (1, 5, 32)."""
    unet = load_backbone("show1-tiny-random").unet
    gen = torch.Generator().manual_seed(0)
    inputs = (torch.randn(1, 3, 8, 8, 8, generator=gen), torch.tensor([500]), torch.randn(1, 5, 32, generator=gen))
    return unet, inputs


MODELS = {"tiny-random": _tiny_random, "show1-tiny-random": _show1_tiny_random}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
    """(name, unet after surgery, inputs, fp32 SDPA reference: output and Q/K/V grads)."""
    unet, inputs = MODELS[request.param]()
    prepare_for_motion_tuning(unet)
    reference = _output_and_qkv_grads(unet, inputs)
    return request.param, unet, inputs, reference


def _output_and_qkv_grads(unet, inputs):
    """Model output (detached) and the gradient of a fixed random projection of it w.r.t. every Q/K/V weight."""
    unet.zero_grad(set_to_none=True)
    out = unet(*inputs)
    out = out.sample if hasattr(out, "sample") else out
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * weights).sum().backward()
    return out.detach(), {name: p.grad.clone() for name, p in temporal_qkv_parameters(unet)}


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


# ----------------------------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("backend", [pytest.param(b, marks=pytest.mark.slow) if b == "triton" else b
                                     for b in _available_backends()])
def test_backend_matches_sdpa_reference_on_model(model, backend):
    name, unet, inputs, reference = model
    if backend == "triton":
        _interpreted_kernel_module()
    num_switched = set_temporal_attention_backend(unet, backend)
    try:
        assert num_switched == 8  # 4 temporal transformers, attn1 + attn2 each, in both tiny models
        got = _output_and_qkv_grads(unet, inputs)
    finally:
        set_temporal_attention_backend(unet, "sdpa")
    assert got[1].keys() == reference[1].keys() and len(got[1]) == 24
    out_err = _relative_error(got[0], reference[0])
    grad_errs = {key: _relative_error(got[1][key], reference[1][key]) for key in reference[1]}
    worst = max(grad_errs, key=grad_errs.get)
    print(f"\n{name} {backend}: output {out_err:.1e}, worst Q/K/V grad {grad_errs[worst]:.1e} ({worst})")
    assert out_err <= TOLERANCE[backend]
    assert grad_errs[worst] <= TOLERANCE[backend], worst


def test_diffusers_processor_equals_default_processor():
    """With sdpa, our processor reproduces diffusers' own AttnProcessor2_0 (so the head split is the same)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet, inputs = _tiny_random()
    with torch.no_grad():
        default = unet(*inputs).sample
        assert set_temporal_attention_backend(unet, "sdpa") == 8
        ours = unet(*inputs).sample
    torch.testing.assert_close(ours, default, atol=1e-6, rtol=1e-6)
    processors = {name: type(m.processor) for name, m in unet.named_modules() if hasattr(m, "set_processor")}
    for name, kind in processors.items():
        temporal = ".temp_attentions." in name
        assert kind is (TemporalAttnProcessor if temporal else AttnProcessor2_0), name  # spatial + transformer_in


def test_processor_head_split_on_one_layer():
    """A lone diffusers Attention with several heads: ours (math backend) vs AttnProcessor2_0."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(0)
    layer = Attention(query_dim=24, heads=3, dim_head=8, bias=False).eval()
    x = torch.randn(5, 7, 24)
    with torch.no_grad():
        layer.set_processor(AttnProcessor2_0())
        want = layer(x)
        layer.set_processor(TemporalAttnProcessor("math"))
        got = layer(x)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_show1_backend_attribute_is_set():
    from vmc_fast.models.show1 import TemporalSelfAttention

    unet, _ = _show1_tiny_random()
    assert set_temporal_attention_backend(unet, "math") == 8
    layers = [m for m in unet.modules() if isinstance(m, TemporalSelfAttention)]
    assert len(layers) == 8 and all(m.backend == "math" for m in layers)


def test_chunked_fused_attention_is_identical(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(10, 3, 8, 5, generator=gen, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(10, 3, 8, 5, generator=gen)

    def run():
        out = attention(q, k, v, backend="sdpa")
        return (out, *torch.autograd.grad(out, (q, k, v), grad_out))

    whole = run()
    calls = []
    real_sdpa = attn_mod._sdpa
    monkeypatch.setattr(attn_mod, "_sdpa", lambda *a: calls.append(a[0].shape[0] * a[0].shape[1]) or real_sdpa(*a))
    for limit, want_calls in ((7, [6, 6, 6, 6, 6]), (2, [3] * 10), (30, [30])):  # 2 / 1 (H > limit) / all rows
        monkeypatch.setattr(attn_mod, "MAX_FUSED_BATCH", limit)
        calls.clear()
        chunked = run()
        assert calls == want_calls
        for a, b in zip(chunked, whole):
            assert torch.equal(a, b)


def test_chunked_model_output_is_identical(monkeypatch):
    unet, inputs = _tiny_random()
    set_temporal_attention_backend(unet, "sdpa")
    with torch.no_grad():
        whole = unet(*inputs).sample
        monkeypatch.setattr(attn_mod, "MAX_FUSED_BATCH", 40)  # temporal layers: 64 or 16 pixels x 4 or 8 heads
        chunked = unet(*inputs).sample
    assert torch.equal(chunked, whole)


def test_unknown_backend_names_the_option():
    unet, _ = _show1_tiny_random()
    with pytest.raises(ValueError, match="--attention 'flash9'.*sdpa, xformers, triton"):
        set_temporal_attention_backend(unet, "flash9")


def test_xformers_missing_gives_the_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "xformers", None)  # `import xformers.ops` raises ImportError
    monkeypatch.setitem(sys.modules, "xformers.ops", None)
    monkeypatch.setattr(attn_mod, "_xformers_ops", None)
    unet, _ = _tiny_random()
    with pytest.raises(VmcError, match=r"--attention xformers needs xformers.*pip install xformers.*--attention sdpa"):
        set_temporal_attention_backend(unet, "xformers")
    assert all(type(m.processor).__name__ == "AttnProcessor2_0" for m in unet.modules() if hasattr(m, "processor"))


def test_xformers_on_cpu_names_the_fix():
    q = torch.zeros(2, 2, 8, 5)
    with pytest.raises(VmcError, match="CUDA only.*--attention sdpa"):
        attention(q, q, q, backend="xformers")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_XFORMERS, reason="xformers is not installed")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="xformers needs CUDA")
def test_xformers_matches_sdpa_on_cuda(monkeypatch):
    from test_gpu import usable_xformers

    usable_xformers()
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(50, 4, 8, 40, generator=gen).cuda().requires_grad_() for _ in range(3))
    grad_out = torch.randn(50, 4, 8, 40, generator=gen).cuda()
    results = {}
    for backend in ("sdpa", "xformers"):
        out = attention(q, k, v, backend=backend)
        results[backend] = (out, *torch.autograd.grad(out, (q, k, v), grad_out))
    for a, b in zip(results["xformers"], results["sdpa"]):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3)
    monkeypatch.setattr(attn_mod, "MAX_FUSED_BATCH", 9)
    out = attention(q, k, v, backend="xformers")
    assert torch.equal(out, results["xformers"][0])
