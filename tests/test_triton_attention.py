"""The Triton temporal attention kernel against its PyTorch reference, run on the CPU by Triton's interpreter.

tests/conftest.py switches the interpreter on for the whole process on machines without CUDA (Triton reads
TRITON_INTERPRET when a kernel module is imported); with CUDA this file skips and tests/test_gpu.py runs the
compiled kernel.
"""

import importlib
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from conftest import TRITON_INTERPRETED

pytest.importorskip("triton", reason="triton is not installed")
if not TRITON_INTERPRETED:
    pytest.skip("CUDA machine: the kernel is compiled there and tested by tests/test_gpu.py", allow_module_level=True)

REPO_ROOT = Path(__file__).resolve().parents[1]


def _load_by_path(name: str, init: Path):
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _import_kernels():
    """`vmc_fast.kernels`, also before `pip install -e .` has mapped it.

    pyproject maps the top-level `kernels/` folder to `vmc_fast.kernels` (package-dir), which only takes effect once
    the project is installed. Before that, load the folder from its path under its real name, so the tests never
    import it as a top-level `kernels` package (the name diffusers and transformers probe for).
    """
    try:
        return importlib.import_module("vmc_fast.kernels")
    except ModuleNotFoundError as error:
        if error.name not in ("vmc_fast", "vmc_fast.kernels"):
            raise
    if "vmc_fast" not in sys.modules:
        try:
            importlib.import_module("vmc_fast")
        except ModuleNotFoundError:
            _load_by_path("vmc_fast", REPO_ROOT / "vmc_fast" / "__init__.py")
    kernels = _load_by_path("vmc_fast.kernels", REPO_ROOT / "kernels" / "__init__.py")
    sys.modules["vmc_fast"].kernels = kernels
    return kernels


def _import_kernel_module():
    """The kernel module, interpreted: reloaded if an earlier import (before TRITON_INTERPRET) compiled it."""
    module = importlib.import_module("vmc_fast.kernels.temporal_attention")
    if type(module._fwd_kernel).__name__ != "InterpretedFunction":
        module = importlib.reload(module)
    return module


kernels = _import_kernels()
ta = _import_kernel_module()
reference = kernels.temporal_attention_reference


def _qkv(shape, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen).to(dtype).requires_grad_() for _ in range(3)]


def _grads(fn, q, k, v, grad_out, **kwargs):
    out = fn(q, k, v, **kwargs)
    return (out, *torch.autograd.grad(out, (q, k, v), grad_out))


@pytest.mark.parametrize(
    "shape",
    [(3, 2, 1, 5), (4, 3, 8, 5), (2, 2, 8, 20), (2, 2, 32, 20), (2, 2, 8, 64), (3, 2, 7, 10), (1, 1, 32, 128)],
)
def test_forward_matches_reference(shape):
    q, k, v = _qkv(shape)
    out = ta.temporal_attention(q, k, v)
    assert out.shape == shape and out.dtype == torch.float32
    torch.testing.assert_close(out, reference(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(3, 2, 1, 5), (4, 3, 8, 5), (2, 2, 32, 20), (2, 2, 8, 64), (3, 2, 7, 15)])
def test_backward_matches_reference(shape):
    q, k, v = _qkv(shape, seed=1)
    grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    got = _grads(ta.temporal_attention, q, k, v, grad_out)
    want = _grads(reference, q, k, v, grad_out)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_scale_and_strided_inputs():
    """diffusers' head split gives (N, F, H, D) transposed to (N, H, F, D): a view the kernel reads by strides."""
    base = [t.detach() for t in _qkv((3, 8, 2, 10), seed=3)]
    q, k, v = (t.transpose(1, 2).requires_grad_() for t in base)
    assert not q.is_contiguous()
    grad_out = torch.randn(3, 2, 8, 10, generator=torch.Generator().manual_seed(4))
    got = _grads(ta.temporal_attention, q, k, v, grad_out, scale=0.7)
    want = _grads(reference, q, k, v, grad_out, scale=0.7)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    shape = (4, 2, 8, 20)
    q, k, v = _qkv(shape, dtype=dtype, seed=5)
    grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(6)).to(dtype)
    try:
        got = _grads(ta.temporal_attention, q, k, v, grad_out)
    except NotImplementedError as error:  # pragma: no cover - depends on the interpreter's numpy dtypes
        pytest.skip(f"Triton's interpreter cannot run {dtype}: {error}")
    # fp32 math on the same rounded inputs: only the final cast to `dtype` differs.
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    want = _grads(reference, q32, k32, v32, grad_out.float())
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    for a, b in zip(got, want):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b, atol=tol, rtol=tol)


def test_chunking_gives_identical_results(monkeypatch):
    shape = (5, 3, 8, 5)
    q, k, v = _qkv(shape, seed=7)
    grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(8))
    whole = _grads(ta.temporal_attention, q, k, v, grad_out)
    launches = []
    real_chunks = ta._batch_chunks
    monkeypatch.setattr(ta, "_batch_chunks", lambda n, h: launches.append(n) or list(real_chunks(n, h)))
    for limit in (7, 1):  # 2 batch entries (6 rows) per launch, then H > limit: one batch entry per launch
        monkeypatch.setattr(ta, "MAX_ROWS_PER_LAUNCH", limit)
        chunks = list(real_chunks(shape[0], shape[1]))
        assert len(chunks) == (3 if limit == 7 else 5)
        chunked = _grads(ta.temporal_attention, q, k, v, grad_out)
        for a, b in zip(chunked, whole):
            assert torch.equal(a, b)
    assert launches == [5, 5, 5, 5]  # forward and backward both go through the chunker


def test_empty_batch_and_public_export():
    q, k, v = _qkv((0, 2, 8, 5))
    out = kernels.temporal_attention(q, k, v)
    assert out.shape == (0, 2, 8, 5)
    out.sum().backward()
    assert q.grad.shape == q.shape


@pytest.mark.parametrize(
    "shapes, match",
    [
        (((2, 2, 33, 5),) * 3, "F \\(frames"),
        (((2, 2, 8, 129),) * 3, "D \\(head size"),
        (((2, 2, 8, 5), (2, 2, 8, 5), (2, 2, 4, 5)), "shapes must match"),
        (((2, 8, 5),) * 3, "4-D"),
    ],
)
def test_invalid_inputs_raise_value_error(shapes, match):
    q, k, v = (torch.zeros(s) for s in shapes)
    with pytest.raises(ValueError, match=match):
        ta.temporal_attention(q, k, v)


def test_invalid_dtypes_raise_value_error():
    q = torch.zeros(2, 2, 8, 5)
    with pytest.raises(ValueError, match="dtypes must match"):
        ta.temporal_attention(q, q, q.half())
    with pytest.raises(ValueError, match="dtype torch.int64"):
        ta.temporal_attention(*(torch.zeros(2, 2, 8, 5, dtype=torch.long),) * 3)


def test_without_triton_the_package_imports_and_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    name = "_vmc_kernels_without_triton"
    for key in [name, f"{name}.reference", f"{name}.temporal_attention"]:
        monkeypatch.delitem(sys.modules, key, raising=False)
    package = _load_by_path(name, REPO_ROOT / "kernels" / "__init__.py")
    try:
        assert package.TRITON_AVAILABLE is False
        with pytest.raises(RuntimeError, match="triton is not installed.*--attention sdpa"):
            package.temporal_attention(*_qkv((1, 1, 2, 4)))
        assert package.temporal_attention_reference is not None
    finally:
        for key in [name, f"{name}.reference"]:
            sys.modules.pop(key, None)
