"""Offline channel calibration for Double Sparsity: which r channels of each KV head predict attention best.

The model runs densely over calibration text; every attention call hands us q and k *after RoPE*, in the
layout the model actually uses (our loader un-permutes GGUF Q/K, so every model arrives in Hugging Face's
rotate-half layout and the channel indices here are the ones the label cache reads). Per layer, KV head
and channel c we accumulate three statistics over the calibration tokens:

- `qk`: mean |q_c · k_c| summed over the query heads of the KV head's group (the paper's outlier rule),
- `qkc`: the same with k centred on its mean over the window's tokens, |q_c · (k_c - mean k_c)| (the default),
- `q`:  mean |q_c| summed over the group, and `k`: mean |k_c|,

so that the calibrated rules can be compared with |q|, |k|, random and first-r selections from one file.
Why centre: a key channel that is nearly constant over tokens adds the same q_c · k_c to every score of a
query, so it cannot change which tokens are the top-k, however large it is. Models with a K projection bias
(Qwen2) have such channels, and the plain `qk` rule picks them: on Qwen2.5-Coder it chose channels that rank
tokens worse than random ones. Centring keeps only the token-dependent part, which is what the labels rank by.
`ChannelCalibrator.fit` accumulates, `ChannelCalibrator.select` turns statistics into channel indices.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lmstack.engine.attention import AttentionBackend, AttentionMetadata
from lmstack.errors import LmstackError
from lmstack.models.config import ModelConfig

STATISTICS = ("qk", "qkc", "q", "k")
RULES = (*STATISTICS, "random", "first")


def select_channels(stats: dict[str, torch.Tensor] | None, rule: str, r: int, shape: tuple[int, int, int],
                    seed: int = 0) -> torch.Tensor:
    """Channel indices [layers, Hkv, r] (long) chosen by `rule`.

    `stats` maps a statistic name to [layers, Hkv, D] means (needed for the qk, q and k rules, which take
    the r largest, best first); shape is (layers, Hkv, D).
    """
    layers, hkv, dim = shape
    if not 1 <= r <= dim:
        raise LmstackError(f"the channel count r must be in [1, {dim}] (the head dim), got {r}")
    if rule == "first":
        return torch.arange(r).expand(layers, hkv, r).clone()
    if rule == "random":
        gen = torch.Generator().manual_seed(seed)
        return torch.stack([torch.randperm(dim, generator=gen)[:r] for _ in range(layers * hkv)]).view(layers, hkv, r)
    if rule not in STATISTICS:
        raise LmstackError(f"unknown channel selection rule {rule!r}; choose from {', '.join(RULES)}")
    if stats is None or rule not in stats:
        raise LmstackError(f"the {rule!r} rule needs calibration statistics; run `lmstack sparsity calibrate` first")
    return stats[rule].topk(r, dim=-1).indices


@dataclass
class ChannelCalibrator:
    """Accumulates the per-channel statistics of one model; `fit` may be called again to add more text."""

    config: ModelConfig
    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # statistic → [layers, Hkv, D] float64 sums
    num_tokens: int = 0

    def __post_init__(self) -> None:
        shape = (self.config.num_hidden_layers, self.config.num_key_value_heads, self.config.head_dim)
        for name in STATISTICS:
            self.sums.setdefault(name, torch.zeros(shape, dtype=torch.float64))

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.config.num_hidden_layers, self.config.num_key_value_heads, self.config.head_dim

    def fit(self, model: torch.nn.Module, token_ids: list[int]) -> ChannelCalibrator:
        """Run the model densely over one window of token ids and add its statistics."""
        if not token_ids:
            raise LmstackError("calibration got an empty window of tokens")
        dev = next(model.parameters()).device
        ids = torch.tensor(token_ids, dtype=torch.long, device=dev)
        n = len(token_ids)
        probe = _StatsProbe(self)
        probe.meta = AttentionMetadata(
            slot_mapping=ids, query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=dev),
            seq_lens=torch.tensor([n], dtype=torch.int32, device=dev),
            block_tables=torch.zeros(1, 1, dtype=torch.int32, device=dev),
            query_start_loc_cpu=[0, n], seq_lens_cpu=[n], max_query_len=n, max_seq_len=n)
        with torch.inference_mode():
            model(ids, torch.arange(n, device=dev), probe)
        self.num_tokens += n
        return self

    def add(self, sums: dict[str, torch.Tensor], num_tokens: int) -> None:
        """Add statistics computed elsewhere (e.g. windows read back from a resumed run)."""
        for name in STATISTICS:
            self.sums[name] += sums[name].to(torch.float64)
        self.num_tokens += num_tokens

    def means(self) -> dict[str, torch.Tensor]:
        """statistic → [layers, Hkv, D] float32 means over the calibration tokens."""
        if self.num_tokens == 0:
            raise LmstackError("no calibration tokens were seen; give a non-empty --data file")
        return {name: (s / self.num_tokens).float() for name, s in self.sums.items()}

    def select(self, rule: str = "qkc", r: int = 8, seed: int = 0) -> torch.Tensor:
        """Channel indices [layers, Hkv, r] chosen by `rule` from the accumulated statistics."""
        return select_channels(self.means() if rule in STATISTICS else None, rule, r, self.shape, seed)


class _StatsProbe(AttentionBackend):
    """Dense, cache-free attention (scoring a whole text) that records q/k channel statistics on the way."""

    def __init__(self, calibrator: ChannelCalibrator) -> None:
        super().__init__(None)
        self.calibrator = calibrator

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        record_statistics(self.calibrator.sums, layer, q, k)
        return super().attention(layer, q, k, v, scale)


def record_statistics(sums: dict[str, torch.Tensor], layer: int, q: torch.Tensor, k: torch.Tensor) -> None:
    """Add one layer's token sums: q [T, Hq, D] and k [T, Hkv, D] after RoPE; query head h belongs to KV
    head h // (Hq // Hkv)."""
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    qg = q.float().view(T, Hkv, Hq // Hkv, D)  # [T, Hkv, G, D]
    kf = k.float()
    kc = kf - kf.mean(dim=0, keepdim=True)  # [T, Hkv, D], centred over this window's tokens
    sums["qk"][layer] += (qg * kf[:, :, None, :]).abs().sum(dim=(0, 2)).double().cpu()
    sums["qkc"][layer] += (qg * kc[:, :, None, :]).abs().sum(dim=(0, 2)).double().cpu()
    sums["q"][layer] += qg.abs().sum(dim=(0, 2)).double().cpu()
    sums["k"][layer] += kf.abs().sum(dim=0).double().cpu()



# ----- the `lmstack sparsity calibrate` job -----

def read_text(path: str | Path) -> str:
    """A calibration or evaluation text: plain text, or JSONL whose rows have a "text" field (joined the way
    the Hugging Face wikitext scripts join rows); `.gz` files are decompressed."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            raw = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise LmstackError(f"cannot read text file {path}: {e}") from None
    if ".jsonl" not in path.name:
        return raw
    rows = []
    for n, line in enumerate(raw.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise LmstackError(f"{path} line {n} is not JSON ({e}); give JSONL with a \"text\" field") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise LmstackError(f"{path} line {n} has no string \"text\" field")
        rows.append(row["text"])
    return "\n\n".join(rows)


def token_windows(ids: list[int], window: int, max_windows: int | None) -> list[list[int]]:
    """Consecutive, non-overlapping full windows of `window` tokens (the ragged tail is dropped)."""
    n = len(ids) // window
    if max_windows is not None:
        n = min(n, max_windows)
    return [ids[i * window:(i + 1) * window] for i in range(n)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="embedded name, HF folder, .gguf file or dummy:<preset>")
    parser.add_argument("--data", required=True,
                        help="calibration text: .txt or .jsonl with a text field (not the text you evaluate on)")
    parser.add_argument("--out", required=True, help="channels.json to write")
    parser.add_argument("--rule", default="qkc", choices=RULES,
                        help="selection rule stored as the file's choice (default qkc; qk is the paper's)")
    parser.add_argument("--r", type=int, default=None, help="label channels per KV head (default head_dim // 16)")
    parser.add_argument("--window", type=int, default=1024, help="tokens per calibration window (default 1024)")
    parser.add_argument("--num-windows", type=int, default=8, help="windows to run (default 8; 0 = all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random rule")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def calibrate(model_name: str, data: str | Path, out: str | Path, rule: str = "qkc", r: int | None = None,
              window: int = 1024, num_windows: int | None = 8, seed: int = 0, dtype: str = "auto",
              device: str = "auto") -> Path:
    """Calibrate `model_name` on `data` and write `out`. Each finished window is appended to
    `<out>.partial.jsonl`, so an interrupted run resumes where it stopped; the file goes once `out` is written."""
    from lmstack.engine.attention.ds_channels import ChannelFile, model_signature
    from lmstack.models import load

    if window < 2:
        raise LmstackError(f"--window must be >= 2, got {window}")
    if num_windows is not None and num_windows < 0:
        raise LmstackError(f"--num-windows must be >= 0 (0 = all), got {num_windows}")
    if not Path(data).is_file():
        raise LmstackError(f"calibration data {data} is not a file; give a .txt or .jsonl text file")
    model, tok, cfg = load(model_name, dtype=dtype, device=device)
    r = r or max(1, cfg.head_dim // 16)
    windows = token_windows(tok.encode(read_text(data), add_special_tokens=False), window, num_windows or None)
    if not windows:
        raise LmstackError(f"{data} has fewer than {window} tokens; give more text or a smaller --window")
    out = Path(out)
    header = {"model": model_signature(model_name, cfg), "data": str(data), "window": window,
              "statistics": list(STATISTICS)}
    calib = ChannelCalibrator(cfg)
    partial = out.with_name(out.name + ".partial.jsonl")
    done = _resume(partial, header, calib)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(partial, "a", encoding="utf-8") as log:
        if log.tell() == 0:
            log.write(json.dumps({"header": header}) + "\n")
        for i in tqdm(range(done, len(windows)), desc="calibrate", unit="window", initial=done, total=len(windows)):
            before = {name: t.clone() for name, t in calib.sums.items()}
            calib.fit(model, windows[i])
            delta = {name: (calib.sums[name] - before[name]).tolist() for name in STATISTICS}
            log.write(json.dumps({"window": i, "num_tokens": len(windows[i]), "sums": delta}) + "\n")
            log.flush()
    file = ChannelFile(model=header["model"], rule=rule, r=r, channels=calib.select(rule, r, seed),
                       stats=calib.means(), seed=seed,
                       calibration={"data": str(data), "window": window, "num_windows": len(windows),
                                    "num_tokens": calib.num_tokens, "statistic": "mean over tokens of |q_c k_c| and "
                                    "|q_c (k_c - window mean of k_c)| (summed over the group's query heads), "
                                    "|q_c| and |k_c|, after RoPE"})
    file.save(out)
    partial.unlink(missing_ok=True)
    return out


def _resume(partial: Path, header: dict[str, Any], calib: ChannelCalibrator) -> int:
    """Add the windows an earlier run finished; returns how many. A line cut short by a crash (and anything
    after it) is cut off the file, so that new windows append after the last good one."""
    if not partial.exists():
        return 0
    done, good_bytes = 0, 0
    with open(partial, "rb") as f:
        for n, line in enumerate(f):
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                break
            if n == 0:
                if rec.get("header") != header:
                    raise LmstackError(f"{partial} holds a calibration with other settings; delete it or "
                                       f"rerun with the same --model, --data and --window")
            elif rec.get("window") == done and line.endswith(b"\n"):
                calib.add({name: torch.tensor(rec["sums"][name]) for name in STATISTICS}, rec["num_tokens"])
                done += 1
            else:
                break
            good_bytes += len(line)
    os.truncate(partial, good_bytes)
    return done


def run(args: argparse.Namespace) -> int:
    out = calibrate(args.model, args.data, args.out, rule=args.rule, r=args.r, window=args.window,
                    num_windows=args.num_windows, seed=args.seed, dtype=args.dtype, device=args.device)
    print(f"wrote {out}")
    return 0
