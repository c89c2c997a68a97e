"""Triton kernels of vmc-fast with their plain PyTorch references.

Installed as `vmc_fast.kernels` (setuptools package-dir maps it to the top-level `kernels/` folder); it must never
be importable as a top-level `kernels` package, which is the name of a Hugging Face package that diffusers and
transformers probe for.

Importing this package never needs triton: without it `TRITON_AVAILABLE` is False and `temporal_attention` raises
a RuntimeError that names the way out.
"""

from __future__ import annotations

from .reference import temporal_attention_reference

try:
    import triton  # noqa: F401
except ImportError:
    TRITON_AVAILABLE = False
else:
    TRITON_AVAILABLE = True

if TRITON_AVAILABLE:
    from .temporal_attention import MAX_FRAMES, MAX_HEAD_DIM, temporal_attention
else:
    MAX_FRAMES = 32
    MAX_HEAD_DIM = 128

    def temporal_attention(q, k, v, scale=None):
        """Stand-in used when triton is missing: always raises."""
        raise RuntimeError(
            "temporal_attention: triton is not installed, so the Triton attention backend is unavailable. "
            "Install it (`pip install triton`) or select another backend with `--attention sdpa`."
        )


__all__ = [
    "MAX_FRAMES",
    "MAX_HEAD_DIM",
    "TRITON_AVAILABLE",
    "temporal_attention",
    "temporal_attention_reference",
]
