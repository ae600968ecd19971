"""K/V in pinned host memory, and the GPU kernels that write and read it without staging copies.

Pinned host memory is mapped into the GPU's address space, so a Triton kernel can store a new token's K/V
straight into it and load just the rows it needs (a few hundred bytes each) over the bus. `HostKVCache` holds
every layer's paged K/V there; `gather_rows` reads the rows a top-k selection names into a GPU buffer. On a
CPU (tests) the same kernels run in Triton's interpreter over ordinary memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_GATHER_TILE = 64  # selected tokens per gather program


@triton.jit
def _scatter_kernel(src_ptr, slots_ptr, dst_ptr, stride_src, stride_dst, width, BLOCK: tl.constexpr):
    """One new token: its K (or V) row of `width` = Hkv * D values into its slot of the (host) cache."""
    t = tl.program_id(0)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    i = tl.arange(0, BLOCK)
    x = tl.load(src_ptr + t.to(tl.int64) * stride_src + i, mask=i < width)
    tl.store(dst_ptr + slot * stride_dst + i, x, mask=i < width)


@triton.jit
def _gather_kernel(
    k_ptr, v_ptr, tables_ptr, idx_ptr, out_k_ptr, out_v_ptr,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_bt, stride_ib, stride_ih,
    stride_ob, stride_ot, stride_oh,
    n_idx, out_blocks_per_seq,
    ROW_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    OUT_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One (sequence, idx row, tile of the list): the selected tokens' K/V rows, in list order, into the buffer."""
    b = tl.program_id(0)
    row = tl.program_id(1)
    j = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    pos = tl.load(idx_ptr + b.to(tl.int64) * stride_ib + row * stride_ih + j, mask=j < n_idx, other=-1)
    valid = pos >= 0
    pos = tl.where(valid, pos, 0)
    block = tl.load(tables_ptr + b.to(tl.int64) * stride_bt + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    slot = pos % BLOCK_SIZE
    kvh = (row * ROW_HEADS) // GROUP
    d = tl.arange(0, HEAD_DIM)
    out_block = (b * out_blocks_per_seq + j // OUT_BLOCK).to(tl.int64)
    out = out_block[:, None] * stride_ob + (j % OUT_BLOCK)[:, None] * stride_ot + row * stride_oh + d[None, :]
    k = tl.load(k_ptr + block[:, None] * stride_kb + slot[:, None] * stride_kt + kvh * stride_kh + d[None, :],
                mask=valid[:, None])
    tl.store(out_k_ptr + out, k, mask=valid[:, None])
    v = tl.load(v_ptr + block[:, None] * stride_vb + slot[:, None] * stride_vt + kvh * stride_vh + d[None, :],
                mask=valid[:, None])
    tl.store(out_v_ptr + out, v, mask=valid[:, None])


class HostKVCache:
    """Per layer K and V [num_blocks, block_size, Hkv, D], in pinned host memory when the device is a GPU."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, n_kv: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        pin = device.type == "cuda"
        shape = (num_blocks, block_size, n_kv, head_dim)
        self.device = device
        self.k = [torch.zeros(shape, dtype=dtype, pin_memory=pin) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, pin_memory=pin) for _ in range(num_layers)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """k, v [T, Hkv, D] on the device into their slots [T]: the GPU writes host memory directly."""
        width = k.shape[1] * k.shape[2]
        for src, dst in ((k, self.k[layer]), (v, self.v[layer])):
            if src.stride(2) != 1 or src.stride(1) != src.shape[2]:
                src = src.contiguous()
            _scatter_kernel[(src.shape[0],)](src, slots, dst, src.stride(0), width, width,
                                             BLOCK=triton.next_power_of_2(width), num_warps=4)


def gather_rows(k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor, idx: torch.Tensor,
                out_k: torch.Tensor, out_v: torch.Tensor, n_heads: int) -> None:
    """The K/V rows idx selects, read from (host) caches into buffers [B * nb, _BUF_BLOCK, rows, D].

    idx [B, rows, k] int32 positions (-1 skipped), rows = Hq (one list per query head) or Hkv (per KV head);
    list entry j of (b, row) lands at position j of sequence b in the buffer, viewed as a paged cache.
    """
    batch, rows, n_idx = idx.shape
    n_kv, head_dim = k_cache.shape[2], k_cache.shape[3]
    if batch == 0 or n_idx == 0:
        return
    blocks_per_seq = out_k.shape[0] // batch
    _gather_kernel[(batch, rows, triton.cdiv(n_idx, _GATHER_TILE))](
        k_cache, v_cache, block_tables, idx, out_k, out_v,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), idx.stride(0), idx.stride(1),
        out_k.stride(0), out_k.stride(1), out_k.stride(2),
        n_idx, blocks_per_seq,
        ROW_HEADS=n_heads // rows, GROUP=n_heads // n_kv, HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1],
        OUT_BLOCK=out_k.shape[1], BLOCK_N=_GATHER_TILE, num_warps=4,
    )  # fmt: skip
