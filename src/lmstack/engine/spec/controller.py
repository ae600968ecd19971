"""How many tokens to propose each step: the controller interface, a fixed k, and speculation profiles.

A controller chooses each step's proposal length and records what every step cost (the samples SmartSpec's
latency model is fitted on, `smartspec.py`). A profile is those samples and the acceptance estimates as JSON,
so that a later run can start from an earlier one's measurements.
"""

from __future__ import annotations

import json
from collections.abc import Sequence as Seq
from pathlib import Path
from typing import Any

import numpy as np

from lmstack.atomic import write_text_atomic
from lmstack.engine.spec.acceptance import Acceptance, merge_tables
from lmstack.engine.spec.latency import FEATURES, SampleWindow, StepShape, size_bucket, step_features
from lmstack.errors import LmstackError

PROFILE_VERSION = 4


def compact_feature(x: float) -> float | int:
    """A feature as a profile writes it: counts as integers, the rest to 7 significant digits."""
    return int(x) if x.is_integer() else float(f"{x:.7g}")


class Controller:
    """Chooses k per step and records what each step cost; subclasses decide the choice."""

    def __init__(self, max_k: int, draft_forwards: bool, window: int = 32) -> None:
        self.max_k = max_k
        self.draft_forwards = draft_forwards  # the proposer runs a model: k forwards of it per step
        self.acceptance = Acceptance(max_k)
        self.samples: dict[tuple[int, int], SampleWindow] = {}  # by (k, size bucket), the latest `window`
        self.window = window
        self.steps = 0
        self.chosen: dict[int, int] = {}  # k -> steps whose longest proposal had k tokens

    def _window(self, key: tuple[int, int]) -> SampleWindow:
        if key not in self.samples:
            self.samples[key] = SampleWindow(self.window)
        return self.samples[key]

    def choose(self, shape: StepShape) -> int:
        raise NotImplementedError

    def plan(self, shape: StepShape) -> list[int]:
        """How many tokens each decode request proposes this step: the chosen k, within each cap."""
        k = self.choose(shape)
        return [min(k, c) for c in shape.caps]

    def observe_step(self, k: int, num_decodes: int, features: np.ndarray, seconds: float) -> None:
        """A finished step: its longest proposal, decode requests, features and wall time."""
        key = (k, size_bucket(num_decodes))
        self._window(key).append(num_decodes, features, seconds)
        self.steps += 1
        self.chosen[k] = self.chosen.get(k, 0) + 1

    def observe_acceptances(self, keys: list[Any], proposed: list[int], accepted: list[int]) -> None:
        """A step's verifications (one per request) at once."""
        self.acceptance.observe_many(keys, proposed, accepted)

    def maintain(self) -> None:
        """Work that need not delay a step; the decoder calls it while the device runs a forward."""

    def plan_ahead(self, shape: StepShape) -> None:
        """While the device runs the step of `shape`: prepare the next step's choice (SmartSpec)."""

    def forget(self, key: Any) -> None:
        self.acceptance.forget(key)

    def features(self, shape: StepShape, k: int | Seq[int]) -> np.ndarray:
        """Predicted features of the step if every request proposes min(k, its cap) tokens (or, for a list,
        request i proposes k[i])."""
        ks = [min(k, c) for c in shape.caps] if isinstance(k, int) else list(k)
        extra = sum(ks)
        forwards = max(ks, default=0) if self.draft_forwards else 0
        mixed = shape.mixed or extra > 0
        lags = shape.lags or [0] * len(ks)
        catch_up = sum(lag for n, lag in zip(ks, lags, strict=True) if n > 0)
        longest = max(ks, default=0)
        padded = shape.padded(longest)
        batched, kv = padded or (shape.batched_tokens + extra, shape.kv_tokens + extra)
        eager = shape.graphs and (shape.mixed or (longest > 0 and padded is None))
        return step_features(batched, kv, forwards, extra + catch_up if self.draft_forwards else 0,
                             shape.num_chunks if mixed else 0, eager)

    # ----- profiles -----
    def profile(self) -> dict[str, Any]:
        """Everything a later run needs to start from this one's measurements (see `merge_profiles`)."""
        a = self.acceptance
        rows = [[k, n, *map(compact_feature, f.tolist()), round(t, 7)] for (k, _), q in sorted(self.samples.items())
                for n, f, t in q.rows()]
        return {"version": PROFILE_VERSION, "features": list(FEATURES), "acceptance": a.rate,
                "accepted_tokens": a.total_accepted, "tested_tokens": a.total_tested,
                "acceptance_table": a.to_profile(), "samples": rows}

    def load_profile(self, profile: dict[str, Any]) -> None:
        if profile.get("version") != PROFILE_VERSION or profile.get("features") != list(FEATURES):
            raise LmstackError(f"the speculation profile has version {profile.get('version')!r} and features "
                               f"{profile.get('features')!r}; expected version {PROFILE_VERSION} with {FEATURES}")
        for row in profile.get("samples", []):
            if len(row) != len(FEATURES) + 3:
                raise LmstackError(f"a speculation profile sample has {len(row)} values; expected k, decode "
                                   f"requests, the {len(FEATURES)} features and seconds")
            k, n, *feats, t = row
            if int(k) <= self.max_k:
                self._window((int(k), size_bucket(int(n)))).append(int(n), np.array(feats, float), float(t))
        self.acceptance.load_profile(float(profile.get("acceptance", 0.5)), profile.get("acceptance_table"))


class FixedK(Controller):
    """Always k (capped per request); k = 0 runs the speculative path without proposing."""

    def __init__(self, k: int, max_k: int, draft_forwards: bool) -> None:
        super().__init__(max_k, draft_forwards)
        self.k = k

    def choose(self, shape: StepShape) -> int:
        return self.k


def read_profile(path: str | Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise LmstackError(f"cannot read the speculation profile {path}: {e}") from None
    if not isinstance(data, dict):
        raise LmstackError(f"the speculation profile {path} is not a JSON object")
    return data


def merge_profiles(profiles: Seq[dict[str, Any]], **meta: Any) -> dict[str, Any]:
    """Several profiles (e.g. one per benchmark run) as one: all samples, acceptance over all tested tokens.

    Profiles of another version or feature set (an older run's) are skipped: their samples do not fit the model.
    """
    profiles = [p for p in profiles if p.get("version") == PROFILE_VERSION and p.get("features") == list(FEATURES)]
    tested = sum(p.get("tested_tokens", 0) for p in profiles)
    accepted = sum(p.get("accepted_tokens", 0) for p in profiles)
    return {"version": PROFILE_VERSION, "features": list(FEATURES), **meta,
            "acceptance": accepted / tested if tested else 0.5, "accepted_tokens": accepted,
            "tested_tokens": tested, "acceptance_table": merge_tables([p.get("acceptance_table") for p in profiles]),
            "samples": [row for p in profiles for row in p.get("samples", [])]}


def save_profile(profile: dict[str, Any], path: str | Path) -> None:
    """Write a profile for `spec_profile` / `--spec-profile` to warm-start SmartSpec."""
    write_text_atomic(path, json.dumps(profile, separators=(",", ":")) + "\n")
