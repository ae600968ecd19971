"""Double Sparsity Triton ops against the torch reference (`double_sparse_ref`), on fresh random paged caches.

Without CUDA the kernels run in Triton's interpreter (small shapes; fp32 and fp16, since bf16 dots are wrong
there; bf16 at Llama-3-8B shapes is the gpu test). Every slot no sequence owns holds NaN, in the K/V and in
the label caches: a kernel that reads past a sequence's end, or follows an unused block-table entry,
poisons its output.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernels' @triton.jit
pytest.importorskip("triton")

from lmstack.engine.attention import double_sparse_ref as ref  # noqa: E402
from lmstack.engine.attention import double_sparse_triton as tri  # noqa: E402
from lmstack.engine.attention import filter_topk  # noqa: E402
from lmstack.engine.attention.torch_ref import paged_attention_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(out: torch.Tensor, expected: torch.Tensor) -> float:
    return ((out.double() - expected.double()).norm() / expected.double().norm()).item()


def tol(dtype: torch.dtype) -> float:
    """METHOD.md: fp32 lands far under 1e-3; 16-bit operands between 1e-3 and 1e-2."""
    return 1e-5 if dtype == torch.float32 else 1e-2


def paged_caches(
    seq_lens: list[int], block_size: int, n_kv: int, dims: list[int], dtype: torch.dtype, gen: torch.Generator
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Random paged caches [num_blocks, block_size, n_kv, dim] (one per entry of dims) sharing one block table,
    with shuffled blocks, NaN in every slot no sequence owns, and junk ids in the unused table columns."""
    need = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(need) + 2
    order = torch.randperm(num_blocks, generator=gen)
    spare = order[sum(need):]
    tables = spare[torch.randint(len(spare), (len(seq_lens), max(need) + 1), generator=gen)].to(torch.int32)
    owned = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    used = 0
    for i, (s, n) in enumerate(zip(seq_lens, need, strict=True)):
        blocks = order[used:used + n]
        used += n
        tables[i, :n] = blocks.to(torch.int32)
        slots = torch.zeros(n * block_size, dtype=torch.bool)
        slots[:s] = True
        owned[blocks] = slots.view(n, block_size)
    caches = []
    for dim in dims:
        c = torch.randn(num_blocks, block_size, n_kv, dim, generator=gen).to(dtype)
        c[~owned] = float("nan")
        caches.append(c.to(DEVICE))
    return caches, tables.to(DEVICE)


def lens_tensor(seq_lens: list[int]) -> torch.Tensor:
    return torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize(
    ("n_heads", "n_kv", "r", "block_size", "dtype", "int8"),
    [
        (8, 2, 8, 16, torch.float32, False),
        (4, 4, 4, 32, torch.float16, False),
        (6, 2, 16, 16, torch.float32, True),
        (8, 1, 12, 64, torch.float16, True),
    ],
)
def test_label_scores_match_reference(
    n_heads: int, n_kv: int, r: int, block_size: int, dtype: torch.dtype, int8: bool
) -> None:
    gen = torch.Generator().manual_seed(n_heads * 100 + r)
    seq_lens = [1, 300, 77, 256]
    (labels,), tables = paged_caches(seq_lens, block_size, n_kv, [r], dtype, gen)
    scale = None
    if int8:
        flat, flat_scale = ref.quantize_labels(labels.reshape(-1, n_kv, r).nan_to_num(0.0))
        labels = flat.view(labels.shape)
        scale = flat_scale.view(labels.shape[:3])
    q_label = torch.randn(len(seq_lens), n_heads, r, generator=gen).to(dtype).to(DEVICE)
    lens = lens_tensor(seq_lens)
    got = tri.ds_label_scores(q_label, labels, tables, lens, scale)
    want = ref.ds_label_scores(q_label, labels, tables, lens, scale)
    assert got.shape == want.shape == (len(seq_lens), n_heads, max(seq_lens)) and got.dtype == torch.float32
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(got)), "-inf exactly at positions >= seq_len, finite elsewhere"
    assert (got[~finite] == float("-inf")).all()
    err = rel_err(got[finite], want[finite])
    assert err < tol(dtype), f"relative error {err:.2e}"
    # 16-bit storage (score_bits=16; fp16 here, bf16 on the GPU test): the fp32 sums, rounded once.
    half = tri.ds_label_scores(q_label, labels, tables, lens, scale, out_dtype=torch.float16)
    assert half.dtype == torch.float16 and torch.equal(torch.isfinite(half), finite)
    assert rel_err(half[finite].float(), want[finite]) < 1e-3
    # forced sink and local tokens: +inf exactly where the reference puts it, the rest unchanged
    got = tri.ds_label_scores(q_label, labels, tables, lens, scale, sink=3, local=5)
    want = ref.ds_label_scores(q_label, labels, tables, lens, scale, sink=3, local=5)
    assert torch.equal(got == float("inf"), want == float("inf")) and (want == float("inf")).any()
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(got)) and rel_err(got[finite], want[finite]) < tol(dtype)


@pytest.mark.parametrize("k", [1, 16, 90, 400])
def test_topk_selects_the_reference_set(k: int) -> None:
    gen = torch.Generator().manual_seed(k)
    seq_lens = [5, 300, 90, 1, 211]
    scores = torch.randn(len(seq_lens), 4, max(seq_lens), generator=gen).to(DEVICE)
    lens = lens_tensor(seq_lens)
    scores[torch.arange(scores.shape[-1], device=DEVICE).expand_as(scores) >= lens.view(-1, 1, 1)] = float("-inf")
    got = tri.ds_topk(scores, lens, k)
    want = ref.ds_topk(scores, lens, k)
    assert got.shape == (len(seq_lens), 4, k) and got.dtype == torch.int32
    assert torch.equal(got.sort(-1).values, want.sort(-1).values), "a different set of positions"
    for b, s in enumerate(seq_lens):
        if s < k:  # the -1 entries form the tail, after positions 0..s-1
            assert (got[b, :, s:] == -1).all() and (got[b, :, :s] >= 0).all()
        assert (got[b] < s).all()


def check_topk(method: str, seq_lens: list[int], heads: int, k: int, dtype: torch.dtype, seed: int,
               ties: bool = False) -> None:
    """`ds_topk(method=...)` keeps the same multiset of scores as torch.topk, at distinct valid positions."""
    gen = torch.Generator().manual_seed(seed)
    shape = (len(seq_lens), heads, max(seq_lens))
    raw = torch.randint(-6, 6, shape, generator=gen).float() if ties else torch.randn(shape, generator=gen) * 50
    scores = raw.to(dtype).to(DEVICE)
    lens = lens_tensor(seq_lens)
    past_end = torch.arange(shape[-1], device=DEVICE).expand_as(scores) >= lens.view(-1, 1, 1)
    scores[past_end] = float("nan")  # never read: a kernel that looks past seq_len picks NaN, the largest key
    got = tri.ds_topk(scores, lens, k, method=method)
    want = ref.ds_topk(scores.masked_fill(past_end, float("-inf")), lens, k)
    assert got.shape == (*shape[:2], k) and got.dtype == torch.int32
    for b, s in enumerate(seq_lens):
        for h in range(heads):
            if s <= k:  # every position, in order, then the -1 tail
                whole = torch.cat([torch.arange(s), torch.full((k - s,), -1)]).to(got)
                assert torch.equal(got[b, h], whole)
                continue
            pos = got[b, h].long()
            assert len(set(pos.tolist())) == k and int(pos.min()) >= 0 and int(pos.max()) < s
            chosen = scores[b, h, pos].float().sort().values
            assert torch.equal(chosen, scores[b, h, want[b, h].long()].float().sort().values)


@pytest.mark.parametrize("method", ["radix", "filter"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_topk_matches_torch_topk(method: str, dtype: torch.dtype) -> None:
    # Rows over one 4,096-score tile and under it, just over k, at k and under k; float and integer (tied) scores.
    # With ties the filter's candidates overflow its capacity: whichever it ranks, the kept scores are the same.
    check_topk(method, [5000, 4097, 130, 129, 128, 40], 2, 128, dtype, seed=0)
    check_topk(method, [9000, 300], 3, 100, dtype, seed=1, ties=True)


def test_filter_topk_counts_its_candidates_and_degrades_to_the_best_it_found(monkeypatch) -> None:
    gen = torch.Generator().manual_seed(4)
    scores = (torch.randn(2, 3, 20000, generator=gen) * 10).to(DEVICE)
    lens = lens_tensor([20000, 9000])
    k = 500
    idx, counts = filter_topk.filter_topk(scores, lens, k, counts=True)
    assert ((counts >= k) & (counts <= filter_topk.filter_capacity(k, 20000))).all()  # the exact case
    assert (filter_topk.filter_topk(scores, lens, 20, counts=True)[1] == -1).all()  # too few to sample: torch.topk
    monkeypatch.setattr(filter_topk, "OVERSELECT", 0.5)  # a pivot that lets through about k / 2 candidates
    monkeypatch.setattr(filter_topk, "SAMPLES_ABOVE", 100)  # still sampled, not handed to torch.topk
    idx, counts = filter_topk.filter_topk(scores, lens, k, counts=True)
    assert (counts < k).all()
    for b, s in enumerate((20000, 9000)):
        for h in range(3):
            n = int(counts[b, h])
            pos = idx[b, h]
            assert ((pos >= 0) | (pos == -1)).all() and int((pos >= 0).sum()) == n  # the rest is padding
            kept = scores[b, h, pos[pos >= 0].long()]
            assert torch.equal(kept.sort(descending=True).values, scores[b, h, :s].topk(n).values)


def test_radix_topk_rejects_what_it_cannot_rank() -> None:
    scores = torch.zeros(1, 1, 64, device=DEVICE)
    lens = lens_tensor([64])
    with pytest.raises(ValueError, match="method"):
        tri.ds_topk(scores, lens, 8, method="heap")
    with pytest.raises(ValueError, match="fp32, fp16 or bf16"):
        tri.ds_topk(scores.double(), lens, 8, method="radix")


def check_sparse(seq_lens: list[int], n_heads: int, n_kv: int, head_dim: int, block_size: int, k: int,
                 dtype: torch.dtype, shared: bool, seed: int, splits: int | None = None) -> None:
    gen = torch.Generator().manual_seed(seed)
    (kc, vc), tables = paged_caches(seq_lens, block_size, n_kv, [head_dim, head_dim], dtype, gen)
    batch = len(seq_lens)
    rows = n_kv if shared else n_heads
    scores = torch.randn(batch, rows, max(seq_lens), generator=gen).to(DEVICE)
    lens = lens_tensor(seq_lens)
    scores[torch.arange(scores.shape[-1], device=DEVICE).expand_as(scores) >= lens.view(-1, 1, 1)] = float("-inf")
    idx = ref.ds_topk(scores, lens, k)
    idx = idx[..., torch.randperm(k, generator=gen).to(DEVICE)]  # the kernel must not rely on any order
    q = torch.randn(batch, n_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    out = torch.full_like(q, float("nan"))
    tri.ds_sparse_attention(q, kc, vc, tables, idx, head_dim**-0.5, out=out, num_splits=splits)
    assert not out.isnan().any(), "unwritten or NaN-poisoned output"
    per_head = idx.repeat_interleave(n_heads // n_kv, dim=1) if shared else idx
    want = ref.ds_sparse_attention(q, kc, vc, tables, per_head, head_dim**-0.5)
    err = rel_err(out, want)
    assert err < tol(dtype), f"relative error {err:.2e}"


@pytest.mark.parametrize(
    ("n_heads", "n_kv", "head_dim", "block_size", "k", "dtype", "shared", "splits"),
    [
        (8, 2, 32, 16, 40, torch.float32, False, None),
        (8, 2, 32, 16, 40, torch.float32, False, 3),
        (4, 4, 64, 32, 100, torch.float16, False, 2),
        (8, 2, 32, 16, 40, torch.float32, True, None),
        (6, 2, 16, 64, 130, torch.float16, True, 4),
    ],
)
def test_sparse_attention_matches_reference(
    n_heads: int, n_kv: int, head_dim: int, block_size: int, k: int, dtype: torch.dtype, shared: bool,
    splits: int | None,
) -> None:
    # Rows shorter than k (with -1 tails, shuffled into the middle) and rows that select a strict subset.
    check_sparse([3, 290, 120, 64], n_heads, n_kv, head_dim, block_size, k, dtype, shared, seed=k + n_heads,
                 splits=splits)


def test_full_budget_and_all_channels_equal_dense_attention() -> None:
    """r = head dim and k = every token: the three Triton ops together are exact dense decode attention."""
    gen = torch.Generator().manual_seed(7)
    seq_lens, n_heads, n_kv, head_dim = [33, 160, 1], 8, 2, 32
    (kc, vc), tables = paged_caches(seq_lens, 16, n_kv, [head_dim, head_dim], torch.float32, gen)
    channels = torch.stack([torch.randperm(head_dim, generator=gen) for _ in range(n_kv)]).to(DEVICE)  # [Hkv, D]
    labels = torch.gather(kc, 3, channels.view(1, 1, n_kv, head_dim).expand_as(kc))
    q = torch.randn(len(seq_lens), n_heads, head_dim, generator=gen).to(DEVICE)
    q_label = torch.gather(q, 2, channels.repeat_interleave(n_heads // n_kv, 0).expand_as(q))
    lens = lens_tensor(seq_lens)
    scores = tri.ds_label_scores(q_label, labels, tables, lens, max_seq_len=max(seq_lens))
    idx = tri.ds_topk(scores, lens, max(seq_lens))
    out = tri.ds_sparse_attention(q, kc, vc, tables, idx, head_dim**-0.5)
    dense = paged_attention_ref(q, kc, vc, tables, list(range(len(seq_lens) + 1)), seq_lens, head_dim**-0.5)
    assert rel_err(out, dense) < 1e-5


def test_rejects_mismatched_inputs() -> None:
    q_label = torch.zeros(1, 4, 8, device=DEVICE)
    labels = torch.zeros(2, 16, 2, 8, device=DEVICE, dtype=torch.int8)
    tables = torch.zeros(1, 2, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="label_scale"):
        tri.ds_label_scores(q_label, labels, tables, lens_tensor([3]))
    with pytest.raises(ValueError, match="idx must be"):
        kc = torch.zeros(2, 16, 2, 32, device=DEVICE)
        tri.ds_sparse_attention(torch.zeros(1, 4, 32, device=DEVICE), kc, kc, tables,
                                torch.zeros(1, 3, 5, dtype=torch.int32, device=DEVICE), 1.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("shared", [False, True])
def test_llama8b_shapes_bf16(shared: bool) -> None:
    check_sparse([4096, 1000, 8192, 17], 32, 8, 128, 16, 512, torch.bfloat16, shared, seed=int(shared))
    for dtype in (torch.float32, torch.bfloat16):
        for method in ("radix", "filter"):
            check_topk(method, [131072, 70000, 8192, 4096], 8 if shared else 32, 8192 if shared else 512, dtype,
                       seed=5)
    gen = torch.Generator().manual_seed(3)
    seq_lens = [8192, 3000, 5]
    (labels,), tables = paged_caches(seq_lens, 16, 8, [8], torch.bfloat16, gen)
    q_label = torch.randn(3, 32, 8, generator=gen).to(torch.bfloat16).to(DEVICE)
    lens = lens_tensor(seq_lens)
    got = tri.ds_label_scores(q_label, labels, tables, lens)
    want = ref.ds_label_scores(q_label, labels, tables, lens)
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(got)) and rel_err(got[finite], want[finite]) < 1e-3
    got16 = tri.ds_label_scores(q_label, labels, tables, lens, out_dtype=torch.bfloat16)
    want16 = ref.ds_label_scores(q_label, labels, tables, lens, out_dtype=torch.bfloat16)
    assert torch.equal(torch.isfinite(got16), finite) and rel_err(got16[finite].float(), want[finite]) < 1e-2
    assert rel_err(got16[finite].float(), want16[finite].float()) < 1e-2
