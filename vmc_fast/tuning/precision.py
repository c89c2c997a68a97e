"""Storage precision of the FROZEN weights (``--frozen-dtype fp32|bf16|int8``).

Called after surgery, so ``requires_grad`` tells the trainable temporal Q/K/V (fp32 master weights, never touched,
never wrapped: adapters rely on their names) from everything else.

- ``fp32`` / ``bf16``: frozen parameters and floating buffers are cast in place; no copy is kept.
- ``int8``: every frozen ``nn.Linear`` becomes a bitsandbytes ``Linear8bitLt`` (int8 rows + one fp32 scale per
  row), every frozen Conv1d/2d/3d becomes a `QuantizedConv` (8-bit weight + one fp32 scale per output channel,
  dequantized to the compute dtype inside forward and again inside backward), and the remaining frozen tensors
  (norms, biases, embeddings) are cast to the compute dtype. Convolutions need their own path: they hold about
  1.0 B of Show-1's 1.73 B parameters and bitsandbytes covers only Linear layers.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from vmc_fast.config import STORAGE_DTYPES
from vmc_fast.runtime import COMPUTE_DTYPES

FROZEN_DTYPES = STORAGE_DTYPES
"""Values of ``--frozen-dtype`` besides ``auto``."""
CONV_FORMATS = ("int8", "fp8")
"""8-bit storage of frozen conv weights: ``int8`` (absmax/127 per output channel) or ``fp8`` (float8_e4m3fn,
absmax/448 per output channel)."""
LINEAR8BIT_THRESHOLD = 0.0
"""bitsandbytes outlier threshold; 0.0 = no mixed-precision decomposition, every activation column quantized:
the fastest int8 path on CUDA. In eval mode on CPU (which quantizes activations like CUDA does) 6.0 left the output
error of the tiny models unchanged (0.0200 vs 0.0200, 0.0414 vs 0.0416 relative to fp32) and ran slower; in
training mode on CPU bitsandbytes dequantizes the weight and runs a float matmul, where the threshold does
nothing. Worth re-measuring on real Show-1 weights on a GPU, where activation outliers may be larger."""

_CAST_DTYPES = {name: COMPUTE_DTYPES[name] for name in ("fp32", "bf16")}
_CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_INPUT_GRADS = {1: torch.nn.grad.conv1d_input, 2: torch.nn.grad.conv2d_input, 3: torch.nn.grad.conv3d_input}
_QMAX = {"int8": 127.0, "fp8": 448.0}
_STORAGE = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}


@dataclass(frozen=True)
class PrecisionReport:
    """What `apply_frozen_precision` did; bytes are the frozen weights as stored (parameters + buffers)."""

    frozen_dtype: str
    """The ``--frozen-dtype`` value applied."""
    bytes_before: int
    """Frozen bytes before."""
    bytes_after: int
    """Frozen bytes after (= linear_bytes + conv_bytes + other_bytes)."""
    linear_bytes: int
    """Frozen bytes in Linear layers after (int8 weights + fp32 row scales + biases for ``int8``)."""
    conv_bytes: int
    """Frozen bytes in convolutions after (8-bit weights + fp32 channel scales + biases for ``int8``)."""
    other_bytes: int
    """All other frozen bytes after (norms, embeddings, layers left unconverted)."""
    num_linear_replaced: int = 0
    """Frozen nn.Linear replaced by bitsandbytes Linear8bitLt."""
    num_conv_replaced: int = 0
    """Frozen Conv1d/2d/3d replaced by QuantizedConv."""
    conv_format: str = ""
    """Storage of quantized conv weights (``int8``/``fp8``); empty when none were quantized."""

    @property
    def ratio(self) -> float:
        """bytes_before / bytes_after."""
        return self.bytes_before / max(self.bytes_after, 1)

    def __str__(self) -> str:
        conv = f"conv {self.conv_format or 'unquantized'}"
        return (f"frozen weights {self.frozen_dtype}: {_gb(self.bytes_before)} -> {_gb(self.bytes_after)} "
                f"({self.ratio:.2f}x smaller); linear {_gb(self.linear_bytes)} ({self.num_linear_replaced} int8), "
                f"{conv} {_gb(self.conv_bytes)} ({self.num_conv_replaced} 8-bit), other {_gb(self.other_bytes)}")


def apply_frozen_precision(unet: nn.Module, frozen_dtype: str, compute_dtype: torch.dtype | None = None,
                           conv_format: str = "int8") -> PrecisionReport:
    """Store the frozen weights of `unet` in `frozen_dtype`, in place; trainable parameters are left as they are.

    compute_dtype: for ``int8``, the dtype of the remaining frozen tensors and of the dequantized weights (bf16 on
    GPU, fp32 on CPU; default fp32). For ``fp32``/``bf16`` the frozen dtype is also the compute dtype (bf16 runs
    under autocast, since the trainable Q/K/V stay fp32); another compute_dtype is ignored with a warning.
    conv_format: ``int8`` (default; 3x smaller weight error than fp8 on Gaussian-like weights, equal on
    heavy-tailed ones) or ``fp8``. Works on meta-device models (byte accounting without weights).
    """
    compute_dtype = _resolve_compute_dtype(frozen_dtype, compute_dtype)
    _validate(unet, frozen_dtype, compute_dtype, conv_format)
    before = frozen_weight_bytes(unet)
    num_linear = num_conv = 0
    if frozen_dtype == "int8":
        num_linear = _replace_frozen(unet, _is_plain_linear, lambda m: _to_linear8bit(m, compute_dtype))
        num_conv = _replace_frozen(unet, _is_plain_conv, lambda m: QuantizedConv(m, compute_dtype, conv_format))
        _cast_frozen(unet, compute_dtype)
    else:
        _cast_frozen(unet, _CAST_DTYPES[frozen_dtype])
    kinds = frozen_bytes_by_kind(unet)
    return PrecisionReport(
        frozen_dtype=frozen_dtype, bytes_before=before, bytes_after=sum(kinds.values()),
        linear_bytes=kinds["linear"], conv_bytes=kinds["conv"], other_bytes=kinds["other"],
        num_linear_replaced=num_linear, num_conv_replaced=num_conv,
        conv_format=conv_format if num_conv else "",
    )


def frozen_weight_bytes(unet: nn.Module) -> int:
    """Bytes of all frozen parameters and buffers as stored, bitsandbytes row scales and 8-bit conv scales included."""
    return sum(frozen_bytes_by_kind(unet).values())


def frozen_bytes_by_kind(unet: nn.Module) -> dict[str, int]:
    """Frozen bytes as stored, split into ``linear`` / ``conv`` / ``other`` by the owning module's type."""
    totals = {"linear": 0, "conv": 0, "other": 0}
    seen: set[int] = set()
    for module in unet.modules():
        kind = _module_kind(module)
        for tensor in _frozen_tensors(module):
            if id(tensor) not in seen:
                seen.add(id(tensor))
                totals[kind] += tensor.numel() * tensor.element_size()
    return totals


# --------------------------------------------------------------------------------------------- 8-bit convolution


class QuantizedConv(nn.Module):
    """A frozen Conv1d/2d/3d whose weight is stored in 8 bits with one fp32 scale per output channel.

    Buffers: ``qweight`` (C_out, C_in/groups, *kernel) int8 or float8_e4m3fn, ``weight_scale`` (C_out,) fp32.
    They are buffers, not parameters, so optimizers never see them and diffusers' ``ModelMixin.dtype`` (the first
    floating *parameter*) still reports the compute dtype. forward: x (B, C_in, *spatial) any float dtype ->
    (B, C_out, *spatial') in the compute dtype (or the autocast dtype). The dequantized weight lives only inside
    forward and inside backward; backward gives the input gradient only (the weight is frozen).
    """

    def __init__(self, conv: nn.Conv1d | nn.Conv2d | nn.Conv3d, compute_dtype: torch.dtype, conv_format: str):
        super().__init__()
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        self.num_spatial_dims = conv.weight.dim() - 2
        self.compute_dtype = compute_dtype
        self.conv_format = conv_format
        qweight, scale = quantize_per_channel(conv.weight.detach(), conv_format)
        self.register_buffer("qweight", qweight)
        self.register_buffer("weight_scale", scale)
        bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().to(compute_dtype), requires_grad=False)
        self.register_parameter("bias", bias)
        self.train(conv.training)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight in the compute dtype: a fresh tensor per access, for code that reads
        ``conv.weight.dtype``/``.device`` (Show-1 takes its dtype from ``conv_in.weight``)."""
        return dequantize_per_channel(self.qweight, self.weight_scale, self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _QuantizedConvFunction.apply(x, self.qweight, self.weight_scale, self.bias, self)

    def conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return _CONV_FUNCTIONS[self.num_spatial_dims](x, weight, bias, self.stride, self.padding, self.dilation,
                                                      self.groups)

    def input_grad(self, input_shape: torch.Size, weight: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
        return _CONV_INPUT_GRADS[self.num_spatial_dims](input_shape, weight, grad_out, self.stride, self.padding,
                                                        self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, {self.conv_format} weight, compute {self.compute_dtype}")


class _QuantizedConvFunction(torch.autograd.Function):
    """Conv with a weight dequantized on the fly. Saves only the 8-bit buffers (no input, no fp copy of the
    weight): plain autograd would keep every dequantized weight alive until backward, undoing the saving."""

    @staticmethod
    def forward(ctx, x, qweight, scale, bias, conv: QuantizedConv):
        weight = dequantize_per_channel(qweight, scale, conv.compute_dtype)
        ctx.save_for_backward(qweight, scale)
        ctx.conv, ctx.input_shape, ctx.input_dtype = conv, x.shape, x.dtype
        return conv.conv(x.to(weight.dtype), weight, None if bias is None else bias.to(weight.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = None
        if ctx.needs_input_grad[0]:
            qweight, scale = ctx.saved_tensors
            weight = dequantize_per_channel(qweight, scale, ctx.conv.compute_dtype)
            grad_x = ctx.conv.input_grad(ctx.input_shape, weight, grad_out.to(weight.dtype)).to(ctx.input_dtype)
        return grad_x, None, None, None, None


def quantize_per_channel(weight: torch.Tensor, conv_format: str) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (C_out, ...) float -> (8-bit tensor of the same shape, fp32 scale (C_out,)); absmax per channel.

    Rounded in fp32 whatever the input dtype; an all-zero channel gets scale 1/qmax and stays zero.
    """
    qmax = _QMAX[conv_format]
    w = weight.float()
    absmax = w.flatten(1).abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax)) / qmax
    scaled = (w / _per_channel(scale, w.dim())).clamp(-qmax, qmax)
    if conv_format == "int8":
        scaled = scaled.round()
    return scaled.to(_STORAGE[conv_format]), scale


def dequantize_per_channel(qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """8-bit (C_out, ...) and fp32 scale (C_out,) -> weight in `dtype`. Scaled in fp32 so a bf16 compute dtype
    rounds once, not twice (a bf16 scale alone would add a 0.4% per-channel bias)."""
    return (qweight.float() * _per_channel(scale, qweight.dim())).to(dtype)


def _per_channel(scale: torch.Tensor, ndim: int) -> torch.Tensor:
    return scale.view(-1, *([1] * (ndim - 1)))


# --------------------------------------------------------------------------------------------- 8-bit linear


def _linear8bit_class() -> type:
    """bitsandbytes' Linear8bitLt with any number of leading dims (its own autograd takes 2-D or 3-D inputs:
    a 4-D input fails inside bitsandbytes 0.50 on CPU in eval mode). Built lazily: importing bitsandbytes is slow."""
    global _Linear8bit
    if _Linear8bit is None:
        import bitsandbytes as bnb

        class Linear8bit(bnb.nn.Linear8bitLt):
            """(..., in_features) -> (..., out_features); int8 weight (out, in), fp32 row scale (out,)."""

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                out = super().forward(x.reshape(-1, x.shape[-1]))
                return out.reshape(*x.shape[:-1], out.shape[-1])

        Linear8bit.__module__, Linear8bit.__qualname__ = __name__, "Linear8bit"
        _Linear8bit = Linear8bit
    return _Linear8bit


_Linear8bit: type | None = None


def __getattr__(name: str):
    # `vmc_fast.tuning.precision.Linear8bit` resolves lazily, so pickled int8 models load in a fresh process.
    if name == "Linear8bit":
        return _linear8bit_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _to_linear8bit(linear: nn.Linear, compute_dtype: torch.dtype) -> nn.Module:
    """A frozen nn.Linear -> Linear8bitLt holding bitsandbytes' own row-wise int8 quantization of its weight.

    Quantized here with bitsandbytes' op (on the weight's device, meta included) instead of through
    ``Int8Params.to(device)``, which only quantizes on a CPU -> device move.
    """
    import bitsandbytes as bnb

    layer = _linear8bit_class()(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                has_fp16_weights=False, threshold=LINEAR8BIT_THRESHOLD, device="meta")
    # bitsandbytes quantizes through fp16 (as Int8Params._quantize does): |w| > 65504 would overflow.
    cb, scb, _ = bnb.functional.int8_vectorwise_quant(linear.weight.detach().to(torch.float16))
    layer.weight = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().to(compute_dtype), requires_grad=False)
    return layer.train(linear.training)


# --------------------------------------------------------------------------------------------- helpers


def _resolve_compute_dtype(frozen_dtype: str, compute_dtype: torch.dtype | None) -> torch.dtype | None:
    if frozen_dtype not in _CAST_DTYPES:
        return compute_dtype or torch.float32
    if compute_dtype not in (None, _CAST_DTYPES[frozen_dtype]):
        warnings.warn(f"--frozen-dtype {frozen_dtype}: frozen weights compute in {frozen_dtype}; compute_dtype "
                      f"{compute_dtype} is ignored", stacklevel=3)
    return _CAST_DTYPES[frozen_dtype]


def _validate(unet: nn.Module, frozen_dtype: str, compute_dtype: torch.dtype, conv_format: str) -> None:
    if frozen_dtype not in FROZEN_DTYPES:
        raise ValueError(f"--frozen-dtype must be one of {', '.join(FROZEN_DTYPES)}; got {frozen_dtype!r}")
    if not (isinstance(compute_dtype, torch.dtype) and compute_dtype.is_floating_point
            and compute_dtype.itemsize >= 2):
        raise ValueError(f"compute_dtype must be a 16- or 32-bit float torch.dtype; got {compute_dtype!r}")
    if conv_format not in CONV_FORMATS:
        raise ValueError(f"conv_format must be one of {', '.join(CONV_FORMATS)}; got {conv_format!r}")
    if any(_is_8bit(m) for m in unet.modules()):
        raise ValueError("--frozen-dtype: this model already holds 8-bit layers; apply the frozen precision once, "
                         "to a freshly loaded model")


def _is_plain_linear(module: nn.Module) -> bool:
    # Exact types only: a subclass (LoRA layer, an already-8-bit layer) may carry behaviour a swap would drop.
    return type(module) is nn.Linear


def _is_plain_conv(module: nn.Module) -> bool:
    # QuantizedConv handles numeric zero padding only; other convs stay in the compute dtype ("other").
    return (type(module) in (nn.Conv1d, nn.Conv2d, nn.Conv3d) and module.padding_mode == "zeros"
            and not isinstance(module.padding, str))


def _is_8bit(module: nn.Module) -> bool:
    weight = module._parameters.get("weight")
    return isinstance(module, QuantizedConv) or type(weight).__name__ == "Int8Params"


def _is_frozen(module: nn.Module) -> bool:
    return not any(p.requires_grad for p in module.parameters())


def _replace_frozen(unet: nn.Module, match, build) -> int:
    """Swap every frozen child for which `match` holds by `build(child)`, one at a time (peak: one layer extra)."""
    count = 0
    for parent in list(unet.modules()):
        for name, child in list(parent.named_children()):
            if match(child) and _is_frozen(child):
                setattr(parent, name, build(child))
                count += 1
    return count


def _cast_frozen(unet: nn.Module, dtype: torch.dtype) -> None:
    """Cast frozen floating parameters and buffers to `dtype` in place; 8-bit layers keep their own storage."""
    for module in unet.modules():
        if _is_8bit(module):
            continue  # an 8-bit layer: its bias is already in the compute dtype, its scales stay fp32
        for param in module.parameters(recurse=False):
            if not param.requires_grad and param.is_floating_point():
                param.data = param.data.to(dtype)
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and buffer.is_floating_point():
                module._buffers[name] = buffer.to(dtype)


def _module_kind(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):  # bitsandbytes' Linear8bitLt is an nn.Linear
        return "linear"
    if isinstance(module, (QuantizedConv, nn.modules.conv._ConvNd)):
        return "conv"
    return "other"


def _frozen_tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    """The module's own frozen parameters and buffers, plus the bitsandbytes row scale when it has one.

    bitsandbytes keeps that scale (SCB) outside parameters and buffers: on the weight until the first forward,
    then in ``module.state`` (the int8 matrix itself is the weight's data throughout).
    """
    params = module._parameters  # not module.weight: QuantizedConv.weight would dequantize
    for param in params.values():
        if param is not None and not param.requires_grad:
            yield param
    yield from (b for b in module._buffers.values() if b is not None)
    scale = getattr(params.get("weight"), "SCB", None)
    if scale is None:
        scale = getattr(getattr(module, "state", None), "SCB", None)
    if isinstance(scale, torch.Tensor):
        yield scale


def _gb(num_bytes: int) -> str:
    if num_bytes >= 1e8:
        return f"{num_bytes / 1e9:.2f} GB"
    return f"{num_bytes / 1e6:.2f} MB" if num_bytes >= 1e5 else f"{num_bytes / 1e3:.2f} kB"
