"""Regional torch.compile of the keyframe UNet: same names, same outputs, and swapping adapters never recompiles.

Inductor's C++ code generation is very slow on this 2-core CPU (about 9 minutes cold for tiny-random), so the test
compiles with the ``aot_eager`` backend by default: Dynamo tracing, guards, graph breaks and AOTAutograd's forward
and backward graphs are all real -- only the kernel code generation is skipped, and that does not decide when a
graph is recompiled. Set VMC_FAST_COMPILE_TEST_BACKEND=inductor to run it with inductor.
"""

import os

import pytest
import torch
from torch._dynamo.utils import counters

from vmc_fast.models import load_backbone
from vmc_fast.tuning.adapters import apply_adapter, base_fingerprint, save_adapter
from vmc_fast.tuning.compile import compile_regions, compile_unet, is_compiled
from vmc_fast.tuning.surgery import (
    prepare_for_motion_tuning,
    temporal_qkv_parameters,
    trainable_state,
)

BACKEND = os.environ.get("VMC_FAST_COMPILE_TEST_BACKEND", "aot_eager")


def _step(unet, inputs):
    """Output and Q/K/V weight gradients of one forward + backward."""
    unet.zero_grad(set_to_none=True)
    out = unet(*inputs).sample
    out.square().mean().backward()
    return out.detach(), [p.grad.clone() for _, p in temporal_qkv_parameters(unet)]


def _compiled_and_eager(unet, inputs):
    compiled = _step(unet, inputs)
    with torch.compiler.set_stance("force_eager"):  # same module and weights, no compiled code
        eager = _step(unet, inputs)
    return compiled, eager


def _assert_close(got, want):
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def _compile_stats():
    return (dict(counters["stats"]), sum(counters["graph_break"].values()), dict(counters["aot_autograd"]))


@pytest.mark.slow
def test_regional_compile_is_reused_across_adapters(tmp_path):
    unet = load_backbone("tiny-random").unet
    prepare_for_motion_tuning(unet)
    unet.train()
    names = [name for name, _ in unet.named_parameters()]
    gen = torch.Generator().manual_seed(0)
    inputs = (torch.randn(1, 4, 8, 16, 16, generator=gen), torch.tensor([500]), torch.randn(1, 5, 32, generator=gen))

    torch._dynamo.reset()
    counters.clear()
    assert compile_unet(unet, "regional", backend=BACKEND) is unet and is_compiled(unet) == "regional"
    assert [name for name, _ in unet.named_parameters()] == names  # no _orig_mod. prefix: adapters keep names
    compiled, eager = _compiled_and_eager(unet, inputs)
    _assert_close(compiled, eager)
    first = _compile_stats()
    assert first[0]["unique_graphs"] == len(compile_regions(unet)) and first[1] == 0  # one graph per block

    # Next video: in-place copies into the trainable tensors, as reset_trainable and apply_adapter do.
    params = [p for _, p in temporal_qkv_parameters(unet)]
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    adapter = save_adapter(tmp_path / "a.safetensors", trainable_state(unet), base_model="tiny-random",
                           fingerprint=base_fingerprint(unet, exclude=set(trainable_state(unet))), prompt="p",
                           steps=1, final_loss=0.0, loss="cos", num_frames=8, height=16, width=16)
    with torch.no_grad():
        for p in params:
            p.zero_()
    apply_adapter(unet, adapter)
    assert compile_unet(unet, "regional", backend=BACKEND) is unet  # compile once: a second call is a no-op
    with torch._dynamo.config.patch(error_on_recompile=True):
        again, eager_again = _compiled_and_eager(unet, inputs)
    assert _compile_stats() == first  # no new graph, graph break or AOT compilation
    _assert_close(again, eager_again)
    assert not torch.equal(again[0], compiled[0])  # the new weights are used


def test_compile_off_and_unknown_mode():
    unet = torch.nn.Linear(2, 2)
    assert compile_unet(unet, "off") is unet and is_compiled(unet) is None
    with pytest.raises(ValueError, match="--compile 'fast'"):
        compile_unet(unet, "fast")
    with pytest.raises(ValueError, match="--compile full"):
        compile_unet(unet, "regional")
