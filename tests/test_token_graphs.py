"""Prefill and mixed steps replayed from token graphs: the same logits, K/V and tokens as run eagerly.

The padding layout (`TokenGraphs.stage`) is checked everywhere: without CUDA the Triton kernels run in the
interpreter, on the staged buffers, without a graph. The replay itself needs CUDA.
"""

from __future__ import annotations

import copy
import os
import weakref

import numpy as np
import pytest
import torch

from conftest import dummy_model

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernels' @triton.jit
pytest.importorskip("triton")

from lmstack.engine.config import EngineConfig  # noqa: E402
from lmstack.engine.llm_engine import LLMEngine  # noqa: E402
from lmstack.engine.runner import ModelRunner  # noqa: E402
from lmstack.engine.sampling_params import SamplingParams  # noqa: E402
from lmstack.engine.scheduler import ScheduledChunk, SchedulerOutput  # noqa: E402
from lmstack.engine.sequence import Sequence  # noqa: E402
from lmstack.engine.token_graphs import TokenGraphs  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CONFIG = dict(model_type="qwen2", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, eos_token_id=[2])
POISON = 12345.0
# (tokens cached before the step, tokens the step computes, proposals): two prefill chunks (one starts a
# prompt, one continues a chunked one), decodes with and without proposals.
STEP = [(0, 23, 0), (40, 1, 3), (16, 9, 0), (7, 1, 0), (3, 1, 2)]


@pytest.fixture(scope="module")
def model(tiny_tokenizer_dir):
    m, tok = dummy_model(CONFIG, tiny_tokenizer_dir, DEVICE)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0, 0.08)
    return m, tok


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _chunks(cfg: EngineConfig, gen: torch.Generator) -> list[ScheduledChunk]:
    """Fresh random requests of STEP, each with its own blocks (block 0 is reserved)."""
    out, next_block = [], 1
    for i, (cached, own, spec) in enumerate(STEP):
        tokens = torch.randint(3, 512, (cached + own,), generator=gen).tolist()
        blocks = -(-(cached + own + spec) // cfg.block_size)
        seq = Sequence(str(i), tokens, SamplingParams(max_tokens=8))
        seq.block_table = list(range(next_block, next_block + blocks))
        next_block += blocks
        out.append(ScheduledChunk(seq, cached, own, torch.randint(3, 512, (spec,), generator=gen).tolist()))
    return out


def _with_prefix(runner: ModelRunner, chunks: list[ScheduledChunk]) -> None:
    """Compute what each chunk has cached (eagerly: prefix chunks are not steps the graphs take)."""
    prefix = [ScheduledChunk(c.seq, 0, c.start) for c in chunks if c.start]
    runner.use_graphs, graphs = False, runner.use_graphs
    runner.forward_logits(SchedulerOutput(prefix))
    runner.use_graphs = graphs


def _fresh_step(cfg: EngineConfig, gen: torch.Generator, runners: tuple[ModelRunner, ...]) -> list[ScheduledChunk]:
    """Random chunks of STEP, with each runner's cache poisoned and then holding what the chunks have cached."""
    chunks = _chunks(cfg, gen)
    for runner in runners:
        _poison(runner)
        _with_prefix(runner, chunks)
    return chunks


def _poison(runner: ModelRunner) -> None:
    for k, v in runner.kv_caches:  # finite: padding reads the reserved block
        k.fill_(POISON)
        v.fill_(POISON)


def _compare_kv(eager: ModelRunner, other: ModelRunner, chunks: list[ScheduledChunk]) -> None:
    for (ke, ve), (ko, vo) in zip(eager.kv_caches, other.kv_caches, strict=True):
        written = ko[1:, :, 0, 0] != POISON
        assert torch.equal(written, ke[1:, :, 0, 0] != POISON)
        assert written.sum() == sum(c.start + c.num_tokens + len(c.spec_tokens) for c in chunks)
        assert _rel(ko[1:][written], ke[1:][written]) < 1e-4 and _rel(vo[1:][written], ve[1:][written]) < 1e-4


def test_staged_padding_gives_the_eager_logits(model) -> None:
    """A mixed step staged into a (64 tokens, 16 sequences) bucket and run on the static buffers: the sampled
    rows' logits and every K/V written outside the reserved block equal the eager step's."""
    m, _ = model
    cfg = EngineConfig(max_model_len=1024, num_kv_blocks=64, max_num_seqs=8, attention_backend="triton")
    eager, staged = ModelRunner(m, copy.copy(cfg), 1024), ModelRunner(m, copy.copy(cfg), 1024)
    eager.use_graphs = staged.use_graphs = False
    graphs = TokenGraphs(staged, 64)
    assert graphs.sizes == [16, 32, 48, 64] and graphs.seqs == [4, 16]
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        chunks = _fresh_step(cfg, gen, (eager, staged))
        ref = eager.forward_logits(SchedulerOutput(chunks))
        t, b = 48, 16  # 41 tokens of 5 chunks, padded
        picks = graphs.stage(SchedulerOutput(chunks), t, b)
        staged.backend.meta = graphs.meta(t, b)
        with torch.inference_mode():
            hidden = m(graphs.ids[:t], graphs.pos[:t], staged.backend)
            out = m.compute_logits(hidden.index_select(0, picks))
        assert out.shape == ref.shape == (sum(1 + len(c.spec_tokens) for c in chunks), 512)
        assert torch.isfinite(hidden).all() and _rel(out, ref) < 1e-4
        _compare_kv(eager, staged, chunks)


def test_bucket_choice() -> None:
    """Buckets hold the step's rows (proposals included) and its chunks plus the padding sequence."""
    runner = type("R", (), {})()
    runner.cfg = EngineConfig(max_num_seqs=20, max_num_batched_tokens=100)
    runner.model_cfg = type("C", (), {"max_position_embeddings": 1024})()
    runner.device, runner.max_blocks_per_seq, runner.block_size = torch.device("cpu"), 4, 16
    graphs = TokenGraphs(runner, 2048)
    assert graphs.sizes == [16, 32, 48, 64, 80, 96] and graphs.seqs == [4, 16, 64]
    assert graphs.tables.shape == (64, 6)  # the padding sequence outgrows a 64-token context window
    assert graphs._seq_buckets(16) == [4, 16, 64] and graphs._seq_buckets(2) == [4]
    graphs.graphs = {(t, b): None for t in graphs.sizes for b in graphs._seq_buckets(t)}
    seq = Sequence("0", list(range(3, 60)), SamplingParams())

    def step(*chunks: tuple[int, int]) -> SchedulerOutput:
        return SchedulerOutput([ScheduledChunk(seq, 0, n, [5] * s) for n, s in chunks])

    assert graphs.key(step((17, 0))) == (32, 4)
    assert graphs.key(step((10, 0), (1, 6))) == (32, 4)  # 17 rows with the proposals
    assert graphs.key(step(*[(1, 0)] * 3)) == (16, 4)
    assert graphs.key(step(*[(1, 0)] * 4)) == (16, 16)  # 4 chunks + the padding sequence
    assert graphs.key(step((97, 0))) is None  # beyond the largest bucket: eager


gpu = pytest.mark.gpu


@gpu
def test_token_graph_logits_match_the_eager_forward(model) -> None:
    """Graphs captured on padding only, replayed on fresh random mixed steps: the eager logits and K/V."""
    m, _ = model
    cfg = EngineConfig(max_model_len=1024, num_kv_blocks=64, max_num_seqs=8, token_graph_tokens=64)
    eager, graphs = ModelRunner(m, copy.copy(cfg), 1024), ModelRunner(m, copy.copy(cfg), 1024)
    eager.use_graphs = False
    assert graphs.token_graphs is not None and set(graphs.token_graphs.graphs) == {
        (t, b) for t in (16, 32, 48, 64) for b in (4, 16)}
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        chunks = _fresh_step(cfg, gen, (eager, graphs))
        timings: dict[str, float] = {}
        ref = eager.forward_logits(SchedulerOutput(chunks))
        assert not eager.last_graphed  # use_graphs = False turns off every kind of graph
        out = graphs.forward_logits(SchedulerOutput(chunks), timings)
        assert timings["token_graph_steps"] == 1 and graphs.last_graphed
        assert torch.isfinite(out).all() and _rel(out, ref) < 1e-4
        _compare_kv(eager, graphs, chunks)


@gpu
def test_generation_with_token_graphs_is_unchanged(model) -> None:
    """Greedy generation of prompts that arrive over time (prefills mixed with decodes): the same tokens with
    token graphs as without, and the graphs were used. The context window is shorter than the largest token
    bucket, so the padding sequence can outgrow it."""
    m, tok = model
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 512, (int(n),), generator=gen).tolist() for n in (5, 37, 120, 18, 64, 9)]
    results = []
    for tokens in (0, 256):
        engine = LLMEngine(m, tok, EngineConfig(max_model_len=160, num_kv_blocks=256, max_num_seqs=4,
                                                max_num_batched_tokens=256, token_graph_tokens=tokens))
        done: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            engine.add_request(p, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True), str(i))
            for out in engine.step():
                if out.finished:
                    done[int(out.request_id)] = out.outputs[0].token_ids
        while engine.has_unfinished:
            for out in engine.step():
                if out.finished:
                    done[int(out.request_id)] = out.outputs[0].token_ids
        results.append((done, engine.stats.get("token_graph_steps", 0)))
    assert results[0][0] == results[1][0] and results[0][1] == 0 and results[1][1] > 0
    assert engine.runner.token_graphs is not None and max(engine.runner.token_graphs.sizes) == 256


def test_step_arrays_match_a_chunk_by_chunk_gathering() -> None:
    """Fresh random steps of decodes, prefill chunks and proposals, some chunks not sampling: the flat arrays
    equal what a loop over the chunks builds."""
    from lmstack.engine.step_arrays import StepArrays

    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        chunks = []
        for i in range(int(torch.randint(1, 9, (1,), generator=gen))):
            cached, own, spec = (int(x) for x in torch.randint(0, 40, (3,), generator=gen))
            own, spec = max(own, 1), spec % 4 if own == 1 else 0
            total = cached + own + int(torch.randint(0, 2, (1,), generator=gen)) * 5  # 5 more: not sampling
            seq = Sequence(str(i), torch.randint(3, 512, (total,), generator=gen).tolist(), SamplingParams())
            seq.block_table = torch.randperm(200, generator=gen)[: -(-(total + spec) // 16)].add(1).tolist()
            chunks.append(ScheduledChunk(seq, cached, own, torch.randint(3, 512, (spec,), generator=gen).tolist()))
        a = StepArrays.of(chunks)
        tokens, pos, slots, picks, row = [], [], [], [], 0
        for c in chunks:
            m = c.num_tokens + len(c.spec_tokens)
            tokens += c.seq.tokens(c.start, c.start + c.num_tokens) + c.spec_tokens
            pos += list(range(c.start, c.start + m))
            slots += [c.seq.block_table[p // 16] * 16 + p % 16 for p in range(c.start, c.start + m)]
            row += m
            if c.samples:
                picks += list(range(row - 1 - len(c.spec_tokens), row))
        starts = np.cumsum(a.lengths) - a.lengths
        assert a.tokens.tolist() == tokens and a.positions().tolist() == pos and a.slots(16).tolist() == slots
        assert a.picks(starts).tolist() == picks
        for i, c in enumerate(chunks):
            assert a.tables[i, : len(c.seq.block_table)].tolist() == c.seq.block_table


def test_token_graph_bench_validates_its_arguments() -> None:
    """Cases parse, and bad cases or a machine without CUDA get a message that says what to change."""
    import argparse

    from lmstack.bench import token_graphs as bench
    from lmstack.errors import LmstackError

    assert bench.parse_cases("16, 160x4,160+8,20x2+3") == [(16, 1, 0), (160, 4, 0), (160, 1, 8), (20, 2, 3)]
    for bad in ("", "x4", "160x0", "160+", "a"):
        with pytest.raises(LmstackError, match="cases"):
            bench.parse_cases(bad)
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    with pytest.raises(LmstackError, match="max-num-seqs"):
        bench.run(parser.parse_args(["--cases", "16x4+40"]))
    with pytest.raises(LmstackError, match="max-model-len"):
        bench.run(parser.parse_args(["--cases", "5000"]))
    if not torch.cuda.is_available():
        with pytest.raises(LmstackError, match="CUDA"):
            bench.run(parser.parse_args(["--cases", "16"]))


def test_a_deleted_engine_frees_its_cache(model) -> None:
    """The engine freezes the collector at start-up, so a reference cycle among its objects (token graphs and
    runner, say) would keep the KV cache and graphs alive after `del engine`: no object of it may be in one."""
    m, tok = model
    before = torch.cuda.memory_allocated() if DEVICE == "cuda" else 0
    blocks = 2**17 if DEVICE == "cuda" else 256  # 1 GiB of K/V on a GPU (8 KiB a block), to see it go
    engine = LLMEngine(m, tok, EngineConfig(max_model_len=160, num_kv_blocks=blocks, max_num_seqs=4,
                                            max_num_batched_tokens=256, token_graph_tokens=256, freeze_gc=True))
    engine.add_request(list(range(3, 40)), SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), "0")
    while engine.has_unfinished:
        engine.step()
    assert (engine.runner.token_graphs is not None) == (DEVICE == "cuda")
    runner = weakref.ref(engine.runner)
    del engine
    assert runner() is None
    if DEVICE == "cuda":  # what stays is cuBLAS's workspaces (70 MB on an H200; clearing them leaves 0)
        assert torch.cuda.memory_allocated() < before + 2**29


@gpu
def test_a_full_batch_between_buckets_replays_a_decode_graph(model) -> None:
    """max_num_seqs = 12 lies between the graph buckets 8 and 16: the runner captures up to 16, so twelve
    decodes replay a padded graph instead of running eagerly."""
    m, tok = model
    engine = LLMEngine(m, tok, EngineConfig(max_model_len=160, num_kv_blocks=256, max_num_seqs=12))
    assert engine.runner.max_graph_bs == 16
    for i in range(12):
        engine.add_request(list(range(3, 20 + i)), SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True),
                           str(i))
    replays = []
    while engine.has_unfinished:
        running = engine.scheduler.running
        decoding = len(running) == 12 and all(s.num_output_tokens > 0 for s in running)
        before = {k: engine.stats.get(k, 0) for k in ("graph_steps", "token_graph_steps", "chunk_graph_steps")}
        engine.step()
        if decoding:
            replays.append(tuple(engine.stats.get(k, 0) - n for k, n in before.items()))
    assert replays and set(replays) == {(1, 0, 0)}  # decode graphs, neither token nor chunk graphs
