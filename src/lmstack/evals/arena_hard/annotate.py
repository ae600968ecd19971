"""LLM quality annotation of prompts on BenchBuilder's seven criteria; score = number of criteria met.

The annotator must answer with one strict JSON object. An answer that does not parse is re-asked by
continuing the conversation (up to `max_reasks` times); after that the prompt is recorded with `score: null`
and counted, never silently dropped or given a made-up score. Results are appended one per prompt, so a
stopped run resumes where it was.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from lmstack.client import GenParams, LLMClient
from lmstack.evals.arena_hard.files import AppendLog, read_jsonl
from lmstack.evals.arena_hard.templates import ANNOTATE_REASK, ANNOTATE_SYSTEM, ANNOTATE_USER, parse_annotation


@dataclass
class AnnotateConfig:
    max_tokens: int = 96
    max_reasks: int = 2
    max_prompt_chars: int = 1500
    batch_size: int = 16
    temperature: float = 0.0


def annotation_prompt(prompt: str, max_chars: int) -> list[dict[str, str]]:
    text = prompt if len(prompt) <= max_chars else prompt[:max_chars] + " [...]"
    return [{"role": "system", "content": ANNOTATE_SYSTEM}, {"role": "user", "content": ANNOTATE_USER.format(
        prompt=text)}]


def annotate_prompts(client: LLMClient, items: list[tuple[str, str]], out_path: str | Path, cfg: AnnotateConfig,
                     progress: bool = True) -> list[dict[str, Any]]:
    """Annotate `(id, prompt)` items not yet in `out_path`; returns every record for `items`, in order."""
    out_path = Path(out_path)
    done = {str(r["id"]): r for r in read_jsonl(out_path)} if out_path.exists() else {}
    todo = [(i, p) for i, p in items if i not in done]
    with AppendLog(out_path) as log:
        for start in tqdm(range(0, len(todo), cfg.batch_size), desc=f"annotating ({client.model})",
                          unit="batch", disable=not progress):
            for record in _annotate_batch(client, todo[start:start + cfg.batch_size], cfg):
                log.write(record)
                done[record["id"]] = record
    return [done[i] for i, _ in items]


def _annotate_batch(client: LLMClient, batch: list[tuple[str, str]], cfg: AnnotateConfig) -> list[dict[str, Any]]:
    params = GenParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature, seed=0)
    convs = [annotation_prompt(p, cfg.max_prompt_chars) for _, p in batch]
    texts = [c.text for c in client.chat(convs, params)]
    parsed = [parse_annotation(t) for t in texts]
    attempts = [1] * len(batch)
    for _ in range(cfg.max_reasks):
        retry = [i for i, p in enumerate(parsed) if p is None]
        if not retry:
            break
        followups = [convs[i] + [{"role": "assistant", "content": texts[i]},
                                 {"role": "user", "content": ANNOTATE_REASK}] for i in retry]
        for i, conv, c in zip(retry, followups, client.chat(followups, params), strict=True):
            convs[i], texts[i], parsed[i] = conv, c.text, parse_annotation(c.text)
            attempts[i] += 1
    return [{"id": item_id, "prompt": prompt, "criteria": crit, "score": None if crit is None else sum(crit.values()),
             "attempts": n, "raw": text}
            for (item_id, prompt), crit, n, text in zip(batch, parsed, attempts, texts, strict=True)]
