"""Fused elementwise ops for the decoder layer: residual add + RMSNorm, rotary on q and k, SiLU-and-mul.

A decode step at batch 1 is bound by kernel launches, not by bytes: unfused, RMSNorm in fp32 costs ~8 kernels,
rotary ~10 per tensor. Each op here is one Triton launch on CUDA (no host syncs, so CUDA-graph capture is safe)
and falls back to the torch reference elsewhere. The `*_ref` functions define the numerics (Hugging Face's);
the `*_triton` functions compute the same thing and take optional output buffers (tests poison them; rotary
may write in place). Rounding: add_rms_norm and rotary round wherever torch rounds (the residual sum and the
normalised row to the input dtype; in rotary cos/sin and every product and sum), so in the interpreter rotary
in bf16/fp16 equals the reference bit for bit; compiled for a GPU, contracted multiply-adds may move a value by
one unit in the last place. silu_and_mul stays in fp32 and rounds once, where torch also rounds silu(gate).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

triton = None
# Import triton only where its kernels can run. On a CPU-only host an eager import would decorate triton's own
# library (tl.sum, tl.cdiv...) for compilation before a test sets TRITON_INTERPRET, breaking the interpreter.
if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
    try:
        import triton
        import triton.language as tl
    except ImportError:  # no triton installed: the torch references serve
        triton = None


def use_triton(x: torch.Tensor) -> bool:
    """True when the fused Triton kernels should run on x (set LMSTACK_FUSED=0 to compare against torch)."""
    return x.is_cuda and triton is not None and os.environ.get("LMSTACK_FUSED", "1") != "0"


# ---------------------------------------------------------------------------------------------- torch references


def add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * rms_norm(r), r) with r = x + residual: normalise in fp32, round to x's dtype, then scale."""
    r = x if residual is None else x + residual
    h = r.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype), r


def rotary_ref(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Half-split rotary of q [T, H, Dh] and k [T, Hkv, Dh] with tables cos/sin [P, Dh/2], in the inputs' dtype."""

    def rotate(x: torch.Tensor) -> torch.Tensor:
        c = cos[positions].unsqueeze(1).to(x.dtype)  # [T, 1, Dh/2]
        s = sin[positions].unsqueeze(1).to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)

    return rotate(q), rotate(k)


def silu_and_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, gate and up being the two halves of the last dim."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


# ------------------------------------------------------------------------------------------------ Triton kernels

if triton is not None:

    @triton.jit
    def _add_rms_norm_kernel(
        x_ptr, res_ptr, w_ptr, y_ptr, r_ptr,
        x_stride, res_stride, y_stride, r_stride,
        D, eps,
        HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        """One row per program; r is rounded to x's dtype before it is normalised, as the torch add does."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < D
        x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            res = tl.load(res_ptr + row * res_stride + cols, mask=mask, other=0.0)
            x = (x.to(tl.float32) + res.to(tl.float32)).to(x_ptr.dtype.element_ty)
            tl.store(r_ptr + row * r_stride + cols, x, mask=mask)
        h = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(h * h, axis=0) / D + eps)
        normed = (h * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * y_stride + cols, (w * normed).to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rotate_heads(
        src_ptr, dst_ptr, src_tok_stride, src_head_stride, dst_tok_stride, dst_head_stride,
        tok, head0, n_heads, c, s,
        HALF: tl.constexpr, HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr,
    ):  # fmt: skip
        """Rotate heads [head0, head0 + HEADS) of one token; each product and sum is rounded to the input dtype."""
        dtype = src_ptr.dtype.element_ty
        heads = head0 + tl.arange(0, HEADS)
        cols = tl.arange(0, BLOCK_HALF)
        mask = (heads[:, None] < n_heads) & (cols[None, :] < HALF)
        src = src_ptr + tok * src_tok_stride + heads[:, None] * src_head_stride + cols[None, :]
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
        c = c[None, :]
        s = s[None, :]
        o1 = (x1 * c).to(dtype).to(tl.float32) - (x2 * s).to(dtype).to(tl.float32)
        o2 = (x2 * c).to(dtype).to(tl.float32) + (x1 * s).to(dtype).to(tl.float32)
        dst = dst_ptr + tok * dst_tok_stride + heads[:, None] * dst_head_stride + cols[None, :]
        tl.store(dst, o1.to(dst_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + HALF, o2.to(dst_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rotary_kernel(
        q_ptr, k_ptr, qo_ptr, ko_ptr, pos_ptr, cos_ptr, sin_ptr,
        q_tok_stride, q_head_stride, k_tok_stride, k_head_stride,
        qo_tok_stride, qo_head_stride, ko_tok_stride, ko_head_stride, table_stride,
        H, HKV,
        HALF: tl.constexpr, HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr,
    ):  # fmt: skip
        """Grid (tokens, q head blocks + k head blocks): q and k in one launch; cos/sin rounded as the reference."""
        tok = tl.program_id(0).to(tl.int64)
        block = tl.program_id(1)
        pos = tl.load(pos_ptr + tok).to(tl.int64)
        cols = tl.arange(0, BLOCK_HALF)
        dtype = q_ptr.dtype.element_ty
        c = tl.load(cos_ptr + pos * table_stride + cols, mask=cols < HALF, other=0.0).to(dtype).to(tl.float32)
        s = tl.load(sin_ptr + pos * table_stride + cols, mask=cols < HALF, other=0.0).to(dtype).to(tl.float32)
        q_blocks = tl.cdiv(H, HEADS)
        if block < q_blocks:
            _rotate_heads(q_ptr, qo_ptr, q_tok_stride, q_head_stride, qo_tok_stride, qo_head_stride,
                          tok, block * HEADS, H, c, s, HALF, HEADS, BLOCK_HALF)
        else:
            _rotate_heads(k_ptr, ko_ptr, k_tok_stride, k_head_stride, ko_tok_stride, ko_head_stride,
                          tok, (block - q_blocks) * HEADS, HKV, c, s, HALF, HEADS, BLOCK_HALF)

    @triton.jit
    def _silu_and_mul_kernel(
        x_ptr, out_ptr, x_stride, out_stride, inter,
        BLOCK: tl.constexpr,
    ):  # fmt: skip
        """Grid (rows, column blocks of the intermediate size); fp32 math, one rounding at the store."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < inter
        gate = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + row * x_stride + inter + cols, mask=mask, other=0.0).to(tl.float32)
        out = gate * tl.sigmoid(gate) * up
        tl.store(out_ptr + row * out_stride + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    """x with a contiguous last dim (the kernels index columns directly); strided rows pass as they are."""
    return x if x.stride(-1) == 1 else x.contiguous()


# --------------------------------------------------------------------------------------------- Triton entry points


def add_rms_norm_triton(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """add_rms_norm_ref in one launch, over the last dim of x [..., D]; out / residual_out are optional buffers."""
    shape, D = x.shape, x.shape[-1]
    x2 = _unit_stride(x.reshape(-1, D))
    rows = x2.shape[0]
    if out is None:
        out = torch.empty(shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    y2 = out.view(-1, D)
    if residual is None:
        r, r2, res2 = x, x2, x2
    else:
        res2 = _unit_stride(residual.reshape(-1, D))
        r = torch.empty_like(x, memory_format=torch.contiguous_format) if residual_out is None else residual_out
        r2 = r.view(-1, D)
    if rows:
        block = triton.next_power_of_2(D)
        _add_rms_norm_kernel[(rows,)](
            x2, res2, weight.contiguous(), y2, r2,
            x2.stride(0), res2.stride(0), y2.stride(0), r2.stride(0),
            D, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=max(1, min(16, block // 512)),
        )  # fmt: skip
    return out, r


def rotary_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_out: torch.Tensor | None = None,
    k_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """rotary_ref in one launch for q and k (strided views allowed); q_out=q, k_out=k rotates in place.

    q and k share a dtype; output buffers need a unit-stride last dim (their rows and heads may be strided).
    """
    if q.dtype != k.dtype:
        raise ValueError(f"q and k dtypes differ: {q.dtype} vs {k.dtype}")
    if (q_out is not None and q_out.stride(-1) != 1) or (k_out is not None and k_out.stride(-1) != 1):
        raise ValueError("rotary output buffers need a unit-stride last dim")
    T, H, Dh = q.shape
    Hkv = k.shape[1]
    half = Dh // 2
    q, k = _unit_stride(q), _unit_stride(k)
    positions, cos, sin = positions.contiguous(), cos.contiguous(), sin.contiguous()
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if q_out is None else q_out
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device) if k_out is None else k_out
    if T:
        block_half = triton.next_power_of_2(half)
        heads = max(1, min(triton.next_power_of_2(max(H, Hkv)), 256 // block_half))
        grid = (T, triton.cdiv(H, heads) + triton.cdiv(Hkv, heads))
        _rotary_kernel[grid](
            q, k, q_out, k_out, positions, cos, sin,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1), cos.stride(0),
            H, Hkv,
            HALF=half, HEADS=heads, BLOCK_HALF=block_half, num_warps=2,
        )  # fmt: skip
    return q_out, k_out


def silu_and_mul_triton(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """silu_and_mul_ref in one launch over gate_up [..., 2I]; out [..., I] is an optional buffer."""
    inter = gate_up.shape[-1] // 2
    x2 = _unit_stride(gate_up.reshape(-1, 2 * inter))
    if out is None:
        out = torch.empty((*gate_up.shape[:-1], inter), dtype=gate_up.dtype, device=gate_up.device)
    out2 = out.view(-1, inter)
    if x2.shape[0] and inter:
        block = min(1024, triton.next_power_of_2(inter))
        grid = (x2.shape[0], triton.cdiv(inter, block))
        _silu_and_mul_kernel[grid](x2, out2, x2.stride(0), out2.stride(0), inter, BLOCK=block, num_warps=4)
    return out


# ---------------------------------------------------------------------------------------------------- public ops


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(normed, r): r = x + residual (x when None) is the new residual stream, normed = RMSNorm(r) * weight."""
    if use_triton(x):
        return add_rms_norm_triton(x, residual, weight, eps)
    return add_rms_norm_ref(x, residual, weight, eps)


def rotary(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hugging Face half-split rotary of q [T, H, Dh] and k [T, Hkv, Dh] at positions [T]; new tensors."""
    if use_triton(q):
        return rotary_triton(q, k, positions, cos, sin)
    return rotary_ref(q, k, positions, cos, sin)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU activation: silu(gate_up[..., :I]) * gate_up[..., I:]."""
    if use_triton(gate_up):
        return silu_and_mul_triton(gate_up)
    return silu_and_mul_ref(gate_up)
