"""Serving metrics with `vllm bench serve`'s definitions, so our numbers compare with theirs.

Per request: TTFT (send → first content chunk), every inter-token latency (ITL, gap between content chunks),
E2E latency and the output tokens the server reports in its final usage chunk. Aggregates: TPOT per request
= (E2E − TTFT) / (tokens − 1); ITL pools every gap of every request; throughputs divide by the wall time of
the whole run; goodput counts requests per second that meet every SLO given. Pure functions, no network.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lmstack.errors import LmstackError

SLO_METRICS = ("ttft", "tpot", "e2e")
_PERCENTILES = (("median", 50), ("p90", 90), ("p99", 99))


@dataclass
class RequestRecord:
    """What one streamed request measured; times in seconds."""

    success: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    e2e: float = 0.0
    finish_reason: str | None = None
    error: str = ""

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first; None with a single token (there is no decode)."""
        if self.output_tokens <= 1:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def parse_slo(text: str | None) -> dict[str, float]:
    """`ttft=500,tpot=50` → {"ttft": 500.0, "tpot": 50.0} (milliseconds)."""
    if not text:
        return {}
    slo: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.strip().partition("=")
        name = name.strip().lower().removesuffix("_ms")
        try:
            ms = float(value)
        except ValueError:
            ms = -1.0
        if not sep or name not in SLO_METRICS or not ms > 0:
            raise LmstackError(f"bad --slo item {part!r}: write name=milliseconds with name one of "
                               f"{', '.join(SLO_METRICS)}, e.g. --slo ttft=500,tpot=50")
        slo[name] = ms
    return slo


def meets_slo(record: RequestRecord, slo: dict[str, float]) -> bool:
    values = {"ttft": record.ttft, "tpot": record.tpot or 0.0, "e2e": record.e2e}
    return all(values[name] * 1e3 <= limit for name, limit in slo.items())


def _stats(name: str, seconds: list[float]) -> dict[str, float | None]:
    """mean / median / p90 / p99 in ms (numpy's linear interpolation, as vLLM); None when nothing measured."""
    if not seconds:
        return {f"{k}_{name}_ms": None for k in ("mean", *(p for p, _ in _PERCENTILES))}
    ms = np.asarray(seconds) * 1e3
    out = {f"mean_{name}_ms": float(ms.mean())}
    out.update({f"{label}_{name}_ms": float(np.percentile(ms, q)) for label, q in _PERCENTILES})
    return out


def compute_metrics(records: list[RequestRecord], duration: float,
                    slo: dict[str, float] | None = None) -> dict[str, Any]:
    """Aggregate per-request records of one run that took `duration` seconds of wall time."""
    ok = [r for r in records if r.success]
    duration = max(duration, 1e-9)
    input_tokens = sum(r.prompt_tokens for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    m: dict[str, Any] = {
        "completed": len(ok), "failed": len(records) - len(ok), "duration_s": duration,
        "total_input_tokens": input_tokens, "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration, "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
    }
    m.update(_stats("ttft", [r.ttft for r in ok]))
    m.update(_stats("tpot", [t for r in ok if (t := r.tpot) is not None]))
    m.update(_stats("itl", [gap for r in ok for gap in r.itl]))
    m.update(_stats("e2e", [r.e2e for r in ok]))
    if slo:
        m["slo_ms"] = dict(slo)
        m["goodput"] = sum(meets_slo(r, slo) for r in ok) / duration
    return m
