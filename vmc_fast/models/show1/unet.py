"""Show-1 keyframe UNet: our own implementation, weight-compatible with ``showlab/show-1-base``.

A pixel-space 3D UNet (DeepFloyd IF-I inflated with temporal layers). Frames are folded into the batch,
(B, C, F, H, W) -> (B*F, C, H, W) with index b*F + f, for every 2D layer; temporal layers unfold them again.
Parameter names, shapes and registration order equal the original ``UNet3DConditionModel`` of Show-1, so its
checkpoints load directly. Layer by layer (see the reference README for the evidence):

- down/up block layer: ResNet -> temporal conv [-> spatial added-KV attention -> temporal attention]
- mid block: ResNet -> temporal conv -> (spatial attention -> temporal attention -> ResNet -> temporal conv)
- down/up samplers are ResNets that resample both branches; they have no temporal conv after them.

Importing this module registers the ``show1`` family and the ``show1-tiny-random`` / ``show1-base-arch``
built-ins in the backbone registry through `vmc_fast.models.show1.loading`, which holds the loaders.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vmc_fast.models.attention import (
    SelectableBackend,
    attention,
    merge_heads,
    split_heads,
)

DOWN_BLOCK_TYPES = ("ResnetDownsampleBlock3D", "SimpleCrossAttnDownBlock3D")
UP_BLOCK_TYPES = ("ResnetUpsampleBlock3D", "SimpleCrossAttnUpBlock3D")
TEMPORAL_CONV_GROUPS = 32
"""The original temporal conv hard-codes GroupNorm(32, C), whatever norm_num_groups says."""


# ----------------------------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class Show1Config:
    """The Show-1 ``unet/config.json`` keys; defaults are the keyframe (base) model's values."""

    act_fn: str = "gelu"
    addition_embed_type: str | None = "text"
    addition_embed_type_num_heads: int = 64
    addition_time_embed_dim: int | None = None
    attention_head_dim: int | tuple[int, ...] = 64
    block_out_channels: tuple[int, ...] = (320, 640, 960, 1280)
    center_input_sample: bool = False
    class_embed_type: str | None = None
    class_embeddings_concat: bool = False
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    cross_attention_dim: int = 1280
    cross_attention_norm: str | None = "group_norm"
    down_block_types: tuple[str, ...] = ("ResnetDownsampleBlock3D",) + ("SimpleCrossAttnDownBlock3D",) * 3
    downsample_padding: int = 1
    dual_cross_attention: bool = False
    encoder_hid_dim: int | None = 4096
    encoder_hid_dim_type: str | None = "text_proj"
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    in_channels: int = 3
    layers_per_block: int = 3
    mid_block_only_cross_attention: bool | None = None
    mid_block_scale_factor: float = 1.0
    mid_block_type: str = "UNetMidBlock3DSimpleCrossAttn"
    norm_eps: float = 1e-5
    norm_num_groups: int = 32
    num_attention_heads: int | None = None
    num_class_embeds: int | None = None
    only_cross_attention: bool = False
    out_channels: int = 6
    projection_class_embeddings_input_dim: int | None = None
    resnet_out_scale_factor: float = 1.0
    resnet_skip_time_act: bool = False
    resnet_time_scale_shift: str = "scale_shift"
    sample_size: Any = 64
    time_cond_proj_dim: int | None = None
    time_embedding_act_fn: str | None = None
    time_embedding_dim: int | None = None
    time_embedding_type: str = "positional"
    timestep_post_act: str | None = None
    transformer_layers_per_block: int = 1
    transfromer_in_opt: bool = False
    up_block_types: tuple[str, ...] = ("SimpleCrossAttnUpBlock3D",) * 3 + ("ResnetUpsampleBlock3D",)
    upcast_attention: bool = False
    use_linear_projection: bool = False

    @classmethod
    def from_dict(cls, config: dict) -> Show1Config:
        """Build from a parsed config.json; keys starting with ``_`` are ignored, unknown keys warned about."""
        known = {f.name for f in fields(cls)}
        values = {}
        for key, value in config.items():
            if key.startswith("_"):
                continue
            if key not in known:
                warnings.warn(f"Show-1 config key {key!r} is not known and is ignored", stacklevel=3)
                continue
            values[key] = tuple(value) if isinstance(value, list) else value
        result = cls(**values)
        result.validate()
        return result

    def to_dict(self) -> dict:
        """The config.json content, in the original format (lists, ``_class_name``)."""
        out: dict[str, Any] = {"_class_name": "UNet3DConditionModel", "_diffusers_version": "0.19.3"}
        for key, value in asdict(self).items():
            out[key] = list(value) if isinstance(value, tuple) else value
        return out

    def head_dims(self) -> tuple[int, ...]:
        """attention_head_dim per down block (an int in the config means the same for every block)."""
        if isinstance(self.attention_head_dim, int):
            return (self.attention_head_dim,) * len(self.block_out_channels)
        return tuple(self.attention_head_dim)

    def validate(self) -> None:
        """Raise ValueError naming the first key whose value this implementation does not support."""
        for key, allowed in _ALLOWED_VALUES.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"Show-1 config: {key}={getattr(self, key)!r} is not supported; "
                                 f"supported: {', '.join(map(repr, allowed))}")
        self._validate_blocks()
        self._validate_channels()

    def _validate_blocks(self) -> None:
        num_levels = len(self.block_out_channels)
        for key, allowed in (("down_block_types", DOWN_BLOCK_TYPES), ("up_block_types", UP_BLOCK_TYPES)):
            types = getattr(self, key)
            if len(types) != num_levels:
                raise ValueError(f"Show-1 config: {key} has {len(types)} entries, block_out_channels {num_levels}")
            for name in types:
                if name not in allowed:
                    raise ValueError(f"Show-1 config: {key} entry {name!r} is not supported; "
                                     f"supported: {', '.join(allowed)}")
        if len(self.head_dims()) != num_levels:
            raise ValueError("Show-1 config: attention_head_dim must be an int or one entry per block")
        if self.encoder_hid_dim_type == "text_proj" and not self.encoder_hid_dim:
            raise ValueError("Show-1 config: encoder_hid_dim must be set when encoder_hid_dim_type is 'text_proj'")
        if self.conv_in_kernel % 2 == 0 or self.conv_out_kernel % 2 == 0:
            raise ValueError("Show-1 config: conv_in_kernel and conv_out_kernel must be odd")

    def _validate_channels(self) -> None:
        for channels, head_dim in zip(self.block_out_channels, self.head_dims()):
            for divisor, why in ((TEMPORAL_CONV_GROUPS, "temporal conv GroupNorm(32)"),
                                 (self.norm_num_groups, "norm_num_groups"), (head_dim, "attention_head_dim")):
                if channels % divisor:
                    raise ValueError(f"Show-1 config: block_out_channels entry {channels} is not divisible by "
                                     f"{divisor} ({why})")


_ALLOWED_VALUES: dict[str, tuple] = {
    "act_fn": ("gelu", "silu"),
    "addition_embed_type": ("text", None),
    "encoder_hid_dim_type": ("text_proj", None),
    "cross_attention_norm": ("group_norm", None),
    "resnet_time_scale_shift": ("scale_shift", "default"),
    "time_embedding_type": ("positional",),
    "mid_block_type": ("UNetMidBlock3DSimpleCrossAttn",),
    "transfromer_in_opt": (False,),
    "class_embed_type": (None, "timestep"),  # "timestep": noise-level labels of the super-resolution stages
    "class_embeddings_concat": (False,),
    "num_class_embeds": (None,),
    "projection_class_embeddings_input_dim": (None,),
    "addition_time_embed_dim": (None,),
    "time_cond_proj_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "num_attention_heads": (None,),
    "dual_cross_attention": (False,),
    "only_cross_attention": (False,),
    "mid_block_only_cross_attention": (None, False),
}


@dataclass
class Show1UNetOutput:
    """sample: (B, out_channels, F, H, W)."""

    sample: torch.Tensor


# ----------------------------------------------------------------------------------------------------------------
# Layout helpers


def frames_to_video(x: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(B*F, C, H, W) -> (B, C, F, H, W) view."""
    bf, c, h, w = x.shape
    return x.view(bf // num_frames, num_frames, c, h, w).permute(0, 2, 1, 3, 4)


def video_to_frames(x: torch.Tensor) -> torch.Tensor:
    """(B, C, F, H, W) -> (B*F, C, H, W), frame index b*F + f."""
    b, c, f, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)


def _activation(name: str) -> nn.Module:
    return {"gelu": nn.GELU, "silu": nn.SiLU}[name]()


def sinusoidal_embedding(timesteps: torch.Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> torch.Tensor:
    """timesteps (B,) -> (B, dim) float32 sinusoid, [cos, sin] halves when flip_sin_to_cos.

    Always float32, like the original, so that a half-precision model sees the same embedding.
    """
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent / (half - freq_shift))
    args = timesteps[:, None].float() * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    return F.pad(emb, (0, dim % 2))


# ----------------------------------------------------------------------------------------------------------------
# Conditioning


class TimeEmbedding(nn.Module):
    """(B, in_dim) sinusoid -> (B, time_dim): Linear -> act -> Linear."""

    def __init__(self, in_dim: int, time_dim: int, act_fn: str):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, time_dim)
        self.act = _activation(act_fn)
        self.linear_2 = nn.Linear(time_dim, time_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class AttentionPool(nn.Module):
    """(B, L, D) -> (B, D): one query (token mean + learned vector) attends over itself and the L tokens."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.positional_embedding = nn.Parameter(torch.randn(1, dim) / dim**0.5)
        self.k_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        query = x.mean(dim=1, keepdim=True) + self.positional_embedding.to(x.dtype)
        tokens = torch.cat([query, x], dim=1)
        q, k, v = (split_heads(proj(t), self.num_heads).float()
                   for proj, t in ((self.q_proj, query), (self.k_proj, tokens), (self.v_proj, tokens)))
        # The original takes this softmax in float32 even for half-precision models.
        return merge_heads(attention(q, k, v)).to(x.dtype)[:, 0]


class TextPooling(nn.Module):
    """Raw text states (B, L, D) -> (B, time_dim) added to the time embedding: LN -> pool -> Linear -> LN."""

    def __init__(self, text_dim: int, time_dim: int, num_heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(text_dim)
        self.pool = AttentionPool(text_dim, num_heads)
        self.proj = nn.Linear(text_dim, time_dim)
        self.norm2 = nn.LayerNorm(time_dim)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return self.norm2(self.proj(self.pool(self.norm1(text))))


# ----------------------------------------------------------------------------------------------------------------
# Layers


@dataclass(frozen=True)
class _ResnetSettings:
    temb_channels: int
    groups: int
    eps: float
    act_fn: str
    scale_shift: bool
    skip_time_act: bool


class ResnetBlock(nn.Module):
    """(N, C_in, H, W), temb (N, T) -> (N, C_out, H', W'); H' = H/2 ("down"), 2H ("up") or H."""

    def __init__(self, in_ch: int, out_ch: int, s: _ResnetSettings, output_scale_factor: float,
                 resample: str | None = None):
        super().__init__()
        self.norm1 = nn.GroupNorm(s.groups, in_ch, eps=s.eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(s.temb_channels, 2 * out_ch if s.scale_shift else out_ch)
        self.norm2 = nn.GroupNorm(s.groups, out_ch, eps=s.eps)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None
        self.act = _activation(s.act_fn)
        self.scale_shift, self.skip_time_act = s.scale_shift, s.skip_time_act
        self.output_scale_factor, self.resample = output_scale_factor, resample

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.act(self.norm1(x))
        # Resampling acts on both branches, after the first norm/act (IF's "resblock_updown").
        x, h = self._resample(x), self._resample(h)
        h = self.conv1(h)
        t = self.time_emb_proj(temb if self.skip_time_act else self.act(temb))[:, :, None, None]
        if self.scale_shift:
            scale, shift = t.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + t)
        h = self.conv2(self.act(h))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return (x + h) / self.output_scale_factor


def _temporal_conv_stage(channels: int, with_dropout_slot: bool) -> nn.Sequential:
    """GroupNorm(32) -> SiLU -> [dropout slot] -> Conv3d (3,1,1); the slot keeps the original weight indices."""
    layers = [nn.GroupNorm(TEMPORAL_CONV_GROUPS, channels), nn.SiLU()]
    if with_dropout_slot:
        layers.append(nn.Identity())
    layers.append(nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0)))
    return nn.Sequential(*layers)


class TemporalConv(nn.Module):
    """(B*F, C, H, W) -> same: four norm/SiLU/conv-over-frames stages with a residual around them."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = _temporal_conv_stage(channels, with_dropout_slot=False)
        self.conv2 = _temporal_conv_stage(channels, with_dropout_slot=True)
        self.conv3 = _temporal_conv_stage(channels, with_dropout_slot=True)
        self.conv4 = _temporal_conv_stage(channels, with_dropout_slot=True)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        video = frames_to_video(x, num_frames)  # GroupNorm statistics span all frames of a video
        h = self.conv4(self.conv3(self.conv2(self.conv1(video))))
        return video_to_frames(video + h)


class TemporalSelfAttention(SelectableBackend, nn.Module):
    """(N, F, C) -> (N, F, C) self-attention over frames; q/k/v without bias. These q/k/v are what VMC tunes.

    `backend` (from SelectableBackend) selects the kernel in `vmc_fast.models.attention.attention` for this layer.
    """

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.to_q = nn.Linear(channels, channels, bias=False)
        self.to_k = nn.Linear(channels, channels, bias=False)
        self.to_v = nn.Linear(channels, channels, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (split_heads(proj(x), self.num_heads) for proj in (self.to_q, self.to_k, self.to_v))
        return self.to_out[0](merge_heads(attention(q, k, v, backend=self.backend)))


class GEGLU(nn.Module):
    """(N, F, C) -> (N, F, inner): value * gelu(gate) from one Linear to 2*inner."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """(N, F, C) -> (N, F, C); ``net`` = [GEGLU, dropout slot, Linear] keeps the original indices 0 and 2."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, mult * dim), nn.Identity(), nn.Linear(mult * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class TemporalTransformerBlock(nn.Module):
    """(N, F, C) -> (N, F, C): two self-attentions (attn2 ignores the text) and a GEGLU feed-forward."""

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(channels)
        self.attn1 = TemporalSelfAttention(channels, num_heads)
        self.norm2 = nn.LayerNorm(channels)
        self.attn2 = TemporalSelfAttention(channels, num_heads)
        self.norm3 = nn.LayerNorm(channels)
        self.ff = FeedForward(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x))
        return x + self.ff(self.norm3(x))


class TemporalTransformer(nn.Module):
    """(B*F, C, H, W) -> same: each pixel's F frames form a token sequence; residual around everything.

    Head layout as in Show-1: ``num_heads`` = attention_head_dim and head size C / attention_head_dim
    (swapped relative to the spatial attention). No positional encoding over frames.
    """

    def __init__(self, channels: int, num_heads: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList([TemporalTransformerBlock(channels, num_heads)])
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        bf, c, h, w = x.shape
        b = bf // num_frames
        video = self.norm(frames_to_video(x, num_frames))  # statistics over all frames
        tokens = self.proj_in(video.permute(0, 3, 4, 2, 1).reshape(b * h * w, num_frames, c))
        for block in self.transformer_blocks:
            tokens = block(tokens)
        tokens = self.proj_out(tokens)
        out = tokens.view(b, h, w, num_frames, c).permute(0, 3, 4, 1, 2).reshape(bf, c, h, w)
        return x + out


class SpatialAttention(nn.Module):
    """(N, C, H, W), text (N, L, D) -> (N, C, H, W): pixels attend over [text tokens, pixels] ("added KV")."""

    def __init__(self, channels: int, head_dim: int, context_dim: int, groups: int, eps: float, norm_cross: bool):
        super().__init__()
        self.num_heads = channels // head_dim
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)
        # The projected text gets its own GroupNorm(32) over channels (diffusers' "cross_attention_norm").
        self.norm_cross = nn.GroupNorm(32, context_dim, eps=1e-5) if norm_cross else None
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.add_k_proj = nn.Linear(context_dim, channels)
        self.add_v_proj = nn.Linear(context_dim, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        tokens = self.group_norm(x.view(n, c, h * w)).transpose(1, 2)
        if self.norm_cross is not None:
            context = self.norm_cross(context.transpose(1, 2)).transpose(1, 2)
        heads = self.num_heads
        q = split_heads(self.to_q(tokens), heads)
        k = torch.cat([split_heads(self.add_k_proj(context), heads), split_heads(self.to_k(tokens), heads)], dim=2)
        v = torch.cat([split_heads(self.add_v_proj(context), heads), split_heads(self.to_v(tokens), heads)], dim=2)
        out = self.to_out[0](merge_heads(attention(q, k, v)))
        return x + out.transpose(1, 2).reshape(n, c, h, w)


class _LayerFactory:
    """Builds the layers of one UNet from its config, so blocks only say which layers they hold."""

    def __init__(self, config: Show1Config, temb_channels: int):
        self.config = config
        self.resnet_settings = _ResnetSettings(
            temb_channels=temb_channels, groups=config.norm_num_groups, eps=config.norm_eps, act_fn=config.act_fn,
            scale_shift=config.resnet_time_scale_shift == "scale_shift", skip_time_act=config.resnet_skip_time_act)

    def resnet(self, in_ch: int, out_ch: int, resample: str | None = None, scale: float | None = None) -> ResnetBlock:
        scale = self.config.resnet_out_scale_factor if scale is None else scale
        return ResnetBlock(in_ch, out_ch, self.resnet_settings, scale, resample)

    def spatial_attention(self, channels: int, head_dim: int) -> SpatialAttention:
        c = self.config
        return SpatialAttention(channels, head_dim, c.cross_attention_dim, c.norm_num_groups, c.norm_eps,
                                norm_cross=c.cross_attention_norm == "group_norm")

    def temporal_attention(self, channels: int, head_dim: int) -> TemporalTransformer:
        return TemporalTransformer(channels, num_heads=head_dim, groups=self.config.norm_num_groups)


# ----------------------------------------------------------------------------------------------------------------
# Blocks


def _add_layer_stacks(block: nn.Module, make: _LayerFactory, channels: int, num_layers: int, head_dim: int,
                      with_attention: bool) -> None:
    """Register a block's per-layer temporal convs (and spatial + temporal attentions) after its resnets.

    Registration order is the original's (resnets, temp_convs, attentions, temp_attentions), so the state_dict
    order matches the published checkpoints.
    """
    block.temp_convs = nn.ModuleList([TemporalConv(channels) for _ in range(num_layers)])
    if with_attention:
        block.attentions = nn.ModuleList([make.spatial_attention(channels, head_dim) for _ in range(num_layers)])
        block.temp_attentions = nn.ModuleList([make.temporal_attention(channels, head_dim)
                                               for _ in range(num_layers)])
    block.has_attention = with_attention


class DownBlock3D(nn.Module):
    """(B*F, C_in, H, W) -> ((B*F, C_out, H', W'), skips): layers, then an optional downsampling ResNet."""

    def __init__(self, make: _LayerFactory, in_ch: int, out_ch: int, num_layers: int, head_dim: int,
                 with_attention: bool, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([make.resnet(in_ch if i == 0 else out_ch, out_ch) for i in range(num_layers)])
        _add_layer_stacks(self, make, out_ch, num_layers, head_dim, with_attention)
        self.downsamplers = nn.ModuleList([make.resnet(out_ch, out_ch, "down")]) if downsample else None

    def forward(self, h: torch.Tensor, temb: torch.Tensor, context: torch.Tensor,
                num_frames: int) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            h = self.temp_convs[i](resnet(h, temb), num_frames)
            if self.has_attention:
                h = self.temp_attentions[i](self.attentions[i](h, context), num_frames)
            skips.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h, temb)
            skips.append(h)
        return h, tuple(skips)


class MidBlock3D(nn.Module):
    """(B*F, C, H, W) -> same: ResNet, temporal conv, then (attention, temporal attention, ResNet, temporal conv)."""

    def __init__(self, make: _LayerFactory, channels: int, head_dim: int, scale: float):
        super().__init__()
        self.resnets = nn.ModuleList([make.resnet(channels, channels, scale=scale) for _ in range(2)])
        self.temp_convs = nn.ModuleList([TemporalConv(channels) for _ in range(2)])
        self.attentions = nn.ModuleList([make.spatial_attention(channels, head_dim)])
        self.temp_attentions = nn.ModuleList([make.temporal_attention(channels, head_dim)])

    def forward(self, h: torch.Tensor, temb: torch.Tensor, context: torch.Tensor, num_frames: int) -> torch.Tensor:
        h = self.temp_convs[0](self.resnets[0](h, temb), num_frames)
        for attn, temp_attn, resnet, temp_conv in zip(self.attentions, self.temp_attentions, self.resnets[1:],
                                                      self.temp_convs[1:]):
            h = temp_attn(attn(h, context), num_frames)
            h = temp_conv(resnet(h, temb), num_frames)
        return h


class UpBlock3D(nn.Module):
    """(B*F, C_prev, H, W) + skips -> (B*F, C_out, H', W'); each layer first concatenates [h, skip]."""

    def __init__(self, make: _LayerFactory, in_ch: int, out_ch: int, prev_ch: int, num_layers: int, head_dim: int,
                 with_attention: bool, upsample: bool):
        super().__init__()
        resnets = []
        for i in range(num_layers):
            skip_ch = in_ch if i == num_layers - 1 else out_ch
            resnets.append(make.resnet((prev_ch if i == 0 else out_ch) + skip_ch, out_ch))
        self.resnets = nn.ModuleList(resnets)
        _add_layer_stacks(self, make, out_ch, num_layers, head_dim, with_attention)
        self.upsamplers = nn.ModuleList([make.resnet(out_ch, out_ch, "up")]) if upsample else None

    def forward(self, h: torch.Tensor, skips: tuple[torch.Tensor, ...], temb: torch.Tensor, context: torch.Tensor,
                num_frames: int) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            h = torch.cat([h, skips[-1 - i]], dim=1)  # skips are consumed last-in-first-out
            h = self.temp_convs[i](resnet(h, temb), num_frames)
            if self.has_attention:
                h = self.temp_attentions[i](self.attentions[i](h, context), num_frames)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h, temb)
        return h


# ----------------------------------------------------------------------------------------------------------------
# The UNet


class Show1UNet3D(nn.Module):
    """Show-1 UNet: sample (B, C_in, F, H, W), timestep (B,) or scalar, text (B, L, encoder_hid_dim)
    -> Show1UNetOutput(sample=(B, C_out, F, H, W)). H and W must be divisible by 2**(levels - 1)."""

    def __init__(self, config: Show1Config):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        channels = config.block_out_channels
        temb_channels = config.time_embedding_dim or 4 * channels[0]
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], config.conv_in_kernel,
                                 padding=config.conv_in_kernel // 2)
        self.time_embedding = TimeEmbedding(channels[0], temb_channels, config.act_fn)
        self.encoder_hid_proj = (nn.Linear(config.encoder_hid_dim, config.cross_attention_dim)
                                 if config.encoder_hid_dim_type == "text_proj" else None)
        self.class_embedding = (TimeEmbedding(channels[0], temb_channels, config.act_fn)
                                if config.class_embed_type == "timestep" else None)
        text_dim = config.encoder_hid_dim if self.encoder_hid_proj is not None else config.cross_attention_dim
        self.add_embedding = (TextPooling(text_dim, temb_channels, config.addition_embed_type_num_heads)
                              if config.addition_embed_type == "text" else None)
        # Registered before the mid block, as in the original, so state_dict order matches (up before mid).
        self.down_blocks = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        make = _LayerFactory(config, temb_channels)
        self._build_down_blocks(make)
        self._build_up_blocks(make)
        self.mid_block = MidBlock3D(make, channels[-1], config.head_dims()[-1], config.mid_block_scale_factor)
        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, channels[0], eps=config.norm_eps)
        self.conv_act = _activation(config.act_fn)
        self.conv_out = nn.Conv2d(channels[0], config.out_channels, config.conv_out_kernel,
                                  padding=config.conv_out_kernel // 2)

    @classmethod
    def from_config(cls, config: dict | Show1Config) -> Show1UNet3D:
        """Build from the Show-1 config keys (``unet/config.json`` content); ValueError for unsupported values."""
        return cls(config if isinstance(config, Show1Config) else Show1Config.from_dict(config))

    def _build_down_blocks(self, make: _LayerFactory) -> None:
        c = self.config
        out_ch = c.block_out_channels[0]
        for i, block_type in enumerate(c.down_block_types):
            in_ch, out_ch = out_ch, c.block_out_channels[i]
            self.down_blocks.append(DownBlock3D(
                make, in_ch, out_ch, c.layers_per_block, c.head_dims()[i],
                with_attention=block_type == "SimpleCrossAttnDownBlock3D",
                downsample=i < len(c.block_out_channels) - 1))

    def _build_up_blocks(self, make: _LayerFactory) -> None:
        c = self.config
        rev_channels, rev_heads = c.block_out_channels[::-1], c.head_dims()[::-1]
        out_ch = rev_channels[0]
        for i, block_type in enumerate(c.up_block_types):
            prev_ch, out_ch = out_ch, rev_channels[i]
            in_ch = rev_channels[min(i + 1, len(rev_channels) - 1)]
            self.up_blocks.append(UpBlock3D(
                make, in_ch, out_ch, prev_ch, c.layers_per_block + 1, rev_heads[i],
                with_attention=block_type == "SimpleCrossAttnUpBlock3D",
                upsample=i < len(rev_channels) - 1))

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv_in.weight.device

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each down/mid/up block in backward instead of keeping its activations (training only)."""
        self.gradient_checkpointing = True

    def disable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = False

    def _run(self, block: nn.Module, *args: Any) -> Any:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def _conditioning(self, timestep: torch.Tensor | int | float, text: torch.Tensor, batch: int,
                      class_labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """timestep (B,) or scalar, raw text (B, L, D_text), class labels (B,) for class-conditioned stages
        -> time embedding (B, T), context (B, L, D_cross)."""
        emb = self.time_embedding(self._sinusoid(timestep, batch, text.device))
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("Show-1 UNet: this config (class_embed_type 'timestep') needs class_labels, "
                                 "the noise level of the super-resolution stage's low-resolution input")
            emb = emb + self.class_embedding(self._sinusoid(class_labels, batch, text.device))
        if self.add_embedding is not None:
            emb = emb + self.add_embedding(text)  # pooled from the raw (unprojected) text states
        context = self.encoder_hid_proj(text) if self.encoder_hid_proj is not None else text
        return emb, context

    def _sinusoid(self, values: torch.Tensor | int | float, batch: int, device: torch.device) -> torch.Tensor:
        """(B,) or scalar timesteps/labels -> (B, C0) sinusoid in the model's dtype."""
        t = torch.as_tensor(values, device=device)
        t = (t[None] if t.ndim == 0 else t).expand(batch)
        c = self.config
        return sinusoidal_embedding(t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift).to(self.dtype)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int | float,
                encoder_hidden_states: torch.Tensor, return_dict: bool = True,
                class_labels: torch.Tensor | None = None) -> Show1UNetOutput | tuple:
        """sample (B, C_in, F, H, W), timestep (B,) or scalar, encoder_hidden_states (B, L, D)
        -> Show1UNetOutput(sample (B, C_out, F, H, W)) in the model's dtype (or a 1-tuple if not return_dict)."""
        batch, _, num_frames, height, width = sample.shape
        factor = 2 ** (len(self.config.block_out_channels) - 1)
        if height % factor or width % factor:
            # The resampling ResNets always halve/double, so other sizes fail deep inside with a shape error.
            raise ValueError(f"Show-1 UNet: height and width must be divisible by {factor}, got {height}x{width}")
        # Inputs are cast to the weights' dtype: callers keep fp32 pixels and cached prompt states.
        text = encoder_hidden_states.to(self.dtype)
        emb, context = self._conditioning(timestep, text, batch, class_labels)
        emb = emb.repeat_interleave(num_frames, dim=0)
        context = context.repeat_interleave(num_frames, dim=0)
        sample = sample.to(self.dtype)
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0
        h = self.conv_in(video_to_frames(sample))
        h = self._unet_body(h, emb, context, num_frames)
        h = self.conv_out(self.conv_act(self.conv_norm_out(h)))
        out = frames_to_video(h, num_frames)
        return Show1UNetOutput(out) if return_dict else (out,)

    def _unet_body(self, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, num_frames: int) -> torch.Tensor:
        """(B*F, C0, H, W) -> (B*F, C0, H, W) through down blocks, mid block and up blocks."""
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = self._run(block, h, emb, context, num_frames)
            skips.extend(block_skips)
        h = self._run(self.mid_block, h, emb, context, num_frames)
        for block in self.up_blocks:
            n = len(block.resnets)
            h = self._run(block, h, tuple(skips[-n:]), emb, context, num_frames)
            del skips[-n:]
        return h


# ----------------------------------------------------------------------------------------------------------------
# Weights initialisation (random builds)


@torch.no_grad()
def init_random_weights(model: nn.Module, seed: int) -> nn.Module:
    """Deterministic random init, in place: matrices N(0, 1/fan_in), norms (1, 0), biases 0.

    Every layer, temporal ones included, gets non-zero weights so gradients reach the temporal Q/K/V from the
    first step (the original zero-initialises the last temporal conv, which random builds do not want).
    """
    generators: dict[torch.device, torch.Generator] = {}
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            gen = generators.setdefault(param.device, torch.Generator(param.device).manual_seed(seed))
            if isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
                param.fill_(1.0 if name == "weight" else 0.0)
            elif param.dim() >= 2:
                param.normal_(0.0, param[0].numel() ** -0.5, generator=gen)
            else:
                param.zero_()
    return model


# ----------------------------------------------------------------------------------------------------------------
# Registry


SHOW1_CONFIG_KEYS = ("encoder_hid_dim_type", "transfromer_in_opt", "addition_embed_type")
"""Keys present in every Show-1 UNet config and absent from diffusers' own UNet3DConditionModel configs."""


def is_show1_unet_config(config: dict) -> bool:
    """True for a Show-1 ``unet/config.json`` (and False for a diffusers ModelScope/ZeroScope one)."""
    return config.get("_class_name") == "UNet3DConditionModel" and any(k in config for k in SHOW1_CONFIG_KEYS)
