"""Speculative steps replayed from chunk graphs (CUDA): the same logits and the same tokens as run eagerly."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import dummy_model
from lmstack.engine.config import EngineConfig
from lmstack.engine.llm_engine import LLMEngine
from lmstack.engine.runner import ModelRunner
from lmstack.engine.sampling_params import SamplingParams
from lmstack.engine.scheduler import ScheduledChunk, SchedulerOutput
from lmstack.engine.sequence import Sequence
from lmstack.engine.spec.latency import FEATURES

pytestmark = pytest.mark.gpu

CONFIG = dict(model_type="qwen2", vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
              num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024, eos_token_id=[2])


@pytest.fixture(scope="module")
def model(tiny_tokenizer_dir):
    m, tok = dummy_model(CONFIG, tiny_tokenizer_dir, "cuda")
    with torch.no_grad():
        for name, p in m.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0, 0.08)  # peaked logits: greedy choices are rarely near-ties
    return m, tok


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


POISON = 12345.0
# (prompt tokens, tokens the step computes, proposals): decodes with 0..5 proposals and a 2-token catch-up.
STEP = [(40, 1, 3), (7, 1, 0), (130, 2, 0), (3, 1, 5), (64, 1, 1)]


def _step(cfg: EngineConfig, gen: torch.Generator) -> list[tuple[list[int], int, list[int], list[int]]]:
    """Fresh random requests of STEP: (tokens, first position computed, proposals, block table)."""
    out, next_block = [], 1  # block 0 is reserved
    for prompt_len, own, spec in STEP:
        tokens = torch.randint(3, 512, (prompt_len + own,), generator=gen).tolist()
        proposals = torch.randint(3, 512, (spec,), generator=gen).tolist()
        blocks = -(-(prompt_len + own + spec) // cfg.block_size)
        out.append((tokens, prompt_len, proposals, list(range(next_block, next_block + blocks))))
        next_block += blocks
    return out


def _run_step(runner: ModelRunner, requests, timings: dict[str, float] | None = None) -> torch.Tensor:
    """Prefill each request's earlier tokens eagerly, then run the step's chunks (with their proposals)."""
    chunks = []
    for i, (tokens, start, proposals, table) in enumerate(requests):
        seq = Sequence(str(i), tokens, SamplingParams(max_tokens=8))
        seq.block_table = table
        chunks.append(ScheduledChunk(seq, start, len(tokens) - start, list(proposals)))
    prefix = SchedulerOutput([ScheduledChunk(c.seq, 0, c.start) for c in chunks])  # not a decode: eager
    runner.forward_logits(prefix)
    return runner.forward_logits(SchedulerOutput(chunks), timings)


def test_chunk_graph_logits_match_the_eager_forward(model) -> None:
    """A verify-shaped step (chunks of 1..6 tokens, padded to 6, batch padded to 8) on fresh random inputs: the
    graph's logits rows equal the eager forward's, and so does every K/V it writes outside the reserved block.
    The graphs were captured before any of it, on padding only."""
    m, _ = model
    cfg = EngineConfig(max_model_len=1024, num_kv_blocks=256, max_num_seqs=16)
    eager, graphs = ModelRunner(m, copy.copy(cfg), 1024), ModelRunner(m, copy.copy(cfg), 1024)
    eager.use_graphs = False
    graphs.enable_chunk_graphs(6)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        requests = _step(cfg, gen)
        for k, v in eager.kv_caches + graphs.kv_caches:  # poison (finite: padding reads stale slots)
            k.fill_(POISON)
            v.fill_(POISON)
        timings: dict[str, float] = {}
        ref = _run_step(eager, requests)
        assert not eager.last_graphed  # use_graphs = False turns off every kind of graph
        out = _run_step(graphs, requests, timings)
        assert timings["graph_steps"] == 1 and set(graphs.chunk_graphs) == {
            (b, q) for b in (1, 2, 4, 8, 16) for q in range(2, 7)}
        assert out.shape == ref.shape == (sum(1 + len(r[2]) for r in requests), 512)
        assert torch.isfinite(out).all() and _rel(out, ref) < 1e-4
        for (ke, ve), (kg, vg) in zip(eager.kv_caches, graphs.kv_caches, strict=True):
            written = kg[1:, :, 0, 0] != POISON
            assert torch.equal(written, ke[1:, :, 0, 0] != POISON) and written.sum() == sum(
                len(r[0]) + len(r[2]) for r in requests)
            assert _rel(kg[1:][written], ke[1:][written]) < 1e-4 and _rel(vg[1:][written], ve[1:][written]) < 1e-4


def _generate(m, tok, prompts: list[list[int]], draft=None, on_engine=None, **cfg
              ) -> tuple[dict[int, list[int]], LLMEngine]:
    engine = LLMEngine(m, tok, EngineConfig(max_model_len=1024, num_kv_blocks=256, max_num_seqs=8, **cfg),
                       draft_model=draft)
    if on_engine is not None:
        on_engine(engine)
    for i, p in enumerate(prompts):
        engine.add_request(p, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True), request_id=str(i))
    done = {}
    while engine.has_unfinished:
        for out in engine.step():
            if out.finished:
                done[int(out.request_id)] = out.outputs[0].token_ids
    assert engine.blocks.num_used == 0
    return done, engine


@pytest.mark.parametrize("proposer, spec_k", [("draft", 3), ("draft", "smart"), ("ngram", 4)])
def test_speculation_with_chunk_graphs_generates_the_same_tokens(model, proposer, spec_k) -> None:
    m, tok = model
    draft = copy.deepcopy(m)
    gen = torch.Generator(device="cuda").manual_seed(3)
    with torch.no_grad():  # a draft that is often, not always, right
        for p in draft.parameters():
            if p.dim() >= 2:
                p.add_(torch.randn(p.shape, generator=gen, device="cuda") * 0.1 * p.std())
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (5, 17, 64, 200, 33, 1)]
    prompts.append([9, 8, 7, 6] * 10)  # a repeating prompt, for n-gram matches
    ref, _ = _generate(m, tok, prompts, enforce_eager=True)
    kw = {"draft": draft} if proposer == "draft" else {}
    eager, eager_engine = _generate(m, tok, prompts, speculative=proposer, spec_k=spec_k, enforce_eager=True, **kw)
    graphed, engine = _generate(m, tok, prompts, speculative=proposer, spec_k=spec_k, **kw)
    assert eager == ref and graphed == ref
    assert engine.stats["chunk_graph_steps"] > 0 and "chunk_graph_steps" not in eager_engine.stats
    if spec_k != "smart":  # the same proposals (the draft's included), so the same acceptance
        accepted = [(e.spec.controller.acceptance.total_accepted, e.spec.controller.acceptance.total_proposed)
                    for e in (eager_engine, engine)]
        assert accepted[0] == accepted[1] and accepted[0][1] > 0
    if proposer == "draft":
        assert engine.spec.proposer.runner.chunk_graphs and engine.spec.proposer.num_used_blocks == 0


def test_chunk_graph_steps_are_measured_at_their_padded_size(model, monkeypatch) -> None:
    """A chunk graph computes every row at the longest chunk's length: SmartSpec's latency samples count those
    padded rows, and the bound the decoder gives the controller is the graph each verify step replayed."""
    m, tok = model
    seen = []

    def hook(engine: LLMEngine) -> None:
        observe, plan = engine.spec.controller.observe_step, engine.spec.controller.plan
        bounds = []

        def planning(shape):
            bounds.append((shape.graph_batch, shape.graph_len))
            return plan(shape)

        def recording(k, n, features, seconds):  # a prefill-only step plans nothing: no bound yet
            seen.append((k, bounds[-1] if bounds else None, engine.runner.last_chunk_graph, features))
            observe(k, n, features, seconds)

        monkeypatch.setattr(engine.spec.controller, "plan", planning)
        monkeypatch.setattr(engine.spec.controller, "observe_step", recording)

    prompts = [[9, 8, 7, 6] * 10, [5, 4, 3] * 9, [11, 12, 13, 14, 15] * 6]
    _generate(m, tok, prompts, speculative="ngram", spec_k=4, on_engine=hook)
    graphed = [(bound, graph, f) for k, bound, graph, f in seen if k > 0 and graph is not None]
    assert graphed
    for (bs, max_len), (graph_bs, q), f in graphed:
        assert graph_bs == bs and q <= max_len and f[FEATURES.index("batched_tokens")] == bs * q
