"""One harness for the ranker and its baselines on the held-out split: Kendall's tau and the cost per request.

Every method scores the same test prompts: the trained ranker, the prompt-length heuristic (direction fitted on
the training split) and, when given, the bucket classifier (expected bucket, and argmax as in the paper). The
headline is tau-b over the whole test split (the paper's metric); the mean tau within random lists of 32 (the
batches a scheduler orders) is reported beside it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmstack.errors import LmstackError
from lmstack.ranking.baselines import BucketObjective, PromptLengthBaseline
from lmstack.ranking.data import LengthExample, read_examples
from lmstack.ranking.metrics import kendall_tau, per_list_tau
from lmstack.ranking.predictor import LengthRanker


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cost_per_prompt(ranker: LengthRanker, prompts: list[str], batch_size: int, repeats: int = 3) -> float:
    """Milliseconds per prompt of `ranker.score` called on consecutive batches of `batch_size` prompts,
    tokenization included (the engine pays it too); the best of `repeats` passes after one warm-up batch."""
    batches = [prompts[i : i + batch_size] for i in range(0, len(prompts) - batch_size + 1, batch_size)]
    if not batches:
        raise LmstackError(f"need at least {batch_size} prompts to time batches of {batch_size}")
    ranker.score(batches[0], batch_size=batch_size)
    best = float("inf")
    for _ in range(repeats):
        _sync(ranker.device)
        start = time.perf_counter()
        for batch in batches:
            ranker.score(batch, batch_size=batch_size)
        _sync(ranker.device)
        best = min(best, time.perf_counter() - start)
    return 1000.0 * best / (len(batches) * batch_size)


def _taus(prefix: str, lengths: list[int], scores: np.ndarray, list_size: int, seed: int) -> dict[str, float]:
    return {prefix: kendall_tau(lengths, scores),
            f"{prefix}_per_list": per_list_tau(lengths, scores, list_size=list_size, seed=seed)}


def _describe(ranker: LengthRanker) -> dict[str, Any]:
    training = ranker.info.get("training", {})
    return {"objective": ranker.objective.to_config(), "max_length": ranker.max_length,
            "head_hidden": ranker.head_hidden, "encoder": ranker.info.get("encoder"),
            "frozen_encoder": training.get("config", {}).get("freeze_encoder"),
            "best_val_tau": training.get("best_val_tau"), "train_config": training.get("config")}


def evaluate(
    data: str | Path,
    ranker_path: str | Path,
    classifiers: dict[str, str | Path] | None = None,
    device: str = "cpu",
    list_size: int = 32,
    seed: int = 0,
    timing_prompts: int = 256,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metrics, details) for the ranker and baselines on the test split of `data`.

    `classifiers` maps a metric name (e.g. "bucket_classifier") to a bucket-classifier folder; each adds
    `kendall_tau_<name>` (expected bucket) and `kendall_tau_<name>_argmax`.
    """
    test = read_examples(data, "test")
    train = read_examples(data, "train")
    if len(test) < 2 or not train:
        raise LmstackError(f"{data} needs a train split and a test split of >= 2 prompts")
    lengths = [ex.output_len for ex in test]
    prompts = [ex.prompt for ex in test]
    ranker = LengthRanker.load(ranker_path, device=device)
    log(f"scoring {len(test)} test prompts with the ranker")
    metrics: dict[str, Any] = {"num_test_prompts": len(test), "num_train_prompts": len(train)}
    metrics |= _taus("kendall_tau", lengths, ranker.predict(prompts), list_size, seed)
    baseline = PromptLengthBaseline().fit([ex.prompt_len for ex in train], [ex.output_len for ex in train])
    metrics |= _taus("kendall_tau_prompt_len", lengths, baseline.predict([ex.prompt_len for ex in test]),
                     list_size, seed)
    details: dict[str, Any] = {"ranker": _describe(ranker), "prompt_len_direction": baseline.sign,
                               "test_output_len": _length_stats(test)}
    for name, path in (classifiers or {}).items():
        classifier = LengthRanker.load(path, device=device)
        if not isinstance(classifier.objective, BucketObjective):
            raise LmstackError(f"{path} is not a bucket classifier (objective {classifier.objective.name!r}); "
                               "train one with `lmstack ltr train --objective bucket`")
        log(f"scoring the test prompts with {name}")
        out = classifier.predict_outputs(prompts)
        metrics |= _taus(f"kendall_tau_{name}", lengths, classifier.objective.score(out).numpy(), list_size, seed)
        metrics |= _taus(f"kendall_tau_{name}_argmax", lengths, classifier.objective.argmax_score(out).numpy(),
                         list_size, seed)
        details[name] = _describe(classifier)
    timing = prompts[: max(32, timing_prompts)]
    log(f"timing the ranker on {len(timing)} prompts ({device})")
    metrics["ranker_ms_per_prompt_batch1"] = cost_per_prompt(ranker, timing[:64], batch_size=1)
    metrics["ranker_ms_per_prompt_batch32"] = cost_per_prompt(ranker, timing, batch_size=32)
    return metrics, details


def _length_stats(examples: list[LengthExample]) -> dict[str, float]:
    lens = [ex.output_len for ex in examples]
    return {"mean": statistics.fmean(lens), "median": statistics.median(lens), "max": max(lens),
            "truncated": sum(ex.truncated for ex in examples)}
