"""BenchBuilder curation: annotate prompts, cluster them into topics, keep the best clusters, sample prompts.

Prompts come from any JSONL (`prompt`, or v0.1 `turns[0].content`) or, by default, the first user turn of
ShareGPT conversations. Clusters are ranked by the mean quality score of their prompts (criteria met, 0-7);
the top N clusters give K prompts each (highest scores first, ties broken by a seeded shuffle), written as
Arena-Hard v0.1's `question.jsonl`.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmstack.client import GenParams, LLMClient
from lmstack.errors import LmstackError
from lmstack.evals.arena_hard.annotate import AnnotateConfig, annotate_prompts
from lmstack.evals.arena_hard.cluster import TopicConfig, TopicModel
from lmstack.evals.arena_hard.files import Question, read_jsonl, write_jsonl_atomic, write_text_atomic
from lmstack.evals.arena_hard.templates import CLUSTER_NAME_SYSTEM, CLUSTER_NAME_USER

_MIN_PROMPT_CHARS = 16  # greetings and one-word turns are not benchmark candidates


@dataclass
class CurateConfig:
    num_prompts: int = 2000
    num_clusters: int = 20
    per_cluster: int = 2
    min_score: int = 0
    seed: int = 0
    annotate: AnnotateConfig | None = None
    topics: TopicConfig | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> CurateConfig:
        return cls(num_prompts=args.num_prompts, num_clusters=args.num_clusters, per_cluster=args.per_cluster,
                   min_score=args.min_score,
                   annotate=AnnotateConfig(max_reasks=args.max_reasks, max_prompt_chars=args.max_prompt_chars,
                                           batch_size=args.batch_size),
                   topics=TopicConfig(umap_dims=args.umap_dims, min_cluster_size=args.min_cluster_size))


def prompt_id(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def load_prompts(path: str | None, limit: int) -> list[tuple[str, str]]:
    """(id, prompt) pairs, deduplicated, at most `limit`; ids are content hashes so reruns line up."""
    if path is None:
        from lmstack.data.sharegpt import load_sharegpt

        texts = (c["conversations"][0]["value"] for c in load_sharegpt()
                 if c["conversations"] and c["conversations"][0]["from"] == "human")
    else:
        texts = (_prompt_of(r, path) for r in read_jsonl(path, allow_torn_tail=False))
    seen: dict[str, str] = {}
    for text in texts:
        if isinstance(text, str) and len(text.strip()) >= _MIN_PROMPT_CHARS:
            seen.setdefault(prompt_id(text), text)
            if len(seen) == limit:
                break
    if len(seen) < limit:
        raise LmstackError(f"only {len(seen)} usable prompts (>= {_MIN_PROMPT_CHARS} characters, distinct) "
                           f"but --num-prompts {limit}; lower it or give more prompts")
    return list(seen.items())


def _prompt_of(record: dict[str, Any], path: str) -> str:
    turns = record.get("turns")
    text = turns[0].get("content") if isinstance(turns, list) and turns else record.get("prompt")
    if not isinstance(text, str):
        raise LmstackError(f"{path}: every line needs `prompt` or `turns[0].content`")
    return text


def name_clusters(client: LLMClient, clusters: list[dict[str, Any]], max_tokens: int = 16) -> None:
    """One short LLM-written topic name per cluster, from its keywords and three of its prompts."""
    convs = []
    for c in clusters:
        examples = "\n".join(f"- {p[:200]}" for p in c["examples"])
        convs.append([{"role": "system", "content": CLUSTER_NAME_SYSTEM},
                      {"role": "user", "content": CLUSTER_NAME_USER.format(keywords=", ".join(c["keywords"]),
                                                                           examples=examples)}])
    outs = client.chat(convs, GenParams(max_tokens=max_tokens, temperature=0.0, seed=0))
    for c, out in zip(clusters, outs, strict=True):
        name = re.sub(r"\s+", " ", out.text.strip().splitlines()[0] if out.text.strip() else "").strip(" \"'*#.")
        c["llm_name"] = name
        c["name"] = name or " ".join(c["keywords"][:4])  # an empty reply keeps the keywords visible


def summarize_clusters(labels: np.ndarray, records: list[dict[str, Any]],
                       keywords: dict[int, list[str]]) -> list[dict[str, Any]]:
    """Per cluster: size, mean score and its standard error (over parsed annotations), keywords, examples."""
    out = []
    for c in sorted(keywords):
        members = [r for r, lab in zip(records, labels, strict=True) if lab == c]
        scores = np.array([r["score"] for r in members if r["score"] is not None], dtype=float)
        best = sorted(members, key=lambda r: -(r["score"] or 0))[:3]
        out.append({"cluster": c, "size": len(members), "annotated": len(scores),
                    "mean_score": float(scores.mean()) if len(scores) else 0.0,
                    "sem": float(scores.std(ddof=1) / np.sqrt(len(scores))) if len(scores) > 1 else 0.0,
                    "keywords": keywords[c], "examples": [r["prompt"] for r in best]})
    return out


def select(clusters: list[dict[str, Any]], records: list[dict[str, Any]], labels: np.ndarray,
           cfg: CurateConfig) -> list[Question]:
    """Top `num_clusters` clusters by mean score that have `per_cluster` prompts scoring >= `min_score`;
    from each, the `per_cluster` best-scored prompts (seeded shuffle first, so ties are broken at random)."""
    rng = random.Random(cfg.seed)
    questions: list[Question] = []
    for c in sorted(clusters, key=lambda c: -c["mean_score"]):
        pool = [r for r, lab in zip(records, labels, strict=True)
                if lab == c["cluster"] and r["score"] is not None and r["score"] >= cfg.min_score]
        if len(pool) < cfg.per_cluster:
            continue
        rng.shuffle(pool)
        pool.sort(key=lambda r: -r["score"])
        questions += [Question(r["id"], r["prompt"], c["name"], "lmstack-curated") for r in pool[:cfg.per_cluster]]
        c["selected"] = True
        if len(questions) == cfg.num_clusters * cfg.per_cluster:
            break
    return questions


def run_curate(args: argparse.Namespace, cfg: CurateConfig) -> dict[str, Any]:
    """The whole curate step; returns the summary also written to the results JSON."""
    import json

    from lmstack.bench.results import cli_command, write_results
    from lmstack.evals.arena_hard.clients import make_client
    from lmstack.evals.arena_hard.embed import make_embedder
    from lmstack.evals.arena_hard.plots import plot_clusters

    out = Path(args.out)
    items = load_prompts(args.prompts, cfg.num_prompts)
    client = make_client(args.annotator, device=args.device, dtype=args.dtype, max_model_len=args.max_model_len)
    records = annotate_prompts(client, items, out / "annotations.jsonl", cfg.annotate, not args.no_progress)
    embeddings = make_embedder(args.embedder, "cpu")([p for _, p in items])  # [N, D]
    topics = TopicModel(cfg.topics).fit(embeddings, [p for _, p in items])
    clusters = summarize_clusters(topics.labels_, records, topics.keywords_)
    if not clusters:
        raise LmstackError("HDBSCAN found no cluster; lower --min-cluster-size or use more prompts")
    name_clusters(client, clusters)
    questions = select(clusters, records, topics.labels_, cfg)
    write_jsonl_atomic(out / "question.jsonl", [q.to_v01() for q in questions])
    write_text_atomic(out / "clusters.json", json.dumps(clusters, indent=1, ensure_ascii=False))
    scored = [r["score"] for r in records if r["score"] is not None]
    chosen = {q.question_id for q in questions}
    summary = {
        "prompts": len(records), "annotator": client.model, "embedder": args.embedder,
        "annotation_parse_failures": len(records) - len(scored),
        "annotation_parse_failure_rate": (len(records) - len(scored)) / len(records),
        "mean_score_all": float(np.mean(scored)) if scored else None,
        "score_histogram": {str(s): scored.count(s) for s in range(8)},
        "clusters": len(clusters), "outliers": int((topics.labels_ == -1).sum()),
        "selected_clusters": sum(bool(c.get("selected")) for c in clusters),
        "selected_prompts": len(questions),
        "mean_score_selected": float(np.mean([r["score"] for r in records if r["id"] in chosen]))
        if questions else None,
        "cluster_table": [{k: c[k] for k in ("cluster", "name", "size", "mean_score", "sem", "keywords")}
                          | {"selected": bool(c.get("selected"))} for c in clusters],
    }
    command = cli_command("arena-hard curate", args, ("prompts", "num_prompts", "annotator", "embedder",
                                                      "max_prompt_chars", "max_reasks", "min_cluster_size",
                                                      "umap_dims", "num_clusters", "per_cluster", "min_score",
                                                      "batch_size", "device", "dtype", "out", "results", "plot"))
    write_results(args.results, command, summary, device="cpu", question_file=str(out / "question.jsonl"))
    plot_clusters(clusters, args.plot)
    return {k: v for k, v in summary.items() if k != "cluster_table"}
