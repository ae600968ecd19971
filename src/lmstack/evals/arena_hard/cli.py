"""`lmstack arena-hard {curate,answer,judge,score,meta-eval}`: argument parsing and validation only."""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lmstack.errors import LmstackError
from lmstack.evals.arena_hard.templates import JUDGE_TEMPLATES

DEFAULT_BASELINE = "gpt-4-0314"
RESULTS_DIR = Path("benchmarks/results/arena_hard")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="arena_command", required=True)

    c = sub.add_parser("curate", help="annotate prompts, cluster them, select a benchmark (BenchBuilder)")
    c.add_argument("--prompts", help="JSONL of prompts (`prompt` or v0.1 `turns`); default: ShareGPT first turns")
    c.add_argument("--num-prompts", type=int, default=2000, help="how many prompts to read")
    c.add_argument("--annotator", default="smollm2-135m-instruct", help="NAME or NAME=URL of the LLM annotator")
    c.add_argument("--embedder", default="minilm", help="`minilm` (embedded MiniLM) or `client:NAME=URL`")
    c.add_argument("--max-prompt-chars", type=int, default=1500, help="prompts are cut to this for annotation")
    c.add_argument("--max-reasks", type=int, default=2, help="re-asks of an annotation that is not valid JSON")
    c.add_argument("--min-cluster-size", type=int, default=15)
    c.add_argument("--umap-dims", type=int, default=5)
    c.add_argument("--num-clusters", type=int, default=20, help="N clusters kept, by mean quality score")
    c.add_argument("--per-cluster", type=int, default=2, help="K prompts sampled per kept cluster")
    c.add_argument("--min-score", type=int, default=0, help="only prompts with at least this score are sampled")
    c.add_argument("--out", default="runs/arena_hard/curate", help="run folder")
    c.add_argument("--results", default=str(RESULTS_DIR / "curate.json"))
    c.add_argument("--plot", default=str(RESULTS_DIR / "curate_score_by_cluster.png"))
    _common(c)

    a = sub.add_parser("answer", help="generate answers of models to a question file, resumable")
    a.add_argument("--questions", required=True, help="question.jsonl (v0.1)")
    a.add_argument("--models", nargs="+", required=True, help="NAME or NAME=URL per model")
    a.add_argument("--out", required=True, help="model_answer folder")
    a.add_argument("--max-tokens", type=int, default=1024)
    a.add_argument("--temperature", type=float, default=0.0)
    a.add_argument("--num-questions", type=int)
    _common(a)

    j = sub.add_parser("judge", help="pairwise judgments against a baseline, position-swapped, resumable")
    j.add_argument("--data", required=True, help="folder with question.jsonl and model_answer/")
    j.add_argument("--judge", required=True, help="NAME or NAME=URL of the judge model")
    j.add_argument("--baseline", default=DEFAULT_BASELINE)
    j.add_argument("--models", nargs="+", required=True, help="models whose answers are judged")
    j.add_argument("--out", default="runs/arena_hard/model_judgment", help="model_judgment folder")
    j.add_argument("--num-questions", type=int, help="judge a random subset of this many questions")
    j.add_argument("--subset-seed", type=int, default=0)
    j.add_argument("--max-tokens", type=int, default=1024)
    j.add_argument("--max-reasks", type=int, default=1, help="re-asks of a game without a verdict label")
    j.add_argument("--max-answer-chars", type=int, help="cut longer answers (with a note the judge sees)")
    j.add_argument("--template", default="arena-hard", choices=sorted(JUDGE_TEMPLATES),
                   help="judge prompt: Arena-Hard's (own answer first) or `compact` (for small judges)")
    _common(j)

    s = sub.add_parser("score", help="Bradley-Terry leaderboard with bootstrap CIs (ours or Arena-Hard's files)")
    s.add_argument("--judgments", required=True, help="model_judgment/<judge>/ folder")
    s.add_argument("--baseline", default=DEFAULT_BASELINE)
    s.add_argument("--answers", help="model_answer/ folder: average answer length and style control")
    s.add_argument("--rounds", type=int, default=100, help="bootstrap rounds")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--decisive-weight", type=float, default=3.0, help="weight of A>>B / B>>A verdicts")
    s.add_argument("--style-control", action="store_true", help="length and markdown counts as covariates")
    s.add_argument("--output", default=str(RESULTS_DIR / "leaderboard.json"))
    s.add_argument("--plot", default=str(RESULTS_DIR / "leaderboard_ci.png"))

    m = sub.add_parser("meta-eval", help="separability, agreement, Spearman and Brier of benchmarks")
    m.add_argument("--metrics-dir", required=True, help="the benchmark_metrics folder of bootstrap scores")
    m.add_argument("--output", default=str(RESULTS_DIR / "meta_eval.json"))
    m.add_argument("--plot", default=str(RESULTS_DIR / "meta_eval.png"))


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="weights of in-process models (e.g. bfloat16 halves memory)")
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    return COMMANDS[args.arena_command](args)


def _positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise LmstackError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def _curate(args: argparse.Namespace) -> int:
    from lmstack.evals.arena_hard.curate import CurateConfig, run_curate

    _positive(args, "num_prompts", "min_cluster_size", "num_clusters", "per_cluster", "batch_size", "umap_dims")
    summary = run_curate(args, CurateConfig.from_args(args))
    print(json.dumps(summary, indent=2))
    return 0


def _answer(args: argparse.Namespace) -> int:
    from lmstack.client import GenParams
    from lmstack.evals.arena_hard.answer import generate_answers
    from lmstack.evals.arena_hard.clients import make_client, model_name
    from lmstack.evals.arena_hard.files import load_questions

    _positive(args, "max_tokens", "num_questions", "batch_size")
    questions = load_questions(args.questions, args.num_questions)
    params = GenParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=0)
    for spec in args.models:
        client = make_client(spec, device=args.device, dtype=args.dtype, max_model_len=args.max_model_len)
        n = generate_answers(client, model_name(spec), questions, args.out, params, args.batch_size,
                             not args.no_progress)
        print(f"{model_name(spec)}: {n} new answers in {Path(args.out) / (model_name(spec) + '.jsonl')}")
    return 0


def select_subset(ids: list[str], n: int | None, seed: int) -> set[str]:
    """A seeded random subset of question ids (all of them when n is None)."""
    if n is None or n >= len(ids):
        return set(ids)
    return set(random.Random(seed).sample(sorted(ids), n))


_JUDGE_OPTIONS = ("data", "judge", "baseline", "out", "num_questions", "subset_seed", "max_tokens", "max_reasks",
                  "max_answer_chars", "template", "batch_size", "device", "dtype", "max_model_len")


def _judge(args: argparse.Namespace) -> int:
    from lmstack.bench.results import cli_command
    from lmstack.evals.arena_hard.clients import make_client, model_name
    from lmstack.evals.arena_hard.files import JUDGE_RUN_LOG, AppendLog, load_answers, load_questions
    from lmstack.evals.arena_hard.judge import JudgeConfig, judge_models

    _positive(args, "max_tokens", "num_questions", "batch_size")
    data = Path(args.data)
    questions = load_questions(data / "question.jsonl")
    keep = select_subset([q.question_id for q in questions], args.num_questions, args.subset_seed)
    questions = [q for q in questions if q.question_id in keep]
    answers = {}
    for m in [args.baseline, *args.models]:
        path = data / "model_answer" / f"{m}.jsonl"
        if not path.is_file():
            raise LmstackError(f"no answers of {m} at {path}; run `lmstack arena-hard answer` first")
        answers[m] = load_answers(path)
    judge = model_name(args.judge)
    cfg = JudgeConfig(judge=judge, baseline=args.baseline, max_tokens=args.max_tokens, max_reasks=args.max_reasks,
                      batch_size=args.batch_size, max_answer_chars=args.max_answer_chars,
                      template=args.template)
    client = make_client(args.judge, device=args.device, dtype=args.dtype, max_model_len=args.max_model_len)
    started = time.monotonic()
    stats = judge_models(client, questions, answers, args.models, args.out, cfg, not args.no_progress)
    summary = {"judged_now": stats.judged, "already_done": stats.resumed, "unparsed_now": stats.unparsed,
               "reasks": stats.reasks, "seconds": round(time.monotonic() - started, 1),
               "questions": len(questions), "judgments": str(Path(args.out) / judge)}
    command = cli_command("arena-hard judge", args, _JUDGE_OPTIONS)
    runs_path = Path(args.out) / judge / JUDGE_RUN_LOG
    with AppendLog(runs_path) as log:  # one line per (resumed) run: its command, settings and what it did
        log.write({"command": command, "config": asdict(cfg), **summary})
    print(json.dumps(summary))
    return 0


def _score(args: argparse.Namespace) -> int:
    from lmstack.evals.arena_hard.report import score_command

    _positive(args, "rounds")
    score_command(args)
    return 0


def _meta_eval(args: argparse.Namespace) -> int:
    from lmstack.evals.arena_hard.metaeval import meta_eval_command

    meta_eval_command(args)
    return 0


COMMANDS: dict[str, Any] = {"curate": _curate, "answer": _answer, "judge": _judge, "score": _score,
                            "meta-eval": _meta_eval}
