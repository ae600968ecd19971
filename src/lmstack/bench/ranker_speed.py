"""`lmstack bench ranker`: what scoring a batch of arrivals costs the engine, eager vs the bucketed scorer.

Both run in one process on the same held-out prompts: the trained ranker as `lmstack ltr eval` runs it (fp32,
eager, padded to the batch's longest prompt) and as the `ltr` policy runs it (`BucketedScorer`: 16-bit on CUDA,
one CUDA graph per (batch, length) bucket). For each batch size: milliseconds per batch from launch to scores on
the host (median of the repeats), and the engine thread's share of it (the CPU time to launch; the rest
overlaps the engine's own GPU work). Also Kendall's tau of each against the labelled lengths and between the
two, so that the fast path is seen to rank the same.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmstack.errors import LmstackError

_BATCHES = "1,4,16,32"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ranker", required=True, help="trained LengthRanker folder (`lmstack ltr train`)")
    parser.add_argument("--data", required=True, help="`lmstack ltr build-data` file: its test split is scored")
    parser.add_argument("--batch-sizes", default=_BATCHES, help=f"comma-separated (default {_BATCHES})")
    parser.add_argument("--repeats", type=int, default=50, help="timed batches per size (default 50)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="results JSON (default benchmarks/results/ltr_ranker_speed"
                        ".json on CUDA, ltr_ranker_speed_cpu.json on CPU)")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Any, batches: list[list[str]], device: torch.device) -> tuple[float, float]:
    """Median ms from call to scores on the host, and median ms the calling thread spent before returning."""
    total, launch = [], []
    for batch in batches:
        _sync(device)
        start = time.perf_counter()
        finish = fn(batch)
        launch.append(time.perf_counter() - start)
        finish()
        total.append(time.perf_counter() - start)
    return 1e3 * float(np.median(total)), 1e3 * float(np.median(launch))


def run(args: argparse.Namespace) -> dict[str, Any]:
    from lmstack.bench.results import cli_command, write_results
    from lmstack.engine.policies.ltr import load_ranker, resolve_ranker_device
    from lmstack.ranking import LengthRanker, kendall_tau
    from lmstack.ranking.data import read_examples
    from lmstack.ranking.graphed import BucketedScorer

    try:
        sizes = sorted({int(x) for x in args.batch_sizes.split(",") if x.strip()})
    except ValueError:
        sizes = []
    if not sizes or sizes[0] < 1 or args.repeats < 1:
        raise LmstackError(f"--batch-sizes must be positive integers and --repeats >= 1, got {args.batch_sizes!r} "
                           f"and {args.repeats}")
    device = torch.device(resolve_ranker_device(args.device))
    examples = read_examples(args.data, split="test")
    if len(examples) < max(sizes):
        raise LmstackError(f"{args.data} has {len(examples)} test prompts, fewer than the largest batch {max(sizes)}")
    eager = LengthRanker.load(args.ranker, device=str(device))
    fast = load_ranker(args.ranker, str(device))
    if not isinstance(fast, BucketedScorer):
        fast = BucketedScorer(eager, use_graphs=False)
    fast.capture()
    prompts = [ex.prompt for ex in examples]
    lengths = [ex.output_len for ex in examples]
    s_eager, s_fast = eager.score(prompts), fast.score(prompts)
    rng = random.Random(args.seed)
    rows = []
    for b in sizes:
        batches = [rng.sample(prompts, b) for _ in range(args.repeats + 3)]

        def run_eager(batch: list[str]) -> Any:
            out = eager.score(batch)
            return lambda: out

        def run_fast(batch: list[str]) -> Any:
            pending = fast.launch(batch)
            return lambda: [p.result() for p in pending]

        run_eager(batches[0])(), run_fast(batches[0])()
        e_ms, e_launch = _time(run_eager, batches[3:], device)
        f_ms, f_launch = _time(run_fast, batches[3:], device)
        rows.append({"batch": b, "eager_fp32_ms": e_ms, "eager_fp32_thread_ms": e_launch, "bucketed_ms": f_ms,
                     "bucketed_thread_ms": f_launch, "speedup": e_ms / f_ms, "thread_speedup": e_launch / f_launch})
        print(f"batch {b:>3}: eager fp32 {e_ms:7.2f} ms | bucketed {f_ms:7.2f} ms (engine thread {f_launch:6.2f} ms)"
              f" | {e_ms / f_ms:5.1f}x", flush=True)
    metrics = {
        "num_prompts": len(prompts), "rows": rows,
        "bucketed_dtype": str(fast.ranker.head[-1].weight.dtype), "cuda_graphs": fast.use_graphs,
        "capture_s": fast.capture_s, "num_graphs": len(fast._graphs),
        "kendall_tau_eager_fp32": kendall_tau(s_eager, lengths),
        "kendall_tau_bucketed": kendall_tau(s_fast, lengths),
        "kendall_tau_eager_vs_bucketed": kendall_tau(s_eager, s_fast),
        "ms_per_request_batch1_eager": rows[0]["eager_fp32_ms"] / sizes[0],
        "ms_per_request_batch1_bucketed": rows[0]["bucketed_ms"] / sizes[0],
    }
    print(f"tau vs lengths: eager fp32 {metrics['kendall_tau_eager_fp32']:.4f}, bucketed "
          f"{metrics['kendall_tau_bucketed']:.4f}; eager vs bucketed {metrics['kendall_tau_eager_vs_bucketed']:.4f}")
    default = "ltr_ranker_speed.json" if device.type == "cuda" else "ltr_ranker_speed_cpu.json"
    output = Path(args.output or f"benchmarks/results/{default}")
    command = cli_command("bench ranker", args, ("ranker", "data", "batch_sizes", "repeats", "device", "seed"))
    write_results(output, command + f" --output {output}", metrics, device=device)
    print(f"wrote {output}")
    return metrics


if __name__ == "__main__":
    from lmstack.bench import module_main

    module_main("lmstack.bench.ranker_speed", __doc__, add_arguments, run)
