"""The engine loop: add requests, `step()` until done. The offline LLM and the async server drive it."""

from __future__ import annotations

import atexit
import functools
import gc
import itertools
import time
from collections.abc import Callable
from typing import Any

import torch

from lmstack.engine.block_manager import BlockManager
from lmstack.engine.config import EngineConfig
from lmstack.engine.outputs import CompletionOutput, RequestOutput
from lmstack.engine.policies import make_policy
from lmstack.engine.runner import ModelRunner
from lmstack.engine.sampling_params import SamplingParams
from lmstack.engine.scheduler import Scheduler, SchedulerOutput
from lmstack.engine.sequence import Sequence
from lmstack.engine.spec.decoder import SpecDecoder
from lmstack.errors import LmstackError, RequestError
from lmstack.models.config import ModelConfig
from lmstack.models.llama import LlamaModel
from lmstack.models.tokenizer import IncrementalDetokenizer, Tokenizer


def freeze_gc() -> None:
    """Collect, then move every live object to the collector's permanent generation (`EngineConfig.freeze_gc`).

    Objects freed by reference counting still go; only cyclic garbage created before this waits for exit, when
    everything is unfrozen so that extension modules release their objects."""
    gc.collect()
    gc.freeze()
    _unfreeze_at_exit()


@functools.cache
def _unfreeze_at_exit() -> None:
    atexit.register(gc.unfreeze)


class LLMEngine:
    def __init__(self, model: LlamaModel, tokenizer: Tokenizer, config: EngineConfig | None = None,
                 draft_model: LlamaModel | None = None) -> None:
        """`draft_model`: an already loaded draft for speculative decoding (else `config.spec_model` is loaded)."""
        self.config = config or EngineConfig()
        self.model = model
        self.tokenizer = tokenizer
        self.model_config: ModelConfig = model.config
        limit = min(self.model_config.max_position_embeddings, self.config.max_model_len_cap)
        self.max_model_len = self.config.max_model_len or limit
        if self.max_model_len > self.model_config.max_position_embeddings:
            raise RequestError(
                f"max_model_len {self.max_model_len} exceeds the model's context window "
                f"({self.model_config.max_position_embeddings})"
            )
        torch.manual_seed(self.config.seed)
        self.runner = ModelRunner(model, self.config, self.max_model_len)
        self.blocks = BlockManager(self.runner.num_blocks, self.config.block_size)
        self.scheduler = Scheduler(self.blocks, make_policy(self.config.policy, **self.config.policy_options),
                                   self.config.max_num_seqs, self.config.max_num_batched_tokens)
        self.spec: SpecDecoder | None = None  # the speculative step, while speculation is on
        self._spec_decoder: SpecDecoder | None = None
        if self.config.speculative is not None:
            self.spec = self._spec_decoder = SpecDecoder.create(self.config, self.runner, self.blocks, self.scheduler,
                                                                tokenizer, self.max_model_len, draft_model)
        self.requests: dict[str, Sequence] = {}
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._ids = itertools.count()
        self._seq_no = itertools.count()
        self.stats: dict[str, float] = {"steps": 0, "schedule_s": 0.0, "forward_s": 0.0, "sample_s": 0.0,
                                        "postprocess_s": 0.0, "graph_steps": 0}
        # When a list, each step run without speculation appends (schedule, seconds, graph replayed): what plain
        # decoding costs, for a SmartSpec profile (`spec.decoder.plain_profile`). Kept raw: a step pays an append.
        self.plain_steps: list[tuple[SchedulerOutput, float, bool]] | None = None
        if self.config.freeze_gc:
            freeze_gc()

    # ----- requests -----
    def add_request(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None,
                    prompt: str | None = None, priority: int = 0, arrival_time: float | None = None) -> str:
        """Queue a request; errors (too long, empty, bad ids) are raised here, before any work."""
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        n = len(prompt_token_ids)
        if n == 0:
            raise RequestError("the prompt is empty: give at least one token")
        if n >= self.max_model_len:
            raise RequestError(
                f"the prompt has {n} tokens but the context window is {self.max_model_len} tokens "
                f"(prompt + at least 1 generated token); shorten the prompt"
            )
        vocab = self.model_config.vocab_size
        if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab:
            raise RequestError(f"prompt token ids must be in [0, {vocab})")
        if -(-(n + 1) // self.config.block_size) > self.blocks.num_blocks - 1:
            raise RequestError(f"the prompt ({n} tokens) does not fit in the KV cache; raise its memory budget")
        seq = Sequence(request_id=request_id, prompt_token_ids=list(prompt_token_ids), params=params, prompt=prompt,
                       priority=priority, seq_no=next(self._seq_no))
        if arrival_time is not None:
            seq.arrival_time = seq.metrics.arrival_time = arrival_time
        if params.seed is not None:
            seq.generator = torch.Generator(device=self.runner.device).manual_seed(params.seed)
        self.requests[request_id] = seq
        if self.config.stream_text or params.stop:
            self._detok[request_id] = IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids)
        self.scheduler.add([seq])
        return request_id

    def abort_request(self, request_id: str) -> None:
        seq = self.requests.pop(request_id, None)
        if seq is not None and not seq.is_finished:
            self.scheduler.finish(seq, "abort")
        self._detok.pop(request_id, None)

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    def set_spec_k(self, spec_k: int | str | None) -> None:
        """Switch the proposal-length policy ("smart" or a fixed k) between runs, with a fresh controller;
        None turns speculation off (plain steps) and keeps the draft loaded. The engine must be idle."""
        if self._spec_decoder is None:
            raise LmstackError("this engine was built without speculative decoding (set speculative=...)")
        if self.has_unfinished:
            raise RuntimeError("set_spec_k needs an idle engine")
        self.spec = None if spec_k is None else self._spec_decoder
        if spec_k is not None:
            self._spec_decoder.set_policy(spec_k)

    # ----- the loop -----
    def step(self, on_launch: Callable[[], None] | None = None) -> list[RequestOutput]:
        """One scheduling step and one forward; returns the requests that got a token or finished.

        `on_launch` is called once the forward is queued on the device (not at all when nothing was scheduled).
        """
        t0 = time.perf_counter()
        sched = self.scheduler.schedule()
        t1 = time.perf_counter()
        self.stats["schedule_s"] += t1 - t0
        if not sched.chunks:
            return []
        now = time.monotonic()
        for c in sched.chunks:
            if c.seq.metrics.first_scheduled_time is None:
                c.seq.metrics.first_scheduled_time = now
        if self.spec is not None:
            new_tokens = self.spec.execute(sched, self.stats, on_launch)
        else:
            tokens, logprobs = self.runner.execute(sched, self.stats, on_launch)
            new_tokens = [([t], [lp]) for t, lp in zip(tokens, logprobs, strict=True)]
        t2 = time.perf_counter()
        outputs: list[RequestOutput] = []
        sampled = iter(new_tokens)
        now = time.monotonic()
        for c in sched.chunks:
            seq = c.seq
            seq.num_computed += c.num_tokens
            if not c.samples:
                continue
            tokens_c, logprobs_c = next(sampled)
            for token, lp in zip(tokens_c, logprobs_c, strict=True):  # token by token: stop at the first stop
                self._append(seq, token, lp, now)
                if seq.is_finished:
                    break
            if c.spec_tokens and not seq.is_finished:
                seq.num_computed += len(tokens_c) - 1  # the accepted proposals' K/V were computed
                self.spec.rollback(seq)
            outputs.append(self._output(seq))
        self.stats["steps"] += 1
        self.stats["postprocess_s"] += time.perf_counter() - t2
        if self.spec is not None:
            self.spec.observe(time.perf_counter() - t0)
        elif self.plain_steps is not None:
            self.plain_steps.append((sched, time.perf_counter() - t0, self.runner.last_graphed))
        return outputs

    def _append(self, seq: Sequence, token: int, lp: Any, now: float) -> None:
        seq.output_token_ids.append(token)
        if lp is not None:
            seq.logprobs.append(lp)
        if seq.metrics.first_token_time is None:
            seq.metrics.first_token_time = now
        p = seq.params
        detok = self._detok.get(seq.request_id)
        if detok is not None:
            seq.text += detok.push(token)
        reason = None
        eos = not p.ignore_eos and token in self.tokenizer.eos_token_ids
        if token in p.stop_token_ids or eos or (p.stop and self._hit_stop_string(seq)):
            reason = "stop"
        elif seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = "length"
        if reason is not None:
            seq.metrics.finish_time = now
            self.scheduler.finish(seq, reason)
            if detok is None:  # text was not streamed: decode it once, now
                seq.text = self.tokenizer.decode(seq.output_token_ids)

    def _hit_stop_string(self, seq: Sequence) -> bool:
        """Cut the text at the first stop string (kept if include_stop_str_in_output)."""
        for s in seq.params.stop:
            i = seq.text.find(s)
            if i >= 0:
                seq.text = seq.text[: i + len(s)] if seq.params.include_stop_str_in_output else seq.text[:i]
                return True
        return False

    def _output(self, seq: Sequence) -> RequestOutput:
        done = seq.is_finished
        if done:
            self.requests.pop(seq.request_id, None)
            self._detok.pop(seq.request_id, None)
        return RequestOutput(
            request_id=seq.request_id, prompt=seq.prompt, prompt_token_ids=seq.prompt_token_ids,
            outputs=[CompletionOutput(index=0, text=seq.text, token_ids=list(seq.output_token_ids),
                                      finish_reason=seq.finish_reason,
                                      logprobs=list(seq.logprobs) if seq.params.logprobs is not None else None)],
            finished=done, metrics=seq.metrics,
        )
