"""`lmstack bench policies`: scheduling policies side by side on one engine, with replayed output lengths.

Held-out ShareGPT prompts (the test split of a `lmstack ltr build-data` file, or a seeded ShareGPT sample)
decode exactly their recorded answer length (`ignore_eos`), so fcfs, mlfq, ltr and oracle-sjf do identical
work and differ only in order. Scenarios, each run under every policy in turn on the same loaded engine:

- burst: every request arrives at t=0 (synthetic data generation): time to finish all, latency;
- Poisson arrivals at a sweep of rates, by default fractions of the capacity the fcfs burst measured (its
  steady throughput, `policy_summary.steady_capacity`: while the batch is full, without the tail).

Each finished (scenario, policy) run is appended to a JSONL log next to the results file, so an interrupted
benchmark resumes where it stopped. The scheduling effect needs queueing: cap `--max-num-seqs` (and the KV pool
with `--num-kv-blocks`) as a deployment sized for its latency target would.
"""

from __future__ import annotations

import argparse
import os
import random
import shlex
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np

from lmstack.bench.policy_replay import ReplayRequest, replay, summarize
from lmstack.bench.results import cli_command, device_name, write_results
from lmstack.bench.runlog import append_run, poisson_offsets, read_runs
from lmstack.engine.policies import POLICIES, make_policy
from lmstack.errors import LmstackError

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_POLICIES = "fcfs,mlfq,ltr,oracle-sjf"
EVICTABLE = ("ltr", "oracle-sjf")  # policies with a `preempt` option (the `+evict` variants)
_OPTIONS = ("model", "tokenizer", "ranker", "data", "policies", "num_requests", "burst_requests", "rates",
            "rate_fractions", "max_num_seqs", "burst_max_num_seqs", "num_kv_blocks", "max_num_batched_tokens",
            "max_prompt_len", "max_total_len", "starvation_steps", "quantum", "time_budget", "threads", "dtype",
            "device", "seed")
_WARMUP_REQUESTS = 8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="embedded name, HF folder or dummy:<preset>")
    parser.add_argument("--tokenizer", default=None, help="take the tokenizer from this folder or model")
    parser.add_argument("--ranker", default=None, help="trained LengthRanker folder (needed for ltr)")
    parser.add_argument("--ranker-device", default="auto", help="device of the ranker (default: cuda if present)")
    parser.add_argument("--data", default=None,
                        help="`lmstack ltr build-data` file: its held-out test split is replayed (default: a "
                             "seeded ShareGPT sample, which may overlap the ranker's training prompts)")
    parser.add_argument("--policies", default=DEFAULT_POLICIES,
                        help=f"comma-separated (default {DEFAULT_POLICIES}); ltr+evict and oracle-sjf+evict also evict "
                             "running requests for better-ranked newcomers")
    parser.add_argument("--num-requests", type=int, default=100, help="requests per Poisson rate (default 100)")
    parser.add_argument("--burst-requests", type=int, default=None, help="requests in the burst (default: "
                        "--num-requests; 0 skips the burst, then --rates is needed)")
    parser.add_argument("--rates", default=None, help="comma-separated Poisson rates in requests/s")
    parser.add_argument("--rate-fractions", default="0.5,0.7,0.9",
                        help="without --rates: rates as fractions of the fcfs burst throughput (default 0.5,0.7,0.9)")
    parser.add_argument("--max-num-seqs", type=int, default=16, help="batch limit under Poisson arrivals (default 16)")
    parser.add_argument("--burst-max-num-seqs", type=int, default=None,
                        help="batch limit of the burst, an offline job (default: --max-num-seqs)")
    parser.add_argument("--num-kv-blocks", type=int, default=None, help="KV pool size in blocks (engine default)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None, help="tokens per step (engine default)")
    parser.add_argument("--max-prompt-len", type=int, default=1024, help="drop longer prompts (default 1024)")
    parser.add_argument("--max-total-len", type=int, default=2048,
                        help="drop requests whose prompt + answer is longer (default 2048)")
    parser.add_argument("--starvation-steps", type=int, default=256, help="ltr/mlfq starvation guard (default 256)")
    parser.add_argument("--quantum", type=int, default=64, help="ltr: steps of priority for a starved request")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds: skip rate scenarios whose estimated time no longer fits (listed in the results)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's); 1 keeps a shared or small CPU's timings stable")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None,
                        help="results JSON (default benchmarks/results/ltr_serving.json on CUDA, "
                             "ltr_serving_cpu.json on CPU); the run log (.jsonl) and plot (.png) go beside it")


def _floats(text: str | None, flag: str) -> list[float]:
    if not text:
        return []
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or not all(v > 0 for v in values):
        raise LmstackError(f"{flag} must be positive numbers separated by commas, got {text!r}")
    return sorted(values)


def base_policy(name: str) -> tuple[str, bool]:
    """`ltr+evict` → (`ltr`, True): the `+evict` variant of a rank policy evicts running requests for better-ranked
    newcomers (the policy's `preempt` option), so a run can compare both against each other."""
    base, plus, variant = name.partition("+")
    return base, bool(plus) and variant == "evict"


def _check(args: argparse.Namespace) -> list[str]:
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = [p for p in policies if base_policy(p)[0] not in POLICIES
               or ("+" in p and (not base_policy(p)[1] or base_policy(p)[0] not in EVICTABLE))]
    if unknown or not policies:
        raise LmstackError(f"unknown policies {unknown} in --policies; choose from {', '.join(sorted(POLICIES))}, "
                           f"or {', '.join(p + '+evict' for p in EVICTABLE)}")
    if any(base_policy(p)[0] == "ltr" for p in policies) and not args.ranker:
        raise LmstackError("--policies includes ltr: pass --ranker PATH (a folder from `lmstack ltr train`)")
    if args.num_requests < 1 or (args.burst_requests is not None and args.burst_requests < 0):
        raise LmstackError("--num-requests must be >= 1 and --burst-requests >= 0")
    if args.burst_requests == 0 and not args.rates:
        raise LmstackError("without a burst there is no measured capacity: pass --rates, or a --burst-requests > 0")
    if not args.rates and "fcfs" not in policies:
        raise LmstackError("rates from --rate-fractions need the fcfs burst: add fcfs to --policies or pass --rates")
    if args.burst_max_num_seqs is None:
        args.burst_max_num_seqs = args.max_num_seqs
    if args.threads is not None and args.threads < 1:
        raise LmstackError(f"--threads must be >= 1, got {args.threads}")
    for name in ("max_num_seqs", "burst_max_num_seqs", "starvation_steps", "quantum"):
        if getattr(args, name) < 1:
            raise LmstackError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    _floats(args.rates, "--rates")
    _floats(args.rate_fractions, "--rate-fractions")
    return policies


def load_requests(args: argparse.Namespace, tokenizer: Any, n: int) -> tuple[list[ReplayRequest], str]:
    """`n` requests with replayed lengths and where they came from."""
    if args.data:
        from lmstack.ranking.data import read_examples

        examples = read_examples(args.data, split="test")
        random.Random(args.seed).shuffle(examples)
        out = []
        for ex in examples:
            ids = tokenizer.encode(ex.prompt, add_special_tokens=False)
            if 4 <= len(ids) <= args.max_prompt_len and 4 <= ex.output_len <= args.max_total_len - len(ids):
                out.append(ReplayRequest(ex.prompt, ids, ex.output_len))
                if len(out) == n:
                    return out, f"test split of {args.data}"
        raise LmstackError(f"only {len(out)} test prompts of {args.data} pass the length limits, {n} needed; "
                           "lower --num-requests/--burst-requests or raise --max-total-len")
    from lmstack.data.sharegpt import sample_requests

    sampled = sample_requests(tokenizer, n, seed=args.seed, max_prompt_len=args.max_prompt_len,
                              max_total_len=args.max_total_len)
    return [ReplayRequest(r.prompt, r.prompt_token_ids, r.output_len) for r in sampled], "ShareGPT sample"


def sweep_order(rates: list[float], capacity: float | None) -> list[float]:
    """Sustainable rates from the highest down (the headline comes first), then the overloaded ones."""
    ok = sorted((r for r in rates if capacity is None or r <= capacity), reverse=True)
    return ok + sorted(r for r in rates if r not in ok)


def _read_log(path: Path, config: dict[str, Any], ranker: str | None) -> dict[tuple[str, str], dict[str, Any]]:
    """Finished runs of this exact configuration, ltr runs only with this ranker."""
    runs = read_runs(path, lambda r: r.get("config") == config
                     and (base_policy(r["policy"])[0] != "ltr" or r.get("ranker") == ranker))
    return {(r["scenario"], r["policy"]): r for r in runs}


class _Runner:
    """One loaded engine; runs a scenario under a policy, or returns the logged run."""

    def __init__(self, args: argparse.Namespace, log: Path, config: dict[str, Any]) -> None:
        from lmstack import LLM

        engine_kwargs = {k: getattr(args, k) for k in ("num_kv_blocks", "max_num_batched_tokens")
                         if getattr(args, k) is not None}
        self.llm = LLM(args.model, dtype=args.dtype, device=args.device, tokenizer=args.tokenizer, seed=args.seed,
                       max_num_seqs=max(args.max_num_seqs, args.burst_max_num_seqs), **engine_kwargs)
        self.args, self.log, self.config = args, log, config
        # Which process ran a logged run: runs resumed from a log may come from several, and on the H200 the same
        # run differed by 10-25% between processes, so the results say how many there were.
        self.process = f"{socket.gethostname()}:{os.getpid()}:{time.strftime('%Y-%m-%dT%H:%M:%S')}"
        self.done = _read_log(log, config, args.ranker)
        self.ranker, self.ranker_device = None, "cpu"
        if args.ranker:
            from lmstack.engine.policies.ltr import load_ranker, resolve_ranker_device

            self.ranker_device = resolve_ranker_device(args.ranker_device)
            self.ranker = load_ranker(args.ranker, self.ranker_device)

    def warm_up(self, requests: list[ReplayRequest]) -> None:
        """Compile/capture paths and the ranker's kernels (or CUDA graphs) before anything is timed: a burst, then
        a full batch arriving a few milliseconds apart, so that prefill chunks mixed with decode rows run too (on
        the H200 the first timed run of a process was the slowest, up to 25%, after the burst-only warm-up)."""
        warm = [ReplayRequest(r.prompt, r.prompt_token_ids, min(r.output_len, 8)) for r in requests[:_WARMUP_REQUESTS]]
        replay(self.llm.engine, make_policy("fcfs"), warm, [0.0] * len(warm), "warmup", self.args.max_num_seqs)
        batch = self.args.max_num_seqs
        staggered = [ReplayRequest(r.prompt, r.prompt_token_ids, min(r.output_len, 32)) for r in requests[:batch]]
        replay(self.llm.engine, make_policy("fcfs"), staggered, [0.005 * i for i in range(len(staggered))],
               "warmup", batch)
        if self.ranker is not None:
            self.ranker.score([r.prompt for r in requests[:_WARMUP_REQUESTS]])

    def policy(self, name: str) -> Any:
        a = self.args
        options: dict[str, dict[str, Any]] = {
            "ltr": {"ranker": self.ranker, "device": self.ranker_device,
                    "starvation_steps": a.starvation_steps, "quantum": a.quantum},
            "mlfq": {"starvation_steps": a.starvation_steps},
        }
        base, evict = base_policy(name)
        return make_policy(base, **options.get(base, {}), **({"preempt": True} if evict else {}))

    def run(self, scenario: str, rate: float | None, policy_name: str, requests: list[ReplayRequest],
            offsets: list[float], max_num_seqs: int) -> dict[str, Any]:
        if (scenario, policy_name) in self.done:
            return self.done[scenario, policy_name]
        policy = self.policy(policy_name)
        try:
            result = replay(self.llm.engine, policy, requests, offsets, f"{scenario}-{policy_name}", max_num_seqs)
        finally:
            policy.close()
        metrics = summarize(result)
        stats = getattr(policy, "stats", None)
        if stats is not None:
            metrics.update(ranker_scored=stats.num_scored, ranker_failed=stats.num_failed,
                           ranker_batches=stats.num_batches, ranker_busy_s=stats.busy_s, ranker_gpu_s=stats.gpu_s,
                           ranker_ms_per_request=1e3 * stats.busy_s / max(stats.num_scored, 1),
                           ranker_share_of_step_time=stats.busy_s / max(result.step_s, 1e-9))
        record = {"config": self.config, "process": self.process, "scenario": scenario, "rate": rate,
                  "policy": policy_name,
                  "ranker": self.args.ranker if base_policy(policy_name)[0] == "ltr" else None,
                  "metrics": metrics, "finish_s": [round(t, 4) for t in sorted(result.finish)]}
        append_run(self.log, record)
        self.done[scenario, policy_name] = record
        print(f"  {scenario:<12} {policy_name:<16} mean E2E {metrics['mean_e2e_ms'] / 1e3:8.2f} s  "
              f"p90 {metrics['p90_e2e_ms'] / 1e3:8.2f} s  TTFT {metrics['mean_ttft_ms'] / 1e3:7.2f} s  "
              f"max stall {metrics['max_stall_ms'] / 1e3:7.2f} s  makespan {metrics['makespan_s']:7.1f} s  "
              f"preempt {metrics['preemptions']}", flush=True)
        return record


class _Plan:
    """Runs scenarios while the time budget allows, collecting the burst and the sweep; lists what it skipped."""

    def __init__(self, runner: _Runner, args: argparse.Namespace, started: float) -> None:
        self.runner, self.args, self.started = runner, args, started
        self.burst: dict[str, dict[str, Any]] = {}
        self.sweep: dict[float, dict[str, dict[str, Any]]] = {}
        self.skipped: list[str] = []

    def _estimate(self, scenario: str, rate: float | None, n: int) -> float:
        """Seconds a run should take: a burst like the fcfs burst, a rate run its arrivals plus a drain."""
        fcfs = self.burst.get("fcfs")
        if rate is None:
            return 1.25 * fcfs["metrics"]["makespan_s"] if fcfs is not None else 0.0
        return 1.15 * n / rate

    def run(self, scenario: str, rate: float | None, policy: str, requests: list[ReplayRequest],
            offsets: list[float], max_num_seqs: int, force: bool = False) -> dict[str, Any] | None:
        budget = self.args.time_budget
        logged = (scenario, policy) in self.runner.done
        if (not force and not logged and budget is not None
                and time.monotonic() - self.started + self._estimate(scenario, rate, len(requests)) > budget):
            self.skipped.append(f"{scenario}/{policy}")
            print(f"  {scenario:<12} {policy:<16} skipped: it would not fit the --time-budget", flush=True)
            return None
        record = self.runner.run(scenario, rate, policy, requests, offsets, max_num_seqs)
        if scenario == "burst":
            self.burst[policy] = record
        elif rate is not None:
            self.sweep.setdefault(rate, {})[policy] = record
        return record

    def sweep_rate(self, rate: float, k: int, policies: list[str], requests: list[ReplayRequest]) -> None:
        """Every policy at one Poisson rate; all or none, so that the rate's row compares like with like."""
        scenario = f"rate={rate:.3f}"
        if self.args.time_budget is not None and not all((scenario, p) in self.runner.done for p in policies):
            need = len(policies) * self._estimate(scenario, rate, len(requests))
            if time.monotonic() - self.started + need > self.args.time_budget:
                self.skipped += [f"{scenario}/{p}" for p in policies]
                print(f"  {scenario:<12} skipped: {need:.0f} s would not fit the --time-budget", flush=True)
                return
        offsets = poisson_offsets(len(requests), rate, self.args.seed + 1 + k)
        for name in policies:
            self.run(scenario, rate, name, requests, offsets, self.args.max_num_seqs, force=True)


def _paths(args: argparse.Namespace, device_type: str) -> tuple[Path, Path, Path]:
    default = "ltr_serving.json" if device_type == "cuda" else "ltr_serving_cpu.json"
    output = Path(args.output or f"benchmarks/results/{default}")
    return output, output.with_suffix(".jsonl"), output.with_suffix(".png")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark described by `args`, write results JSON + PNG, return the metrics."""
    from lmstack.bench.policy_summary import (
        plot_latency_vs_rate,
        plot_title,
        print_table,
        steady_capacity,
        summary_metrics,
    )
    from lmstack.models import resolve_device

    policies = _check(args)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    output, log, plot = _paths(args, device.type)
    output.parent.mkdir(parents=True, exist_ok=True)
    # What a logged run must share to be reused; the ranker matters to ltr runs only, the time budget to none.
    config = {k: getattr(args, k) for k in _OPTIONS if k not in ("policies", "ranker", "time_budget")}
    started = time.monotonic()
    runner = _Runner(args, log, config)
    n_burst = args.num_requests if args.burst_requests is None else args.burst_requests
    requests, source = load_requests(args, runner.llm.tokenizer, max(n_burst, args.num_requests))
    runner.warm_up(requests)
    n = args.num_requests
    plan = _Plan(runner, args, started)
    # Priority order, so that a time budget cuts the least important runs: the fcfs and ltr burst, the capacity
    # the sweep is scaled to, every policy at each rate (highest sustainable first), the other policies' bursts.
    core = [p for p in ("fcfs", "ltr") if p in policies]
    burst_requests, zeros = requests[:n_burst], [0.0] * n_burst
    for name in core if n_burst else []:
        plan.run("burst", None, name, burst_requests, zeros, args.burst_max_num_seqs)
    capacity = None
    if n_burst == n and args.burst_max_num_seqs == args.max_num_seqs and "fcfs" in plan.burst:
        capacity = steady_capacity(plan.burst["fcfs"]["finish_s"])
    elif not args.rates:  # the burst ran at another size: measure the sweep's own capacity (fcfs, all at t=0)
        probe = plan.run("capacity", None, "fcfs", requests[:n], [0.0] * n, args.max_num_seqs, force=True)
        capacity = steady_capacity(probe["finish_s"])
    rates = _floats(args.rates, "--rates") or [f * capacity for f in _floats(args.rate_fractions, "--rate-fractions")]
    for k, rate in enumerate(sweep_order(rates, capacity)):
        plan.sweep_rate(rate, k, policies, requests[:n])
    for name in [p for p in policies if p not in core] if n_burst else []:
        plan.run("burst", None, name, burst_requests, zeros, args.burst_max_num_seqs)
    burst, sweep = plan.burst, plan.sweep
    metrics = summary_metrics(burst, sweep, capacity, policies)
    metrics.update(model=args.model, device=str(device), requests_source=source, skipped_runs=plan.skipped,
                   max_num_seqs=args.max_num_seqs, burst_max_num_seqs=args.burst_max_num_seqs,
                   num_kv_blocks=runner.llm.engine.blocks.num_blocks,
                   mean_output_len=float(np.mean([r.output_len for r in requests[:args.num_requests]])),
                   mean_prompt_len=float(np.mean([len(r.prompt_token_ids) for r in requests[:args.num_requests]])))
    drawn = plot_latency_vs_rate(metrics["by_rate"], policies, plot, plot_title(metrics, device_name(device)))
    command = cli_command("bench policies", args, _OPTIONS) + f" --output {shlex.quote(str(output))}"
    write_results(output, command, metrics, device=device, plot=str(plot) if drawn else None, run_log=str(log))
    print_table(metrics, output)
    return metrics


if __name__ == "__main__":
    from lmstack.bench import module_main

    module_main("lmstack.bench.policies", __doc__, add_arguments, run)
