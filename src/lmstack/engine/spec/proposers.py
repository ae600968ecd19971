"""Where proposed tokens come from, by name: `PROPOSERS["ngram"]`, `PROPOSERS["draft"]`.

A proposer guesses up to k[i] next tokens of each request; the target verifies them all in one forward.
- `ngram` (prompt lookup): find the longest suffix of the request's tokens (max_n down to min_n tokens) that
  occurred earlier in its prompt or output, and propose what followed it. Free, and good when the answer
  quotes its context (summaries, edits, code changes). Its proposals are deterministic (q is one-hot).
- `draft`: a smaller model with the same tokenizer decodes k tokens ahead, greedily for greedy requests and
  by sampling from its processed distribution q otherwise (kept for rejection sampling). It has its own paged
  KV cache and block tables, kept consistent with the target's: it catches up lazily on tokens it has not
  seen (its first forward of a step is a chunk), rolls back to the accepted tokens after verification, and
  frees a request's blocks when the target does (preemption, finish, abort).
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from lmstack.engine.block_manager import BlockManager
from lmstack.engine.config import EngineConfig
from lmstack.engine.runner import ModelRunner
from lmstack.engine.sampler import race_noise, sampling_probs
from lmstack.engine.scheduler import ScheduledChunk, SchedulerOutput
from lmstack.engine.sequence import Sequence
from lmstack.errors import LmstackError
from lmstack.models.llama import LlamaModel
from lmstack.models.tokenizer import Tokenizer


@dataclass
class Proposal:
    """Proposed tokens per request (each at most its k, possibly fewer) and, for sampled drafts, their q.

    `probs[i, j]` is the distribution token j of request i was drawn from; None means one-hot proposals.
    `draft_forwards` / `draft_tokens` count the draft model's work, for the latency model.
    """

    tokens: list[list[int]]
    probs: torch.Tensor | None = None
    draft_forwards: int = 0
    draft_tokens: int = 0


@dataclass
class ProposerContext:
    """What a proposer may need from the engine that builds it."""

    config: EngineConfig
    runner: ModelRunner  # the target's
    tokenizer: Tokenizer
    max_model_len: int
    draft_model: LlamaModel | None = None  # a loaded draft; else `config.spec_model` is loaded


class Proposer:
    name: ClassVar[str]
    runs_model: ClassVar[bool] = False  # each proposed token costs a forward of a model
    # Proposing costs next to nothing and changes no state: the decoder may propose before choosing k.
    free: ClassVar[bool] = False

    def propose(self, seqs: list[Sequence], ks: list[int]) -> Proposal:
        raise NotImplementedError

    def lag(self, seq: Sequence) -> int:
        """Tokens of `seq` the proposer must process before proposing for it, beyond its last one."""
        return 0

    def rollback(self, seq: Sequence) -> None:
        """`seq` kept only the accepted tokens (seq.num_computed is their count): drop state past them."""

    def release(self, seq: Sequence) -> None:
        """`seq` left the running batch (preempted, finished or aborted): free what it holds."""

    @property
    def num_used_blocks(self) -> int:
        return 0


class NgramIndex:
    """Where every n-gram (min_n..max_n tokens) of a growing token list ends, kept up to date incrementally, so a
    lookup costs a few dictionary probes however long the request is, not a scan of all its tokens."""

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n
        self.ends: dict[tuple[int, ...], list[int]] = {}  # n-gram -> its end positions (exclusive), ascending
        self.indexed = 0  # n-grams ending at or before this position are in `ends`

    def lookup(self, tokens: list[int], k: int) -> list[int]:
        """What followed the longest earlier occurrence of the tokens' suffix: the most recent occurrence
        with k tokens after it, else the one with the most (the earliest). `tokens` must extend the list the
        index saw before."""
        length = len(tokens)
        for end in range(self.indexed + 1, length):  # the suffix itself (ending at `length`) is not indexed
            for n in range(self.min_n, min(self.max_n, end) + 1):
                self.ends.setdefault(tuple(tokens[end - n: end]), []).append(end)
        self.indexed = max(self.indexed, length - 1)
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            ends = self.ends.get(tuple(tokens[length - n:]))
            if ends:
                full = bisect.bisect_right(ends, length - k)  # occurrences with k tokens after them
                start = ends[full - 1] if full else ends[0]
                return tokens[start: start + k]
        return []


class NgramProposer(Proposer):
    name = "ngram"
    free = True

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n
        self.indexes: dict[Sequence, NgramIndex] = {}

    @classmethod
    def create(cls, ctx: ProposerContext) -> NgramProposer:
        return cls(ctx.config.spec_ngram_min_n, ctx.config.spec_ngram_max_n)

    def propose(self, seqs: list[Sequence], ks: list[int]) -> Proposal:
        out = []
        for s, k in zip(seqs, ks, strict=True):
            index = self.indexes.get(s)
            if index is None:
                index = self.indexes[s] = NgramIndex(self.min_n, self.max_n)
            out.append(index.lookup(s.prompt_token_ids + s.output_token_ids, k))
        return Proposal(out)

    def release(self, seq: Sequence) -> None:
        self.indexes.pop(seq, None)


@dataclass(eq=False)
class _DraftView:
    """The draft model's view of a request: the request's tokens plus this step's proposals, and its own
    block table and computed count (a draft cache can lag the target's: it catches up when it next runs)."""

    seq: Sequence
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0
    proposed: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return self.seq.num_tokens + len(self.proposed)

    def token_at(self, i: int) -> int:
        n = self.seq.num_tokens
        return self.seq.token_at(i) if i < n else self.proposed[i - n]

    def tokens(self, start: int, end: int) -> list[int]:
        n = self.seq.num_tokens
        return self.seq.tokens(start, min(end, n)) + self.proposed[max(start - n, 0): max(end - n, 0)]


class DraftProposer(Proposer):
    name = "draft"
    runs_model = True

    def __init__(self, model: LlamaModel, config: EngineConfig, max_model_len: int, num_blocks: int) -> None:
        backend = "auto" if config.attention_backend == "double_sparse" else config.attention_backend
        draft_cfg = dataclasses.replace(config, num_kv_blocks=num_blocks, attention_backend=backend,
                                        attention_options={}, speculative=None, spec_model=None,
                                        spec_profile=None)
        # As many blocks as the target: a request's draft cache never holds more tokens than its target cache,
        # so the draft pool cannot run out while the target's has room.
        self.runner = ModelRunner(model, draft_cfg, max_model_len)
        # Its first forward of a step catches up one or two tokens per request (more after steps without
        # speculation): up to K + 1 replay a chunk graph.
        self.runner.enable_chunk_graphs(config.spec_max_k + 1)
        self.blocks = BlockManager(num_blocks, config.block_size)
        self.views: dict[Sequence, _DraftView] = {}
        self.generator = torch.Generator(device=self.runner.device).manual_seed(config.seed + 1)

    @classmethod
    def create(cls, ctx: ProposerContext) -> DraftProposer:
        target = ctx.runner.model_cfg
        model = ctx.draft_model
        if model is None:
            from lmstack.models import load

            if ctx.config.spec_model is None:
                raise LmstackError("speculative='draft' needs a draft model: set spec_model (--spec-model)")

            model, tokenizer, _ = load(ctx.config.spec_model, dtype=ctx.runner.dtype, device=ctx.runner.device,
                                       seed=ctx.config.seed)
            probe = "def main():\n    print('Hello, world!')  # speculative decoding ✓"
            if (tokenizer.vocab_size != ctx.tokenizer.vocab_size
                    or tokenizer.encode(probe) != ctx.tokenizer.encode(probe)):
                raise LmstackError(
                    f"the draft model {ctx.config.spec_model!r} has a different tokenizer than the target "
                    f"({tokenizer.vocab_size} vs {ctx.tokenizer.vocab_size} tokens): a draft must share the "
                    "target's tokenizer")
        if model.config.vocab_size != target.vocab_size:
            raise LmstackError(f"the draft model's vocabulary ({model.config.vocab_size} logits) differs from the "
                               f"target's ({target.vocab_size}): a draft must share the target's tokenizer")
        if model.config.max_position_embeddings < ctx.max_model_len:
            raise LmstackError(f"the draft model's context window ({model.config.max_position_embeddings}) is "
                               f"shorter than max_model_len ({ctx.max_model_len}); lower max_model_len")
        return cls(model, ctx.config, ctx.max_model_len, ctx.runner.num_blocks)

    @property
    def num_used_blocks(self) -> int:
        return self.blocks.num_used

    def propose(self, seqs: list[Sequence], ks: list[int]) -> Proposal:
        """max(ks) sequential batched forwards: the first catches each request's draft cache up to its last
        token (a chunk), the rest feed back the previous proposal."""
        views = [self.views.setdefault(s, _DraftView(s)) for s in seqs]
        for v in views:
            v.proposed = []
        limits = list(ks)
        sampled = not all(s.params.greedy for s in seqs)
        probs: torch.Tensor | None = None
        forwards = tokens = 0
        for j in range(max(ks, default=0)):
            active = [i for i, v in enumerate(views) if len(v.proposed) == j < limits[i]]
            chunks = []
            for i in list(active):
                v = views[i]
                end = v.num_tokens
                if not self.blocks.can_allocate(self.blocks.blocks_needed(v, end)):
                    limits[i] = j  # no room: this request proposes what it has
                    active.remove(i)
                    continue
                self.blocks.allocate(v, end)
                chunks.append(ScheduledChunk(v, v.num_computed, end - v.num_computed))
            if not chunks:
                break
            logits = self.runner.forward_logits(SchedulerOutput(chunks))
            forwards += 1
            tokens += sum(c.num_tokens for c in chunks)
            params = [views[i].seq.params for i in active]
            if sampled:
                q = sampling_probs(logits, params)
                noise = race_noise(q, [views[i].seq.generator for i in active], self.generator)
                new = (q / noise).argmax(dim=-1)
                if probs is None:
                    probs = torch.zeros(len(seqs), max(ks), q.shape[-1], dtype=q.dtype, device=q.device)
                probs[active, j] = q
            else:
                new = logits.argmax(dim=-1)
            for i, c, t in zip(active, chunks, new.tolist(), strict=True):
                views[i].num_computed += c.num_tokens
                views[i].proposed.append(t)
        return Proposal([list(v.proposed) for v in views], probs, forwards, tokens)

    def lag(self, seq: Sequence) -> int:
        v = self.views.get(seq)
        return max(0, seq.num_tokens - 1 - (v.num_computed if v is not None else 0))

    def rollback(self, seq: Sequence) -> None:
        v = self.views.get(seq)
        if v is not None:
            v.proposed = []
            v.num_computed = min(v.num_computed, seq.num_computed)
            self.blocks.truncate(v, v.num_computed)

    def release(self, seq: Sequence) -> None:
        v = self.views.pop(seq, None)
        if v is not None:
            self.blocks.release(v)


PROPOSERS: dict[str, Callable[[ProposerContext], Proposer]] = {
    "ngram": NgramProposer.create,
    "draft": DraftProposer.create,
}
