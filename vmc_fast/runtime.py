"""Where and how a run computes, and where it ran: device choice, compute dtype, autocast, provenance.

Every command resolves ``auto`` the same way here: CUDA when available; bf16 compute on CUDA and fp32 on CPUs
(bf16 matrix products are slow on most CPUs).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch

COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""Precision names of the command line -> torch dtypes."""


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a CUDA device is a ValueError naming --device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device: {name} was asked for but this machine has no CUDA device")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``auto`` means bf16 on CUDA and fp32 elsewhere; other names are returned as they are."""
    if precision != "auto":
        return precision
    return "bf16" if torch.device(device).type == "cuda" else "fp32"


def compute_dtype(precision: str, device: torch.device | str) -> torch.dtype:
    """The torch dtype of `precision` (``auto`` resolved for `device`)."""
    return COMPUTE_DTYPES[resolve_precision(precision, device)]


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast on `device` when asked (``auto``: bf16 on CUDA); a no-op for fp32."""
    dtype = compute_dtype(precision, device)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


# ------------------------------------------------------------------------------------------------ provenance


def git_sha() -> str | None:
    """Short HEAD of the checkout this package runs from; VMC_FAST_GIT_SHA when set (a GPU machine receives
    files without .git); None outside a checkout."""
    if os.environ.get("VMC_FAST_GIT_SHA"):
        return os.environ["VMC_FAST_GIT_SHA"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def versions(names: tuple[str, ...] = ("vmc-fast", "torch", "diffusers", "transformers", "deepspeed",
                                       "bitsandbytes", "triton", "xformers", "peft")) -> dict[str, str | None]:
    """Installed versions of the libraries whose behaviour a record depends on (None: not installed)."""
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (else what platform knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description() -> str:
    """One line on where this ran: the GPU name, or the CPU model and torch's thread count."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), torch {torch.__version__}"
    return f"CPU {cpu_name()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}"


def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
