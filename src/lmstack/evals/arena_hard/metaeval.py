"""How good is a benchmark? Separability, agreement with confidence, Spearman and Brier score (arXiv 2406.11939).

Each benchmark is a set of per-model bootstrap score distributions with a 95% CI; the reference (human
preference) is Chatbot Arena's full leaderboard of 2024-03-29 with its own 95% CI. Over every pair of the
models both rank:

- separability: fraction of pairs whose benchmark CIs do not overlap;
- agreement: (pairs that benchmark and reference both separate in the same order − pairs both separate in
  opposite orders) / all pairs; a confident wrong order is penalized, an unseparated pair scores 0 (the
  same numerator over the pairs the reference separates is reported as `agreement_over_reference_separated`);
- spearman: rank correlation of the point scores;
- brier: mean of (P_bench(A > B) − 1[reference ranks A above B])², P_bench being the probability that an
  independent draw from A's bootstrap distribution beats one from B's (the files store each model's bootstrap
  scores sorted, so rounds cannot be paired across models).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import spearmanr

from lmstack.errors import LmstackError
from lmstack.evals.arena_hard.files import read_jsonl

REFERENCE_FILE = "chatbot_arena_elo_20240329_bootstrap.jsonl"
MODEL_SET_FILE = "arena_to_arena_hard.json"  # its keys: the 20 models every benchmark is compared on


@dataclass
class BenchmarkSpec:
    """Where a benchmark's bootstrap scores are and how its model names map to Chatbot Arena's."""

    file: str
    names: str | None  # JSON mapping file, None when the file already uses Arena names
    arena_to_bench: bool  # direction of the mapping
    label: str


BENCHMARKS: dict[str, BenchmarkSpec] = {
    "arena_hard": BenchmarkSpec("bootstrap_stats_arena_hard.jsonl", "arena_to_arena_hard.json", True,
                                "Arena-Hard-Auto v0.1"),
    "mt_bench": BenchmarkSpec("bootstrap_stats_mt_bench.jsonl", "arena_to_mt_bench.json", True, "MT-Bench"),
    "alpaca_eval_2": BenchmarkSpec("bootstrap_stats_alpaca.jsonl", "alpaca_to_arena.json", False,
                                   "AlpacaEval 2.0"),
    "alpaca_eval_2_lc": BenchmarkSpec("bootstrap_stats_alpaca_LC.jsonl", "alpaca_to_arena.json", False,
                                      "AlpacaEval 2.0 LC"),
    "chatbot_arena_20k": BenchmarkSpec("bootstrap_stats_20k_votes.jsonl", None, True,
                                       "Chatbot Arena (20K votes)"),
}


@dataclass
class Scores:
    """A model's point score, CI and bootstrap samples."""

    score: float
    lower: float
    upper: float
    samples: np.ndarray  # [rounds]


def load_scores(path: Path) -> dict[str, Scores]:
    out = {}
    for i, r in enumerate(read_jsonl(path, allow_torn_tail=False)):
        try:
            out[str(r["model"]).lower()] = Scores(float(r["score"]), float(r["lower"]), float(r["upper"]),
                                                  np.sort(np.asarray(r["results"], dtype=float)))
        except (KeyError, TypeError, ValueError):
            raise LmstackError(f"{path} line {i + 1}: need model, score, lower, upper and results") from None
    return out


def prob_beats(a: np.ndarray, b: np.ndarray) -> float:
    """P(X > Y) for independent X ~ a, Y ~ b (empirical), ties counted half. a, b: sorted [n], [m]."""
    below = np.searchsorted(b, a, side="left")  # [n] draws of b strictly below each a
    upto = np.searchsorted(b, a, side="right")  # [n] draws of b at or below
    return float(np.mean((below + upto) / 2) / len(b))


def separated(x: Scores, y: Scores) -> bool:
    return x.lower > y.upper or y.lower > x.upper


def pair_metrics(bench: dict[str, Scores], ref: dict[str, Scores], models: list[str]) -> dict[str, Any]:
    """The four metrics of one benchmark on `models` (reference names), plus the counts behind them."""
    pairs = list(combinations(models, 2))
    sep = agree = disagree = ref_sep = 0
    brier = []
    for a, b in pairs:
        ba, bb, ra, rb = bench[a], bench[b], ref[a], ref[b]
        bench_sep, ref_sep_pair = separated(ba, bb), separated(ra, rb)
        sep += bench_sep
        ref_sep += ref_sep_pair
        if bench_sep and ref_sep_pair:
            same = (ba.score > bb.score) == (ra.score > rb.score)
            agree += same
            disagree += not same
        outcome = 1.0 if ra.score > rb.score else 0.0
        brier.append((prob_beats(ba.samples, bb.samples) - outcome) ** 2)
    rho = spearmanr([bench[m].score for m in models], [ref[m].score for m in models]).statistic
    return {"separability": sep / len(pairs), "agreement": (agree - disagree) / len(pairs),
            "spearman": float(rho), "brier": float(np.mean(brier)), "num_models": len(models),
            "num_pairs": len(pairs), "pairs_separated": sep, "pairs_agree_confident": agree,
            "pairs_disagree_confident": disagree, "pairs_reference_separated": ref_sep,
            "agreement_over_reference_separated": (agree - disagree) / max(ref_sep, 1)}


def evaluate(metrics_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Metrics of every benchmark in `BENCHMARKS` against the Chatbot Arena reference."""
    folder = Path(metrics_dir)
    if not (folder / REFERENCE_FILE).is_file():
        raise LmstackError(f"{folder} has no {REFERENCE_FILE}; point --metrics-dir at the benchmark_metrics folder")
    ref = load_scores(folder / REFERENCE_FILE)
    models = sorted(m.lower() for m in _read_json(folder / MODEL_SET_FILE))
    results = {}
    for key, spec in BENCHMARKS.items():
        raw = load_scores(folder / spec.file)
        mapping = {} if spec.names is None else _read_json(folder / spec.names)
        to_arena = ({v.lower(): k.lower() for k, v in mapping.items()} if spec.arena_to_bench
                    else {k.lower(): v.lower() for k, v in mapping.items()})
        bench = {to_arena.get(name, name): s for name, s in raw.items()}
        missing = [m for m in models if m not in bench or m not in ref]
        if missing:
            raise LmstackError(f"{spec.file}: no scores for {', '.join(missing)} (after the name mapping)")
        results[key] = {"label": spec.label, **pair_metrics(bench, ref, models)}
    return results


def _read_json(path: Path) -> dict[str, str]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LmstackError(f"cannot read the name mapping {path}: {e}") from None


def meta_eval_command(args: argparse.Namespace) -> None:
    from lmstack.bench.results import cli_command, write_results
    from lmstack.evals.arena_hard.plots import plot_meta_eval

    results = evaluate(args.metrics_dir)
    command = cli_command("arena-hard meta-eval", args, ("metrics_dir", "output", "plot"))
    write_results(args.output, command, results, device="cpu", reference="Chatbot Arena leaderboard 2024-03-29",
                  model_set=f"the {next(iter(results.values()))['num_models']} keys of {MODEL_SET_FILE}")
    plot_meta_eval(results, args.plot)
    print(f"{'benchmark':<28}{'separability':>14}{'agreement':>12}{'spearman':>10}{'brier':>8}")
    for r in results.values():
        print(f"{r['label']:<28}{r['separability']:>14.3f}{r['agreement']:>12.3f}{r['spearman']:>10.3f}"
              f"{r['brier']:>8.3f}")
    print(f"wrote {args.output} and {args.plot}")

