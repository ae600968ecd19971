"""Judgments → weighted battles: where the position swap and the decisive-verdict weight are applied, once.

A judgment record holds two games for one question: game 1 with the baseline as assistant A and the model
as B, game 2 with the two swapped. Each game becomes one battle between the model in position A and the model
in position B, so the swap is undone by the position alone and never by flipping a label. A decisive verdict
(A>>B, B>>A) counts `decisive_weight` times (3 in Arena-Hard), a slight win or a tie once; a tie is half a win
for each side. Games without a parsed verdict are not battles: they are counted and reported.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmstack.errors import LmstackError
from lmstack.evals.arena_hard.files import JUDGE_RUN_LOG, iter_judgments

# Verdict label → (outcome for position A: 1 win, 0.5 tie, 0 loss, is it decisive).
OUTCOMES: dict[str, tuple[float, bool]] = {
    "A>>B": (1.0, True), "A>B": (1.0, False), "A=B": (0.5, False), "B>A": (0.0, False), "B>>A": (0.0, True),
}
STYLE_FEATURES = ("length", "headers", "lists", "bold")
_HEADER_RE = re.compile(r"^#{1,6}\s", re.MULTILINE)
_LIST_RE = re.compile(r"^\s*(?:[-*+]|\d+\.)\s", re.MULTILINE)
_BOLD_RE = re.compile(r"\*\*[^*\n]+\*\*|__[^_\n]+__")


@dataclass
class Battle:
    """One judged game: `outcome` is position A's result, `weight` how many times it counts."""

    question_id: str
    model_a: str
    model_b: str
    outcome: float
    weight: float
    style_a: dict[str, float] = field(default_factory=dict)
    style_b: dict[str, float] = field(default_factory=dict)


@dataclass
class BattleSet:
    """The battles of a leaderboard plus the games that could not be used, per model."""

    battles: list[Battle]
    baseline: str
    games: dict[str, int]  # model → games judged (parsed or not)
    unparsed: dict[str, int]  # model → games whose verdict is null

    @property
    def parse_failure_rate(self) -> float:
        total = sum(self.games.values())
        return sum(self.unparsed.values()) / total if total else 0.0


def style_features(text: str, token_len: int | None = None) -> dict[str, float]:
    """Answer length (tokens when known, else words) and markdown counts: the covariates of style control."""
    length = token_len if token_len is not None else len(text.split())
    return {"length": float(length), "headers": float(len(_HEADER_RE.findall(text))),
            "lists": float(len(_LIST_RE.findall(text))), "bold": float(len(_BOLD_RE.findall(text)))}


def game_battle(question_id: str, game_index: int, label: str | None, model: str, baseline: str,
                decisive_weight: float) -> Battle | None:
    """The battle of game 1 (baseline is A) or game 2 (model is A); None for a null verdict."""
    if label is None:
        return None
    if label not in OUTCOMES:
        raise LmstackError(f"question {question_id}, model {model}: unknown verdict label {label!r}; "
                           f"expected one of {', '.join(OUTCOMES)} or null")
    if game_index not in (0, 1):
        raise LmstackError(f"a judgment has exactly two games; got game index {game_index}")
    model_a, model_b = (baseline, model) if game_index == 0 else (model, baseline)
    outcome, decisive = OUTCOMES[label]
    return Battle(question_id, model_a, model_b, outcome, decisive_weight if decisive else 1.0)


def battles_from_judgments(records: Iterable[dict[str, Any]], baseline: str, decisive_weight: float = 3.0,
                           answers: dict[str, dict[str, dict[str, Any]]] | None = None) -> BattleSet:
    """Battles of judgment records (ours or Arena-Hard's v0.1 files); `answers` (model → question → answer)
    attaches the style features that style control needs."""
    if decisive_weight < 1:
        raise LmstackError(f"decisive_weight must be >= 1 (Arena-Hard uses 3), got {decisive_weight}")
    battles: list[Battle] = []
    games: dict[str, int] = {}
    unparsed: dict[str, int] = {}
    for r in records:
        model, qid = str(r["model"]), str(r["question_id"])
        base = str(r.get("baseline", baseline))
        if base != baseline:
            raise LmstackError(f"judgment of {model} on {qid} is against {base}, not the baseline {baseline}; "
                               "score one baseline at a time (--baseline)")
        for g, game in enumerate(r["games"]):
            games[model] = games.get(model, 0) + 1
            battle = game_battle(qid, g, game.get("score"), model, baseline, decisive_weight)
            if battle is None:
                unparsed[model] = unparsed.get(model, 0) + 1
                continue
            if answers is not None:
                battle.style_a = _style_of(answers, battle.model_a, qid)
                battle.style_b = _style_of(answers, battle.model_b, qid)
            battles.append(battle)
    return BattleSet(battles, baseline, games, unparsed)


def position_bias(bs: BattleSet) -> dict[str, float | int | None]:
    """How much the judge's verdicts follow the answer's position rather than the answer, from parsed games.

    `position_a_win_share`: position A's share of wins (ties half); 0.5 for a judge that ignores order, since
    every model sits in A as often as in B. `position_consistency`: share of (question, model) pairs whose two
    games agree once the swap is undone (same winner, or a tie in both); 1.0 for an order-blind judge.
    """
    if not bs.battles:
        return {"position_a_win_share": None, "position_consistency": None, "paired_games": 0}
    seen: dict[tuple[str, str], list[float]] = {}
    for b in bs.battles:
        other = b.model_b if b.model_a == bs.baseline else b.model_a
        base_outcome = b.outcome if b.model_a == bs.baseline else 1.0 - b.outcome
        seen.setdefault((b.question_id, other), []).append(base_outcome)
    pairs = [v for v in seen.values() if len(v) == 2]
    return {"position_a_win_share": sum(b.outcome for b in bs.battles) / len(bs.battles),
            "position_consistency": sum(v[0] == v[1] for v in pairs) / len(pairs) if pairs else None,
            "paired_games": len(pairs)}


def _style_of(answers: dict[str, dict[str, dict[str, Any]]], model: str, qid: str) -> dict[str, float]:
    try:
        answer = answers[model][qid]
    except KeyError:
        raise LmstackError(f"style control needs the answer of {model} to question {qid}; pass the answer "
                           "folder that holds model_answer/<model>.jsonl for every judged model") from None
    return style_features(answer["content"], answer.get("token_len"))


def load_battles(judgment_dir: str | Path, baseline: str, decisive_weight: float = 3.0,
                 answers: dict[str, dict[str, dict[str, Any]]] | None = None,
                 models: list[str] | None = None) -> BattleSet:
    """Battles of every `<model>.jsonl` in a `model_judgment/<judge>/` folder (or of the listed models)."""
    folder = Path(judgment_dir)
    if not folder.is_dir():
        raise LmstackError(f"judgment folder {folder} does not exist; point --judgments at "
                           "model_judgment/<judge>/")
    paths = (sorted(p for p in folder.glob("*.jsonl") if p.name != JUDGE_RUN_LOG) if models is None
             else [folder / f"{m}.jsonl" for m in models])
    missing = [str(p) for p in paths if not p.is_file()]
    if missing or not paths:
        raise LmstackError(f"no judgment files to score in {folder}" + (f": missing {', '.join(missing)}"
                                                                       if missing else ""))
    records = [r for p in paths for r in iter_judgments(p)]
    return battles_from_judgments(records, baseline, decisive_weight, answers)
