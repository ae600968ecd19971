"""KV offload: Double Sparsity fetching only selected rows from host memory, and full-KV streaming.

On a CPU the host cache is ordinary memory and the Triton kernels run in the interpreter; the same code runs
against pinned memory on a GPU. A tiny random Llama decodes greedily through each backend and must match
dense attention where the two should agree; the sparse decode is checked against the torch reference ops.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernels' @triton.jit
pytest.importorskip("triton")

from lmstack.engine.attention import AttentionMetadata, TorchAttention  # noqa: E402
from lmstack.engine.attention import double_sparse_ref as ref  # noqa: E402
from lmstack.engine.attention.ds_host_kv import HostKVCache  # noqa: E402
from lmstack.engine.attention.ds_offload import DoubleSparseOffload, FullKVStreaming, OffloadConfig  # noqa: E402
from lmstack.errors import LmstackError  # noqa: E402
from lmstack.models import load  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BLOCK = 16


@pytest.fixture(scope="module")
def tiny(tiny_tokenizer_dir):
    model, _, cfg = load("dummy:tiny-llama", dtype="float32", device=str(DEVICE), seed=3,
                         tokenizer=str(tiny_tokenizer_dir))
    return model, cfg


def metadata(slots: list[int], qsl: list[int], seq_lens: list[int], tables: torch.Tensor) -> AttentionMetadata:
    widths = [b - a for a, b in zip(qsl[:-1], qsl[1:], strict=True)]
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, device=DEVICE),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE), block_tables=tables,
        query_start_loc_cpu=qsl, seq_lens_cpu=seq_lens, max_query_len=max(widths), max_seq_len=max(seq_lens))


def greedy(model, ctx, prompts: list[list[int]], steps: int, tables: torch.Tensor) -> list[torch.Tensor]:
    """Prefill every prompt in one step, then decode `steps` greedy tokens; the logits of each step."""
    tab = tables.cpu().tolist()

    def slot(b: int, pos: int) -> int:
        return tab[b][pos // BLOCK] * BLOCK + pos % BLOCK

    ids = [t for p in prompts for t in p]
    pos = [i for p in prompts for i in range(len(p))]
    qsl = [0]
    for p in prompts:
        qsl.append(qsl[-1] + len(p))
    lens = [len(p) for p in prompts]
    ctx.meta = metadata([slot(b, i) for b, p in enumerate(prompts) for i in range(len(p))], qsl, lens, tables)
    with torch.inference_mode():
        hidden = model(torch.tensor(ids, device=DEVICE), torch.tensor(pos, device=DEVICE), ctx)
        logits = [model.compute_logits(hidden[[q - 1 for q in qsl[1:]]])]
        for _ in range(steps):
            nxt = logits[-1].argmax(-1)
            ctx.meta = metadata([slot(b, n) for b, n in enumerate(lens)], list(range(len(lens) + 1)),
                                [n + 1 for n in lens], tables)
            hidden = model(nxt, torch.tensor(lens, device=DEVICE), ctx)
            logits.append(model.compute_logits(hidden))
            lens = [n + 1 for n in lens]
    return logits


def setup(cfg, prompt_lens: list[int], steps: int, seed: int) -> tuple[list[list[int]], torch.Tensor, int]:
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=gen).tolist() for n in prompt_lens]
    per_seq = -(-(max(prompt_lens) + steps) // BLOCK)
    num_blocks = len(prompt_lens) * per_seq + 1
    tables = torch.randperm(num_blocks, generator=gen)[: len(prompt_lens) * per_seq].view(len(prompt_lens), per_seq)
    return prompts, tables.to(torch.int32).to(DEVICE), num_blocks


def host_cache(cfg, num_blocks: int) -> HostKVCache:
    return HostKVCache(cfg.num_hidden_layers, num_blocks, BLOCK, cfg.num_key_value_heads, cfg.head_dim,
                       torch.float32, DEVICE)


def dense_logits(model, cfg, prompts, steps, tables, num_blocks) -> list[torch.Tensor]:
    shape = (num_blocks, BLOCK, cfg.num_key_value_heads, cfg.head_dim)
    caches = [(torch.zeros(shape, device=DEVICE), torch.zeros(shape, device=DEVICE))
              for _ in range(cfg.num_hidden_layers)]
    return greedy(model, TorchAttention(caches), prompts, steps, tables)


def random_channels(cfg, r: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.stack([torch.randperm(cfg.head_dim, generator=gen)[:r]
                                     for _ in range(cfg.num_key_value_heads)])
                        for _ in range(cfg.num_hidden_layers)])


def assert_same(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        err = ((g - w).norm() / w.norm()).item()
        assert err < 1e-5, f"step {step}: relative error {err:.2e}"


def test_full_kv_streaming_equals_dense(tiny) -> None:
    model, cfg = tiny
    prompts, tables, num_blocks = setup(cfg, [37, 50], 4, seed=1)
    want = dense_logits(model, cfg, prompts, 4, tables, num_blocks)
    assert_same(greedy(model, FullKVStreaming(host_cache(cfg, num_blocks)), prompts, 4, tables), want)


@pytest.mark.parametrize("selection", ["head", "kv_group"])
def test_offload_with_every_token_equals_dense(tiny, selection: str) -> None:
    """A budget of the whole context fetches every past token: prefetch and all, decode is dense attention."""
    model, cfg = tiny
    prompts, tables, num_blocks = setup(cfg, [37, 50], 4, seed=2)
    want = dense_logits(model, cfg, prompts, 4, tables, num_blocks)
    backend = DoubleSparseOffload(host_cache(cfg, num_blocks), random_channels(cfg, 4, 0),
                                  OffloadConfig(token_budget=1.0, dense_below=0, selection=selection),
                                  model=model, max_batch=2)
    try:
        assert_same(greedy(model, backend, prompts, 4, tables), want)
    finally:
        backend.close()


@pytest.mark.parametrize("selection", ["head", "kv_group"])
def test_offload_decode_matches_reference_ops(tiny, selection: str) -> None:
    """Without prefetch, a decode layer is: top-k of the label scores over the past tokens (per query head, or
    per KV head from the group's summed scores; the sink and local tokens forced in), plus the current token,
    attended exactly."""
    model, cfg = tiny
    prompts, tables, num_blocks = setup(cfg, [60, 23, 45], 1, seed=3)
    budget = 9
    backend = DoubleSparseOffload(host_cache(cfg, num_blocks), random_channels(cfg, 4, 1),
                                  OffloadConfig(token_budget=budget, dense_below=0, selection=selection,
                                                sink_tokens=2, local_tokens=3, prefetch=False), max_batch=3)
    greedy(model, backend, prompts, 0, tables)  # fills the host and label caches with real K/V
    gen = torch.Generator().manual_seed(4)
    n_heads, n_kv, head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    lens = [len(p) for p in prompts]
    q = torch.randn(3, n_heads, head_dim, generator=gen).to(DEVICE)
    k = torch.randn(3, n_kv, head_dim, generator=gen).to(DEVICE)
    v = torch.randn(3, n_kv, head_dim, generator=gen).to(DEVICE)
    tab = tables.cpu().tolist()
    backend.meta = metadata([tab[b][n // BLOCK] * BLOCK + n % BLOCK for b, n in enumerate(lens)], [0, 1, 2, 3],
                            [n + 1 for n in lens], tables)
    out = backend.attention(1, q, k, v, head_dim**-0.5)

    group = n_heads // n_kv
    past = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    ch = backend.channels[1]
    q_label = q.gather(2, ch.repeat_interleave(group, 0).expand(3, -1, -1))
    if selection == "kv_group":
        q_label = q_label.view(3, n_kv, group, -1).sum(2)
    scores = ref.ds_label_scores(q_label, backend.labels[1], tables, past, sink=2, local=3)
    idx = ref.ds_topk(scores, past, budget)
    for b, n in enumerate(lens):  # the first 2 and the last 3 past tokens are among every list
        assert all(set(range(2)) | set(range(n - 3, n)) <= set(row.tolist()) for row in idx[b])
    if selection == "kv_group":
        idx = idx.repeat_interleave(group, 1)
    current = past.view(3, 1, 1).expand(3, n_heads, 1)
    expected = ref.ds_sparse_attention(q, backend.host.k[1].to(DEVICE), backend.host.v[1].to(DEVICE), tables,
                                       torch.cat([idx, current], -1), head_dim**-0.5)
    err = ((out - expected).norm() / expected.norm()).item()
    assert err < 1e-5, f"relative error {err:.2e}"
    assert torch.equal(backend.host.k[1].view(-1, n_kv, head_dim)[backend.meta.slot_mapping.cpu()], k.cpu())


def test_offload_prefetch_uses_the_estimated_query(tiny) -> None:
    """With a partial budget, prefetching selects for layers >= 1 from an estimated query, so its logits differ
    from synchronous selection (which uses the true query) while staying finite."""
    model, cfg = tiny
    prompts, tables, num_blocks = setup(cfg, [80, 64], 3, seed=5)
    runs = {}
    for prefetch in (False, True):
        backend = DoubleSparseOffload(host_cache(cfg, num_blocks), random_channels(cfg, 4, 2),
                                      OffloadConfig(token_budget=0.25, dense_below=0, prefetch=prefetch),
                                      model=model, max_batch=2)
        runs[prefetch] = greedy(model, backend, prompts, 3, tables)
        backend.close()
    assert all(torch.isfinite(x).all() for x in runs[True])
    assert any(not torch.equal(a, b) for a, b in zip(runs[True][1:], runs[False][1:], strict=True))


def test_offload_rejects_bad_settings(tiny) -> None:
    model, cfg = tiny
    with pytest.raises(LmstackError, match="selection"):
        OffloadConfig(selection="tokens")
    with pytest.raises(LmstackError, match="local_tokens"):
        OffloadConfig(local_tokens=-1)
    with pytest.raises(LmstackError, match="model="):
        DoubleSparseOffload(host_cache(cfg, 4), random_channels(cfg, 4, 0), OffloadConfig())


def test_offload_budget_and_context_choice() -> None:
    from lmstack.bench.ds_offload_speed import choose_context

    cfg = OffloadConfig(token_budget="1/16", dense_below=256)
    assert [cfg.keep(p) for p in (0, 255, 256, 4096, 4097)] == [0, 255, 16, 256, 257]
    assert OffloadConfig(token_budget=100, dense_below=0).keep(50) == 50
    per_token = 128 * 1024  # Llama-3-8B bf16: 32 layers x 2 x 8 KV heads x 128 x 2 bytes
    assert choose_context(per_token, 1, 120 * 2**30, 1 << 20) == 1 << 18  # 32 GiB fits half of 120 GiB; 64 does not
    assert choose_context(per_token, 1, 120 * 2**30, 1 << 17) == 1 << 17
    with pytest.raises(LmstackError, match="host memory"):
        choose_context(per_token, 1, 2**30, 1 << 20)
