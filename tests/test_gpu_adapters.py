"""An adapter tuned on a GPU (bf16 or fp16 frozen weights on CUDA) loads into the same base on a CPU (fp32), and
back: the base reference does not depend on the device or the storage dtype (issue 12 E1). Marked `gpu`."""

from __future__ import annotations

import pytest
import torch

from vmc_fast.models import load_backbone
from vmc_fast.models.registry import LoadOptions
from vmc_fast.tuning.adapters import apply_adapter, base_fingerprint, base_reference, save_adapter
from vmc_fast.tuning.surgery import temporal_qkv_parameters

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("gpu_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("model_id", ["tiny-random", "show1-tiny-random"])
def test_adapters_move_between_gpu_and_cpu_copies_of_a_base(tmp_path, model_id, gpu_dtype):
    gpu = load_backbone(model_id, LoadOptions(dtype=gpu_dtype, device="cuda")).unet
    cpu = load_backbone(model_id).unet
    for source, target in ((gpu, cpu), (cpu, gpu)):
        tensors = {n: p.detach().float().cpu() + 0.01 for n, p in temporal_qkv_parameters(source)}
        tuned = set(tensors)
        path = save_adapter(tmp_path / "a.safetensors", tensors, base_model=model_id, prompt="p", steps=1,
                            fingerprint=base_fingerprint(source, tuned), base=base_reference(source, tuned),
                            final_loss=0.0, loss="cos", num_frames=8, height=32, width=32)
        apply_adapter(target, path)
        params = dict(target.named_parameters())
        assert all(torch.equal(params[n].cpu(), v.to(params[n].dtype)) for n, v in tensors.items())
