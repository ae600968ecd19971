"""Replays one arrival schedule through an in-process `LLMEngine` on the wall clock and measures every request.

The driver adds each request when its arrival time comes (its `arrival_time` is that instant, so time spent
queued while a step was running counts) and otherwise steps the engine as fast as it can, as a server's engine
thread does. Every request decodes exactly its replayed length (`ignore_eos`), so all policies do the same
work. Per request it records the time of every token, which gives TTFT, E2E, the inter-token gaps and the
longest stall.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lmstack.bench.runlog import drive
from lmstack.bench.serving_metrics import RequestRecord, compute_metrics
from lmstack.engine.llm_engine import LLMEngine
from lmstack.engine.policies import Policy
from lmstack.engine.sampling_params import SamplingParams


@dataclass
class ReplayRequest:
    """A prompt (text for the ranker, ids for the engine) and the length of the answer it originally got."""

    prompt: str
    prompt_token_ids: list[int]
    output_len: int


@dataclass
class _Trace:
    arrival: float
    first: float | None = None
    last: float | None = None
    finish: float | None = None
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0


@dataclass
class ReplayResult:
    """Per-request timings of one run (seconds, relative to the first arrival) and the engine's work."""

    arrivals: list[float]
    ttft: list[float]
    e2e: list[float]
    finish: list[float]
    max_gap: list[float]
    records: list[RequestRecord]
    steps: int
    step_s: float
    preemptions: int
    duration_s: float


def replay(engine: LLMEngine, policy: Policy, requests: list[ReplayRequest], offsets: list[float], tag: str,
           max_num_seqs: int) -> ReplayResult:
    """Run `requests`, arriving `offsets` seconds after the start, under `policy` with at most `max_num_seqs`
    running (no more than the engine was built for); the engine must be idle."""
    if engine.has_unfinished:
        raise RuntimeError("replay needs an idle engine")
    if not 1 <= max_num_seqs <= engine.config.max_num_seqs:
        raise ValueError(f"max_num_seqs must be in [1, {engine.config.max_num_seqs}], got {max_num_seqs}")
    engine.scheduler.policy = policy
    engine.scheduler.max_num_seqs = max_num_seqs
    preempted_before = engine.scheduler.num_preemptions
    traces = [_Trace(arrival=0.0) for _ in offsets]

    def add(i: int, request_id: str, arrival: float) -> None:
        r = requests[i]
        traces[i].arrival = arrival
        engine.add_request(r.prompt_token_ids, SamplingParams(max_tokens=r.output_len, ignore_eos=True,
                                                              temperature=0.0),
                           request_id=request_id, prompt=r.prompt, arrival_time=arrival)

    def on_output(k: int, out: Any, now: float) -> None:
        tr = traces[k]
        if tr.first is None:
            tr.first = now
        else:
            tr.gaps.append(now - tr.last)
        tr.last = now
        tr.tokens += 1
        if out.finished:
            tr.finish = now
            got = len(out.outputs[0].token_ids)
            if got != requests[k].output_len:
                raise RuntimeError(f"engine bug: request {k} generated {got} tokens but ignore_eos asked for "
                                   f"exactly {requests[k].output_len}")

    start, _, steps, step_s = drive(engine, offsets, tag, add, on_output)
    return _result(traces, requests, start, steps, step_s, engine.scheduler.num_preemptions - preempted_before)


def _result(traces: list[_Trace], requests: list[ReplayRequest], start: float, steps: int, step_s: float,
            preemptions: int) -> ReplayResult:
    records = [RequestRecord(success=True, prompt_tokens=len(r.prompt_token_ids), output_tokens=tr.tokens,
                             ttft=tr.first - tr.arrival, itl=tr.gaps, e2e=tr.finish - tr.arrival,
                             finish_reason="length")
               for tr, r in zip(traces, requests, strict=True)]
    first_arrival = min(tr.arrival for tr in traces)
    return ReplayResult(
        arrivals=[tr.arrival - start for tr in traces], ttft=[r.ttft for r in records], e2e=[r.e2e for r in records],
        finish=[tr.finish - first_arrival for tr in traces],
        # The longest a request went without progress: waiting for its first token, or between two tokens.
        max_gap=[max([tr.first - tr.arrival, *tr.gaps]) for tr in traces],
        records=records, steps=steps, step_s=step_s, preemptions=preemptions,
        duration_s=max(tr.finish for tr in traces) - first_arrival)


def summarize(result: ReplayResult) -> dict[str, Any]:
    """vLLM-style serving metrics plus the fairness and makespan numbers this benchmark is about."""
    m = compute_metrics(result.records, result.duration_s)
    m.update({
        "makespan_s": result.duration_s,
        "max_e2e_ms": 1e3 * max(result.e2e),
        "max_ttft_ms": 1e3 * max(result.ttft),
        "max_stall_ms": 1e3 * max(result.max_gap),
        "p99_stall_ms": 1e3 * float(np.percentile(result.max_gap, 99)),
        "steps": result.steps,
        "step_time_s": result.step_s,
        "mean_step_ms": 1e3 * result.step_s / max(result.steps, 1),
        "preemptions": result.preemptions,
    })
    return m
