"""Answers of the models under test, in Arena-Hard v0.1's `model_answer/<model>.jsonl` layout, resumable.

Each finished answer is appended as one line, so a stopped run picks up at the first unanswered question.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from tqdm import tqdm

from lmstack.client import GenParams, LLMClient
from lmstack.evals.arena_hard.files import AppendLog, Question, answer_record, load_answers


def generate_answers(client: LLMClient, model: str, questions: list[Question], out_dir: str | Path,
                     params: GenParams, batch_size: int = 8, progress: bool = True) -> int:
    """Answer every question `model` has not answered yet in `<out_dir>/<model>.jsonl`; returns how many."""
    path = Path(out_dir) / f"{model}.jsonl"
    done = set(load_answers(path)) if path.exists() else set()
    todo = [q for q in questions if q.question_id not in done]
    with AppendLog(path) as log:
        for start in tqdm(range(0, len(todo), batch_size), desc=f"answers ({model})", unit="batch",
                          disable=not progress):
            batch = todo[start:start + batch_size]
            outs = client.chat([[{"role": "user", "content": q.prompt}] for q in batch], params)
            for q, out in zip(batch, outs, strict=True):
                tokens = out.usage.completion_tokens if out.usage else len(out.text.split())
                log.write(answer_record(q.question_id, model, out.text, tokens, uuid.uuid4().hex, time.time()))
    return len(todo)
