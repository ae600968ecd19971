"""The channels.json file of Double Sparsity: which channels each KV head's labels keep, and why.

It records the model it was calibrated on (so a file is never applied to a model of another shape), the
selection rule and r, the chosen channels, and the per-channel statistics, so that another rule or r can
be picked later from the same file (`ChannelFile.reselect`). Written atomically; validated on load.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmstack.engine.attention.calibrate import RULES, STATISTICS, select_channels
from lmstack.errors import LmstackError
from lmstack.models.config import ModelConfig

FORMAT = "lmstack-double-sparsity-channels"
VERSION = 1
_SHAPE_FIELDS = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim")


def model_signature(name: str, cfg: ModelConfig) -> dict[str, Any]:
    """What a channel file must agree with: the shapes, plus the name and the Q/K layout for the record."""
    return {"name": name, "layout": "hf-rotate-half", **{f: getattr(cfg, f) for f in _SHAPE_FIELDS}}


@dataclass
class ChannelFile:
    model: dict[str, Any]
    rule: str
    r: int
    channels: torch.Tensor  # [layers, Hkv, r] long, best channel first for the statistic rules
    stats: dict[str, torch.Tensor] | None = None  # statistic → [layers, Hkv, D] means
    seed: int = 0
    calibration: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.model["num_hidden_layers"], self.model["num_key_value_heads"], self.model["head_dim"]

    def reselect(self, rule: str | None = None, r: int | None = None, seed: int | None = None) -> torch.Tensor:
        """Channels [layers, Hkv, r] for another rule / r / seed; the file's own choice when nothing changes."""
        rule, r, seed = rule or self.rule, r or self.r, self.seed if seed is None else seed
        if (rule, r, seed) == (self.rule, self.r, self.seed):
            return self.channels
        return select_channels(self.stats, rule, r, self.shape, seed)

    def check_model(self, cfg: ModelConfig, path: str | Path = "channels.json") -> None:
        """Raise unless the file was made for a model of this shape."""
        wrong = [f"{f}: file {self.model.get(f)} vs model {getattr(cfg, f)}" for f in _SHAPE_FIELDS
                 if self.model.get(f) != getattr(cfg, f)]
        if wrong:
            raise LmstackError(f"{path} was calibrated for another model ({self.model.get('name')!r}; "
                               f"{'; '.join(wrong)}); calibrate this model with `lmstack sparsity calibrate`")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": FORMAT, "version": VERSION, "model": self.model, "rule": self.rule,
                               "r": self.r, "seed": self.seed, "calibration": self.calibration,
                               "channels": self.channels.tolist()}
        if self.stats is not None:
            out["stats"] = {name: [[[float(f"{x:.7g}") for x in head] for head in layer] for layer in t.tolist()]
                            for name, t in self.stats.items()}
        return out

    def save(self, path: str | Path) -> None:
        """Write to a temp file beside `path`, then rename over it: never a half-written file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.to_json(), f)
                f.write("\n")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | Path) -> ChannelFile:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise LmstackError(f"channel file {path} does not exist; make one with `lmstack sparsity calibrate`"
                               ) from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise LmstackError(f"channel file {path} is not readable JSON ({e}); calibrate again") from None
        return cls.from_json(data, path)

    @classmethod
    def from_json(cls, data: Any, path: str | Path = "channels.json") -> ChannelFile:
        """Validate every field; a broken file is a clear error, never a silent wrong selection."""
        def bad(why: str) -> LmstackError:
            return LmstackError(f"channel file {path} is invalid: {why}; re-create it with `lmstack sparsity "
                                f"calibrate`")

        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise bad(f"it is not a {FORMAT} file")
        if data.get("version") != VERSION:
            raise bad(f"format version {data.get('version')!r} is not supported (this lmstack reads {VERSION})")
        model = data.get("model")
        if not isinstance(model, dict) or not all(isinstance(model.get(f), int) and model[f] > 0
                                                  for f in _SHAPE_FIELDS):
            raise bad(f"'model' must give positive integers {', '.join(_SHAPE_FIELDS)}")
        rule, r = data.get("rule"), data.get("r")
        if rule not in RULES:
            raise bad(f"rule {rule!r} is not one of {', '.join(RULES)}")
        layers, hkv, dim = model["num_hidden_layers"], model["num_key_value_heads"], model["head_dim"]
        if not isinstance(r, int) or not 1 <= r <= dim:
            raise bad(f"r must be an integer in [1, {dim}], got {r!r}")
        try:
            channels = torch.tensor(data.get("channels"), dtype=torch.long)
        except (TypeError, ValueError, RuntimeError):
            raise bad("'channels' must be a [layers][kv_heads][r] list of integers") from None
        if tuple(channels.shape) != (layers, hkv, r):
            raise bad(f"'channels' has shape {tuple(channels.shape)}, expected {(layers, hkv, r)}")
        if channels.numel() and (channels.min() < 0 or channels.max() >= dim):
            raise bad(f"channel indices must be in [0, {dim})")
        if (channels.sort(-1).values.diff(dim=-1) == 0).any():
            raise bad("a head lists the same channel twice")
        stats = None
        if data.get("stats") is not None:
            raw = data["stats"]
            if not isinstance(raw, dict) or not raw or not set(raw) <= set(STATISTICS):
                raise bad(f"'stats' must hold some of {', '.join(STATISTICS)} and nothing else")
            try:
                stats = {name: torch.tensor(raw[name], dtype=torch.float32) for name in raw}
            except (TypeError, ValueError, RuntimeError):
                raise bad("'stats' must be [layers][kv_heads][head_dim] lists of numbers") from None
            if any(tuple(t.shape) != (layers, hkv, dim) or not torch.isfinite(t).all() for t in stats.values()):
                raise bad(f"every statistic must be finite with shape {(layers, hkv, dim)}")
        seed = data.get("seed", 0)
        calibration = data.get("calibration", {})
        if not isinstance(seed, int) or not isinstance(calibration, dict):
            raise bad("'seed' must be an integer and 'calibration' an object")
        return cls(model=model, rule=rule, r=r, channels=channels, stats=stats, seed=seed, calibration=calibration)


def resolve_channels(spec: str | None, cfg: ModelConfig, rule: str | None, r: int | None,
                     seed: int = 0) -> tuple[torch.Tensor, str]:
    """Channels [layers, Hkv, r] from a channels.json path, or "random" / "first" (no file; r defaults to
    head_dim // 16). Returns them with a one-line description for logs and result files."""
    shape = (cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim)
    if spec in (None, ""):
        raise LmstackError("the double_sparse backend needs channels: a channels.json from `lmstack sparsity "
                           "calibrate`, or 'random' / 'first' (uncalibrated, for speed tests)")
    if spec in ("random", "first"):
        if rule not in (None, spec):
            raise LmstackError(f"channels={spec!r} cannot use rule {rule!r}; give a calibrated channels.json")
        r = r or max(1, cfg.head_dim // 16)
        return select_channels(None, spec, r, shape, seed), f"{spec} r={r}"
    file = ChannelFile.load(spec)
    file.check_model(cfg, spec)
    chosen = file.reselect(rule, r, seed)
    return chosen, f"{spec} rule={rule or file.rule} r={chosen.shape[-1]}"
