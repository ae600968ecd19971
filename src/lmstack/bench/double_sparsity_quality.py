"""Double Sparsity quality on real weights: wikitext-2 perplexity and key-value retrieval, dense vs sparse.

Perplexity: windows of the wikitext-2 test text, where every position of a window attends exactly to the
top-k tokens of its own causal past, ranked by the label estimate (`sparse_prefill`). "1/16" means
r = head_dim/16 label channels and a budget of window/16 tokens: a position with fewer past tokens than
the budget attends to all of them, so the per-position sparsity reaches 1/16 only at the window's end;
the `*_late` numbers score the second half of each window alone (budget ≤ 1/8 of the context there).
Channel choices compared on the same windows: calibrated (centred |q_c (k_c - mean k_c)|, the default, and
the paper's plain |q_c k_c|), random, first-r, |q| and |k|; `ds_1_16_dense2` keeps layers 0 and 1 dense
(the backend's `dense_layers`), where attention is least concentrated; `exact_top_1_16` ranks by all of K,
i.e. the exact top-k tokens at the same budget: what is lost to the token budget alone, not to the labels;
`*_kv_group` share one token list per KV head (the GQA-friendly selection the speed benchmark also times);
`ds_1_16_bytes_int8` spends the label bytes of 1/16 differently: twice the channels (head_dim/8) in int8.
Every label-ranked variant forces the backend's default sink and local tokens into its budget (4 + 16 of
the 64 places at the end of a 1024 window), except `*_labels_only`, where the labels pick all of them (the
paper's rule), and `exact_top_1_16`, which is the pure exact top-k.

Retrieval: generated `key: value` lists of several lengths through the real engine (`LLM`), dense vs the
`double_sparse` backend (sparse decode, budget = 1/16 of the context, dense prefill). The first answer
token comes from the (dense) prefill step, the rest from sparse decode steps; a sample counts when the
whole value is right.

Every finished item (a window under one config, a retrieval sample) is appended to `<work-dir>/records.jsonl`
and skipped on a rerun, so the job resumes after a crash; channels are calibrated into the work dir first
(on text that is not the evaluation text) unless a channels file is already there.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lmstack.bench.kv_retrieval import is_correct, make_sample
from lmstack.bench.results import cli_command, write_results
from lmstack.engine.attention import AttentionBackend, AttentionMetadata
from lmstack.engine.attention.calibrate import calibrate, read_text, token_windows
from lmstack.engine.attention.double_sparse import DoubleSparseAttention, DoubleSparseConfig
from lmstack.engine.attention.ds_channels import ChannelFile, resolve_channels
from lmstack.errors import LmstackError

DEFAULT_MODELS = "smollm2-135m-instruct,qwen2.5-coder-0.5b-instruct"
_DATA = Path(__file__).resolve().parents[4] / "shared" / "data" / "wikitext2"


@dataclass(frozen=True)
class Variant:
    """One way to attend: dense (rule None), or a channel rule at 1/`sparsity` channels and tokens."""

    rule: str | None = None
    sparsity: int = 16
    label_bits: int = 16
    dense_layers: tuple[int, ...] = ()
    all_channels: bool = False  # labels = all of K: the exact top-k tokens, the best any channel choice can do
    selection: str = "head"  # kv_group: one token list per KV head, ranked by the group's summed label scores
    channel_sparsity: int | None = None  # r = head_dim / this (default: `sparsity`, the token fraction's too)
    forced: bool = True  # the backend's default sink and local tokens take their places in the budget

    def r(self, head_dim: int) -> int:
        return head_dim if self.all_channels else max(1, head_dim // (self.channel_sparsity or self.sparsity))

    def forced_tokens(self) -> dict[str, int]:
        """The sink/local options of this variant: the backend's defaults, or none."""
        return {} if self.forced else {"sink_tokens": 0, "local_tokens": 0}


VARIANTS: dict[str, Variant] = {
    "dense": Variant(),
    "ds_1_8": Variant("qkc", 8),
    "ds_1_16": Variant("qkc", 16),
    "ds_1_8_labels_only": Variant("qkc", 8, forced=False),
    "ds_1_16_labels_only": Variant("qkc", 16, forced=False),
    "qk_channels_1_16": Variant("qk", 16),
    "random_channels_1_16": Variant("random", 16),
    "first_channels_1_16": Variant("first", 16),
    "q_channels_1_16": Variant("q", 16),
    "k_channels_1_16": Variant("k", 16),
    "ds_1_16_int8": Variant("qkc", 16, label_bits=8),
    "ds_1_16_dense2": Variant("qkc", 16, dense_layers=(0, 1)),
    "exact_top_1_16": Variant("qkc", 16, all_channels=True, forced=False),
    "ds_1_8_kv_group": Variant("qkc", 8, selection="kv_group"),
    "ds_1_16_kv_group": Variant("qkc", 16, selection="kv_group"),
    "ds_1_16_bytes_int8": Variant("qkc", 16, label_bits=8, channel_sparsity=8),
    "ds_1_16_bytes_int8_kv_group": Variant("qkc", 16, label_bits=8, channel_sparsity=8, selection="kv_group"),
    "ds_1_16_bytes_int8_labels_only": Variant("qkc", 16, label_bits=8, channel_sparsity=8, forced=False),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default=DEFAULT_MODELS, help=f"comma-separated models (default {DEFAULT_MODELS})")
    parser.add_argument("--work-dir", default="runs/double_sparsity_quality",
                        help="channels files and the resumable records.jsonl")
    parser.add_argument("--calib-data", default=str(_DATA / "valid.txt"), help="calibration text (wikitext-2 valid)")
    parser.add_argument("--calib-windows", type=int, default=8, help="calibration windows of --window tokens")
    parser.add_argument("--eval-data", default=str(_DATA / "wikitext-2-raw-v1_test.jsonl"),
                        help="perplexity text (wikitext-2 raw test)")
    parser.add_argument("--window", type=int, default=1024, help="perplexity window in tokens (default 1024)")
    parser.add_argument("--num-windows", type=int, default=8,
                        help="windows per model, spread evenly over the test text (default 8)")
    parser.add_argument("--ppl-variants",
                        default="dense,ds_1_8,ds_1_16,ds_1_16_labels_only,qk_channels_1_16,random_channels_1_16,"
                                "first_channels_1_16",
                        help=f"comma-separated, from: {', '.join(VARIANTS)}")
    parser.add_argument("--retrieval-lengths", default="512,1024,2048", help="prompt lengths in tokens")
    parser.add_argument("--retrieval-samples", type=int, default=8, help="samples per length (default 8)")
    parser.add_argument("--retrieval-variants", default="dense,ds_1_16,ds_1_16_labels_only",
                        help="comma-separated variants")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--output", default="benchmarks/results/double_sparsity_quality.json")
    parser.add_argument("--report-only", action="store_true",
                        help="write the results from the records already in --work-dir, running nothing")


def _names(text: str, what: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if not names or unknown:
        raise LmstackError(f"--{what}: unknown variant(s) {unknown or '(none given)'}; choose from "
                           f"{', '.join(VARIANTS)}")
    return names


def _check(args: argparse.Namespace) -> tuple[list[str], list[str], list[int]]:
    for name in ("window", "num_windows", "retrieval_samples", "calib_windows"):
        if getattr(args, name) < 1:
            raise LmstackError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.window < 64:
        raise LmstackError(f"--window must be >= 64 tokens for 1/16 budgets to mean anything, got {args.window}")
    try:
        lengths = [int(x) for x in args.retrieval_lengths.split(",") if x.strip()]
    except ValueError:
        raise LmstackError(f"--retrieval-lengths must be integers, got {args.retrieval_lengths!r}") from None
    if any(n < 128 for n in lengths):
        raise LmstackError("--retrieval-lengths must each be >= 128 tokens")
    return _names(args.ppl_variants, "ppl-variants"), _names(args.retrieval_variants, "retrieval-variants"), lengths


# ----- records -----

def _load_records(path: Path) -> list[dict[str, Any]]:
    """Records of earlier runs; a last line cut short by a crash is dropped from the file."""
    if not path.exists():
        return []
    records, good = [], 0
    with open(path, "rb") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                break
            if not line.endswith(b"\n"):
                break
            records.append(rec)
            good += len(line)
    with open(path, "r+b") as f:
        f.truncate(good)
    return records


def _key(rec: dict[str, Any]) -> tuple[Any, ...]:
    return rec["task"], rec["model"], rec["variant"], rec.get("window", rec.get("length")), rec.get("sample", -1)


# ----- perplexity -----

def window_nll(model: torch.nn.Module, ids: list[int], ctx: AttentionBackend) -> torch.Tensor:
    """Negative log-likelihood [W-1] of tokens 1..W-1 of one window, attending through `ctx` (no KV cache)."""
    dev = next(model.parameters()).device
    t = torch.tensor(ids, dtype=torch.long, device=dev)
    n = len(ids)
    ctx.meta = AttentionMetadata(
        slot_mapping=t, query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=dev),
        seq_lens=torch.tensor([n], dtype=torch.int32, device=dev),
        block_tables=torch.zeros(1, 1, dtype=torch.int32, device=dev),
        query_start_loc_cpu=[0, n], seq_lens_cpu=[n], max_query_len=n, max_seq_len=n)
    with torch.inference_mode():
        hidden = model(t, torch.arange(n, device=dev), ctx)
        logp = model.compute_logits(hidden[:-1]).log_softmax(-1)  # [W-1, V]
        return -logp.gather(1, t[1:, None]).squeeze(1).float().cpu()


def _ppl_context(variant: Variant, channels_path: Path, cfg: Any, window: int) -> AttentionBackend:
    if variant.rule is None:
        return AttentionBackend(None)
    r = variant.r(cfg.head_dim)
    ds = DoubleSparseConfig(channels=str(channels_path), rule=variant.rule, r=r,
                            token_budget=window // variant.sparsity, dense_below=0, sparse_prefill=True,
                            label_bits=variant.label_bits, dense_layers=list(variant.dense_layers),
                            selection=variant.selection, **variant.forced_tokens())
    channels, _ = resolve_channels(ds.channels, cfg, ds.rule, ds.r, ds.seed)
    return DoubleSparseAttention(None, channels, ds)


def run_perplexity(model_name: str, args: argparse.Namespace, variants: list[str], channels_path: Path,
                   done: set[tuple[Any, ...]], log: Any) -> None:
    from lmstack.models import load

    model, tok, cfg = load(model_name, dtype=args.dtype, device=args.device)
    all_windows = token_windows(tok.encode(read_text(args.eval_data), add_special_tokens=False), args.window, None)
    if not all_windows:
        raise LmstackError(f"{args.eval_data} has fewer than {args.window} tokens")
    n = min(args.num_windows, len(all_windows))
    picks = sorted({round(i * (len(all_windows) - 1) / max(1, n - 1)) for i in range(n)})
    contexts = {v: _ppl_context(VARIANTS[v], channels_path, cfg, args.window) for v in variants}
    todo = [(w, v) for w in picks for v in variants if ("ppl", model_name, v, w, -1) not in done]
    half = args.window // 2
    for w, v in tqdm(todo, desc=f"perplexity {model_name}", unit="window"):
        nll = window_nll(model, all_windows[w], contexts[v])
        late = nll[half - 1:]  # predictions made with a context of >= window/2 tokens
        rec = {"task": "ppl", "model": model_name, "variant": v, "window": w, "nll": float(nll.double().sum()),
               "n": nll.numel(), "nll_late": float(late.double().sum()), "n_late": late.numel()}
        log.write(json.dumps(rec) + "\n")
        log.flush()
    del model


# ----- retrieval -----

def run_retrieval(model_name: str, args: argparse.Namespace, variants: list[str], lengths: list[int],
                  channels_path: Path, done: set[tuple[Any, ...]], log: Any) -> None:
    from lmstack import LLM, SamplingParams

    params = SamplingParams(max_tokens=10, temperature=0.0)
    for v in variants:
        todo = [(n, s) for n in lengths for s in range(args.retrieval_samples)
                if ("retrieval", model_name, v, n, s) not in done]
        if not todo:
            continue
        variant = VARIANTS[v]
        options: dict[str, Any] = {}
        if variant.rule is not None:
            head_dim = ChannelFile.load(channels_path).model["head_dim"]
            options = {"channels": str(channels_path), "rule": variant.rule, "r": variant.r(head_dim),
                       "label_bits": variant.label_bits, "token_budget": 1 / variant.sparsity,
                       "dense_layers": list(variant.dense_layers), "selection": variant.selection,
                       **variant.forced_tokens()}
        max_len = max(lengths) + 32
        llm = LLM(model_name, dtype=args.dtype, device=args.device, max_model_len=max_len,
                  num_kv_blocks=args.retrieval_samples * -(-max_len // 16) + 1, block_size=16,
                  attention_backend="torch" if variant.rule is None else "double_sparse",
                  attention_options=options, enforce_eager=True)
        for n in lengths:
            batch = [s for (m, s) in todo if m == n]
            if not batch:
                continue
            samples = [make_sample(llm.tokenizer, n, s) for s in batch]
            outs = llm.generate([{"prompt_token_ids": llm.tokenizer.encode(x.prompt, add_special_tokens=False)}
                                 for x in samples], params, use_tqdm=False)
            hits = 0
            for s, x, out in zip(batch, samples, outs, strict=True):
                text = llm.tokenizer.decode(out.outputs[0].token_ids)
                hits += is_correct(text, x.value)
                rec = {"task": "retrieval", "model": model_name, "variant": v, "length": n, "sample": s,
                       "prompt_tokens": len(out.prompt_token_ids), "depth": round(x.depth, 3), "value": x.value,
                       "output": text, "correct": is_correct(text, x.value), "options": options}
                log.write(json.dumps(rec) + "\n")
            log.flush()
            print(f"retrieval {model_name} {v} length {n}: {hits}/{len(batch)}", flush=True)
        del llm


# ----- summary -----

def summarize(records: list[dict[str, Any]], models: list[str]) -> dict[str, Any]:
    """Per model: perplexity of each variant over the windows every variant finished, retrieval accuracy."""
    per_model: dict[str, Any] = {}
    for m in models:
        ppl_recs = [r for r in records if r["task"] == "ppl" and r["model"] == m]
        by_variant: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
        for r in ppl_recs:
            by_variant[r["variant"]][r["window"]] = r
        common = set.intersection(*(set(d) for d in by_variant.values())) if by_variant else set()
        out: dict[str, Any] = {"ppl_windows": len(common)}
        for v, d in by_variant.items():
            rows = [d[w] for w in sorted(common)]
            if rows:
                out[f"ppl_{v}"] = float(torch.tensor(sum(r["nll"] for r in rows) / sum(r["n"] for r in rows)).exp())
                out[f"ppl_{v}_late"] = float(torch.tensor(sum(r["nll_late"] for r in rows)
                                                          / sum(r["n_late"] for r in rows)).exp())
        acc: dict[str, dict[str, float]] = defaultdict(dict)
        counts: dict[tuple[str, int], list[bool]] = defaultdict(list)
        for r in records:
            if r["task"] == "retrieval" and r["model"] == m:
                counts[r["variant"], r["length"]].append(r["correct"])
        for (v, n), hits in sorted(counts.items()):
            acc[v][str(n)] = sum(hits) / len(hits)
            acc[v]["samples_per_length"] = len(hits)
        for v, d in acc.items():
            lens = [k for k in d if k.isdigit()]
            out[f"retrieval_acc_{v}"] = sum(d[k] for k in lens) / len(lens)
            out[f"retrieval_acc_{v}_by_length"] = {k: d[k] for k in lens}
        per_model[m] = out
    return per_model


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def run(args: argparse.Namespace) -> None:
    ppl_variants, ret_variants, lengths = _check(args)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models:
        raise LmstackError("--models is empty")
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    records_path = work / "records.jsonl"
    records = _load_records(records_path)
    done = {_key(r) for r in records}
    with open(records_path, "a", encoding="utf-8") as log:
        for m in [] if args.report_only else models:
            channels_path = work / f"channels_{_slug(m)}.json"
            if not channels_path.exists():
                calibrate(m, args.calib_data, channels_path, window=args.window, num_windows=args.calib_windows,
                          dtype=args.dtype, device=args.device)
            run_perplexity(m, args, ppl_variants, channels_path, done, log)
            run_retrieval(m, args, ret_variants, lengths, channels_path, done, log)
    per_model = summarize(_load_records(records_path), models)
    primary = per_model[models[0]]
    metrics = {k: primary.get(k) for k in ("ppl_dense", "ppl_ds_1_16", "ppl_random_channels_1_16",
                                           "retrieval_acc_dense", "retrieval_acc_ds_1_16")}
    metrics.update({"primary_model": models[0], "per_model": per_model})
    command = cli_command("bench double-sparsity-quality", args,
                          ("models", "work_dir", "calib_data", "calib_windows", "eval_data", "window", "num_windows",
                           "ppl_variants", "retrieval_lengths", "retrieval_samples", "retrieval_variants", "dtype",
                           "device", "output"))
    write_results(args.output, command, metrics, device=None if args.device == "auto" else args.device,
                  settings={"ppl": "every position attends to the top window/k tokens of its causal past by the label "
                                   "estimate, r = head_dim/k channels (k = 8 or 16); *_late: second half of each "
                                   "window only", "forced": "label-ranked variants but *_labels_only and exact_top "
                                   "force the backend's default sink and local tokens into the budget",
                                   "retrieval": "engine decode, token budget = context/16, "
                                   "r = head_dim/16, prefill dense; greedy; exact match of the 6-digit value"})
    print(json.dumps(metrics, indent=2))
    return 0
