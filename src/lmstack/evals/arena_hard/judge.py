"""Pairwise judging against a baseline, position-swapped, resumable, and never dropping a game silently.

For every question and model two games are judged: game 1 shows the baseline as assistant A, game 2 shows it
as B. A verdict that cannot be parsed is re-asked by continuing the judge's own conversation (so a judge that
ran out of tokens or forgot the label can finish, also at temperature 0) up to `max_reasks` times; after that
the game is recorded with `score: null`, and it counts in the reported parse-failure rate.

Output: `<out>/<judge>/<model>.jsonl`, one line per question (Arena-Hard's `model_judgment` layout). Finished
games are first appended to `<out>/<judge>/.games/<model>.jsonl`, so a run killed between the two games of a
question resumes without judging the finished one again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from lmstack.client import Conversation, GenParams, LLMClient
from lmstack.errors import LmstackError
from lmstack.evals.arena_hard.files import AppendLog, Question, read_jsonl
from lmstack.evals.arena_hard.templates import JUDGE_REASK, JUDGE_TEMPLATES, parse_verdict


@dataclass
class JudgeConfig:
    judge: str  # name the judgments are filed under
    baseline: str
    max_tokens: int = 1024
    reask_tokens: int = 48
    max_reasks: int = 1
    temperature: float = 0.0
    batch_size: int = 8
    max_answer_chars: int | None = None  # longer answers are cut, with a note the judge sees
    template: str = "arena-hard"  # a key of JUDGE_TEMPLATES

    def __post_init__(self) -> None:
        if self.template not in JUDGE_TEMPLATES:
            raise LmstackError(f"unknown judge template {self.template!r}; choose one of {', '.join(JUDGE_TEMPLATES)}")
        if self.max_reasks < 0 or self.batch_size < 1 or self.max_tokens < 1 or self.reask_tokens < 1:
            raise LmstackError("judge settings: max_reasks >= 0, batch_size, max_tokens and reask_tokens >= 1")
        if self.max_answer_chars is not None and self.max_answer_chars < 100:
            raise LmstackError(f"max_answer_chars must be >= 100 (or unset), got {self.max_answer_chars}")


@dataclass
class JudgeStats:
    """What one run did: games judged now, found already done, left unparsed, and re-asks spent."""

    judged: int = 0
    resumed: int = 0
    unparsed: int = 0
    reasks: int = 0


def clip(text: str, limit: int | None) -> tuple[str, bool]:
    """`text` cut to `limit` characters with a visible note, so the judge knows the end is missing."""
    if limit is None or len(text) <= limit:
        return text, False
    return text[:limit] + f"\n\n[... answer truncated for judging: {limit} of {len(text)} characters shown]", True


def game_prompt(question: str, baseline_answer: str, model_answer: str, game: int,
                max_answer_chars: int | None, template: str = "arena-hard") -> tuple[Conversation, bool]:
    """The judge conversation of game 0 (baseline is A) or game 1 (model is A); the one place of the swap."""
    a, b = (baseline_answer, model_answer) if game == 0 else (model_answer, baseline_answer)
    a, cut_a = clip(a, max_answer_chars)
    b, cut_b = clip(b, max_answer_chars)
    system, user = JUDGE_TEMPLATES[template]
    return [{"role": "system", "content": system},
            {"role": "user", "content": user.format(question=question, answer_a=a, answer_b=b)}], cut_a or cut_b


def _paths(out_dir: Path, judge: str, model: str) -> tuple[Path, Path]:
    folder = out_dir / judge
    return folder / f"{model}.jsonl", folder / ".games" / f"{model}.jsonl"


def judge_models(client: LLMClient, questions: list[Question], answers: dict[str, dict[str, dict[str, Any]]],
                 models: list[str], out_dir: str | Path, cfg: JudgeConfig, progress: bool = True) -> JudgeStats:
    """Judge every model in `models` against `cfg.baseline` on `questions`; resumes from what is on disk.

    `answers` maps model → question_id → {"content", ...}, baseline included. Games are ordered question by
    question across the models, so a run stopped early still covers every model on the same questions.
    """
    out_dir = Path(out_dir)
    for m in [cfg.baseline, *models]:
        missing = [q.question_id for q in questions if q.question_id not in answers.get(m, {})]
        if missing:
            raise LmstackError(f"{m} has no answer to {len(missing)} of the questions (e.g. {missing[0]}); "
                               "run `lmstack arena-hard answer` for it first or judge fewer questions")
    if cfg.baseline in models:
        raise LmstackError(f"the baseline {cfg.baseline} cannot be judged against itself; drop it from --models")
    stats = JudgeStats()
    done: dict[str, set[str]] = {}
    games: dict[str, dict[tuple[str, int], dict[str, Any]]] = {}
    finals: dict[str, AppendLog] = {}
    journals: dict[str, AppendLog] = {}
    for m in models:
        final_path, journal_path = _paths(out_dir, cfg.judge, m)
        done[m] = {str(r["question_id"]) for r in read_jsonl(final_path)} if final_path.exists() else set()
        games[m] = {(str(r["question_id"]), int(r["game"])): r["record"]
                    for r in (read_jsonl(journal_path) if journal_path.exists() else [])}
        finals[m], journals[m] = AppendLog(final_path), AppendLog(journal_path)
    try:
        for m in models:  # questions whose two games were journaled before a crash but never written out
            for q in questions:
                if q.question_id not in done[m] and all((q.question_id, g) in games[m] for g in (0, 1)):
                    _finish(finals[m], q.question_id, m, cfg, games[m], done[m])
        todo = [(q, m, g) for q in questions for m in models for g in (0, 1)
                if q.question_id not in done[m] and (q.question_id, g) not in games[m]]
        stats.resumed = 2 * len(questions) * len(models) - len(todo)
        bar = tqdm(total=len(todo), desc=f"judging ({cfg.judge})", unit="game", disable=not progress)
        for start in range(0, len(todo), cfg.batch_size):
            batch = todo[start:start + cfg.batch_size]
            records = _judge_batch(client, batch, answers, cfg, stats)
            for (q, m, g), record in zip(batch, records, strict=True):
                journals[m].write({"question_id": q.question_id, "game": g, "record": record})
                games[m][(q.question_id, g)] = record
                if all((q.question_id, k) in games[m] for k in (0, 1)):
                    _finish(finals[m], q.question_id, m, cfg, games[m], done[m])
            bar.update(len(batch))
            bar.set_postfix(unparsed=stats.unparsed)
        bar.close()
    finally:
        for log in [*finals.values(), *journals.values()]:
            log.close()
    return stats


def _finish(final: AppendLog, qid: str, model: str, cfg: JudgeConfig,
            games: dict[tuple[str, int], dict[str, Any]], done: set[str]) -> None:
    final.write({"question_id": qid, "model": model, "judge": cfg.judge, "baseline": cfg.baseline,
                 "games": [games[(qid, 0)], games[(qid, 1)]], "tstamp": time.time()})
    done.add(qid)


def _judge_batch(client: LLMClient, batch: list[tuple[Question, str, int]],
                 answers: dict[str, dict[str, dict[str, Any]]], cfg: JudgeConfig,
                 stats: JudgeStats) -> list[dict[str, Any]]:
    """One record per game: the conversation's text, the parsed label (or None), attempts, truncation."""
    convs, cut = [], []
    for q, m, g in batch:
        conv, truncated = game_prompt(q.prompt, answers[cfg.baseline][q.question_id]["content"],
                                      answers[m][q.question_id]["content"], g, cfg.max_answer_chars,
                                      cfg.template)
        convs.append(conv)
        cut.append(truncated)
    params = GenParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature, seed=0)
    texts = [c.text for c in client.chat(convs, params)]
    labels = [parse_verdict(t) for t in texts]
    attempts = [1] * len(batch)
    reask = GenParams(max_tokens=cfg.reask_tokens, temperature=cfg.temperature, seed=0)
    for _ in range(cfg.max_reasks):
        retry = [i for i, label in enumerate(labels) if label is None]
        if not retry:
            break
        followups = [convs[i] + [{"role": "assistant", "content": texts[i]},
                                 {"role": "user", "content": JUDGE_REASK}] for i in retry]
        stats.reasks += len(retry)
        for i, conv, c in zip(retry, followups, client.chat(followups, reask), strict=True):
            convs[i] = conv
            texts[i] = c.text
            labels[i] = parse_verdict(c.text)
            attempts[i] += 1
    records = []
    for i, conv in enumerate(convs):
        judgment = "\n\n".join([*(msg["content"] for msg in conv[2:] if msg["role"] == "assistant"), texts[i]])
        records.append({"user_prompt": conv[1]["content"], "judgment": judgment, "score": labels[i],
                        "attempts": attempts[i], "truncated": cut[i]})
        stats.judged += 1
        stats.unparsed += labels[i] is None
    return records
