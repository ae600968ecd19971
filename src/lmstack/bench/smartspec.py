"""`lmstack bench smartspec`: speculative decoding policies across request rates, in one run.

One engine is loaded with its proposer (a draft model, or n-gram lookup); every policy replays the same seeded
Poisson arrival trace at each rate of the sweep through the in-process engine loop: no speculation (plain
steps), fixed proposal lengths k, and SmartSpec's goodput-chosen k. Per-request latency is finish − arrival.
Outputs are greedy, so every policy generates the same tokens (speculation is lossless) and does the same work;
the results count requests whose tokens differed from no-spec's (float round-off in other batch shapes can flip
a near-tie).

Workloads:
- `--proposer draft` (default model qwen2.5-coder-1.5b-instruct, draft qwen2.5-coder-0.5b-instruct) on coding
  prompts (`--data code`) or ShareGPT (`--data sharegpt`);
- `--proposer ngram` (default smollm2-135m-instruct) on prompts that ask to repeat or edit a wikitext-2
  paragraph (`--data quote`).

With `--repeats R` every rate is replayed on R arrival traces (other seeds; `--repeats 2,8,8` gives each rate its
own count: runs near saturation last a second or two and vary the most), the policies taking turns within
each trace so that drift of the machine touches all of them alike: no-spec first, the others in order on even
traces and in reverse on odd ones, so that no policy always runs last (a drift over the turns of a trace then
cancels over pairs of traces); the results average each policy's metrics over its traces and keep every
trace's mean latency beside them.

Each run also splits its mean step into the engine's phases (ms per step): schedule, propose (the n-gram lookup
or the draft's forwards, and choosing k), forward, sample (verification) and postprocess. On a GPU the forward is
only queued: its device time shows up in the phase that first waits for it (sampling or verification).

SmartSpec at each rate is warm-started from a profile of the runs before it (the step times of the no-speculation
and fixed-k runs, the fixed-k runs' acceptance), as the paper profiles the batch latency offline, and keeps
refitting as it runs. The pooled profile is written beside the results for `lmstack serve --spec-profile`.
Finished runs are appended to a JSONL log next to the results, so an interrupted benchmark resumes where it
stopped.
"""

from __future__ import annotations

import argparse
import shlex
import time
from pathlib import Path
from typing import Any

import numpy as np

from lmstack.bench.results import cli_command, device_name, save_figure, write_results
from lmstack.bench.runlog import append_run, drive, poisson_offsets, read_runs
from lmstack.errors import LmstackError

# Defaults sized to finish in about 15 minutes on 2 CPU cores; the lowest rate has requests rarely overlapping.
WORKLOADS: dict[str, dict[str, Any]] = {
    "draft": {"model": "qwen2.5-coder-1.5b-instruct", "spec_model": "qwen2.5-coder-0.5b-instruct", "data": "code",
              "rates": "0.05,0.2,1", "num_requests": 4, "max_tokens": 32},
    "ngram": {"model": "smollm2-135m-instruct", "spec_model": None, "data": "quote",
              "rates": "0.2,1,4", "num_requests": 12, "max_tokens": 64},
}
DEFAULT_POLICIES = "nospec,1,3,5,smart"
_OPTIONS = ("proposer", "model", "spec_model", "data", "data_file", "policies", "rates", "repeats", "num_requests",
            "max_tokens", "max_prompt_len", "max_num_seqs", "spec_max_k", "spec_profile", "temperature", "threads",
            "dtype", "device", "seed")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--proposer", choices=sorted(WORKLOADS), default="draft")
    parser.add_argument("--model", default=None, help="target model (default: the proposer's workload default)")
    parser.add_argument("--spec-model", default=None, help="draft model (default qwen2.5-coder-0.5b-instruct)")
    parser.add_argument("--data", choices=["code", "sharegpt", "quote"], default=None,
                        help="prompts: coding requests, ShareGPT, or wikitext paragraphs to repeat/edit "
                             "(default: code for draft, quote for ngram)")
    parser.add_argument("--data-file", default=None,
                        help="the wikitext-2 JSONL the quote prompts come from (default: "
                             "../shared/data/wikitext2/wikitext-2-raw-v1_test.jsonl)")
    parser.add_argument("--policies", default=DEFAULT_POLICIES,
                        help=f"comma-separated: nospec, smart and fixed k values (default {DEFAULT_POLICIES})")
    parser.add_argument("--rates", default=None,
                        help="comma-separated Poisson rates in requests/s (default: 0.05,0.2,1 for draft, "
                             "0.2,1,4 for ngram: from one request at a time to a full batch on 2 CPU cores)")
    parser.add_argument("--repeats", default="1",
                        help="arrival traces per rate (other seeds; default 1), one count for all rates or one per "
                             "rate (comma-separated, in --rates order): latencies are averaged over them, and the "
                             "policies take turns within each trace, so machine drift touches all alike")
    parser.add_argument("--num-requests", type=int, default=None, help="requests per rate (default 4 draft, 12 ngram)")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="output tokens per request at most (default 32 draft, 64 ngram)")
    parser.add_argument("--max-prompt-len", type=int, default=320, help="drop longer prompts (default 320)")
    parser.add_argument("--max-num-seqs", type=int, default=8, help="requests running at once (default 8)")
    parser.add_argument("--spec-max-k", type=int, default=5, help="K: longest proposal SmartSpec considers")
    parser.add_argument("--spec-profile", default=None, help="extra SmartSpec warm-start profile JSON")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None,
                        help="results JSON (default benchmarks/results/smartspec.json for draft, smartspec_ngram.json "
                             "for ngram); the run log (.jsonl), plot (.png) and SmartSpec profile (.profile.json) "
                             "go beside it")


def _policies(text: str) -> list[tuple[str, int | str | None]]:
    """Policy names and their spec_k (None: speculation off), no-spec first and smart last."""
    out: dict[str, int | str | None] = {}
    for name in (p.strip() for p in text.split(",") if p.strip()):
        if name == "nospec":
            out[name] = None
        elif name == "smart":
            out[name] = "smart"
        elif name.removeprefix("k").isdigit() and int(name.removeprefix("k")) >= 1:
            out[f"k={int(name.removeprefix('k'))}"] = int(name.removeprefix("k"))
        else:
            raise LmstackError(f"unknown policy {name!r} in --policies: use nospec, smart or a fixed k >= 1")
    if "nospec" not in out:
        raise LmstackError("--policies must include nospec: every speedup is measured against it")
    return sorted(out.items(), key=lambda kv: (kv[1] is not None, kv[1] == "smart", kv[1] if isinstance(kv[1], int)
                                                                                     else 0))


def turns(policies: list[tuple[str, int | str | None]], trace: int) -> list[tuple[str, int | str | None]]:
    """The order the policies run in on a trace: no-spec first (the others' outputs are compared with it), the
    rest forward on even traces and backward on odd ones. SmartSpec's warm start needs a fixed-k run before
    it, which the first trace (even) always gives."""
    base, rest = policies[:1], policies[1:]
    return base + (rest if trace % 2 == 0 else rest[::-1])


def _check(args: argparse.Namespace) -> list[tuple[str, int | str | None]]:
    defaults = WORKLOADS[args.proposer]
    args.model = args.model or defaults["model"]
    args.data = args.data or defaults["data"]
    if args.proposer == "draft":
        args.spec_model = args.spec_model or defaults["spec_model"]
    elif args.spec_model is not None:
        raise LmstackError("--spec-model is for --proposer draft")
    if args.data_file is not None and args.data != "quote":
        raise LmstackError("--data-file is for --data quote (a wikitext-2 JSONL)")
    for name in ("rates", "num_requests", "max_tokens"):
        if getattr(args, name) is None:
            setattr(args, name, defaults[name])
    try:
        rates = [float(r) for r in args.rates.split(",") if r.strip()]
    except ValueError:
        rates = []
    if not rates or min(rates) <= 0:
        raise LmstackError(f"--rates must be positive numbers separated by commas, got {args.rates!r}")
    args.repeats_by_rate = _repeats(str(args.repeats), rates)
    for name in ("num_requests", "max_tokens", "max_prompt_len", "max_num_seqs", "spec_max_k"):
        if getattr(args, name) < 1:
            raise LmstackError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.threads is not None and args.threads < 1:
        raise LmstackError(f"--threads must be >= 1, got {args.threads}")
    return _policies(args.policies)


def _repeats(text: str, rates: list[float]) -> dict[float, int]:
    """--repeats as traces per rate: one count for every rate, or one per rate in --rates order."""
    try:
        counts = [int(r) for r in text.split(",") if r.strip()]
    except ValueError:
        counts = []
    if len(counts) == 1:
        counts *= len(rates)
    if len(counts) != len(rates) or min(counts) < 1:
        raise LmstackError(f"--repeats must be one count >= 1 or one per rate ({len(rates)} for --rates), "
                           f"comma-separated; got {text!r}")
    return dict(zip(rates, counts, strict=True))


def _prompts(args: argparse.Namespace, llm: Any) -> list[list[int]]:
    """Chat-templated prompt ids, `--num-requests` of them within `--max-prompt-len`."""
    from lmstack.data.prompts import code_prompts, quote_prompts

    n = args.num_requests
    if args.data == "sharegpt":
        from lmstack.data.sharegpt import sample_requests

        texts = [r.prompt for r in sample_requests(llm.tokenizer, 4 * n, seed=args.seed,
                                                   max_prompt_len=args.max_prompt_len)]
    elif args.data == "code":
        texts = code_prompts()
        texts = [texts[(args.seed + i) % len(texts)] for i in range(max(n, len(texts)))]
    else:
        texts = quote_prompts(4 * n, seed=args.seed, **({"path": args.data_file} if args.data_file else {}))
    ids = [llm.encode_prompt([{"role": "user", "content": t}])[0] for t in texts]
    ids = [x for x in ids if len(x) <= args.max_prompt_len][:n]
    if len(ids) < n:
        raise LmstackError(f"only {len(ids)} {args.data} prompts fit --max-prompt-len {args.max_prompt_len}; "
                           "raise it or lower --num-requests")
    return ids


def replay(engine: Any, prompts: list[list[int]], offsets: list[float], params: Any, tag: str) -> dict[str, Any]:
    """Add each request at its arrival time, step the engine as fast as it goes; per-request timings."""
    n = len(prompts)
    first: dict[int, float] = {}
    finish: dict[int, float] = {}
    tokens: dict[int, list[int]] = {}

    def add(i: int, request_id: str, arrival: float) -> None:
        engine.add_request(prompts[i], params, request_id=request_id, arrival_time=arrival)

    def on_output(i: int, out: Any, now: float) -> None:
        first.setdefault(i, now)
        if out.finished:
            finish[i] = now
            tokens[i] = out.outputs[0].token_ids

    before = dict(engine.stats)
    start, arrivals, steps, step_s = drive(engine, offsets, tag, add, on_output)
    # Where a step's time went (ms per step): the host's share is what speculation adds besides the forward.
    phases = {f"{name}_ms_per_step": 1e3 * (engine.stats.get(f"{name}_s", 0.0) - before.get(f"{name}_s", 0.0))
              / max(steps, 1) for name in ("schedule", "propose", "forward", "sample", "postprocess")}
    latency = np.array([finish[i] - arrivals[i] for i in range(n)])
    ttft = np.array([first[i] - arrivals[i] for i in range(n)])
    n_tokens = sum(len(t) for t in tokens.values())
    return {"mean_latency_s": float(latency.mean()), "p50_latency_s": float(np.percentile(latency, 50)),
            "p90_latency_s": float(np.percentile(latency, 90)), "mean_ttft_s": float(ttft.mean()),
            "output_tokens": n_tokens, "makespan_s": max(finish.values()) - start, "steps": steps,
            "mean_step_ms": 1e3 * step_s / max(steps, 1), "tokens_per_step": n_tokens / max(steps, 1), **phases,
            "tokens": [tokens[i] for i in range(n)]}


def average_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One policy's metrics at one rate over its traces: numbers and tables of counts (steps by k) averaged,
    the rest from the first trace, plus each trace's mean latency (its spread is the run-to-run noise the
    ratios should be read against)."""
    def mean(key: str, value: Any) -> Any:
        if isinstance(value, dict):
            keys = sorted({k for r in runs for k in r["metrics"].get(key, {})}, key=lambda k: (len(k), k))
            return {k: float(np.mean([r["metrics"].get(key, {}).get(k, 0) for r in runs])) for k in keys}
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(np.mean([r["metrics"][key] for r in runs]))
        return value

    out = {k: mean(k, v) for k, v in runs[0]["metrics"].items() if k != "tokens"}
    out["traces"] = len(runs)
    out["mean_latency_s_by_trace"] = [r["metrics"]["mean_latency_s"] for r in runs]
    return out


def summarize(runs: dict[tuple[float, str, int], dict[str, Any]], rates: list[float],
              policies: list[str]) -> dict[str, Any]:
    """Per-rate mean latency of each policy (averaged over its traces) and the headline ratios (definitions in
    the results file)."""
    fixed = [p for p in policies if p.startswith("k=")]
    by_rate, speedups, smart_vs_fixed, smart_vs_nospec = [], [], [], []
    for rate in rates:
        row: dict[str, Any] = {"rate_req_s": rate}
        for p in policies:
            traces = [run for (r, name, _), run in sorted(runs.items()) if r == rate and name == p]
            if traces:
                row[p] = average_runs(traces)
        by_rate.append(row)
        base = row.get("nospec", {}).get("mean_latency_s")
        spec = [row[p]["mean_latency_s"] for p in policies if p != "nospec" and p in row]
        if base and spec:
            speedups.append(base / min(spec))
        smart = row.get("smart", {}).get("mean_latency_s")
        best_fixed = min((row[p]["mean_latency_s"] for p in fixed if p in row), default=None)
        if smart and best_fixed:
            smart_vs_fixed.append(smart / best_fixed)
        if smart and base:
            smart_vs_nospec.append(smart / base)
    return {
        "rates_req_s": rates, "policies": policies,
        "mean_latency_s": {p: [row.get(p, {}).get("mean_latency_s") for row in by_rate] for p in policies},
        "best_speedup_vs_nospec": max(speedups, default=None),
        "speedup_vs_nospec_by_rate": speedups,
        "worst_smart_over_best_fixed": max(smart_vs_fixed, default=None),
        "smart_over_best_fixed_by_rate": smart_vs_fixed,
        "worst_smart_over_nospec": max(smart_vs_nospec, default=None),
        "smart_over_nospec_by_rate": smart_vs_nospec,
        "by_rate": by_rate,
    }


DEFINITIONS = {
    "best_speedup_vs_nospec": "max over rates of nospec mean latency / the best speculative policy's (fixed k or "
                              "smart) mean latency at that rate",
    "worst_smart_over_best_fixed": "max over rates of smart mean latency / the best fixed k's mean latency",
    "worst_smart_over_nospec": "max over rates of smart mean latency / nospec mean latency",
}


def plot(metrics: dict[str, Any], path: Path, title: str) -> bool:
    """Mean latency against the arrival rate, one line per policy; False where matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for p in metrics["policies"]:
        points = [(r, y) for r, y in zip(metrics["rates_req_s"], metrics["mean_latency_s"][p], strict=True)
                  if y is not None]
        ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=p,
                linewidth=2.5 if p == "smart" else 1.5)
    ax.set_xscale("log")
    ax.set_xlabel("arrival rate (requests/s)")
    ax.set_ylabel("mean latency (s)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    return True


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the sweep described by `args`; write results JSON, plot and profile; return the metrics."""
    from lmstack import LLM, SamplingParams
    from lmstack.engine.spec.controller import merge_profiles, read_profile, save_profile
    from lmstack.engine.spec.decoder import plain_profile
    from lmstack.engine.spec.smartspec import SmartSpec

    policies = _check(args)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    output = Path(args.output or ("benchmarks/results/smartspec.json" if args.proposer == "draft"
                                  else f"benchmarks/results/smartspec_{args.proposer}.json"))
    log, png, profile_path = output.with_suffix(".jsonl"), output.with_suffix(".png"), \
        output.with_suffix(".profile.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    config = {k: getattr(args, k) for k in _OPTIONS if k not in ("policies", "repeats")}
    done = {(r["rate"], r["policy"], r.get("repeat", 0)): r
            for r in read_runs(log, lambda r: r.get("config") == config)}
    max_model_len = args.max_prompt_len + args.max_tokens + 8
    block_size = 16
    # Room for every running request at full length (plus proposals) and no more: two models share the memory.
    num_kv_blocks = args.max_num_seqs * -(-(max_model_len + args.spec_max_k) // block_size) + 1
    llm = LLM(args.model, dtype=args.dtype, device=args.device, seed=args.seed, speculative=args.proposer,
              spec_model=args.spec_model, spec_k="smart", spec_max_k=args.spec_max_k,
              max_num_seqs=args.max_num_seqs, max_model_len=max_model_len, block_size=block_size,
              num_kv_blocks=num_kv_blocks)
    engine = llm.engine
    prompts = _prompts(args, llm)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
    # Load kernels and caches of both step kinds before anything is timed: a full batch of each at full length,
    # since CPU kernels are built per matrix shape on first use (about 1 ms each) and CUDA decode graphs are
    # captured per context bucket on first use; either would be charged to the first policy (on the H200 a
    # warm-up of 64-token prompts left the first no-speculation run at 4 req/s twice as slow as the next).
    warm = prompts[:args.max_num_seqs]
    for spec_k in (None, args.spec_max_k):
        engine.set_spec_k(spec_k)
        replay(engine, warm, [0.0] * len(warm), params, "warmup")
    profiles = [read_profile(args.spec_profile)] if args.spec_profile else []
    profiles += [rec["profile"] for rec in done.values() if rec.get("profile")]
    rates = sorted(float(r) for r in args.rates.split(",") if r.strip())
    names = [name for name, _ in policies]
    started = time.monotonic()
    for i, rate in enumerate(rates):
        for rep in range(args.repeats_by_rate[rate]):
            offsets = poisson_offsets(len(prompts), rate, args.seed + 1 + i + 1009 * rep)
            for name, spec_k in turns(policies, rep):
                if (rate, name, rep) in done:
                    continue
                engine.set_spec_k(spec_k)
                if spec_k == "smart" and profiles:
                    engine.spec.controller.load_profile(merge_profiles(profiles))
                engine.plain_steps = [] if engine.spec is None else None
                metrics = replay(engine, prompts, offsets, params, f"r{i}.{rep}-{name}")
                record: dict[str, Any] = {"config": config, "rate": rate, "policy": name, "repeat": rep,
                                          "metrics": metrics}
                if engine.spec is not None:
                    ctl = engine.spec.controller
                    acc = ctl.acceptance
                    metrics.update(acceptance_rate=acc.total_accepted / max(acc.total_tested, 1),
                                   proposed_tokens=acc.total_proposed, accepted_tokens=acc.total_accepted,
                                   steps_by_k={str(k): v for k, v in sorted(ctl.chosen.items())})
                    if isinstance(ctl, SmartSpec):
                        metrics["plans_by_source"] = dict(ctl.sources)
                    record["profile"] = ctl.profile()
                else:  # plain decoding's step times, which SmartSpec weighs every k against
                    record["profile"] = plain_profile(engine.plain_steps, engine.runner.use_graphs)
                    engine.plain_steps = None
                profiles.append(record["profile"])
                ref = done.get((rate, "nospec", rep))
                if ref is not None and name != "nospec":
                    metrics["requests_differing_from_nospec"] = sum(
                        a != b for a, b in zip(metrics["tokens"], ref["metrics"]["tokens"], strict=True))
                append_run(log, record)
                done[rate, name, rep] = record
                print(f"  rate {rate:<7g} trace {rep} {name:<7} mean latency {metrics['mean_latency_s']:8.2f} s  "
                      f"p90 {metrics['p90_latency_s']:8.2f} s  tokens/step {metrics['tokens_per_step']:5.2f}  "
                      f"step {metrics['mean_step_ms']:7.1f} ms  [{time.monotonic() - started:6.0f} s]", flush=True)
    engine.set_spec_k(None)
    metrics = summarize(done, rates, names)
    metrics.update(proposer=args.proposer, model=args.model, spec_model=args.spec_model, data=args.data,
                   num_requests=len(prompts), max_tokens=args.max_tokens, max_num_seqs=args.max_num_seqs,
                   mean_prompt_len=float(np.mean([len(p) for p in prompts])), definitions=DEFINITIONS)
    save_profile(merge_profiles(profiles, proposer=args.proposer, model=args.model, spec_model=args.spec_model),
                 profile_path)
    title = (f"{args.proposer}: {args.model}" + (f" ← {args.spec_model}" if args.spec_model else "")
             + f", {args.data} prompts, {device_name(llm.device)}")
    drawn = plot(metrics, png, title)
    command = cli_command("bench smartspec", args, _OPTIONS) + f" --output {shlex.quote(str(output))}"
    write_results(output, command, metrics, device=llm.device, plot=str(png) if drawn else None,
                  run_log=str(log), profile=str(profile_path))
    _print(metrics, output)
    return metrics


def _print(metrics: dict[str, Any], output: Path) -> None:
    policies = metrics["policies"]
    print(f"{'rate req/s':<12}" + "".join(f"{p:>10}" for p in policies) + "   (mean latency, s)")
    for i, rate in enumerate(metrics["rates_req_s"]):
        cells = [metrics["mean_latency_s"][p][i] for p in policies]
        print(f"{rate:<12g}" + "".join(f"{c:>10.2f}" if c is not None else f"{'-':>10}" for c in cells))
    for key in DEFINITIONS:
        value = metrics.get(key)
        print(f"  {key:<30} {value:.3f}" if value is not None else f"  {key:<30} -")
    print(f"results: {output}")


if __name__ == "__main__":
    from lmstack.bench import module_main

    module_main("lmstack.bench.smartspec", __doc__, add_arguments, run)
