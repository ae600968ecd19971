"""Prefill and mixed steps on a GPU, eager vs replayed from token graphs (engine/token_graphs.py), in one run.

Each case is one engine step, timed with a device sync on both sides, median of `--repeats`: `160` is one
160-token prompt, `160x4` four of them, `160+8` one prompt joining 8 requests that are decoding. The same
engine settings run twice, with `token_graph_tokens=0` (every such step eager) and with the default.
"""

from __future__ import annotations

import argparse
import gc
import re
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from lmstack.bench.results import cli_command, save_figure, write_results
from lmstack.errors import LmstackError
from lmstack.models.registry import DEFAULT_MODEL

_CASE = re.compile(r"^(\d+)(?:x(\d+))?(?:\+(\d+))?$")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="embedded name, HF folder, .gguf file or dummy:<preset>")
    parser.add_argument("--tokenizer", default=None, help="take the tokenizer from this folder or model")
    parser.add_argument("--cases", default="16,160,640,160x4,1500,160+8,160+31",
                        help="steps to time: PROMPT_LEN[xPROMPTS][+DECODING], comma-separated")
    parser.add_argument("--repeats", type=int, default=8, help="timed steps per case and mode (median; default 8)")
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--kv-cache-gib", type=float, default=8.0, help="KV cache of each engine (default 8 GiB)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cuda", help="cuda or cuda:N (token graphs need CUDA)")
    parser.add_argument("--output", default="benchmarks/results/token_graphs_gpu.json")


def parse_cases(text: str) -> list[tuple[int, int, int]]:
    """`160x4+8` → (prompt length 160, 4 prompts, 8 requests decoding)."""
    cases = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        m = _CASE.match(item)
        if m is None or int(m[1]) < 1 or (m[2] is not None and int(m[2]) < 1):
            raise LmstackError(f"--cases: {item!r} is not PROMPT_LEN[xPROMPTS][+DECODING], e.g. 160, 160x4 or 160+8")
        cases.append((int(m[1]), int(m[2] or 1), int(m[3] or 0)))
    if not cases:
        raise LmstackError("--cases is empty: give e.g. 16,160,160x4,160+8")
    return cases


def _label(case: tuple[int, int, int]) -> str:
    n, prompts, decoding = case
    return f"{n}" + (f"x{prompts}" if prompts > 1 else "") + (f"+{decoding}" if decoding else "")


def _step_ms(engine: Any, case: tuple[int, int, int], repeats: int, gen: torch.Generator) -> float:
    """Median seconds of the step that reads the case's prompts (beside its decoding requests), in ms."""
    from lmstack.engine.sampling_params import SamplingParams

    n, prompts, decoding = case
    vocab = min(engine.model_config.vocab_size, engine.tokenizer.vocab_size)  # a dummy model may outsize it

    def ids(length: int) -> list[int]:
        return torch.randint(10, vocab, (length,), generator=gen).tolist()

    times = []
    for _ in range(repeats):
        for _ in range(decoding):
            engine.add_request(ids(100), SamplingParams(max_tokens=400, ignore_eos=True))
        while engine.scheduler.waiting:  # their prompts are read: they decode from now on
            engine.step()
        for _ in range(prompts):
            engine.add_request(ids(n), SamplingParams(max_tokens=1, ignore_eos=True))
        torch.cuda.synchronize()
        start = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        for rid in list(engine.requests):
            engine.abort_request(rid)
        while engine.has_unfinished:
            engine.step()
    return statistics.median(times) * 1e3


def run(args: argparse.Namespace) -> dict[str, Any]:
    cases = parse_cases(args.cases)
    if args.repeats < 1:
        raise LmstackError(f"--repeats must be >= 1, got {args.repeats}")
    if max(n for n, _, _ in cases) >= args.max_model_len:
        raise LmstackError(f"--max-model-len {args.max_model_len} does not hold the longest prompt of --cases")
    if max(prompts + decoding for _, prompts, decoding in cases) > args.max_num_seqs:
        raise LmstackError(f"--max-num-seqs {args.max_num_seqs} is below a case's prompts + decoding requests")
    if not args.device.startswith("cuda") or not torch.cuda.is_available():
        raise LmstackError("token graphs are CUDA graphs: run this benchmark with --device cuda on a machine "
                           "with a GPU")
    from lmstack.engine.config import EngineConfig
    from lmstack.engine.llm import LLM

    results: dict[str, dict[str, float]] = {}
    build_s: dict[str, float] = {}
    for mode, tokens in (("eager", 0), ("graphs", EngineConfig.token_graph_tokens)):
        start = time.perf_counter()
        llm = LLM(args.model, dtype=args.dtype, device=args.device, tokenizer=args.tokenizer,
                  max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                  kv_cache_memory=int(args.kv_cache_gib * 2**30), token_graph_tokens=tokens)
        build_s[mode] = time.perf_counter() - start
        gen = torch.Generator().manual_seed(0)
        _step_ms(llm.engine, cases[0], 2, gen)  # warm-up
        results[mode] = {_label(c): _step_ms(llm.engine, c, args.repeats, gen) for c in cases}
        print(f"{mode}: " + "  ".join(f"{k} {v:.2f} ms" for k, v in results[mode].items()), flush=True)
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    speedup = {k: results["eager"][k] / results["graphs"][k] for k in results["eager"]}
    metrics = {"step_ms_eager": results["eager"], "step_ms_graphs": results["graphs"],
               "speedup_by_case": speedup, "speedup_min": min(speedup.values()),
               "speedup_max": max(speedup.values()), "engine_build_s": build_s, "model": args.model,
               "dtype": args.dtype, "repeats": args.repeats}
    output = Path(args.output)
    options = ("model", "tokenizer", "cases", "repeats", "max_num_seqs", "max_model_len", "kv_cache_gib", "dtype",
               "device", "output")
    write_results(output, cli_command("bench token-graphs", args, options), metrics, device=args.device)
    _plot(results, output.with_suffix(".png"), args.model)
    for k, s in speedup.items():
        print(f"  {k:>10}  eager {results['eager'][k]:7.2f} ms  graphs {results['graphs'][k]:7.2f} ms  {s:5.1f}x")
    print(f"results: {output}")
    return metrics


def _plot(results: dict[str, dict[str, float]], path: Path, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(results["eager"])
    x = range(len(labels))
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar([i - 0.2 for i in x], [results["eager"][k] for k in labels], width=0.4, label="eager")
    ax.bar([i + 0.2 for i in x], [results["graphs"][k] for k in labels], width=0.4, label="token graphs")
    ax.set_xticks(list(x), labels)
    ax.set_xlabel("step: prompt tokens [x prompts] [+ decoding requests]")
    ax.set_ylabel("step time (ms)")
    ax.set_title(f"prefill and mixed steps, {model[:60]}")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
