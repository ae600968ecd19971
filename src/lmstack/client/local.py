"""`LocalClient`: the `LLMClient` interface over an in-process engine, with no server in between."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from lmstack.client.base import Completion, Conversation, GenParams, TokenLogprob, Usage, check_batch
from lmstack.client.cache import DiskCache, request_key
from lmstack.engine import LLM, RequestOutput, SamplingParams
from lmstack.errors import LmstackError

_SAMPLING_EXTRA = ("top_k", "min_p", "stop_token_ids", "ignore_eos", "include_stop_str_in_output")


class LocalClient:
    """Runs a whole batch through one `llm.generate` call, so it is continuously batched by the engine.

    `model` is a model name (loaded here with `llm_kwargs`, e.g. device="cpu") or an existing `LLM` to share.
    A shared `LLM` has no name of its own: pass `name` so that cached answers cannot be mixed up between
    models. Calls are serialized by a lock because one engine runs one batch at a time.
    """

    def __init__(self, model: str | LLM, *, name: str | None = None, cache_dir: str | Path | None = None,
                 progress: bool = False, **llm_kwargs: Any) -> None:
        if isinstance(model, LLM):
            if llm_kwargs:
                raise LmstackError(f"LocalClient got an LLM and LLM options ({', '.join(llm_kwargs)}); "
                                   "pass the options to LLM(...) instead")
            self.llm = model
            self.model = name or (str(model.model_path) if model.model_path else "")
        else:
            self.llm = LLM(model, **llm_kwargs)
            self.model = name or model
        if cache_dir is not None and not self.model:
            raise LmstackError("LocalClient over an LLM of random weights needs name=... to key its cache")
        self.cache = DiskCache(cache_dir) if cache_dir is not None else None
        self.progress = progress
        self.num_requests = 0  # requests that ran on the model (cache hits excluded)
        self.num_cache_hits = 0
        self._lock = threading.Lock()

    def chat(self, conversations: list[Conversation], params: GenParams | None = None) -> list[Completion]:
        check_batch(conversations, "conversations")
        return self._run("chat", conversations, params or GenParams())

    def complete(self, prompts: list[str], params: GenParams | None = None) -> list[Completion]:
        check_batch(prompts, "prompts")
        return self._run("complete", prompts, params or GenParams())

    def embed(self, texts: list[str]) -> list[list[float]]:
        raise LmstackError("this client has no embedding model; use an embedding client for embed()")

    def _run(self, api: str, inputs: list[Any], params: GenParams) -> list[Completion]:
        sampling = _sampling_params(params)
        results: list[Completion | None] = [None] * len(inputs)
        keys = [request_key(api, self.model, x, params) for x in inputs] if self.cache else []
        todo = list(range(len(inputs)))
        if self.cache:
            for i, key in enumerate(keys):
                results[i] = self.cache.get(key)
            todo = [i for i, r in enumerate(results) if r is None]
            self.num_cache_hits += len(inputs) - len(todo)
        if todo:
            with self._lock:
                outs = self.llm.generate([inputs[i] for i in todo], sampling, use_tqdm=self.progress)
            self.num_requests += len(todo)
            for i, out in zip(todo, outs, strict=True):
                results[i] = self._completion(out)
                if self.cache:
                    self.cache.put(keys[i], results[i])
        return [r for r in results if r is not None]

    def _completion(self, out: RequestOutput) -> Completion:
        c = out.outputs[0]
        logprobs = None
        if c.logprobs is not None:
            logprobs = [TokenLogprob(token=self._piece(lp.token_id), logprob=lp.logprob, token_id=lp.token_id,
                                     top={self._piece(t): v for t, v in lp.top.items()})
                        for lp in c.logprobs]
        usage = Usage(prompt_tokens=len(out.prompt_token_ids), completion_tokens=len(c.token_ids))
        return Completion(text=c.text, finish_reason=c.finish_reason, token_ids=list(c.token_ids),
                          logprobs=logprobs, usage=usage)

    def _piece(self, token_id: int) -> str:
        """A token's own text, special tokens kept, as OpenAI-compatible servers report it in logprobs."""
        return self.llm.tokenizer.decode([token_id], skip_special_tokens=False)


def _sampling_params(params: GenParams) -> SamplingParams:
    unknown = sorted(set(params.extra) - set(_SAMPLING_EXTRA))
    if unknown:
        raise LmstackError(f"GenParams.extra has fields the local engine does not know: "
                           f"{', '.join(unknown)}; it accepts {', '.join(_SAMPLING_EXTRA)}")
    return SamplingParams(max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
                          seed=params.seed, stop=list(params.stop), logprobs=params.logprobs, **params.extra)
