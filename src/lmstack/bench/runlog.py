"""What replay benchmarks share: seeded Poisson arrivals, the open-loop driver, and the append-only log of
finished runs.

Each finished run is one JSON line, so a benchmark that was stopped resumes where it was and never loses a
finished run; a line torn by a crash is cut off before the next record is appended.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def poisson_offsets(n: int, rate: float, seed: int) -> list[float]:
    """Arrival times (s) of a Poisson process starting at 0: the same for every policy at a given rate and seed."""
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=n)
    return [float(t) for t in np.cumsum(gaps) - gaps[0]]


def drive(engine: Any, offsets: list[float], tag: str, add: Callable[[int, str, float], None],
          on_output: Callable[[int, Any, float], None]) -> tuple[float, list[float], int, float]:
    """Open-loop replay on an idle engine: request i is added (`add(i, request_id, arrival)`) at `offsets[i]`
    seconds after the start whatever the engine is doing, which steps as fast as it goes; every output goes to
    `on_output(i, output, now)`. Returns the start, the arrival times, the steps and the seconds spent in them."""
    if engine.has_unfinished:
        raise RuntimeError("replay needs an idle engine")
    n = len(offsets)
    start = time.monotonic()
    arrivals = [start + t for t in offsets]
    added = finished = steps = 0
    step_s = 0.0
    while finished < n:
        now = time.monotonic()
        while added < n and arrivals[added] <= now:
            add(added, f"{tag}-{added}", arrivals[added])
            added += 1
        if not engine.has_unfinished:
            time.sleep(max(0.0, arrivals[added] - time.monotonic()))
            continue
        t0 = time.perf_counter()
        outputs = engine.step()
        step_s += time.perf_counter() - t0
        steps += 1
        now = time.monotonic()
        for out in outputs:
            on_output(int(out.request_id.rsplit("-", 1)[1]), out, now)
            finished += bool(out.finished)
    return start, arrivals, steps, step_s


def read_runs(path: Path, keep: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    """The logged records that `keep` accepts (e.g. those of this exact configuration), in order."""
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):  # a record torn by a crash: drop it, so the next one starts a line
        with path.open("r+", encoding="utf-8") as f:
            f.truncate(len(text[:text.rfind("\n") + 1].encode("utf-8")))
    out = []
    for line in text.split("\n"):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and keep(rec):
            out.append(rec)
    return out


def append_run(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record, separators=(",", ":")) + "\n")
        f.flush()
