"""Double Sparsity: the torch reference ops, the label cache, the backend in the engine, calibration and
the channels file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmstack import LLM, SamplingParams
from lmstack.engine.attention import AttentionMetadata, _sdpa_causal
from lmstack.engine.attention import double_sparse_ref as ref
from lmstack.engine.attention.calibrate import STATISTICS, ChannelCalibrator, calibrate
from lmstack.engine.attention.double_sparse import DoubleSparseAttention, DoubleSparseConfig, _trim_to_budget
from lmstack.engine.attention.ds_channels import ChannelFile, model_signature, resolve_channels
from lmstack.engine.attention.torch_ref import paged_attention_ref
from lmstack.errors import LmstackError
from lmstack.models import load


def _paged(seed: int, seq_lens: list[int], H: int, Hkv: int, D: int, bs: int = 16, nb: int = 80):
    g = torch.Generator().manual_seed(seed)
    kc, vc = torch.randn(nb, bs, Hkv, D, generator=g), torch.randn(nb, bs, Hkv, D, generator=g)
    need = max(-(-s // bs) for s in seq_lens)
    tables = torch.stack([torch.randperm(nb - 1, generator=g)[:need] + 1 for _ in seq_lens]).int()
    q = torch.randn(len(seq_lens), H, D, generator=g)
    return q, kc, vc, tables, torch.tensor(seq_lens, dtype=torch.int32)


# ----- the reference ops -----

@pytest.mark.parametrize(("H", "Hkv", "D"), [(8, 2, 32), (9, 3, 64), (4, 4, 16)])
def test_full_budget_and_all_channels_equal_dense_attention(H: int, Hkv: int, D: int) -> None:
    seq_lens = [1, 17, 200, 64]
    q, kc, vc, tables, lens = _paged(H + D, seq_lens, H, Hkv, D)
    scores = ref.ds_label_scores(q, kc, tables, lens)  # r = D: the label cache is K itself
    idx = ref.ds_topk(scores, lens, max(seq_lens))
    out = ref.ds_sparse_attention(q, kc, vc, tables, idx, D**-0.5)
    dense = paged_attention_ref(q, kc, vc, tables, list(range(len(seq_lens) + 1)), seq_lens, D**-0.5)
    assert ((out - dense).norm() / dense.norm()).item() < 1e-5


def test_label_scores_match_a_direct_computation_and_mask_the_tail() -> None:
    q, kc, _, tables, lens = _paged(3, [5, 40, 33], 6, 2, 32)
    channels = torch.tensor([[3, 9, 30], [0, 1, 17]])  # [Hkv, r]
    labels = kc.gather(3, channels.expand(*kc.shape[:2], -1, -1))  # [nb, bs, Hkv, r]
    q_label = q.gather(2, channels.repeat_interleave(3, 0).expand(3, -1, -1))
    scores = ref.ds_label_scores(q_label, labels, tables, lens)
    assert scores.shape == (3, 6, 40) and scores.dtype == torch.float32
    for b, n in enumerate(lens.tolist()):
        keys = kc[tables[b].long()].reshape(-1, 2, 32)[:n]  # [n, Hkv, D]
        for h in range(6):
            ch = channels[h // 3]
            want = keys[:, h // 3, ch] @ q[b, h, ch]
            assert torch.allclose(scores[b, h, :n], want, atol=1e-5)
        assert torch.isinf(scores[b, :, n:]).all()


def test_topk_never_picks_past_the_sequence_and_pads_with_minus_one() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 4, 50, generator=g)
    lens = torch.tensor([50, 7, 1], dtype=torch.int32)
    scores[1, :, 7:] = float("-inf")
    scores[2, :, 1:] = float("-inf")
    idx = ref.ds_topk(scores, lens, 10)
    assert idx.shape == (3, 4, 10) and idx.dtype == torch.int32
    assert (idx[0] >= 0).all() and set(idx[0, 0].tolist()) == set(scores[0, 0].topk(10).indices.tolist())
    assert (idx[1, :, :7] >= 0).all() and (idx[1, :, :7] < 7).all() and (idx[1, :, 7:] == -1).all()
    assert (idx[2, :, 0] == 0).all() and (idx[2, :, 1:] == -1).all()


def test_sparse_attention_is_exact_softmax_over_the_selected_tokens() -> None:
    q, kc, vc, tables, lens = _paged(5, [30, 64], 4, 2, 16)
    idx = torch.tensor([[[0, 5, 29, -1]] * 4, [[63, 2, -1, -1]] * 4], dtype=torch.int32)
    out = ref.ds_sparse_attention(q, kc, vc, tables, idx, 0.25)
    for b in range(2):
        keys = kc[tables[b].long()].reshape(-1, 2, 16)
        vals = vc[tables[b].long()].reshape(-1, 2, 16)
        for h in range(4):
            sel = [i for i in idx[b, h].tolist() if i >= 0]
            p = (keys[sel, h // 2] @ q[b, h] * 0.25).softmax(0)
            assert torch.allclose(out[b, h], p @ vals[sel, h // 2], atol=1e-5)


def test_trim_gives_each_row_its_own_budget_best_first() -> None:
    scores = torch.tensor([[[0.1, 0.9, 0.5, 0.3]], [[0.8, 0.2, 0.7, 0.1]]])
    idx = torch.tensor([[[2, 1, 3]], [[3, 0, 2]]], dtype=torch.int32)  # unordered picks
    out = _trim_to_budget(idx, scores, [3, 1])
    assert out[0, 0].tolist() == [1, 2, 3] and out[1, 0].tolist() == [0, -1, -1]


def test_causal_mode_with_full_budget_is_dense_and_small_budgets_keep_k_tokens() -> None:
    g = torch.Generator().manual_seed(1)
    L, H, Hkv, D = 40, 6, 2, 16
    q = torch.randn(L, H, D, generator=g)
    k, v = torch.randn(L, Hkv, D, generator=g), torch.randn(L, Hkv, D, generator=g)
    all_channels = torch.arange(D).expand(Hkv, D)
    out = ref.ds_causal_attention(q, k, v, all_channels, 1.0, 0, D**-0.5, head_chunk=4)
    assert torch.allclose(out, _sdpa_causal(q, k, v, D**-0.5, 0), atol=1e-5)
    channels = torch.tensor([[1, 4, 9], [0, 2, 15]])
    out = ref.ds_causal_attention(q, k, v, channels, 5, 3, D**-0.5)
    for pos in (0, 2, 3, 39):  # position 0..2: dense (under dense_below=3), then 5 tokens
        for h in range(H):
            ch = channels[h // 3]
            approx = k[: pos + 1, h // 3, ch] @ q[pos, h, ch]
            keep = approx.topk(min(5, pos + 1) if pos >= 2 else pos + 1).indices
            p = (k[keep, h // 3] @ q[pos, h] * D**-0.5).softmax(0)
            assert torch.allclose(out[pos, h], p @ v[keep, h // 3], atol=1e-5)


def test_forced_sink_and_local_tokens_take_their_places_whatever_the_labels_say() -> None:
    """The first `sink` and last `local` tokens are attended whatever their label scores, the rest of the
    budget goes to the label ranking, and prompt mode (every position) agrees with decode (one row)."""
    g = torch.Generator().manual_seed(7)
    L, H, Hkv, D = 48, 4, 2, 16
    q = torch.randn(L, H, D, generator=g)
    k, v = torch.randn(L, Hkv, D, generator=g), torch.randn(L, Hkv, D, generator=g)
    channels = torch.tensor([[1, 4, 9], [0, 2, 15]])
    assert ref.forced_counts(10, 2, 3) == (2, 3) and ref.forced_counts(4, 2, 3) == (1, 3)
    assert ref.forced_counts(2, 2, 3) == (0, 2)
    out = ref.ds_causal_attention(q, k, v, channels, 10, 0, D**-0.5, sink=2, local=3)
    for pos in (5, 20, 47):
        for h in range(H):
            kv, ch = h // 2, channels[h // 2]
            approx = k[: pos + 1, kv, ch] @ q[pos, h, ch]
            forced = {0, 1, pos, pos - 1, pos - 2} if pos >= 10 else set(range(pos + 1))
            approx[list(forced)] = float("-inf")
            keep = sorted(forced | set(approx.topk(min(10, pos + 1) - len(forced)).indices.tolist())
                          if len(forced) < 10 else forced)
            p = (k[keep, kv] @ q[pos, h] * D**-0.5).softmax(0)
            assert torch.allclose(out[pos, h], p @ v[keep, kv], atol=1e-5), (pos, h)
    # decode of the last position through the paged ops, same rule
    bs = 16
    kc = k.view(L // bs, bs, Hkv, D)
    vc = v.view(L // bs, bs, Hkv, D)
    tables = torch.arange(L // bs, dtype=torch.int32)[None]
    lens = torch.tensor([L], dtype=torch.int32)
    labels = kc.gather(3, channels.expand(L // bs, bs, -1, -1))
    q_label = q[-1:].gather(2, channels.repeat_interleave(2, 0)[None])
    scores = ref.ds_label_scores(q_label, labels, tables, lens, sink=2, local=3)
    assert torch.isinf(scores[0, :, [0, 1, L - 3, L - 2, L - 1]]).all() and (scores[0, :, 2:L - 3] < 1e30).all()
    idx = ref.ds_topk(scores, lens, 10)
    dec = ref.ds_sparse_attention(q[-1:], kc, vc, tables, idx, D**-0.5)
    assert torch.allclose(dec[0], out[-1], atol=1e-5)


def test_shared_selection_ranks_by_the_groups_summed_labels() -> None:
    """kv_group: every head of a group attends to the same tokens, those its summed label scores rank first;
    with one query head per KV head it is the per-head rule; a shared idx equals the repeated per-head idx."""
    g = torch.Generator().manual_seed(4)
    L, H, Hkv, D = 30, 6, 2, 16
    q = torch.randn(L, H, D, generator=g)
    k, v = torch.randn(L, Hkv, D, generator=g), torch.randn(L, Hkv, D, generator=g)
    channels = torch.tensor([[1, 4, 9], [0, 2, 15]])
    out = ref.ds_causal_attention(q, k, v, channels, 4, 0, D**-0.5, shared=True, head_chunk=4)
    pos = 29
    for h in range(H):
        kv, ch = h // 3, channels[h // 3]
        approx = k[: pos + 1, kv, ch] @ q[pos, kv * 3:kv * 3 + 3][:, ch].sum(0)
        keep = approx.topk(4).indices
        p = (k[keep, kv] @ q[pos, h] * D**-0.5).softmax(0)
        assert torch.allclose(out[pos, h], p @ v[keep, kv], atol=1e-5)
    mha = ref.ds_causal_attention(q[:, :2], k, v, channels, 4, 0, D**-0.5, shared=True)
    assert torch.equal(mha, ref.ds_causal_attention(q[:, :2], k, v, channels, 4, 0, D**-0.5))
    qd, kc, vc, tables, lens = _paged(5, [40, 90], H, Hkv, D)
    idx = ref.ds_topk(torch.randn(2, Hkv, 90, generator=g), lens, 7)
    assert torch.equal(ref.ds_sparse_attention(qd, kc, vc, tables, idx, 0.25),
                       ref.ds_sparse_attention(qd, kc, vc, tables, idx.repeat_interleave(3, 1), 0.25))


def test_int8_labels_error_is_bounded() -> None:
    g = torch.Generator().manual_seed(2)
    labels = torch.randn(500, 4, 8, generator=g) * torch.logspace(-2, 2, 500)[:, None, None]
    q8, scale = ref.quantize_labels(labels)
    assert q8.dtype == torch.int8 and scale.dtype == torch.float16 and scale.shape == (500, 4)
    err = (ref.dequantize_labels(q8, scale) - labels).abs()
    bound = labels.abs().amax(-1, keepdim=True) / 254 * 1.01  # half a step, plus fp16 rounding of the scale
    assert (err <= bound + 1e-6).all()


# ----- the backend -----

def test_label_cache_is_written_at_the_k_slots(tiny_tokenizer_dir: Path) -> None:
    Hkv, D = 2, 16
    kc, vc = torch.zeros(6, 4, Hkv, D), torch.zeros(6, 4, Hkv, D)
    channels = torch.tensor([[[2, 7, 11], [0, 5, 15]]])  # one layer
    for bits in (16, 8):
        backend = DoubleSparseAttention([(kc, vc)], channels, DoubleSparseConfig(label_bits=bits))
        slots = torch.tensor([5, 9, 10, 23])
        backend.meta = AttentionMetadata(slot_mapping=slots, query_start_loc=torch.tensor([0, 4]),
                                         seq_lens=torch.tensor([4]), block_tables=torch.zeros(1, 6).int(),
                                         query_start_loc_cpu=[0, 4], seq_lens_cpu=[4], max_query_len=4,
                                         max_seq_len=4)
        k = torch.randn(4, Hkv, D)
        backend.write_kv(0, k, torch.randn(4, Hkv, D))
        flat = backend.label_caches[0].view(-1, Hkv, 3)
        scale = backend.label_scales[0]
        got = ref.dequantize_labels(flat, None if scale is None else scale.view(-1, Hkv))
        want = torch.stack([k[:, h, channels[0, h]] for h in range(Hkv)], dim=1)
        assert torch.allclose(got[slots], want, atol=0 if bits == 16 else want.abs().max().item() / 200)
        others = torch.ones(24, dtype=torch.bool)
        others[slots] = False
        assert (got[others] == 0).all()
        assert torch.equal(kc.view(-1, Hkv, D)[slots], k)


def _tiny_llm(tok: Path, **kw) -> LLM:
    return LLM("dummy:tiny-llama", tokenizer=str(tok), max_model_len=320, num_kv_blocks=80,
               max_num_batched_tokens=96, **kw)


PROMPTS = [{"prompt_token_ids": [(7 * i + 3 * j) % 390 + 5 for j in range(n)]} for i, n in enumerate((3, 40, 120, 9))]


@pytest.mark.parametrize(("selection", "score_bits"), [("head", 32), ("kv_group", 32), ("kv_group", 16)])
def test_engine_with_all_tokens_and_all_channels_equals_dense(tiny_tokenizer_dir: Path, selection: str,
                                                              score_bits: int) -> None:
    """Greedy tokens through chunked prefill and mixed prefill+decode steps, in both selections (with every
    token kept, 16-bit scores change nothing)."""
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    dense = [o.outputs[0].token_ids for o in _tiny_llm(tiny_tokenizer_dir).generate(PROMPTS, params, use_tqdm=False)]
    options = {"channels": "first", "r": 16, "token_budget": 1.0, "dense_below": 0, "selection": selection,
               "score_bits": score_bits}
    llm = _tiny_llm(tiny_tokenizer_dir, attention_backend="double_sparse", attention_options=options)
    assert isinstance(llm.engine.runner.backend, DoubleSparseAttention)
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)] == dense
    options = {"channels": "random", "r": 2, "token_budget": 4, "dense_below": 10_000}  # sparse never kicks in
    llm = _tiny_llm(tiny_tokenizer_dir, attention_backend="double_sparse", attention_options=options)
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)] == dense


def test_engine_int8_labels_decode_sparsely_and_dense_layers_stay_dense(tiny_tokenizer_dir: Path) -> None:
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    options = {"channels": "random", "r": 2, "token_budget": 2, "dense_below": 0, "label_bits": 8}
    # Eager: a decode graph would replay sparse_decode without calling it (and pad the batch when capturing).
    llm = _tiny_llm(tiny_tokenizer_dir, attention_backend="double_sparse", attention_options=options,
                    enforce_eager=True)
    backend = llm.engine.runner.backend
    assert backend.label_caches[0].dtype == torch.int8 and backend.label_scales[0] is not None
    rows: list[int] = []
    real = backend.sparse_decode
    backend.sparse_decode = lambda q, *a: rows.append(q.shape[0]) or real(q, *a)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 8 for o in outs)
    assert sum(rows) == 4 * 7 * 2  # every decode step of every sequence, in both layers
    options = {"channels": "random", "r": 2, "token_budget": 2, "dense_below": 0, "dense_layers": [0, 1]}
    all_dense = _tiny_llm(tiny_tokenizer_dir, attention_backend="double_sparse", attention_options=options)
    assert all_dense.engine.runner.backend.label_caches == [None, None]
    dense = _tiny_llm(tiny_tokenizer_dir).generate(PROMPTS, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in all_dense.generate(PROMPTS, params, use_tqdm=False)] == \
        [o.outputs[0].token_ids for o in dense]


@pytest.mark.parametrize(("options", "message"), [
    ({"channels": "first", "token_budget": 0.0}, "fractional token budget"),
    ({"channels": "first", "token_budget": "1/0"}, "not a fraction"),
    ({"channels": "first", "label_bits": 4}, "label_bits"),
    ({"channels": "first", "selection": "token"}, "selection must be one of"),
    ({"channels": "first", "score_bits": 8}, "score_bits must be 32 or 16"),
    ({"channels": "first", "sink_tokens": -1}, "sink_tokens must be an integer >= 0"),
    ({"channels": "first", "local_tokens": 2.5}, "local_tokens must be an integer >= 0"),
    ({"channels": "first", "topk": "heap"}, "topk must be torch, radix or filter"),
    ({"channels": "first", "dense_layers": [7]}, "do not exist"),
    ({"channels": "first", "top_k": 3}, "unknown double_sparse option"),
    ({}, "needs channels"),
    ({"channels": "first", "r": 99}, "channel count r"),
])
def test_bad_backend_options_are_clear_errors(tiny_tokenizer_dir: Path, options: dict, message: str) -> None:
    with pytest.raises(LmstackError, match=message):
        _tiny_llm(tiny_tokenizer_dir, attention_backend="double_sparse", attention_options=options)


def test_graph_buckets_bound_the_over_budget_of_a_captured_decode() -> None:
    """Under a graph every row keeps keep(bound) tokens: buckets 1/8 octave apart keep that within 1/8."""
    bounds = DoubleSparseAttention.graph_contexts(DoubleSparseAttention(None, torch.zeros(1, 1, 1).long()), 40_000)
    assert bounds[0] == 16 and bounds[-1] == 40_000 and bounds == sorted(set(bounds))
    assert all(b / a <= 1.125 for a, b in zip(bounds, bounds[1:], strict=False))


def test_budget_parsing() -> None:
    assert DoubleSparseConfig(token_budget="1/16").token_budget == 1 / 16
    assert DoubleSparseConfig(token_budget="256").token_budget == 256
    cfg = DoubleSparseConfig(token_budget=0.1)
    assert [cfg.keep(n) for n in (1, 10, 11, 1000)] == [1, 1, 2, 100]
    assert DoubleSparseConfig(token_budget=64).keep(40) == 40


# ----- calibration -----

def _plant_outliers(model: torch.nn.Module) -> None:
    """KV head 0 (query heads 0, 1): a strong q/k component in channel 0, the fastest-rotating RoPE pair (its
    rotate-half partner is channel D/2). KV head 1 (query heads 2, 3): in channel D/2 - 1, the slowest pair,
    which RoPE barely moves at these positions."""
    attn = model.layers[0].self_attn
    D, q_size = attn.head_dim, attn.q_size
    w = attn.qkv_proj.weight
    g = torch.Generator().manual_seed(0)
    for kv_head, ch in ((0, 0), (1, D // 2 - 1)):
        direction = torch.randn(w.shape[1], generator=g) * 0.5
        for h in (2 * kv_head, 2 * kv_head + 1):
            w[h * D + ch] = direction
        w[q_size + kv_head * D + ch] = direction


def test_calibration_finds_planted_outlier_channels_after_rope(tiny_tokenizer_dir: Path) -> None:
    model, _, cfg = load("dummy:tiny-llama", tokenizer=str(tiny_tokenizer_dir))
    _plant_outliers(model)
    D = cfg.head_dim
    calib = ChannelCalibrator(cfg)
    g = torch.Generator().manual_seed(1)
    calib.fit(model, torch.randint(5, 390, (160,), generator=g).tolist())
    assert calib.num_tokens == 160
    top = calib.select("qk", r=2)[0]  # layer 0, [Hkv, 2]
    assert set(top[0].tolist()) == {0, D // 2}  # RoPE spreads the fast pair over both halves
    assert top[1, 0].item() == D // 2 - 1  # the slow pair stays put
    means = calib.means()
    assert means["qk"][0, 1, D // 2 - 1] > 20 * means["qk"][0, 1].median()
    assert set(calib.select("k", r=2)[0, 0].tolist()) == {0, D // 2}
    assert set(calib.select("qkc", r=2)[0, 0].tolist()) == {0, D // 2}
    assert calib.select("first", r=3)[0, 1].tolist() == [0, 1, 2]
    random = calib.select("random", r=3, seed=5)
    assert torch.equal(random, calib.select("random", r=3, seed=5)) and len(set(random[0, 0].tolist())) == 3


def test_centred_rule_skips_a_constant_key_channel_that_cannot_rank_tokens() -> None:
    from lmstack.engine.attention.calibrate import record_statistics

    g = torch.Generator().manual_seed(0)
    T, G, D = 512, 2, 16
    q = torch.randn(T, G, D, generator=g)
    k = torch.randn(T, 1, D, generator=g)
    k[:, 0, 3] = 40.0 + 0.01 * torch.randn(T, generator=g)  # a bias: huge, the same for every token
    k[:, 0, 7] *= 6.0  # a real outlier: large and token-dependent
    sums = {name: torch.zeros(1, 1, D, dtype=torch.float64) for name in STATISTICS}
    record_statistics(sums, 0, q, k)
    assert sums["qk"][0, 0].argmax().item() == 3
    assert sums["qkc"][0, 0].argmax().item() == 7
    # What matters: the top-k tokens by the single chosen label channel, against the exact top-k.
    exact = (q[:, 0] @ k[:, 0].T).topk(32, dim=-1).indices
    for ch, floor in ((7, 0.3), (3, None)):
        approx = (q[:, 0, ch:ch + 1] @ k[:, 0, ch:ch + 1].T).topk(32, dim=-1).indices
        shared = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(approx, exact, strict=True))
        overlap = shared / exact.numel()
        if floor is None:
            assert overlap < 0.15  # the bias channel ranks tokens at about chance (32 / 512)
        else:
            assert overlap > floor


def test_calibrate_job_writes_a_valid_file_and_resumes(tiny_tokenizer_dir: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import lmstack.models

    real_load = lmstack.models.load
    monkeypatch.setattr(lmstack.models, "load", lambda name, **a: real_load(name, tokenizer=str(tiny_tokenizer_dir),
                                                                             **a))
    text = tmp_path / "calib.jsonl"
    text.write_text("\n".join(json.dumps({"text": f"Line {i} says the fox jumps {i * 7} times."}) for i in range(60)))
    kw = {"window": 64, "num_windows": 3}
    fresh = ChannelFile.load(calibrate("dummy:tiny-llama", text, tmp_path / "fresh.json", **kw))
    assert fresh.calibration["num_tokens"] == 192 and fresh.model["num_hidden_layers"] == 2
    assert not (tmp_path / "fresh.json.partial.jsonl").exists()

    real_fit = ChannelCalibrator.fit
    calls: list[int] = []

    def crashing_fit(self: ChannelCalibrator, model: torch.nn.Module, ids: list[int]) -> ChannelCalibrator:
        calls.append(len(ids))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_fit(self, model, ids)

    monkeypatch.setattr(ChannelCalibrator, "fit", crashing_fit)
    out = tmp_path / "resumed.json"
    with pytest.raises(KeyboardInterrupt):
        calibrate("dummy:tiny-llama", text, out, **kw)
    log = out.with_name(out.name + ".partial.jsonl")
    assert len(log.read_text().splitlines()) == 3  # header + the two finished windows
    with open(log, "a") as f:
        f.write('{"window": 2, "num_tokens": 64, "sums": {"qk": [[[0.1')  # a line cut short by a crash
    calls.clear()
    resumed = ChannelFile.load(calibrate("dummy:tiny-llama", text, out, **kw))
    assert calls == [64]  # only the unfinished window ran again
    assert resumed.calibration["num_tokens"] == 192
    assert torch.equal(fresh.channels, resumed.channels)
    assert torch.allclose(fresh.stats["qk"], resumed.stats["qk"], rtol=1e-5)
    with pytest.raises(LmstackError, match="other settings"):
        log.write_text(json.dumps({"header": {"model": "x"}}) + "\n")
        calibrate("dummy:tiny-llama", text, out, **kw)


# ----- the channels file -----

def _file(cfg) -> ChannelFile:
    calib = ChannelCalibrator(cfg)
    calib.add({n: torch.rand(2, 2, 16, dtype=torch.float64) for n in ("qk", "qkc", "q", "k")}, 10)
    return ChannelFile(model=model_signature("dummy:tiny-llama", cfg), rule="qk", r=4, channels=calib.select("qk", 4),
                       stats=calib.means())


def test_channel_file_round_trip_and_reselect(tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    _, _, cfg = load("dummy:tiny-llama", tokenizer=str(tiny_tokenizer_dir))
    f = _file(cfg)
    f.save(tmp_path / "c.json")
    back = ChannelFile.load(tmp_path / "c.json")
    assert torch.equal(back.channels, f.channels) and back.rule == "qk"
    assert torch.equal(back.reselect("q", 2), f.stats["q"].topk(2, dim=-1).indices)
    channels, desc = resolve_channels(str(tmp_path / "c.json"), cfg, "k", 3)
    assert channels.shape == (2, 2, 3) and "rule=k" in desc
    older = f.to_json()
    del older["stats"]["qkc"]  # a file calibrated before the centred statistic existed still loads
    (tmp_path / "old.json").write_text(json.dumps(older))
    assert resolve_channels(str(tmp_path / "old.json"), cfg, "qk", 4)[0].shape == (2, 2, 4)
    with pytest.raises(LmstackError, match="needs calibration statistics"):
        resolve_channels(str(tmp_path / "old.json"), cfg, "qkc", 4)


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda d: d.update(version=99), "version"),
    (lambda d: d.update(format="other"), "not a lmstack-double-sparsity-channels"),
    (lambda d: d.update(rule="magic"), "rule"),
    (lambda d: d["channels"][0].pop(), r"\[layers\]\[kv_heads\]\[r\] list"),
    (lambda d: d.update(channels=[[[0, 1, 2]] * 2] * 2), r"shape \(2, 2, 3\), expected \(2, 2, 4\)"),
    (lambda d: d["channels"][0][0].__setitem__(1, d["channels"][0][0][0]), "same channel twice"),
    (lambda d: d["channels"][1][1].__setitem__(0, 16), r"in \[0, 16\)"),
    (lambda d: d["stats"].update(magic=d["stats"]["q"]), "stats"),
    (lambda d: d["model"].update(num_hidden_layers=3), "shape"),
])
def test_bad_channel_files_are_clear_errors(tiny_tokenizer_dir: Path, tmp_path: Path, mutate, message: str) -> None:
    _, _, cfg = load("dummy:tiny-llama", tokenizer=str(tiny_tokenizer_dir))
    data = _file(cfg).to_json()
    mutate(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(LmstackError, match=message):
        resolve_channels(str(path), cfg, None, None)


def test_channel_file_for_another_model_or_missing_is_a_clear_error(tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    _, _, cfg = load("dummy:tiny-llama", tokenizer=str(tiny_tokenizer_dir))
    data = _file(cfg).to_json()
    data["model"]["head_dim"] = 32
    data["channels"] = [[[0, 1, 2, 3]] * 2] * 2
    data.pop("stats")
    path = tmp_path / "other.json"
    path.write_text(json.dumps(data))
    with pytest.raises(LmstackError, match="calibrated for another model"):
        resolve_channels(str(path), cfg, None, None)
    with pytest.raises(LmstackError, match="does not exist"):
        resolve_channels(str(tmp_path / "nope.json"), cfg, None, None)
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(LmstackError, match="not readable JSON"):
        resolve_channels(str(tmp_path / "junk.json"), cfg, None, None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sparse_prefill_on_cuda_takes_a_channel_table_kept_on_the_cpu() -> None:
    g = torch.Generator().manual_seed(3)
    L, Hq, Hkv, D = 96, 4, 2, 32
    q, k, v = (torch.randn(L, h, D, generator=g).cuda() for h in (Hq, Hkv, Hkv))
    channels = torch.stack([torch.randperm(D, generator=g)[:4] for _ in range(Hkv)])  # [Hkv, r] on the CPU
    on_cpu = ref.ds_causal_attention(q, k, v, channels, 8, 0, D ** -0.5)
    on_gpu = ref.ds_causal_attention(q, k, v, channels.cuda(), 8, 0, D ** -0.5)
    torch.testing.assert_close(on_cpu, on_gpu)


def test_speed_bench_reports_the_e2e_variants_that_ran(capsys) -> None:
    """End to end runs only the chosen variants beside dense; each ratio is its tokens/s over dense's, the
    headline metrics hold only what ran, and an unknown variant is a clear error (before any GPU check)."""
    from lmstack.bench.double_sparsity_speed import _metrics, e2e_speedups
    from lmstack.cli import main

    runs = {"dense": {"tok_s": 100.0, "eager_tok_s": 80.0}, "double_sparse_kv_group_s16": {"tok_s": 190.0}}
    speedups = e2e_speedups(runs)
    assert speedups == {"speedup_kv_group_s16": 1.9}
    m = _metrics({"e2e": {"runs": runs, **speedups}})
    assert m["e2e_decode_speedup_kv_group_s16"] == 1.9 and "e2e_decode_speedup" not in m
    assert m["e2e_decode_tok_s"] == {"dense": 100.0, "double_sparse_kv_group_s16": 190.0}
    runs["double_sparse"] = {"tok_s": 120.0}
    assert e2e_speedups(runs) == {"speedup": 1.2, "speedup_kv_group_s16": 1.9, "speedup_vs_dense_eager": 1.5}
    assert main(["bench", "double-sparsity-speed", "--e2e-variants", "kv_group,fast"]) == 2
    err = capsys.readouterr().err
    assert "--e2e-variants takes a subset of head, kv_group" in err and "Traceback" not in err
