"""CUDA fast paths (Triton attention, CUDA graphs) against the torch reference inside the real engine."""

from __future__ import annotations

import json

import pytest
import torch

from lmstack.engine.config import EngineConfig
from lmstack.engine.llm_engine import LLMEngine
from lmstack.engine.sampling_params import SamplingParams
from lmstack.models import load

pytestmark = pytest.mark.gpu

CONFIG = dict(model_type="llama", vocab_size=512, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
              num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096, eos_token_id=[2])


def _run(model, tok, prompts: list[list[int]], n: int, **cfg) -> list[tuple[list[int], list[float]]]:
    engine = LLMEngine(model, tok, EngineConfig(max_model_len=4096, num_kv_blocks=1024, **cfg))
    for p in prompts:  # the long prompt stops early: decode then moves to the short-context graphs
        engine.add_request(p, SamplingParams(max_tokens=8 if len(p) > 2048 else n, temperature=0.0, ignore_eos=True,
                                             logprobs=0))
    done = {}
    while engine.has_unfinished:
        for out in engine.step():
            if out.finished:
                c = out.outputs[0]
                done[int(out.request_id)] = (c.token_ids, [lp.logprob for lp in c.logprobs])
    assert engine.blocks.num_used == 0
    return [done[i] for i in range(len(prompts))]


def _max_gap(a: list[tuple[list[int], list[float]]], b: list[tuple[list[int], list[float]]]) -> float:
    """Largest logprob difference over the tokens where two runs still agree (rounding can part them)."""
    gap = 0.0
    for (at, al), (bt, bl) in zip(a, b, strict=True):
        n = next((i for i, (x, y) in enumerate(zip(at, bt, strict=True)) if x != y), len(at))
        gap = max([gap] + [abs(x - y) for x, y in zip(al[:n], bl[:n], strict=True)])
    return gap


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_and_graphs_match_reference(dtype: torch.dtype, tiny_tokenizer_dir) -> None:
    model, tok, _ = load("dummy:" + json.dumps(CONFIG), dtype=dtype, device="cuda", tokenizer=str(tiny_tokenizer_dir))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0, 0.08)  # peaked logits: greedy choices are rarely near-ties
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (5, 17, 64, 200, 33, 1, 130, 2100)]
    ref = _run(model, tok, prompts, 24, attention_backend="torch", enforce_eager=True)
    eager = _run(model, tok, prompts, 24, attention_backend="triton", enforce_eager=True)
    graphs = _run(model, tok, prompts, 24, attention_backend="triton", enforce_eager=False, max_num_seqs=8)
    if dtype == torch.float32:
        for fast in (eager, graphs):
            assert [t for t, _ in fast] == [t for t, _ in ref]
            assert _max_gap(fast, ref) < 1e-3
        return
    # bf16: every path rounds; the truth is the same weights run in fp32. A fast path may not drift from it
    # much more than the torch reference path in bf16 does.
    truth = _run(model.float(), tok, prompts, 24, attention_backend="torch", enforce_eager=True)
    for fast in (eager, graphs):
        assert _max_gap(fast, truth) <= 2 * _max_gap(ref, truth) + 0.02


@pytest.mark.parametrize(("selection", "topk"),
                         [("head", "torch"), ("kv_group", "torch"), ("kv_group", "radix"), ("kv_group", "filter")])
def test_double_sparse_decode_graphs(selection: str, topk: str, tiny_tokenizer_dir) -> None:
    """Double Sparsity decode replayed from lazily captured graphs: with every token and every channel it is
    dense attention; with a real budget it is what the eager backend computes for the graph's bucket."""
    model, tok, _ = load("dummy:" + json.dumps(CONFIG), dtype=torch.float32, device="cuda",
                         tokenizer=str(tiny_tokenizer_dir))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0, 0.08)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (300, 517, 64, 1100)]
    dense = _run(model, tok, prompts, 24, attention_backend="triton", enforce_eager=True)
    full = {"channels": "first", "r": 64, "token_budget": 1.0, "dense_below": 0, "selection": selection}
    graphs = _run(model, tok, prompts, 24, attention_backend="double_sparse", attention_options=full,
                  enforce_eager=False, max_num_seqs=4)
    assert [t for t, _ in graphs] == [t for t, _ in dense] and _max_gap(graphs, dense) < 1e-3
    # Budget 64 tokens (an absolute count: the same for every row and bucket), so eager and graphs agree.
    sparse = {"channels": "random", "r": 4, "token_budget": 64, "dense_below": 0, "selection": selection,
              "topk": topk}
    eager = _run(model, tok, prompts, 24, attention_backend="double_sparse", attention_options=sparse,
                 enforce_eager=True)
    engine = LLMEngine(model, tok, EngineConfig(max_model_len=4096, num_kv_blocks=1024, max_num_seqs=4,
                                                attention_backend="double_sparse", attention_options=sparse))
    assert engine.runner.use_graphs and not engine.runner.graphs  # nothing captured up front
    graphs = _run(model, tok, prompts, 24, attention_backend="double_sparse", attention_options=sparse,
                  enforce_eager=False, max_num_seqs=4)
    assert [t for t, _ in graphs] == [t for t, _ in eager] and _max_gap(graphs, eager) < 1e-3
    assert [t for t, _ in graphs] != [t for t, _ in dense]  # the budget really binds
    # Two graphs kept at most: buckets met again after their graph was dropped are captured again.
    engine = LLMEngine(model, tok, EngineConfig(max_model_len=4096, num_kv_blocks=1024, max_num_seqs=4,
                                                attention_backend="double_sparse", attention_options=sparse,
                                                max_lazy_graphs=2))
    # Requests that finish at different steps (the longest prompt first) walk the batch and context buckets.
    for prompt, max_tokens in zip(prompts, (24, 16, 8, 2), strict=True):
        engine.add_request(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    captured = set()
    while engine.has_unfinished:
        engine.step()
        assert len(engine.runner.graphs) <= 2
        captured |= set(engine.runner.graphs)
    assert len(captured) > 2
    capped = _run(model, tok, prompts, 24, attention_backend="double_sparse", attention_options=sparse,
                  enforce_eager=False, max_num_seqs=4, max_lazy_graphs=2)
    assert [t for t, _ in capped] == [t for t, _ in eager] and _max_gap(capped, eager) < 1e-3
