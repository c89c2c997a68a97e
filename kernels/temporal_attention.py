"""Triton temporal attention: softmax(scale * Q K^T) V over a few frames for a huge batch of pixel positions.

Shape of the problem (Show-1 keyframe UNet, 8 frames at 40x64): q, k, v are (N, H, F, D) with N the pixel
positions (times the video batch), H heads, F frames (<= 32) and a small head size D (5, 10, 15, 20 -- not a power
of two). Each (n, h) "row" is an independent F x F attention, and there are hundreds of thousands of rows.

Layout of the kernels:
- One program owns BLOCK_R whole rows. It loads the full F x D query tile of every row once (F is tiny), then walks
  the F key frames one at a time with an online softmax, so the live state is O(BLOCK_R * F * D) registers and no
  F x F x D product is ever materialised. D and F are padded to powers of two with masks.
- Math runs in fp32 whatever the input dtype; logits are pre-multiplied by log2(e) so the kernels use exp2.
- The forward saves the natural-log log-sum-exp (N, H, F) in fp32; the backward recomputes P from it. A program
  owns whole rows, so dq, dk and dv are written without atomics by one backward kernel.
- Rows go on grid axis 0 (limit 2**31 - 1), and the leading batch is chunked so that no launch covers more than
  `MAX_ROWS_PER_LAUNCH` (n, h) rows: fused attention kernels that put batch * heads on grid axes y/z fail once
  that reaches 65,536, and this keeps every launch far from any grid or int32 limit. Row offsets are int64.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

MAX_FRAMES = 32
"""Largest F supported: the whole F x D tile of a row is held by one program."""

MAX_HEAD_DIM = 128
"""Largest D supported (padded to the next power of two inside the kernel)."""

MAX_ROWS_PER_LAUNCH = 65_535
"""Most (n, h) rows one kernel launch may cover; the leading batch N is chunked to stay below it.
Tests lower it to exercise the chunking path cheaply."""

TILE_ELEMENTS = 1024
"""Target number of fp32 elements of one (BLOCK_R, BLOCK_F, BLOCK_D) tile: bounds register use per program.
With about 8 tile elements per thread (see _launch_config), ptxas -v for sm_80 and sm_90 reports at most ~130
registers for the forward, ~180 for the backward and no spills over F <= 32, D <= 128 (compiled ahead of time,
no GPU run yet); 4096 elements on 4 warps used 255 registers and spilled at the Show-1 shape (F=8, D=5)."""

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


@triton.jit
def _row_offsets(rows, num_heads, stride_n, stride_h):
    """Element offset (int64) of the first value of each (n, h) row; rows are flattened n * H + h."""
    rows = rows.to(tl.int64)
    return (rows // num_heads) * stride_n + (rows % num_heads) * stride_h


@triton.jit
def _load_tile(base, row_off, f_idx, d_idx, stride_f, stride_d, mask):
    """(BLOCK_R, BLOCK_F, BLOCK_D) fp32 tile of a q/k/v-shaped tensor; masked lanes read 0."""
    ptrs = base + row_off[:, None, None] + f_idx[None, :, None] * stride_f + d_idx[None, None, :] * stride_d
    return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
    num_rows, num_heads, num_frames, head_dim, qk_scale,
    sq_n, sq_h, sq_f, sq_d,
    sk_n, sk_h, sk_f, sk_d,
    sv_n, sv_h, sv_f, sv_d,
    so_n, so_h, so_f, so_d,
    BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    f_idx = tl.arange(0, BLOCK_F)
    d_idx = tl.arange(0, BLOCK_D)
    r_mask = rows < num_rows
    rd_mask = r_mask[:, None] & (d_idx < head_dim)[None, :]
    tile_mask = rd_mask[:, None, :] & (f_idx < num_frames)[None, :, None]

    # qk_scale already holds log2(e), so the logits below are base-2.
    q = _load_tile(q_ptr, _row_offsets(rows, num_heads, sq_n, sq_h), f_idx, d_idx, sq_f, sq_d, tile_mask)
    q = q * qk_scale
    k_off = _row_offsets(rows, num_heads, sk_n, sk_h)
    v_off = _row_offsets(rows, num_heads, sv_n, sv_h)

    m = tl.full((BLOCK_R, BLOCK_F), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_R, BLOCK_F), tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_F, BLOCK_D), tl.float32)
    for j in range(0, num_frames):
        k_j = tl.load(k_ptr + k_off[:, None] + j * sk_f + d_idx[None, :] * sk_d, mask=rd_mask, other=0.0)
        v_j = tl.load(v_ptr + v_off[:, None] + j * sv_f + d_idx[None, :] * sv_d, mask=rd_mask, other=0.0)
        s = tl.sum(q * k_j.to(tl.float32)[:, None, :], axis=2)  # (BLOCK_R, BLOCK_F)
        m_new = tl.maximum(m, s)
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new)
        l = l * alpha + p
        acc = acc * alpha[:, :, None] + p[:, :, None] * v_j.to(tl.float32)[:, None, :]
        m = m_new

    out = acc / l[:, :, None]
    o_off = _row_offsets(rows, num_heads, so_n, so_h)
    o_ptrs = o_ptr + o_off[:, None, None] + f_idx[None, :, None] * so_f + d_idx[None, None, :] * so_d
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=tile_mask)
    # lse is a contiguous (rows, F) fp32 buffer, stored in natural log.
    lse_ptrs = lse_ptr + rows.to(tl.int64)[:, None] * num_frames + f_idx[None, :]
    lse_mask = r_mask[:, None] & (f_idx < num_frames)[None, :]
    tl.store(lse_ptrs, (m + tl.log2(l)) * 0.6931471805599453, mask=lse_mask)


@triton.jit
def _bwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, lse_ptr, dq_ptr, dk_ptr, dv_ptr,
    num_rows, num_heads, num_frames, head_dim, scale,
    sq_n, sq_h, sq_f, sq_d,
    sk_n, sk_h, sk_f, sk_d,
    sv_n, sv_h, sv_f, sv_d,
    so_n, so_h, so_f, so_d,
    sdo_n, sdo_h, sdo_f, sdo_d,
    sg_n, sg_h, sg_f, sg_d,
    BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dq, dk, dv of one block of rows; dq/dk/dv share the strides sg_* (freshly allocated, contiguous)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    f_idx = tl.arange(0, BLOCK_F)
    d_idx = tl.arange(0, BLOCK_D)
    r_mask = rows < num_rows
    f_mask = f_idx < num_frames
    rd_mask = r_mask[:, None] & (d_idx < head_dim)[None, :]
    tile_mask = rd_mask[:, None, :] & f_mask[None, :, None]

    q = _load_tile(q_ptr, _row_offsets(rows, num_heads, sq_n, sq_h), f_idx, d_idx, sq_f, sq_d, tile_mask)
    do = _load_tile(do_ptr, _row_offsets(rows, num_heads, sdo_n, sdo_h), f_idx, d_idx, sdo_f, sdo_d, tile_mask)
    o = _load_tile(o_ptr, _row_offsets(rows, num_heads, so_n, so_h), f_idx, d_idx, so_f, so_d, tile_mask)
    delta = tl.sum(do * o, axis=2)  # (BLOCK_R, BLOCK_F): rowsum(dO * O) = sum_j P_ij dP_ij
    lse_ptrs = lse_ptr + rows.to(tl.int64)[:, None] * num_frames + f_idx[None, :]
    # Padded query frames get lse = +inf so their P is exactly 0.
    lse2 = tl.load(lse_ptrs, mask=r_mask[:, None] & f_mask[None, :], other=float("inf")) * 1.4426950408889634
    q2 = q * (scale * 1.4426950408889634)

    k_off = _row_offsets(rows, num_heads, sk_n, sk_h)
    v_off = _row_offsets(rows, num_heads, sv_n, sv_h)
    g_off = _row_offsets(rows, num_heads, sg_n, sg_h)
    dq = tl.zeros((BLOCK_R, BLOCK_F, BLOCK_D), tl.float32)
    for j in range(0, num_frames):
        k_j = tl.load(k_ptr + k_off[:, None] + j * sk_f + d_idx[None, :] * sk_d, mask=rd_mask, other=0.0)
        v_j = tl.load(v_ptr + v_off[:, None] + j * sv_f + d_idx[None, :] * sv_d, mask=rd_mask, other=0.0)
        k_j = k_j.to(tl.float32)
        v_j = v_j.to(tl.float32)
        p = tl.exp2(tl.sum(q2 * k_j[:, None, :], axis=2) - lse2)  # P[:, :, j], (BLOCK_R, BLOCK_F)
        dv_j = tl.sum(p[:, :, None] * do, axis=1)  # (BLOCK_R, BLOCK_D)
        dp = tl.sum(do * v_j[:, None, :], axis=2)
        ds = p * (dp - delta)  # gradient of the (scaled) logits
        dq += ds[:, :, None] * k_j[:, None, :]
        dk_j = tl.sum(ds[:, :, None] * q, axis=1) * scale
        g_ptrs = g_off[:, None] + j * sg_f + d_idx[None, :] * sg_d
        tl.store(dv_ptr + g_ptrs, dv_j.to(dv_ptr.dtype.element_ty), mask=rd_mask)
        tl.store(dk_ptr + g_ptrs, dk_j.to(dk_ptr.dtype.element_ty), mask=rd_mask)

    dq_ptrs = dq_ptr + g_off[:, None, None] + f_idx[None, :, None] * sg_f + d_idx[None, None, :] * sg_d
    tl.store(dq_ptrs, (dq * scale).to(dq_ptr.dtype.element_ty), mask=tile_mask)


# triton.jit decided at decoration time; only interpreted kernels can run on CPU tensors.
_INTERPRETED = type(_fwd_kernel).__name__ == "InterpretedFunction"


def _launch_config(num_frames: int, head_dim: int) -> dict[str, int]:
    """BLOCK_R, BLOCK_F, BLOCK_D (powers of two, tile bounded by TILE_ELEMENTS) and num_warps (~8 elements/thread)."""
    block_f = max(2, triton.next_power_of_2(num_frames))
    block_d = max(2, triton.next_power_of_2(head_dim))
    block_r = max(1, min(64, TILE_ELEMENTS // (block_f * block_d)))
    num_warps = min(8, max(2, block_r * block_f * block_d // 256))
    return dict(BLOCK_R=block_r, BLOCK_F=block_f, BLOCK_D=block_d, num_warps=num_warps)


def _batch_chunks(num_batch: int, num_heads: int):
    """Slices of the leading batch so that one launch covers at most MAX_ROWS_PER_LAUNCH (n, h) rows."""
    step = max(1, MAX_ROWS_PER_LAUNCH // num_heads)
    for start in range(0, num_batch, step):
        yield slice(start, min(start + step, num_batch))


def _forward(q, k, v, scale):
    """Returns o (N, H, F, D) in q's dtype, contiguous, and lse (N, H, F) fp32."""
    num_batch, num_heads, num_frames, head_dim = q.shape
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((num_batch, num_heads, num_frames), dtype=torch.float32, device=q.device)
    config = _launch_config(num_frames, head_dim)
    for sl in _batch_chunks(num_batch, num_heads):
        qc, kc, vc, oc = q[sl], k[sl], v[sl], o[sl]
        num_rows = qc.shape[0] * num_heads
        _fwd_kernel[(triton.cdiv(num_rows, config["BLOCK_R"]),)](
            qc, kc, vc, oc, lse[sl],
            num_rows, num_heads, num_frames, head_dim, scale * _LOG2E,
            *qc.stride(), *kc.stride(), *vc.stride(), *oc.stride(),
            **config,
        )
    return o, lse


def _backward(q, k, v, o, lse, grad_out, scale):
    """Returns dq, dk, dv, contiguous, in q's dtype."""
    num_batch, num_heads, num_frames, head_dim = q.shape
    dq, dk, dv = (torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
    config = _launch_config(num_frames, head_dim)
    for sl in _batch_chunks(num_batch, num_heads):
        qc, kc, vc, oc, doc = q[sl], k[sl], v[sl], o[sl], grad_out[sl]
        num_rows = qc.shape[0] * num_heads
        _bwd_kernel[(triton.cdiv(num_rows, config["BLOCK_R"]),)](
            qc, kc, vc, oc, doc, lse[sl], dq[sl], dk[sl], dv[sl],
            num_rows, num_heads, num_frames, head_dim, scale,
            *qc.stride(), *kc.stride(), *vc.stride(), *oc.stride(), *doc.stride(), *dq[sl].stride(),
            **config,
        )
    return dq, dk, dv


class _TemporalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale):
        o, lse = _forward(q, k, v, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale = scale
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, o, lse = ctx.saved_tensors
        if grad_out.dtype != q.dtype:
            grad_out = grad_out.to(q.dtype)
        dq, dk, dv = _backward(q, k, v, o, lse, grad_out, ctx.scale)
        return dq, dk, dv, None


def _validate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """ValueError naming the problem for anything the kernels do not support."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = f"{t.dim()}-D" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"temporal_attention: {name} must be a 4-D (N, H, F, D) tensor, got {got}")
        if t.dtype not in _SUPPORTED_DTYPES:
            raise ValueError(f"temporal_attention: {name} has dtype {t.dtype}; supported: fp32, bf16, fp16")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(
            f"temporal_attention: q, k, v shapes must match, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"temporal_attention: q, k, v dtypes must match, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"temporal_attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    _, _, num_frames, head_dim = q.shape
    if not 1 <= num_frames <= MAX_FRAMES:
        raise ValueError(f"temporal_attention: F (frames, dim 2) = {num_frames}; the kernel supports 1..{MAX_FRAMES}")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"temporal_attention: D (head size, dim 3) = {head_dim}; the kernel supports 1..{MAX_HEAD_DIM}")
    if q.device.type != "cuda" and not _INTERPRETED:
        raise ValueError(
            f"temporal_attention: tensors are on {q.device} but the Triton kernel needs CUDA (or TRITON_INTERPRET=1 "
            "set before triton is imported, for slow CPU testing); select another backend with `--attention sdpa`"
        )


def temporal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """softmax(scale * Q K^T) V over the frame axis with the Triton kernels (no mask), differentiable.

    Args:
        q, k, v: (N, H, F, D) tensors, one dtype among fp32 / bf16 / fp16, any strides; F <= 32, D <= 128.
        scale: logit scale; None means 1 / sqrt(D).

    Returns:
        (N, H, F, D) contiguous tensor in the input dtype. Math is fp32 inside; the backward recomputes the
        attention probabilities from a saved fp32 log-sum-exp (N, H, F).
    """
    _validate(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if q.numel() == 0:
        return _empty_output(q, k, v)
    return _TemporalAttention.apply(q, k, v, scale)


def _empty_output(q, k, v):
    """Zero rows: nothing to launch; keep the graph connected so autograd still works."""
    return q * 0 + (k.sum() + v.sum()) * 0
