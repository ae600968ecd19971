"""`lmstack bench double-sparsity-speed`: Double Sparsity decode speed on a GPU, each part against its baseline.

1. attention op (`ds_attention_op`): one layer's decode attention, dense Triton paged kernel vs Double Sparsity
   at the token fraction (labels → top-k → sparse attention), over contexts x batch sizes;
2. end to end: the real engine decoding `--e2e-batch` sequences at `--e2e-context` tokens, dense backend
   (Triton, CUDA graphs: the engine's default) vs the `double_sparse` backend (its own decode graphs, one list
   per query head and one per KV group), step time → tokens/s;
3. offload (`ds_offload_speed`): KV in pinned host memory, Double Sparsity offload vs FlexGen-style full
   streaming, at the longest context that fits the host.

Every part checks its fast path against a reference first; a part that fails records its error and the
others still run. Results: a JSON with the exact command, and a PNG of speedup against context.
"""

from __future__ import annotations

import argparse
import gc
import shlex
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lmstack.bench.results import cli_command, save_figure, write_results
from lmstack.errors import LmstackError

DEFAULT_OUTPUT = Path("benchmarks/results/double_sparsity_speed.json")
PARTS = ("attention", "e2e", "offload")
# End-to-end Double Sparsity variants (NOTES), each run against the dense backend; its run is named
# double_sparse_<variant> ("double_sparse" for head) and its ratio speedup_<variant> ("speedup" for head).
E2E_VARIANTS = ("head", "kv_group", "kv_group_s16", "kv_group_s16_radix", "kv_group_s16_filter", "kv_group_s16_int8")


NOTES = [
    "attention: one decode layer, random bf16 paged caches (blocks shuffled per sequence), each op replayed "
    "from a CUDA graph, do_bench medians with the L2 flushed between runs; DS time includes the q-label "
    "gather, label scoring, top-k (torch.topk, sorted=False) and the sparse attention",
    "s16: kv_group with the approximate scores stored in bf16 (score_bits=16), which halves the top-k's bytes",
    "radix: s16 with the top-k by radix_topk (histogram passes + a compaction in Triton) instead of torch.topk",
    "filter: s16 with the top-k by filter_topk (a sampled pivot filters each row to ~1.5k candidates, which "
    "torch.topk ranks) instead of torch.topk over the whole row",
    "int8 (e2e only): s16 with int8 labels of twice the channels (2r, label_bits=8): the label bytes of r "
    "16-bit channels, the configuration whose perplexity the quality benchmark reports as ds_1_16_bytes_int8",
    "per head: one top-k list per query head (the double_sparse backend); kv_group: one list per KV head "
    "from the group's summed label scores. Under GQA (G query heads per KV head) per-head lists gather "
    "G x more K/V rows than kv_group lists, so the per-head byte saving at 1/16 is at most 16/G",
    "e2e: engine decode steps after prefilling every sequence (bench.step_split), all with CUDA graphs (eager "
    "steps reported too); double_sparse with per-head lists (the default) and with kv_group lists. Its decode "
    "graphs are captured per context bucket (1/8 octave): every row keeps keep(bucket) tokens, so graph_keep "
    "is the fraction of the context actually attended",
    "offload: whole-model decode steps with every layer's K/V in pinned host memory, random K/V and labels "
    "made from them (no prefill), host wall time between device syncs, median of the timed steps",
]


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="dummy:llama-3-8b", help="embedded name, HF folder or dummy:<preset>")
    parser.add_argument("--tokenizer", default=None, help="take the tokenizer from this folder (dummy: models)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--channels", default="random",
                        help="channels.json from `lmstack sparsity calibrate`, or random / first (speed does not "
                             "depend on which channels)")
    parser.add_argument("--r", type=int, default=None, help="label channels per KV head (default head_dim // 16)")
    parser.add_argument("--token-budget", default="1/16", help="fraction of the context each query attends to")
    parser.add_argument("--contexts", type=_ints, default=_ints("4096,8192,16384,32768,65536,131072"))
    parser.add_argument("--batches", type=_ints, default=_ints("1,4,8,16,32"))
    parser.add_argument("--e2e-context", type=int, default=32768)
    parser.add_argument("--e2e-batch", type=int, default=8)
    parser.add_argument("--e2e-steps", type=int, default=16, help="timed decode steps per backend")
    parser.add_argument("--e2e-variants", default=",".join(E2E_VARIANTS),
                        help=f"comma-separated subset of {','.join(E2E_VARIANTS)} run end to end beside dense "
                             "(each costs a prefill of the whole batch)")
    parser.add_argument("--offload-batch", type=int, default=1)
    parser.add_argument("--offload-max-context", type=int, default=1 << 20,
                        help="cap on the offload context (default 1M; the host's memory decides below that)")
    parser.add_argument("--offload-steps", type=int, default=3, help="timed decode steps per offload mode")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--output", default=None, help=f"results JSON (default {DEFAULT_OUTPUT}); PNG beside it")


def _e2e_variants(text: str) -> list[str]:
    variants = [v.strip() for v in text.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(E2E_VARIANTS))
    if unknown or not variants:
        raise LmstackError(f"--e2e-variants takes a subset of {', '.join(E2E_VARIANTS)}, got {text!r}")
    return [v for v in E2E_VARIANTS if v in variants]


def _check_args(args: argparse.Namespace) -> tuple[float, list[str]]:
    from lmstack.engine.attention.double_sparse import parse_budget

    budget = parse_budget(args.token_budget)
    if not isinstance(budget, float):
        raise LmstackError(f"--token-budget must be a fraction such as 1/16 here, got {args.token_budget!r}")
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        raise LmstackError(f"--parts takes a subset of {', '.join(PARTS)}, got {args.parts!r}")
    for name in ("e2e_context", "e2e_batch", "e2e_steps", "offload_batch", "offload_max_context", "offload_steps"):
        if getattr(args, name) < 1:
            raise LmstackError(f"--{name.replace('_', '-')} must be >= 1")
    if args.e2e_steps < 2:
        raise LmstackError("--e2e-steps must be >= 2 (half as many eager steps are timed too)")
    _e2e_variants(args.e2e_variants)
    if not torch.cuda.is_available():
        raise LmstackError("the Double Sparsity speed benchmark needs a CUDA GPU (its kernels are Triton on CUDA)")
    return budget, parts


def _part(name: str, results: dict[str, Any], fn: Callable[[], Any]) -> None:
    """Run one part; a failure is recorded (and printed) rather than losing the other parts' numbers."""
    t0 = time.perf_counter()
    print(f"--- {name} ...", flush=True)
    try:
        results[name] = fn()
    except Exception as e:  # noqa: BLE001 (recorded in the results file, with its traceback printed)
        traceback.print_exc()
        results[name] = {"error": f"{type(e).__name__}: {e}"}
    results.setdefault("seconds", {})[name] = time.perf_counter() - t0
    gc.collect()
    torch.cuda.empty_cache()


def _attention(model_cfg: Any, r: int, fraction: float, args: argparse.Namespace) -> dict[str, Any]:
    from lmstack.bench import ds_attention_op

    shape = ds_attention_op.OpShape(n_heads=model_cfg.num_attention_heads, n_kv=model_cfg.num_key_value_heads,
                                    head_dim=model_cfg.head_dim, r=r, fraction=fraction)
    checks = ds_attention_op.check(shape)
    free, _ = torch.cuda.mem_get_info()
    # K/V take at most 60% of what is free: labels, scores and top-k scratch need room too.
    rows = ds_attention_op.sweep(shape, args.contexts, args.batches, max_kv_bytes=0.6 * free)
    return {"checks": checks, "rows": rows, "r": r, "fraction": fraction}


def _e2e(model: Any, tokenizer: Any, r: int, args: argparse.Namespace) -> dict[str, Any]:
    from lmstack.bench.step_split import measure_step_split
    from lmstack.engine.attention.double_sparse import DoubleSparseConfig
    from lmstack.engine.config import EngineConfig
    from lmstack.engine.llm_engine import LLMEngine
    from lmstack.engine.runner import GRAPH_BATCH_SIZES

    steps = args.e2e_steps
    ds_options: dict[str, Any] = {"channels": args.channels, "token_budget": args.token_budget}
    if args.r:
        ds_options["r"] = args.r
    runs: dict[str, Any] = {}
    kv_group = {**ds_options, "selection": "kv_group"}
    options_by_variant = {"head": ds_options, "kv_group": kv_group, "kv_group_s16": {**kv_group, "score_bits": 16},
                          "kv_group_s16_radix": {**kv_group, "score_bits": 16, "topk": "radix"},
                          "kv_group_s16_filter": {**kv_group, "score_bits": 16, "topk": "filter"},
                          "kv_group_s16_int8": {**kv_group, "score_bits": 16, "label_bits": 8, "r": 2 * r}}
    backends = [("dense", "triton", {})] + [(_run_name(v), "double_sparse", options_by_variant[v])
                                           for v in _e2e_variants(args.e2e_variants)]
    for name, backend, options in backends:
        # Room for the decode steps the first sequences take while the last prompts are prefilled in chunks.
        prefill_steps = args.e2e_batch * (args.e2e_context // EngineConfig.max_num_batched_tokens + 1)
        config = EngineConfig(max_num_seqs=args.e2e_batch,
                              max_model_len=args.e2e_context + 2 * steps + 16 + prefill_steps,
                              attention_backend=backend, attention_options=options, stream_text=False)
        engine = LLMEngine(model, tokenizer, config)
        try:
            split = measure_step_split(engine, args.e2e_batch, args.e2e_context, steps=steps)
            bucket = next(b for b in GRAPH_BATCH_SIZES if b >= args.e2e_batch)  # the batch's decode graphs
            bounds = sorted(c for b, c in engine.runner.graphs if b == bucket)
        finally:
            del engine
            gc.collect()
            torch.cuda.empty_cache()
        split["tok_s"] = args.e2e_batch / split["step_ms"] * 1e3
        if backend == "double_sparse" and bounds:
            split["graph_bounds"] = bounds
            keep = DoubleSparseConfig(token_budget=args.token_budget).keep(bounds[-1])
            split["graph_keep"] = keep / args.e2e_context
        split["eager_tok_s"] = args.e2e_batch / split["eager_step_ms"] * 1e3
        runs[name] = split
    return {"batch": args.e2e_batch, "context": args.e2e_context, "options": ds_options, "runs": runs,
            **e2e_speedups(runs)}


def _run_name(variant: str) -> str:
    return "double_sparse" if variant == "head" else f"double_sparse_{variant}"


def e2e_speedups(runs: dict[str, Any]) -> dict[str, float]:
    """Tokens/s of each Double Sparsity variant that ran over dense's (`E2E_VARIANTS`), and per-head lists
    over dense run eagerly."""
    out = {}
    for variant in E2E_VARIANTS:
        if _run_name(variant) in runs:
            key = "speedup" if variant == "head" else f"speedup_{variant}"
            out[key] = runs[_run_name(variant)]["tok_s"] / runs["dense"]["tok_s"]
    if "double_sparse" in runs:
        out["speedup_vs_dense_eager"] = runs["double_sparse"]["tok_s"] / runs["dense"]["eager_tok_s"]
    return out


def _offload(model: Any, model_cfg: Any, channels: torch.Tensor, fraction: float,
             args: argparse.Namespace) -> dict[str, Any]:
    from lmstack.bench import ds_offload_speed

    checks = ds_offload_speed.check(model_cfg, channels, model.embed_tokens.weight.dtype, torch.device("cuda"))
    available = ds_offload_speed.host_available_bytes()
    per_token = ds_offload_speed.kv_bytes_per_token(model_cfg, model.embed_tokens.weight.dtype)
    ctx = ds_offload_speed.choose_context(per_token, args.offload_batch, available, args.offload_max_context)
    timing = ds_offload_speed.time_offload(model, model_cfg, channels, ctx, args.offload_batch, args.offload_steps,
                                           fraction)
    return {"checks": checks, "host_available_gib": available / 2**30, **timing}


def _metrics(results: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers (only those that were measured) plus every part's details."""
    m: dict[str, Any] = {}
    rows = [r for r in results.get("attention", {}).get("rows", []) if "dense_us" in r]
    if rows:
        m["attn_speedup_1_16_max"] = max(r["speedup_head"] for r in rows)
        m["attn_speedup_1_16_max_kv_group"] = max(r["speedup_kv_group"] for r in rows)
        m["attn_speedup_1_16_max_kv_group_s16"] = max(r["speedup_kv_group_s16"] for r in rows)
        m["attn_speedup_1_16_max_kv_group_s16_radix"] = max(r["speedup_kv_group_s16_radix"] for r in rows)
        m["attn_speedup_1_16_max_kv_group_s16_filter"] = max(r["speedup_kv_group_s16_filter"] for r in rows)
        best = max(rows, key=lambda r: r["speedup_head"])
        m["attn_speedup_1_16_max_at"] = {"batch": best["batch"], "context": best["context"]}
    e2e = results.get("e2e", {})
    for key in ("speedup", *(f"speedup_{v}" for v in E2E_VARIANTS[1:])):
        if key in e2e:
            m[f"e2e_decode_{key}"] = e2e[key]
    if "runs" in e2e:
        m["e2e_decode_tok_s"] = {k: v["tok_s"] for k, v in e2e["runs"].items()}
    modes = results.get("offload", {}).get("modes", {})
    if "ds_offload_head" in modes:
        m["offload_speedup"] = modes["ds_offload_head"]["speedup_vs_full"]
        m["offload_speedup_kv_group"] = modes["ds_offload_kv_group"]["speedup_vs_full"]
        m["offload_speedup_kv_group_no_prefetch"] = modes["ds_offload_kv_group_no_prefetch"]["speedup_vs_full"]
        m["offload_context"] = results["offload"]["context"]
    return {**m, **results}


def plot(results: dict[str, Any], path: Path) -> None:
    """Attention-op speedup against context, one colour per batch size: per-head lists (solid), kv_group lists
    with bf16 scores (dashed) and the same with the filter top-k (dotted), where measured; the end-to-end and
    offload ratios in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results.get("attention", {}).get("rows", []) if "dense_us" in r]
    if not rows:
        return
    lines = (("speedup_head", "o-", "per head"), ("speedup_kv_group_s16", "s--", "kv_group s16"),
             ("speedup_kv_group_s16_filter", "^:", "kv_group s16 filter"))
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for i, batch in enumerate(sorted({r["batch"] for r in rows})):
        mine = sorted((r for r in rows if r["batch"] == batch), key=lambda r: r["context"])
        for key, style, label in lines:
            if all(key in r for r in mine):
                ax.plot([r["context"] for r in mine], [r[key] for r in mine], style, color=f"C{i}",
                        label=f"B={batch} {label}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("attention-op speedup over dense Triton decode")
    title = "Double Sparsity 1/16, Llama-3-8B shapes, bf16"
    e2e = results.get("e2e", {})
    ran = [f"{label} {results[key]:.2f}x" for key, label in
           [("e2e_decode_speedup", "per head")] + [(f"e2e_decode_speedup_{v}", v) for v in E2E_VARIANTS[1:]]
           if key in results]
    if ran:
        title += f"\nend to end (B={e2e.get('batch')}, {e2e.get('context')} tokens): " + ", ".join(ran)
    if "offload_speedup" in results:
        title += (f"\noffload vs full streaming: per head {results['offload_speedup']:.1f}x, kv_group "
                  f"{results['offload_speedup_kv_group']:.1f}x")
        if "offload_speedup_kv_group_no_prefetch" in results:
            title += f" ({results['offload_speedup_kv_group_no_prefetch']:.1f}x without prefetch)"
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=3)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def print_table(m: dict[str, Any]) -> None:
    rows = [r for r in m.get("attention", {}).get("rows", []) if "dense_us" in r]
    if rows:
        print(f"{'ctx':>7} {'B':>3} {'dense us':>9} {'DS head':>9} {'x':>6} {'DS kvg':>9} {'x':>6} {'s16 x':>6} "
              f"{'radix x':>7} {'filt x':>7} {'scores':>8} {'topk':>8} {'sparse':>8} {'kvg:sc':>8} {'topk':>8} "
              f"{'radix':>8} {'filter':>8} {'sparse':>8}")
        for r in rows:
            print(f"{r['context']:>7} {r['batch']:>3} {r['dense_us']:>9.1f} {r['ds_head_us']:>9.1f} "
                  f"{r['speedup_head']:>6.2f} {r['ds_kv_group_us']:>9.1f} {r['speedup_kv_group']:>6.2f} "
                  f"{r['speedup_kv_group_s16']:>6.2f} {r['speedup_kv_group_s16_radix']:>7.2f} "
                  f"{r['speedup_kv_group_s16_filter']:>7.2f} "
                  f"{r['stage_scores_us']:>8.1f} {r['stage_topk_us']:>8.1f} {r['stage_sparse_us']:>8.1f} "
                  f"{r['stage_scores_kv_group_us']:>8.1f} {r['stage_topk_kv_group_us']:>8.1f} "
                  f"{r['stage_topk_radix_kv_group_us']:>8.1f} {r['stage_topk_filter_kv_group_us']:>8.1f} "
                  f"{r['stage_sparse_kv_group_us']:>8.1f}")
    e2e = m.get("e2e", {})
    for name, run in e2e.get("runs", {}).items():
        kept = f", graphs keep {run['graph_keep']:.4f} of the context" if "graph_keep" in run else ""
        print(f"e2e {name:<33} B={e2e['batch']} ctx={e2e['context']}: {run['step_ms']:.2f} ms/step "
              f"{run['tok_s']:.1f} tok/s (eager {run['eager_step_ms']:.2f} ms, "
              f"attention {run['eager_attention_ms']:.2f} ms{kept})")
    off = m.get("offload", {})
    for name, run in off.get("modes", {}).items():
        print(f"offload {name:<28} ctx={off['context']}: {run['step_ms']:.1f} ms/step, "
              f"{run['bus_gb_per_step']:.2f} GB over the bus, {run['speedup_vs_full']:.2f}x")
    for part in PARTS:
        if "error" in m.get(part, {}):
            print(f"{part}: FAILED: {m[part]['error']}")
    for key in ("attn_speedup_1_16_max", "attn_speedup_1_16_max_kv_group", "attn_speedup_1_16_max_kv_group_s16",
                "attn_speedup_1_16_max_kv_group_s16_radix", "attn_speedup_1_16_max_kv_group_s16_filter",
                "e2e_decode_speedup", "e2e_decode_speedup_kv_group", "e2e_decode_speedup_kv_group_s16",
                "e2e_decode_speedup_kv_group_s16_radix", "e2e_decode_speedup_kv_group_s16_filter",
                "e2e_decode_speedup_kv_group_s16_int8", "offload_speedup", "offload_speedup_kv_group",
                "offload_speedup_kv_group_no_prefetch"):
        if key in m:
            print(f"{key}: {m[key]:.2f}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from lmstack.engine.attention.ds_channels import resolve_channels
    from lmstack.models import load

    fraction, parts = _check_args(args)
    output = Path(args.output) if args.output else DEFAULT_OUTPUT
    model, tokenizer, model_cfg = load(args.model, dtype=args.dtype, device="cuda", tokenizer=args.tokenizer)
    channels, described = resolve_channels(args.channels, model_cfg, None, args.r, 0)
    r = channels.shape[-1]
    results: dict[str, Any] = {"channels": described}
    command = cli_command("bench double-sparsity-speed", args,
                          ("model", "tokenizer", "dtype", "channels", "r", "token_budget", "e2e_context",
                           "e2e_batch", "e2e_steps", "e2e_variants", "offload_batch", "offload_max_context",
                           "offload_steps", "parts"))
    command += " --contexts " + ",".join(map(str, args.contexts)) + " --batches " + ",".join(map(str, args.batches))
    command += f" --output {shlex.quote(str(output))}"
    runners = {"attention": lambda: _attention(model_cfg, r, fraction, args),
               "e2e": lambda: _e2e(model, tokenizer, r, args),
               "offload": lambda: _offload(model, model_cfg, channels, fraction, args)}
    metrics: dict[str, Any] = {}
    for name in PARTS:
        if name in parts:
            _part(name, results, runners[name])
            metrics = {**_metrics(results), "notes": NOTES}
            write_results(output, command, metrics, device="cuda")  # after every part: a crash keeps the rest
    plot(metrics, output.with_suffix(".png"))
    print_table(metrics)
    print(f"wrote {output} and {output.with_suffix('.png')}")
    return metrics


if __name__ == "__main__":
    from lmstack.bench import module_main

    module_main("lmstack.bench.double_sparsity_speed", __doc__, add_arguments, run)
