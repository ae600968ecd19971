"""JSONL files of the pipeline in Arena-Hard v0.1's layout, read with validation and written crash-safely.

Long jobs append one finished record per line (flushed and fsynced), so a crash or Ctrl-C loses nothing that
was finished; a torn last line (the process died mid-write) is ignored on read and the item is redone.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmstack.atomic import write_text_atomic
from lmstack.errors import LmstackError

# Beside the `<model>.jsonl` judgments: one line per judge run (command, settings, counts); not a model.
JUDGE_RUN_LOG = "judge_runs.jsonl"


def read_jsonl(path: str | Path, *, allow_torn_tail: bool = True) -> list[dict[str, Any]]:
    """Every JSON object of a file; a malformed line raises, except a torn final line of an appended log."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").split("\n")  # not splitlines(): U+2028 is valid in JSON text
    except OSError as e:
        raise LmstackError(f"cannot read {path}: {e}") from None
    records: list[dict[str, Any]] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if allow_torn_tail and i == len(lines) - 1:
                break
            raise LmstackError(f"{path}:{i + 1} is not valid JSON; fix or delete that line") from None
        if not isinstance(record, dict):
            raise LmstackError(f"{path}:{i + 1} must be a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


class AppendLog:
    """An append-only JSONL file: each `write` is one complete line, on disk before the call returns."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._drop_torn_tail()
        self._f = self.path.open("a", encoding="utf-8")

    def _drop_torn_tail(self) -> None:
        """A line cut off by a crash would glue onto the next record: truncate it away before appending."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            with self.path.open("r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> AppendLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_jsonl_atomic(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    """Replace a whole file: written next to it, then renamed, so readers never see half of it."""
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


@dataclass
class Question:
    """One benchmark prompt (v0.1: `question_id`, `category`, `cluster`, `turns: [{content}]`)."""

    question_id: str
    prompt: str
    cluster: str = ""
    category: str = "arena-hard-v0.1"

    def to_v01(self) -> dict[str, Any]:
        return {"question_id": self.question_id, "category": self.category, "cluster": self.cluster,
                "turns": [{"content": self.prompt}]}


def load_questions(path: str | Path, limit: int | None = None) -> list[Question]:
    """Questions of a v0.1 `question.jsonl` (the newer `uid`/`prompt` schema is accepted too)."""
    questions: list[Question] = []
    for i, r in enumerate(read_jsonl(path, allow_torn_tail=False)):
        qid = r.get("question_id", r.get("uid"))
        turns = r.get("turns")
        prompt = turns[0].get("content") if isinstance(turns, list) and turns and isinstance(turns[0], dict) \
            else r.get("prompt")
        if not isinstance(qid, str | int) or not isinstance(prompt, str):
            raise LmstackError(f"{path} line {i + 1}: a question needs `question_id` and `turns[0].content` "
                               "(Arena-Hard v0.1) or `uid` and `prompt`")
        questions.append(Question(str(qid), prompt, str(r.get("cluster", "")),
                                  str(r.get("category", "arena-hard-v0.1"))))
    if not questions:
        raise LmstackError(f"{path} holds no questions")
    return questions[:limit] if limit is not None else questions


def answer_record(question_id: str, model: str, text: str, token_len: int, answer_id: str,
                  tstamp: float) -> dict[str, Any]:
    """One v0.1 `model_answer/<model>.jsonl` line."""
    return {"question_id": question_id, "answer_id": answer_id, "model_id": model,
            "choices": [{"index": 0, "turns": [{"content": text, "token_len": token_len}]}], "tstamp": tstamp}


def load_answers(path: str | Path) -> dict[str, dict[str, Any]]:
    """question_id → {"content", "token_len"} of a v0.1 answer file (first turn of the first choice)."""
    answers: dict[str, dict[str, Any]] = {}
    for i, r in enumerate(read_jsonl(path)):
        try:
            turn = r["choices"][0]["turns"][0]
            answers[str(r["question_id"])] = {"content": str(turn["content"]), "token_len": turn.get("token_len")}
        except (KeyError, IndexError, TypeError):
            raise LmstackError(f"{path} line {i + 1} is not a v0.1 answer (question_id, "
                               "choices[0].turns[0].content)") from None
    return answers


def iter_judgments(path: str | Path) -> Iterator[dict[str, Any]]:
    """Lines of a `model_judgment/<judge>/<model>.jsonl` file, checked for the fields scoring needs."""
    for i, r in enumerate(read_jsonl(path)):
        games = r.get("games")
        if "question_id" not in r or "model" not in r or not isinstance(games, list) or len(games) != 2:
            raise LmstackError(f"{path} line {i + 1} is not a judgment record (question_id, model, games: "
                               "[game 1, game 2])")
        yield r
