"""`arena-hard score`: judgments → Bradley-Terry leaderboard with CIs, results JSON, CI plot, printed table."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lmstack.bench.results import cli_command, write_results
from lmstack.errors import LmstackError
from lmstack.evals.arena_hard.battles import BattleSet, load_battles, position_bias
from lmstack.evals.arena_hard.files import JUDGE_RUN_LOG, load_answers, read_jsonl
from lmstack.evals.arena_hard.plots import plot_leaderboard
from lmstack.evals.arena_hard.score import ScoreRow, leaderboard

_OPTIONS = ("judgments", "baseline", "answers", "rounds", "seed", "decisive_weight", "output", "plot")


def load_answer_dir(folder: str | Path) -> dict[str, dict[str, dict[str, Any]]]:
    """model → question_id → answer, for every `<model>.jsonl` in a model_answer folder."""
    folder = Path(folder)
    paths = sorted(folder.glob("*.jsonl")) if folder.is_dir() else []
    if not paths:
        raise LmstackError(f"no <model>.jsonl answer files in {folder}; point --answers at model_answer/")
    return {p.stem: load_answers(p) for p in paths}


def observed_win_share(bs: BattleSet) -> dict[str, float]:
    """Each model's weighted win share against the baseline (ties half): what the single-baseline fit matches."""
    won: dict[str, float] = {}
    total: dict[str, float] = {}
    for b in bs.battles:
        model, share = (b.model_b, 1 - b.outcome) if b.model_a == bs.baseline else (b.model_a, b.outcome)
        won[model] = won.get(model, 0.0) + b.weight * share
        total[model] = total.get(model, 0.0) + b.weight
    return {m: 100 * won[m] / total[m] for m in total}


def score_command(args: argparse.Namespace) -> dict[str, Any]:
    answers = load_answer_dir(args.answers) if args.answers else None
    if args.style_control and answers is None:
        raise LmstackError("--style-control needs --answers (the model_answer folder) for the style features")
    bs = load_battles(args.judgments, args.baseline, args.decisive_weight, answers)
    fit, rows = leaderboard(bs.battles, args.baseline, rounds=args.rounds, seed=args.seed,
                            style=args.style_control)
    share = observed_win_share(bs)
    for r in rows:
        r.games = bs.games.get(r.model, 0)
        r.unparsed = bs.unparsed.get(r.model, 0)
        if answers is not None and r.model in answers:
            lens = [a["token_len"] for a in answers[r.model].values() if a.get("token_len") is not None]
            r.avg_tokens = sum(lens) / len(lens) if lens else None
    games = sum(bs.games.values())
    unparsed = sum(bs.unparsed.values())
    judged_questions = len({b.question_id for b in bs.battles})
    metrics = {
        "leaderboard": [_row_json(r, share.get(r.model)) for r in rows],
        "games": games, "unparsed_games": unparsed, "parse_failure_rate": bs.parse_failure_rate,
        "questions": judged_questions, "battles": len(bs.battles),
        "style_coefficients": fit.style_coef_,
        "position_bias": position_bias(bs),
    }
    command = cli_command("arena-hard score", args, _OPTIONS, ("style_control",))
    runs = Path(args.judgments) / JUDGE_RUN_LOG
    write_results(args.output, command, metrics, device="cpu", baseline=args.baseline,
                  judge=Path(args.judgments).name, style_control=bool(args.style_control),
                  bootstrap_rounds=args.rounds, judge_runs=read_jsonl(runs) if runs.is_file() else [])
    title = (f"judge {Path(args.judgments).name}, baseline {args.baseline}, {judged_questions} questions, "
             f"{args.rounds} bootstrap rounds" + (", style control" if args.style_control else ""))
    plot_leaderboard(metrics["leaderboard"], title, args.plot)
    _print_table(rows, games, unparsed)
    bias = metrics["position_bias"]
    if bias["paired_games"]:
        print(f"position bias: assistant A wins {100 * bias['position_a_win_share']:.1f}% of parsed games (50% "
              f"unbiased); the two games of a pair agree {100 * bias['position_consistency']:.1f}% of the time")
    print(f"wrote {args.output} and {args.plot}")
    return metrics


def _row_json(r: ScoreRow, share: float | None) -> dict[str, Any]:
    d = asdict(r)
    d["observed_win_share"] = share
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()}


def _print_table(rows: list[ScoreRow], games: int, unparsed: int) -> None:
    print(f"{'model':<28}{'score':>7}{'95% CI':>18}{'rating':>9}{'games':>7}{'null':>6}{'avg tok':>9}")
    for r in rows:
        ci = f"({r.lower:.1f}, {r.upper:.1f})"
        tok = f"{r.avg_tokens:.0f}" if r.avg_tokens is not None else "-"
        print(f"{r.model:<28}{r.score:>7.1f}{ci:>18}{r.rating:>9.1f}{r.games:>7}{r.unparsed:>6}{tok:>9}")
    rate = unparsed / games if games else 0.0
    print(f"parse failures: {unparsed} of {games} games ({100 * rate:.1f}%), reported, never dropped silently")
