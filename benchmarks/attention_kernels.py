"""Check and time the Triton paged-attention kernels against torch SDPA on a GPU.

Decode: B sequences of one context length over a paged bf16 cache whose blocks are shuffled within each
sequence. Decode attention ignores key order, so SDPA over a zero-copy [B, n_kv, S, D] view of the same cache
(the group's query heads as G query rows) is both the reference and the baseline: what a non-paged flash
kernel reaches on the same bytes. Reported bandwidth counts the K and V bytes that must be read.

    python benchmarks/attention_kernels.py [--out results.json]
    TRITON_INTERPRET=1 python benchmarks/attention_kernels.py --tiny   # correctness only, runs on a CPU
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # runnable from a plain checkout

import triton  # noqa: E402
from triton.testing import do_bench, do_bench_cudagraph  # noqa: E402

from lmstack.engine.attention.torch_ref import paged_attention_ref  # noqa: E402
from lmstack.engine.attention.triton_paged import (  # noqa: E402
    paged_decode_attention,
    paged_prefill_attention,
)

KV_BYTES_LIMIT = 40e9


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def shuffled_cache(
    batch: int, ctx: int, n_kv: int, head_dim: int, block_size: int, dtype: torch.dtype, device: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random caches where sequence b owns blocks b*nb..(b+1)*nb-1, listed in a shuffled order."""
    n_blocks = triton.cdiv(ctx, block_size)
    shape = (batch * n_blocks, block_size, n_kv, head_dim)
    k = torch.randn(shape, device=device, dtype=dtype)
    v = torch.randn(shape, device=device, dtype=dtype)
    order = torch.argsort(torch.rand(batch, n_blocks, device=device), dim=1)
    tables = (order + torch.arange(batch, device=device)[:, None] * n_blocks).to(torch.int32)
    return k, v, tables


def contiguous_view(cache: torch.Tensor, batch: int, ctx: int) -> torch.Tensor:
    """[B, n_kv, ctx, D] strided view of a cache laid out sequence after sequence (no copy)."""
    n_kv, head_dim = cache.shape[2], cache.shape[3]
    return cache.view(batch, -1, n_kv, head_dim)[:, :ctx].transpose(1, 2)


def bench_decode(args: argparse.Namespace, batch: int, ctx: int) -> dict[str, float | int | str]:
    dtype = getattr(torch, args.dtype)
    n_heads, n_kv, head_dim = args.heads, args.kv_heads, args.head_dim
    group = n_heads // n_kv
    k, v, tables = shuffled_cache(batch, ctx, n_kv, head_dim, args.block_size, dtype, "cuda")
    q = torch.randn(batch, n_heads, head_dim, device="cuda", dtype=dtype)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    scale = head_dim**-0.5
    out = torch.full_like(q, float("nan"))
    kq, vq = contiguous_view(k, batch, ctx), contiguous_view(v, batch, ctx)
    qg = q.view(batch, n_kv, group, head_dim)

    def triton_fn() -> torch.Tensor:
        return paged_decode_attention(q, k, v, tables, lens, scale, out=out)

    def sdpa_fn() -> torch.Tensor:
        return F.scaled_dot_product_attention(qg, kq, vq, scale=scale)

    triton_fn()
    ref = sdpa_fn().reshape(batch, n_heads, head_dim)
    torch.cuda.synchronize()
    assert not out.isnan().any(), "unwritten output"
    err = rel_err(out, ref)
    kv_bytes = 2 * batch * ctx * n_kv * head_dim * k.element_size()
    t_triton = do_bench(triton_fn, warmup=25, rep=100, return_mode="median")
    t_graph = do_bench_cudagraph(triton_fn, rep=100, return_mode="median")
    t_sdpa = do_bench(sdpa_fn, warmup=25, rep=100, return_mode="median")
    return {
        "B": batch,
        "ctx": ctx,
        "kv_GB": kv_bytes / 1e9,
        "rel_err": err,
        "triton_us": t_triton * 1e3,
        "graph_us": t_graph * 1e3,
        "sdpa_us": t_sdpa * 1e3,
        "triton_GBps": kv_bytes / (t_triton * 1e-3) / 1e9,
        "graph_GBps": kv_bytes / (t_graph * 1e-3) / 1e9,
        "sdpa_GBps": kv_bytes / (t_sdpa * 1e-3) / 1e9,
    }


def bench_prefill(args: argparse.Namespace, q_len: int, ctx: int) -> dict[str, float | int | str]:
    """One sequence: q_len new tokens at the end of a ctx-token context (a chunk when q_len < ctx)."""
    dtype = getattr(torch, args.dtype)
    n_heads, n_kv, head_dim = args.heads, args.kv_heads, args.head_dim
    k, v, tables = shuffled_cache(1, ctx, n_kv, head_dim, args.block_size, dtype, "cuda")
    q = torch.randn(q_len, n_heads, head_dim, device="cuda", dtype=dtype)
    starts = torch.tensor([0, q_len], dtype=torch.int32, device="cuda")
    lens = torch.tensor([ctx], dtype=torch.int32, device="cuda")
    scale = head_dim**-0.5
    out = torch.full_like(q, float("nan"))

    def triton_fn() -> torch.Tensor:
        return paged_prefill_attention(q, k, v, tables, starts, lens, q_len, scale, out=out)

    triton_fn()
    ref = paged_attention_ref(q, k, v, tables, [0, q_len], [ctx], scale)
    err = rel_err(out, ref)
    # Baseline: SDPA over contiguous K/V with the heads expanded; query j sits at ctx - q_len + j.
    group = n_heads // n_kv
    kc, vc = (
        c[tables[0].long()]
        .reshape(-1, n_kv, head_dim)[:ctx]
        .repeat_interleave(group, 1)
        .transpose(0, 1)[None]
        for c in (k, v)
    )
    qc = q.transpose(0, 1)[None]
    mask = causal_lower_right(q_len, ctx)

    def sdpa_fn() -> torch.Tensor:
        return F.scaled_dot_product_attention(qc, kc, vc, attn_mask=mask, scale=scale)

    t_triton = do_bench(triton_fn, warmup=25, rep=100, return_mode="median")
    t_sdpa = do_bench(sdpa_fn, warmup=25, rep=100, return_mode="median")
    # Multiply-adds of QK^T and PV over the causally visible keys only.
    visible = q_len * (ctx - q_len) + q_len * (q_len + 1) / 2
    flops = 4 * n_heads * head_dim * visible
    return {
        "q_len": q_len,
        "ctx": ctx,
        "rel_err": err,
        "triton_us": t_triton * 1e3,
        "sdpa_us": t_sdpa * 1e3,
        "triton_TFLOPs": flops / (t_triton * 1e-3) / 1e12,
        "sdpa_TFLOPs": flops / (t_sdpa * 1e-3) / 1e12,
    }


def tiny_check() -> None:
    """Correctness on one tiny shape; fp32 so it also runs under TRITON_INTERPRET=1 on a CPU."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    batch, n_heads, n_kv, head_dim, block_size = 2, 4, 2, 64, 16
    seq_lens = [100, 37]
    k, v, tables = shuffled_cache(batch, 112, n_kv, head_dim, block_size, torch.float32, device)
    q = torch.randn(batch, n_heads, head_dim, device=device)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    out = torch.full_like(q, float("nan"))
    paged_decode_attention(q, k, v, tables, lens, head_dim**-0.5, out=out, num_splits=2)
    ref = paged_attention_ref(q, k, v, tables, [0, 1, 2], seq_lens, head_dim**-0.5)
    err = rel_err(out, ref)
    print(f"tiny decode check: rel_err {err:.2e}")
    if out.isnan().any() or err > 1e-3:
        raise SystemExit("tiny decode check FAILED")


def print_table(rows: list[dict[str, float | int | str]]) -> None:
    if not rows:
        return
    keys = list(rows[0])
    cells = [[f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in keys] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(keys)]
    print("  ".join(c.rjust(w) for c, w in zip(keys, widths, strict=True)))
    for row in cells:
        print("  ".join(x.rjust(w) for x, w in zip(row, widths, strict=True)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tiny", action="store_true", help="only a tiny correctness check (CPU interpreter ok)"
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192, 32768])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--no-prefill", action="store_true")
    parser.add_argument("--out", type=Path, help="write results (with command and environment) as JSON here")
    args = parser.parse_args()

    if args.tiny:
        tiny_check()
        return
    if not torch.cuda.is_available():
        raise SystemExit("timing needs a CUDA device (use --tiny for the CPU check)")

    elem = torch.empty(0, dtype=getattr(torch, args.dtype)).element_size()
    decode_rows = []
    for batch in args.batches:
        for ctx in args.contexts:
            if 2 * batch * ctx * args.kv_heads * args.head_dim * elem > KV_BYTES_LIMIT:
                continue
            decode_rows.append(bench_decode(args, batch, ctx))
            torch.cuda.empty_cache()  # the next case's cache may be large
            print(decode_rows[-1], flush=True)
    prefill_rows = []
    if not args.no_prefill:
        for q_len, ctx in [(512, 512), (2048, 2048), (8192, 8192), (512, 8192), (2048, 32768)]:
            prefill_rows.append(bench_prefill(args, q_len, ctx))
            print(prefill_rows[-1], flush=True)

    if args.out:
        env = {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "triton": triton.__version__,
            "device": torch.cuda.get_device_name(),
        }
        result = {"command": sys.argv, "environment": env, "decode": decode_rows, "prefill": prefill_rows}
        args.out.write_text(json.dumps(result, indent=2))
    print(f"\ndecode ({args.heads}/{args.kv_heads} heads, D={args.head_dim}, {args.dtype}, "
          f"block {args.block_size}; medians):")  # fmt: skip
    print_table(decode_rows)
    if prefill_rows:
        print("\nprefill (one sequence, causal):")
        print_table(prefill_rows)


if __name__ == "__main__":
    main()
