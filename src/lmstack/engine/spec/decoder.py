"""A speculative engine step: choose k, propose, verify every request's proposals in one target forward.

The scheduler plans the step as usual; each decode chunk (one new token, which samples) then gets up to k
proposed tokens appended, so the forward sees a chunk of k + 1 tokens per request, like a short prefill, and
returns logits at all k + 1 positions. Rejection sampling turns them into 1..k+1 tokens per request. The
engine appends those one by one (stop checks run per token) and calls `rollback`, which keeps the accepted
tokens' K/V (num_computed counts them) and frees the blocks reserved for rejected ones, in both caches;
their stale K/V is simply overwritten later. On CUDA a verify step replays a chunk graph of its (batch size,
longest chunk) bucket (runner.py), as a draft's forwards do, so speculating does not mean leaving CUDA graphs.

A free proposer (n-gram lookup) is asked before k is chosen, for as many tokens as each request may propose,
so the controller knows which requests have a proposal at all; the chosen k then cuts them. A step in which
nothing is proposed is a plain step (the runner's own sampler, a CUDA graph for decodes), as cheap as with
speculation off.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from lmstack.engine.block_manager import BlockManager
from lmstack.engine.config import EngineConfig
from lmstack.engine.outputs import TokenLogprob
from lmstack.engine.runner import ModelRunner
from lmstack.engine.sampler import gather_logprobs, race_noise, sampling_probs
from lmstack.engine.scheduler import ScheduledChunk, Scheduler, SchedulerOutput
from lmstack.engine.sequence import Sequence
from lmstack.engine.spec.controller import PROFILE_VERSION, Controller, compact_feature
from lmstack.engine.spec.latency import FEATURES, StepShape, padded_tokens, step_features
from lmstack.engine.spec.proposers import PROPOSERS, Proposal, Proposer, ProposerContext
from lmstack.engine.spec.rejection import greedy_accept, rejection_sample
from lmstack.engine.spec.smartspec import make_controller
from lmstack.models.llama import LlamaModel
from lmstack.models.tokenizer import Tokenizer

StepTokens = list[tuple[list[int], list[TokenLogprob | None]]]


class SpecDecoder:
    """Owns the proposer and the controller; runs the steps of an engine that speculates."""

    def __init__(self, config: EngineConfig, runner: ModelRunner, blocks: BlockManager, scheduler: Scheduler,
                 proposer: Proposer, max_model_len: int) -> None:
        self.config = config
        self.runner = runner
        self.blocks = blocks
        self.proposer = proposer
        self.max_model_len = max_model_len
        self.controller = self.make_controller(config.spec_k)
        runner.enable_chunk_graphs(self.controller.max_k + 1)
        # The last step's longest proposal, decode requests and features, timed when the engine step ends.
        self._pending: tuple[int, int, np.ndarray] | None = None
        scheduler.release_hooks.append(self.release)

    @classmethod
    def create(cls, config: EngineConfig, runner: ModelRunner, blocks: BlockManager, scheduler: Scheduler,
               tokenizer: Tokenizer, max_model_len: int, draft_model: LlamaModel | None = None) -> SpecDecoder:
        ctx = ProposerContext(config, runner, tokenizer, max_model_len, draft_model)
        return cls(config, runner, blocks, scheduler, PROPOSERS[config.speculative](ctx), max_model_len)

    def make_controller(self, spec_k: int | str) -> Controller:
        """A fresh controller for `spec_k` ("smart" or a fixed k), warm-started from the configured profile."""
        k = self.config.spec_max_k if spec_k == "smart" else int(spec_k)
        return make_controller(spec_k, max(k, 1), self.proposer.runs_model, self.config.spec_profile)

    # ----- the step -----
    def execute(self, sched: SchedulerOutput, timings: dict[str, float],
                on_launch: Callable[[], None] | None = None) -> StepTokens:
        """Run the step; return each sampling chunk's new tokens (and logprobs), in chunk order."""
        t0 = time.perf_counter()
        decodes = [c for c in sched.chunks if c.samples and c.num_tokens == 1]
        caps = [self._cap(c.seq) for c in decodes]
        found: list[list[int]] | None = None
        if self.proposer.free and any(caps):
            found = self.proposer.propose([c.seq for c in decodes], caps).tokens
            caps = [len(t) for t in found]
        shape = StepShape(batched_tokens=sched.num_tokens,
                          kv_tokens=sum(c.start + c.num_tokens for c in sched.chunks),
                          num_other_samples=sum(c.samples for c in sched.chunks) - len(decodes),
                          keys=[c.seq for c in decodes], caps=caps, num_chunks=len(sched.chunks),
                          mixed=not sched.is_decode,
                          graphs=self.runner.use_graphs and self.runner.token_graphs is None)
        if sched.is_decode:
            shape.graph_batch, shape.graph_len = self.runner.chunk_graph_bound(len(sched.chunks))
        if self.proposer.runs_model:
            shape.lags = [self.proposer.lag(c.seq) for c in decodes]
            shape.remaining = [self._remaining(c.seq) for c in decodes]
        if decodes and not sched.is_decode:
            shape.alone = self._decodes_alone(decodes, shape)
        lengths = self.controller.plan(shape) if decodes else []
        proposing = self._reserve(decodes, lengths, self.config.max_num_batched_tokens - sched.num_tokens)
        proposal = Proposal([])
        if proposing and found is not None:
            row = {id(c): i for i, c in enumerate(decodes)}
            proposal = Proposal([found[row[id(c)]][:n] for c, n in proposing])
        elif proposing:
            proposal = self.proposer.propose([c.seq for c, _ in proposing], [n for _, n in proposing])
        for (c, _), tokens in zip(proposing, proposal.tokens, strict=True):
            c.spec_tokens = tokens
            self.blocks.truncate(c.seq, c.start + 1 + len(tokens))  # a proposer may return fewer than asked
        t1 = time.perf_counter()
        timings["propose_s"] = timings.get("propose_s", 0.0) + (t1 - t0)
        num_spec = sum(len(c.spec_tokens) for c in sched.chunks)

        def launched() -> None:  # the forward is queued: CPU work here overlaps the device
            self.controller.maintain()
            if decodes:
                self.controller.plan_ahead(shape.alone or shape)
            if on_launch is not None:
                on_launch()

        if num_spec:
            out = self._speculative(sched, timings, launched, proposal,
                                    {id(c): i for i, (c, _) in enumerate(proposing)})
        else:
            tokens, logprobs = self.runner.execute(sched, timings, launched)
            out = [([t], [lp]) for t, lp in zip(tokens, logprobs, strict=True)]
        batched, kv = sched.num_tokens + num_spec, shape.kv_tokens + num_spec
        graph = self.runner.last_chunk_graph if num_spec else None
        if graph is not None:
            batched, kv = padded_tokens(sched.num_tokens, shape.kv_tokens, *graph)
        features = step_features(batched, kv, proposal.draft_forwards, proposal.draft_tokens,
                                 0 if sched.is_decode else len(sched.chunks),
                                 self.runner.use_graphs and not self.runner.last_graphed)
        self._pending = (max((len(c.spec_tokens) for c in sched.chunks), default=0), len(decodes), features)
        timings["spec_proposed"] = timings.get("spec_proposed", 0) + num_spec
        return out

    def _speculative(self, sched: SchedulerOutput, timings: dict[str, float], on_launch: Callable[[], None],
                     proposal: Proposal, proposal_row: dict[int, int]) -> StepTokens:
        """The target forward over every chunk and its proposals, then verification."""
        t1 = time.perf_counter()
        logits = self.runner.forward_logits(sched, timings)
        on_launch()
        t2 = time.perf_counter()
        out = self._verify(sched, logits, proposal, proposal_row)
        t3 = time.perf_counter()
        for key, seconds in (("forward_s", t2 - t1), ("sample_s", t3 - t2)):
            timings[key] = timings.get(key, 0.0) + seconds
        return out

    def _decodes_alone(self, decodes: list[ScheduledChunk], shape: StepShape) -> StepShape:
        """A mixed step's decodes as a step of their own: what the next step, once the prompts are in, is
        made of (for `Controller.plan_ahead`), and the rate its time is weighed against (`SmartSpec.options`)."""
        alone = StepShape(batched_tokens=len(decodes), kv_tokens=sum(c.start + 1 for c in decodes),
                          num_other_samples=0, keys=shape.keys, caps=shape.caps, lags=shape.lags,
                          remaining=shape.remaining, graphs=shape.graphs)
        alone.graph_batch, alone.graph_len = self.runner.chunk_graph_bound(len(decodes))
        return alone

    def observe(self, seconds: float) -> None:
        """The whole engine step took `seconds`: one more point for the latency model."""
        if self._pending is not None:
            self.controller.observe_step(*self._pending, seconds)
            self._pending = None

    def _remaining(self, seq: Sequence) -> int:
        """Most tokens `seq` may still emit, within max_tokens and the context."""
        return min(seq.params.max_tokens - seq.num_output_tokens, self.max_model_len - seq.num_tokens)

    def _cap(self, seq: Sequence) -> int:
        """Most tokens `seq` may propose: k + 1 tokens may come back, within max_tokens and the context."""
        return max(0, min(self.controller.max_k, self._remaining(seq) - 1))

    def _reserve(self, decodes: list[ScheduledChunk], ks: list[int], budget: int) -> list[tuple[ScheduledChunk, int]]:
        """Fit the proposals into the token budget and the free KV blocks (never preempting for them)."""
        out = []
        for c, k in zip(decodes, ks, strict=True):
            k = min(k, budget)
            while k > 0 and not self.blocks.can_allocate(self.blocks.blocks_needed(c.seq, c.start + 1 + k)):
                k -= 1
            if k > 0:
                self.blocks.allocate(c.seq, c.start + 1 + k)
                budget -= k
                out.append((c, k))
        return out

    @torch.inference_mode()
    def _verify(self, sched: SchedulerOutput, logits: torch.Tensor | None, proposal: Proposal,
                proposal_row: dict[int, int]) -> StepTokens:
        sampling = [c for c in sched.chunks if c.samples]
        if not sampling:
            return []
        n_spec = [len(c.spec_tokens) for c in sampling]
        starts = np.cumsum([0] + [n + 1 for n in n_spec[:-1]])
        if all(c.seq.params.greedy for c in sampling):  # one small device-to-host copy, then plain comparisons
            targets = logits.argmax(dim=-1).tolist()
            pairs = [greedy_accept(targets[s: s + n + 1], c.spec_tokens)
                     for c, s, n in zip(sampling, starts.tolist(), n_spec, strict=True)]
            accepted_l, nxt_l = [a for a, _ in pairs], [t for _, t in pairs]
        else:
            accepted_l, nxt_l = self._rejection_sample(sampling, logits, proposal, proposal_row, n_spec, starts)
        emitted = [c.spec_tokens[:a] + [t] for c, a, t in zip(sampling, accepted_l, nxt_l, strict=True)]
        self.controller.observe_acceptances([c.seq for c in sampling], n_spec, accepted_l)
        return list(zip(emitted, self._logprobs(logits, sampling, starts, emitted), strict=True))

    def _rejection_sample(self, sampling: list[ScheduledChunk], logits: torch.Tensor, proposal: Proposal,
                          proposal_row: dict[int, int], n_spec: list[int], starts: np.ndarray
                          ) -> tuple[list[int], list[int]]:
        """Accepted counts and next tokens of a step with sampled requests: rejection sampling on the device."""
        dev = logits.device
        K, B = max(n_spec), len(sampling)
        num_proposed = torch.tensor(n_spec, device=dev)
        # Row of logits holding position j of chunk b (positions past its proposals repeat its last row).
        index = torch.tensor(starts, device=dev)[:, None] + torch.minimum(torch.arange(K + 1, device=dev)[None, :],
                                                                          num_proposed[:, None])
        draft = torch.tensor([c.spec_tokens + [0] * (K - len(c.spec_tokens)) for c in sampling], dtype=torch.long,
                             device=dev).view(B, K)
        row_params = [c.seq.params for c, n in zip(sampling, n_spec, strict=True) for _ in range(n + 1)]
        target = sampling_probs(logits, row_params)[index]  # [B, K+1, V]
        draft_probs = None
        if proposal.probs is not None and K > 0:
            draft_probs = torch.zeros(B, K, target.shape[-1], dtype=target.dtype, device=dev)
            for b, c in enumerate(sampling):
                if id(c) in proposal_row:
                    draft_probs[b, : n_spec[b]] = proposal.probs[proposal_row[id(c)], : n_spec[b]]
        gens = [c.seq.generator for c in sampling]
        uniforms = _uniforms(B, K, gens, self.runner.sampler.generator, dev)
        noise = race_noise(target[:, 0], gens, self.runner.sampler.generator)
        accepted, nxt = rejection_sample(target, draft, num_proposed, draft_probs, uniforms, noise)
        return accepted.tolist(), nxt.tolist()

    @staticmethod
    def _logprobs(logits: torch.Tensor, sampling: list[ScheduledChunk], starts: Any,
                  emitted: list[list[int]]) -> list[list[TokenLogprob | None]]:
        """Target logprobs of every emitted token, for the requests that asked for them."""
        out: list[list[TokenLogprob | None]] = []
        for b, (c, tokens) in enumerate(zip(sampling, emitted, strict=True)):
            n = c.seq.params.logprobs
            if n is None:
                out.append([None] * len(tokens))
                continue
            rows = torch.log_softmax(logits[int(starts[b]): int(starts[b]) + len(tokens)], dim=-1)
            out.append(gather_logprobs(rows, tokens, [n] * len(tokens)))
        return out

    # ----- cache consistency -----
    def rollback(self, seq: Sequence) -> None:
        """After the accepted tokens were appended: free target blocks past them and roll the draft back."""
        self.blocks.truncate(seq, seq.num_tokens)
        self.proposer.rollback(seq)

    def release(self, seq: Sequence) -> None:
        self.proposer.release(seq)
        self.controller.forget(seq)

    def set_policy(self, spec_k: int | str) -> None:
        """Switch to another k policy between runs (the engine must be idle)."""
        self.controller = self.make_controller(spec_k)
        self.runner.enable_chunk_graphs(self.controller.max_k + 1)
        self.config.spec_k = spec_k


def plain_profile(steps: list[tuple[SchedulerOutput, float, bool]], use_graphs: bool) -> dict[str, Any]:
    """A SmartSpec profile of steps run without speculation (`LLMEngine.plain_steps`), each a k = 0 sample with
    the features the decoder gives its own steps. A warm start from fixed-k runs alone knows plain decoding,
    which every k is weighed against, only from their rare steps without proposals: on a 2-core CPU (draft 0.5B,
    target 1.5B) that model's linear part put plain decode steps of 1-5 requests 3-23% below their measured
    times."""
    rows = []
    for sched, seconds, graphed in steps:
        # A chunk's `samples` reads its sequence as it is now, grown since: a one-token chunk counts as a decode
        # (the decoder's definition differs only for a one-token chunk in the middle of a prompt).
        decodes = sum(1 for c in sched.chunks if c.num_tokens == 1)
        kv = sum(c.start + c.num_tokens for c in sched.chunks)
        features = step_features(sched.num_tokens, kv, 0, 0, 0 if sched.is_decode else len(sched.chunks),
                                 use_graphs and not graphed)
        rows.append([0, decodes, *map(compact_feature, features.tolist()), round(seconds, 7)])
    return {"version": PROFILE_VERSION, "features": list(FEATURES), "acceptance": 0.5, "accepted_tokens": 0,
            "tested_tokens": 0, "acceptance_table": None, "samples": rows}


def _uniforms(B: int, K: int, gens: list[torch.Generator | None], default: torch.Generator,
              device: torch.device) -> torch.Tensor:
    """U[0, 1) draws for the acceptance tests, each seeded request's from its own generator."""
    u = torch.rand(B, K, generator=default, device=device)
    for b, gen in enumerate(gens):
        if gen is not None and K:
            u[b] = torch.rand(K, generator=gen, device=device)
    return u
