"""Triton kernels of vmc-fast with their plain PyTorch references.

Installed as `vmc_fast.kernels` (setuptools package-dir maps it to the top-level `kernels/` folder); it must never
stand in for a top-level `kernels` package, which is the name of a Hugging Face package that transformers requires
and that diffusers and transformers import from. Where the folder is reached under that name anyway (a process
started in the repository root has the root on sys.path), it hands the name over to Hugging Face's package.

Importing this package never needs triton: without it `TRITON_AVAILABLE` is False and `temporal_attention` raises
a RuntimeError that names the way out.
"""

from __future__ import annotations

if __name__ == "kernels":
    # Reached as a top-level `kernels`: a checkout root is on sys.path (`python -m ...` or `python -c` run from the
    # repository root puts it first). That name belongs to Hugging Face's package, which transformers requires and
    # imports from, so hand the name over to it instead of shadowing it.
    import importlib
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _saved_path = list(sys.path)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    del sys.modules["kernels"]
    try:
        sys.modules["kernels"] = importlib.import_module("kernels")  # the import system returns this module
    except ImportError:
        raise ImportError("`import kernels` reached vmc-fast's kernels/ folder because the repository root is on "
                          "sys.path, and Hugging Face's `kernels` package is not installed; vmc-fast's kernels "
                          "are `vmc_fast.kernels`") from None
    finally:
        sys.path[:] = _saved_path
else:
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
