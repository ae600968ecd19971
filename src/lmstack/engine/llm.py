"""The offline batch API: `LLM(model).generate(prompts, SamplingParams)`."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lmstack.engine.config import EngineConfig
from lmstack.engine.llm_engine import LLMEngine
from lmstack.engine.outputs import RequestOutput
from lmstack.engine.sampling_params import SamplingParams
from lmstack.errors import RequestError
from lmstack.models import load

Prompt = str | list[dict[str, Any]] | dict[str, Any]


class LLM:
    """Loads a model once and generates for many prompts with continuous batching."""

    def __init__(self, model: str, dtype: str = "auto", device: str = "auto", tokenizer: str | None = None,
                 **engine_config: Any) -> None:
        config = EngineConfig(**{"stream_text": False, **engine_config})
        self.model, self.tokenizer, self.model_config = load(model, dtype=dtype, device=device, seed=config.seed,
                                                             tokenizer=tokenizer)
        self.model_path: Path | None = self.model.model_path
        self.device: torch.device = self.model.embed_tokens.weight.device
        self.engine = LLMEngine(self.model, self.tokenizer, config)

    def encode_prompt(self, prompt: Prompt) -> tuple[list[int], str | None]:
        """Token ids of a text, a chat (list of messages, rendered with the chat template) or token ids."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=True), prompt
        if isinstance(prompt, dict):
            ids = prompt.get("prompt_token_ids")
            if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
                raise RequestError("a dict prompt must be {'prompt_token_ids': [int, ...]}")
            return ids, None
        if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
            for m in prompt:
                if "role" not in m or "content" not in m:
                    raise RequestError("every chat message needs 'role' and 'content'")
            text = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
            return self.tokenizer.encode(text, add_special_tokens=False), text
        raise RequestError(f"unsupported prompt type {type(prompt).__name__}: give a str, a chat or token ids")

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in the prompts' order."""
        if isinstance(prompts, str | dict) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], dict) and "role" in prompts[0]
        ):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise RequestError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        encoded = [self.encode_prompt(p) for p in prompts]
        ids = [self.engine.add_request(tok, sp, prompt=text) for (tok, text), sp in zip(encoded, params, strict=True)]
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="generate", unit="req", disable=not use_tqdm, dynamic_ncols=True)
        n_out = 0
        try:
            while self.engine.has_unfinished:
                for out in self.engine.step():
                    n_out += 1
                    if out.finished:
                        results[out.request_id] = out
                        bar.update(1)
                bar.set_postfix_str(f"{n_out} tok", refresh=False)
        except BaseException:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        finally:
            bar.close()
        return [results[r] for r in ids]
