"""Headline ratios, the latency-vs-rate plot and the printed table of `lmstack bench policies`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmstack.bench.results import save_figure

_KEEP = ("mean_e2e_ms", "p90_e2e_ms", "p99_e2e_ms", "mean_ttft_ms", "p90_ttft_ms", "max_ttft_ms", "max_stall_ms",
         "p99_stall_ms", "mean_tpot_ms", "makespan_s", "request_throughput", "output_throughput", "preemptions",
         "steps", "mean_step_ms", "ranker_ms_per_request", "ranker_share_of_step_time")


# (name, numerator policy, denominator policy) of the mean E2E latency ratios reported at each rate.
_RATE_RATIOS = (("mean_latency_fcfs_over_ltr", "fcfs", "ltr"), ("mean_latency_fcfs_over_oracle", "fcfs", "oracle-sjf"),
                ("ltr_over_oracle_latency", "ltr", "oracle-sjf"), ("mean_latency_mlfq_over_ltr", "mlfq", "ltr"))


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _pick(run: dict[str, Any]) -> dict[str, Any]:
    return {k: run["metrics"][k] for k in _KEEP if k in run["metrics"]}


def _metric(runs: dict[str, dict[str, Any]], policy: str, key: str) -> float | None:
    run = runs.get(policy)
    return run["metrics"].get(key) if run is not None else None


def steady_capacity(finish_s: list[float]) -> float:
    """Requests per second an all-at-once run served while its batch was full: completions between the 10th and
    90th percentile of the finish times. n / makespan undercounts what the engine sustains, because at the end
    of such a run the longest requests decode alone, in small batches; rates scaled to it never build a queue."""
    times = sorted(finish_s)
    lo, hi = len(times) // 10, len(times) - 1 - len(times) // 10
    if hi - lo < 2 or times[hi] <= times[lo]:
        return len(times) / max(times[-1], 1e-9)
    return (hi - lo) / (times[hi] - times[lo])


def summary_metrics(burst: dict[str, dict[str, Any]], sweep: dict[float, dict[str, dict[str, Any]]],
                    capacity: float | None, policies: list[str]) -> dict[str, Any]:
    """Per-scenario tables and the ratios the issue asks for (None where a policy was not run)."""
    m: dict[str, Any] = {"policies": policies, "capacity_req_s": capacity}
    if burst:
        m["burst"] = {p: _pick(run) for p, run in burst.items()}
        m["burst_requests"] = len(next(iter(burst.values()))["finish_s"])
        m["burst_throughput_ltr_over_fcfs"] = _ratio(_metric(burst, "fcfs", "makespan_s"),
                                                     _metric(burst, "ltr", "makespan_s"))
        m["burst_mean_latency_fcfs_over_ltr"] = _ratio(_metric(burst, "fcfs", "mean_e2e_ms"),
                                                       _metric(burst, "ltr", "mean_e2e_ms"))
        if "fcfs" in burst:
            # Synthetic data generation: how many results each policy has delivered by half of fcfs's makespan.
            half = burst["fcfs"]["metrics"]["makespan_s"] / 2
            done = {p: sum(t <= half for t in run["finish_s"]) for p, run in burst.items()}
            m["burst_completed_by_half_fcfs_makespan"] = done
            m["burst_early_completions_ltr_over_fcfs"] = _ratio(done.get("ltr"), done.get("fcfs"))
    rates = sorted(sweep)
    m["rates_req_s"] = rates
    m["by_rate"] = [{"rate_req_s": r, "fraction_of_capacity": _ratio(r, capacity),
                     **{p: _pick(run) for p, run in sweep[r].items()}} for r in rates]
    # The ordering's effect at every rate, not only the headline one: it grows with the queue, so it is near 1
    # while arrivals find free slots and largest once requests wait.
    m["ratios_by_rate"] = [
        {"rate_req_s": r, "fraction_of_capacity": _ratio(r, capacity),
         **{name: _ratio(_metric(sweep[r], a, "mean_e2e_ms"), _metric(sweep[r], b, "mean_e2e_ms"))
            for name, a, b in _RATE_RATIOS},
         "mean_ttft_fcfs_ms": _metric(sweep[r], "fcfs", "mean_ttft_ms")} for r in rates]
    sustainable = [r for r in rates if capacity is None or r <= capacity]
    if sustainable:
        top = max(sustainable)
        at = sweep[top]
        # The ratios below are taken at `headline_rate_req_s`: the highest rate at or under the measured capacity,
        # or, with no capacity measured (rates given outright), the highest rate, which may be an overload.
        m["headline_rate_req_s"] = top
        m["highest_sustainable_rate_req_s"] = top if capacity is not None else None
        headline = next(row for row in m["ratios_by_rate"] if row["rate_req_s"] == top)
        m.update({name: headline[name] for name, _, _ in _RATE_RATIOS})
        m["p90_latency_fcfs_over_ltr"] = _ratio(_metric(at, "fcfs", "p90_e2e_ms"), _metric(at, "ltr", "p90_e2e_ms"))
        m["mean_ttft_fcfs_over_ltr"] = _ratio(_metric(at, "fcfs", "mean_ttft_ms"), _metric(at, "ltr", "mean_ttft_ms"))
        m["max_stall_ltr_over_fcfs"] = _ratio(_metric(at, "ltr", "max_stall_ms"), _metric(at, "fcfs", "max_stall_ms"))
        m["evict_over_no_evict_latency"] = {
            p.removesuffix("+evict"): _ratio(_metric(at, p, "mean_e2e_ms"), _metric(at, p.removesuffix("+evict"),
                                                                                   "mean_e2e_ms"))
            for p in policies if p.endswith("+evict")}
    runs = [*burst.values(), *(r for s in sweep.values() for r in s.values())]
    # Logs written before runs named their process count as one unnamed process.
    m["num_processes"] = len({run.get("process") for run in runs})
    ltr_runs = [run["metrics"] for run in runs if "ranker_busy_s" in run["metrics"]]
    if ltr_runs:
        busy = sum(r["ranker_busy_s"] for r in ltr_runs)
        scored = sum(r["ranker_scored"] for r in ltr_runs)
        m["ranker_ms_per_request"] = 1e3 * busy / max(scored, 1)
        m["ranker_share_of_step_time"] = busy / max(sum(r["step_time_s"] for r in ltr_runs), 1e-9)
        m["ranker_failed"] = sum(r["ranker_failed"] for r in ltr_runs)
    return m


def plot_latency_vs_rate(by_rate: list[dict[str, Any]], policies: list[str], path: Path, title: str) -> bool:
    """Mean and p90 E2E latency and the worst stall against the arrival rate, one line per policy.

    Returns False (and draws nothing) where matplotlib is not installed, e.g. on a bare GPU machine: the
    results file has everything, and `python -m lmstack.bench.policy_summary RESULTS.json` draws it later.
    """
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not by_rate:
        return False
    panels = (("mean_e2e_ms", "mean E2E latency (s)"), ("p90_e2e_ms", "p90 E2E latency (s)"),
              ("max_stall_ms", "worst stall per request (s)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4.2))
    for ax, (key, label) in zip(axes, panels, strict=True):
        for p in policies:
            points = [(row["rate_req_s"], row[p][key] / 1e3) for row in by_rate if p in row]
            ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=p)
        ax.set_xlabel("arrival rate (requests/s)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
    return True


def plot_title(metrics: dict[str, Any], device_name: str) -> str:
    return f"{metrics['model']}, max_num_seqs={metrics['max_num_seqs']}, {device_name}"


def print_table(metrics: dict[str, Any], output: Path) -> None:
    policies = metrics["policies"]
    rows = [("burst", metrics.get("burst", {}))] + [(f"{r['rate_req_s']:.2f} req/s", r) for r in metrics["by_rate"]]
    print(f"{'scenario':<14}{'policy':<18}{'mean E2E s':>11}{'p90 E2E s':>11}{'TTFT s':>9}{'max stall s':>12}"
          f"{'makespan s':>11}{'preempt':>8}")
    for label, table in rows:
        for p in policies:
            if p not in table:
                continue
            t = table[p]
            print(f"{label:<14}{p:<18}{t['mean_e2e_ms'] / 1e3:>11.2f}{t['p90_e2e_ms'] / 1e3:>11.2f}"
                  f"{t['mean_ttft_ms'] / 1e3:>9.2f}{t['max_stall_ms'] / 1e3:>12.2f}{t['makespan_s']:>11.1f}"
                  f"{t['preemptions']:>8}")
    if metrics.get("ratios_by_rate"):
        print(f"{'rate req/s':>11}{'x capacity':>11}" + "".join(f"{name:>32}" for name, _, _ in _RATE_RATIOS))
        for row in metrics["ratios_by_rate"]:
            cells = "".join(f"{row[name]:>32.3f}" if row[name] is not None else f"{'-':>32}"
                            for name, _, _ in _RATE_RATIOS)
            frac = row["fraction_of_capacity"]
            print(f"{row['rate_req_s']:>11.2f}{frac if frac is not None else float('nan'):>11.2f}{cells}")
    for key in ("num_processes", "capacity_req_s", "highest_sustainable_rate_req_s", "headline_rate_req_s",
                "mean_latency_fcfs_over_ltr", "p90_latency_fcfs_over_ltr", "mean_latency_fcfs_over_oracle",
                "ltr_over_oracle_latency",
                "mean_latency_mlfq_over_ltr", "burst_throughput_ltr_over_fcfs", "burst_mean_latency_fcfs_over_ltr",
                "burst_early_completions_ltr_over_fcfs", "ranker_ms_per_request", "ranker_share_of_step_time"):
        value = metrics.get(key)
        if value is not None:
            print(f"  {key:<40} {value:.4g}")
    print(f"results: {output}")


def rebuild_from_log(log: Path, device_label: str) -> Path:
    """Results JSON (and PNG) from a run log alone, for a benchmark stopped before it wrote them (e.g. a time
    limit on a lent GPU): the finished runs are all in the log. Written beside the log as `<log>.json`."""
    import json
    import shlex

    from lmstack.atomic import write_text_atomic

    records = [json.loads(line) for line in log.read_text(encoding="utf-8").split("\n") if line.strip()]
    if not records:
        raise SystemExit(f"{log} holds no finished run")
    config = records[-1]["config"]
    burst = {r["policy"]: r for r in records if r["scenario"] == "burst"}
    sweep: dict[float, dict[str, dict[str, Any]]] = {}
    for r in records:
        if r["scenario"].startswith("rate="):
            sweep.setdefault(r["rate"], {})[r["policy"]] = r
    capacity = next((steady_capacity(r["finish_s"]) for r in records if r["scenario"] == "capacity"), None)
    if capacity is None and "fcfs" in burst and config["burst_requests"] == config["num_requests"]:
        capacity = steady_capacity(burst["fcfs"]["finish_s"])
    policies = list(dict.fromkeys(r["policy"] for r in records))
    metrics = summary_metrics(burst, sweep, capacity, policies)
    metrics.update(model=config["model"], max_num_seqs=config["max_num_seqs"],
                   burst_max_num_seqs=config["burst_max_num_seqs"])
    rankers = {r["ranker"] for r in records if r.get("ranker")}
    command = "lmstack bench policies " + " ".join(
        f"--{k.replace('_', '-')} {shlex.quote(str(v))}" for k, v in config.items() if v is not None)
    command += "".join(f" --ranker {shlex.quote(r)}" for r in sorted(rankers))
    out, png = log.with_suffix(".json"), log.with_suffix(".png")
    drawn = plot_latency_vs_rate(metrics["by_rate"], policies, png, plot_title(metrics, device_label))
    record = {"command": command, "device": device_label, "metrics": metrics, "run_log": str(log),
              "plot": str(png) if drawn else None,
              "note": "rebuilt from the run log by `python -m lmstack.bench.policy_summary LOG.jsonl DEVICE`; "
                      "runs missing from the log were not finished"}
    write_text_atomic(out, json.dumps(record, indent=2) + "\n")
    print_table(metrics, out)
    return out


if __name__ == "__main__":
    import json
    import sys

    if len(sys.argv) == 3 and sys.argv[1].endswith(".jsonl"):
        rebuild_from_log(Path(sys.argv[1]), sys.argv[2])
        sys.exit(0)
    if len(sys.argv) != 2:
        sys.exit("usage: python -m lmstack.bench.policy_summary RESULTS.json  (draws RESULTS.png beside it)\n"
                 "       python -m lmstack.bench.policy_summary RUN_LOG.jsonl DEVICE  (results from a run log)")
    results = Path(sys.argv[1])
    data = json.loads(results.read_text(encoding="utf-8"))
    m = data["metrics"]
    png = results.with_suffix(".png")
    if not plot_latency_vs_rate(m["by_rate"], m["policies"], png, plot_title(m, data["device"])):
        sys.exit("nothing drawn: install matplotlib, and the results need a rate sweep")
    print(f"plot: {png}")
