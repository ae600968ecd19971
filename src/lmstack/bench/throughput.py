"""Offline throughput: our engine vs Hugging Face `generate` on the same ShareGPT prompts and answer lengths.

Every request decodes exactly the number of tokens its original ShareGPT answer had (`ignore_eos`), so the
work is fixed and throughputs are comparable across engines, models and machines. On a GPU the run also
places batch-1 decode against the memory-bandwidth roofline and the big batch against peak tensor FLOP/s.
"""

from __future__ import annotations

import argparse
import gc
import shlex
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, is_dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import torch

from lmstack.bench.results import cli_command, write_results
from lmstack.bench.step_split import measure_step_split
from lmstack.data.sharegpt import BenchRequest, sample_requests
from lmstack.errors import LmstackError
from lmstack.models import resolve_device

T = TypeVar("T")

DEFAULT_MODEL = "smollm2-135m-instruct"
_GPU_HF_DEFAULT_BATCHES = 2  # on GPU the HF baseline runs this many batches unless --hf-num-prompts says
_WARMUP_PROMPTS = 4
_B1_PROMPT_LEN, _B1_OUTPUT_LEN = 128, 256
# Dense (no sparsity) bf16 tensor-core peaks from the vendor data sheets; more specific names first.
_PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("H800", 989e12),
    ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10", 125e12),
)
_TABLE = ("num_prompts", "prompt_tokens", "output_tokens", "elapsed_s", "throughput_tok_s", "total_tok_s",
          "requests_s", "hf_num_prompts", "hf_elapsed_s", "hf_throughput_tok_s", "speedup_vs_hf",
          "decode_b1_tok_s", "roofline_b1_tok_s", "decode_b1_roofline_frac", "mfu")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="embedded name, HF folder, .gguf file or dummy:<preset> (e.g. dummy:llama-3-8b)")
    parser.add_argument("--num-prompts", type=int, default=64, help="ShareGPT prompts to run (default 64)")
    parser.add_argument("--hf-num-prompts", type=int, default=None,
                        help="run the HF baseline on the first N prompts only (default: all of them on CPU, "
                             f"{_GPU_HF_DEFAULT_BATCHES} batches on GPU)")
    parser.add_argument("--hf-batch-size", type=int, default=64, help="HF static batch size (default 64)")
    parser.add_argument("--dtype", default="auto",
                        help="auto (bf16 on GPU, fp32 on CPU), bfloat16, float16 or float32")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, default=0, help="prompt sampling and engine seed")
    parser.add_argument("--max-num-seqs", type=int, default=None, help="engine batch limit (engine default)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="engine tokens per step (engine default)")
    parser.add_argument("--no-hf", action="store_true", help="skip the Hugging Face baseline")
    parser.add_argument("--output", default=None,
                        help="results JSON (default benchmarks/results/engine_{cpu|gpu}.json)")
    parser.add_argument("--tokenizer", default=None,
                        help="take the tokenizer from this folder or model (e.g. for dummy: models)")
    parser.add_argument("--enforce-eager", action="store_true", help="disable CUDA graphs in the engine")


def _command(args: argparse.Namespace, output: Path) -> str:
    options = ("model", "tokenizer", "num_prompts", "hf_num_prompts", "hf_batch_size", "dtype", "device", "seed",
               "max_num_seqs", "max_num_batched_tokens")
    command = cli_command("bench throughput", args, options, flags=("no_hf", "enforce_eager"))
    return f"{command} --output {shlex.quote(str(output))}"


def _timed(fn: Callable[[], T], device: torch.device) -> tuple[T, float]:
    """Wall time of `fn`, with the GPU drained before and after so queued kernels are counted."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


def _event_times(fn: Callable[[], Any], repeats: int) -> list[float]:
    """Seconds per call of a GPU op, from CUDA events (host overhead excluded), after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Achievable HBM bandwidth in bytes/s: a device-to-device copy reads and writes `nbytes` each."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = statistics.median(_event_times(partial(dst.copy_, src), repeats))
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / seconds


def peak_bf16_flops(device: torch.device) -> tuple[float, str]:
    """Dense bf16 peak FLOP/s and where the number came from: the data sheet, else a timed big matmul."""
    name = torch.cuda.get_device_name(device)
    for key, flops in _PEAK_BF16_FLOPS:
        if key in name:
            return flops, f"data sheet ({key})"
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    seconds = min(_event_times(lambda: a @ b, repeats=10))
    return 2 * n**3 / seconds, f"measured {n}x{n} bf16 matmul ({name} is not in the table)"


def _numeric_stats(llm: Any) -> dict[str, float] | None:
    """A snapshot of `llm.engine.stats` (step timing counters), if the engine keeps them."""
    stats = getattr(getattr(llm, "engine", None), "stats", None)
    if stats is None:
        return None
    d = asdict(stats) if is_dataclass(stats) else dict(stats)
    return {k: v for k, v in d.items() if isinstance(v, int | float) and not isinstance(v, bool)}


@dataclass
class _Hardware:
    """GPU limits, measured before the engine takes its memory and so nothing else competes."""

    copy_bandwidth: float  # bytes/s
    peak_flops: float
    peak_source: str


@dataclass
class _HFSource:
    """What the HF baseline needs from the engine run, kept so the engine itself can be freed first."""

    model_path: Path | None
    hf_config: dict[str, Any]
    dtype: torch.dtype
    device: torch.device
    eos_token_ids: list[int]


def _engine_phase(args: argparse.Namespace, hardware: _Hardware | None, metrics: dict[str, Any],
                  notes: list[str]) -> tuple[list[BenchRequest], _HFSource]:
    """Run our engine, fill `metrics`; returns the requests and what HF needs once the engine is gone."""
    from lmstack import LLM, SamplingParams

    engine_kwargs = {k: getattr(args, k) for k in ("max_num_seqs", "max_num_batched_tokens")
                     if getattr(args, k) is not None}
    llm = LLM(args.model, dtype=args.dtype, device=args.device, enforce_eager=args.enforce_eager,
              seed=args.seed, tokenizer=args.tokenizer, **engine_kwargs)
    cfg = llm.model_config
    max_total = min(2048, cfg.max_position_embeddings)
    requests = sample_requests(llm.tokenizer, args.num_prompts, seed=args.seed,
                               max_prompt_len=min(1024, max_total // 2), max_total_len=max_total)
    device = llm.device
    dtype = next(llm.model.parameters()).dtype

    def params(n: int) -> Any:
        return SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.0)

    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    warmup = requests[:_WARMUP_PROMPTS]
    llm.generate(prompts[:len(warmup)], [params(min(16, r.output_len)) for r in warmup], use_tqdm=False)
    before = _numeric_stats(llm)
    outputs, elapsed = _timed(lambda: llm.generate(prompts, [params(r.output_len) for r in requests]), device)
    after = _numeric_stats(llm)
    for i, (req, out) in enumerate(zip(requests, outputs, strict=True)):
        got = len(out.outputs[0].token_ids)
        if got != req.output_len:
            raise RuntimeError(f"engine bug: request {i} generated {got} tokens but ignore_eos asked for "
                               f"exactly {req.output_len}")
    prompt_tokens = sum(len(r.prompt_token_ids) for r in requests)
    output_tokens = sum(r.output_len for r in requests)
    metrics.update(model=args.model, device=str(device), dtype=str(dtype).removeprefix("torch."),
                   num_prompts=len(requests), prompt_tokens=prompt_tokens, output_tokens=output_tokens,
                   elapsed_s=elapsed, throughput_tok_s=output_tokens / elapsed,
                   total_tok_s=(prompt_tokens + output_tokens) / elapsed, requests_s=len(requests) / elapsed)
    if after is not None:
        # Counters are cumulative since start-up: subtract the warm-up's share.
        metrics["step_time_split"] = {k: v - (before or {}).get(k, 0) for k, v in after.items()}

    batch = min(llm.engine.config.max_num_seqs, len(requests))
    context = int(statistics.mean(len(r.prompt_token_ids) + r.output_len // 2 for r in requests))
    metrics["step_split_largest_batch"] = measure_step_split(llm.engine, batch, context,
                                                             steps=20 if hardware is not None else 4)
    notes.append("step_split_largest_batch: decode steps at batch = max running sequences and the workload's mean "
                 "context, forward timed with a device sync; attention from one eager pass with device events")
    if hardware is not None:
        _gpu_metrics(llm, params, requests, hardware, metrics, notes)

    if not args.no_hf and llm.model_path is None:
        notes.append("HF baseline uses its own random weights for a dummy model: speed does not depend on "
                     "the values")
    source = _HFSource(model_path=llm.model_path, hf_config=cfg.to_hf_dict(),
                       dtype=dtype, device=device, eos_token_ids=list(cfg.eos_token_id))
    return requests, source


def _gpu_metrics(llm: Any, params: Callable[[int], Any], requests: list[BenchRequest], hardware: _Hardware,
                 metrics: dict[str, Any], notes: list[str]) -> None:
    """Batch-1 decode against the bandwidth roofline, and the main run's model FLOPs utilization."""
    device = llm.device
    pool = [t for r in requests for t in r.prompt_token_ids]
    pool = pool * (_B1_PROMPT_LEN // len(pool) + 1)
    prompt = [{"prompt_token_ids": pool[:_B1_PROMPT_LEN]}]

    def run_b1(n: int) -> float:
        return _timed(lambda: llm.generate(prompt, [params(n)], use_tqdm=False), device)[1]

    run_b1(16)
    first = statistics.median(run_b1(1) for _ in range(3))
    full = statistics.median(run_b1(_B1_OUTPUT_LEN) for _ in range(3))
    decode_tok_s = (_B1_OUTPUT_LEN - 1) / (full - first)

    weight_bytes = sum(p.numel() * p.element_size() for p in llm.model.parameters())
    roofline = hardware.copy_bandwidth / weight_bytes
    num_params = llm.model_config.num_params
    achieved = 2 * num_params * (metrics["prompt_tokens"] + metrics["output_tokens"]) / metrics["elapsed_s"]
    metrics.update(decode_b1_tok_s=decode_tok_s, decode_b1_ms_per_tok=1e3 / decode_tok_s,
                   copy_bandwidth_gb_s=hardware.copy_bandwidth / 1e9, weight_bytes=weight_bytes,
                   roofline_b1_tok_s=roofline,
                   decode_b1_roofline_frac=decode_tok_s / roofline, num_params=num_params,
                   achieved_flops=achieved, peak_bf16_flops=hardware.peak_flops,
                   peak_flops_source=hardware.peak_source, mfu=achieved / hardware.peak_flops)
    notes += [
        f"decode_b1: {_B1_PROMPT_LEN}-token prompt, batch 1; tok/s = {_B1_OUTPUT_LEN - 1} decode steps / "
        f"(time for {_B1_OUTPUT_LEN} tokens - time for 1), medians of 3, prefill excluded",
        "roofline_b1 = device copy bandwidth (read + write of a 1 GiB tensor) / bytes of all parameters",
        "mfu = 2 x num_params x (prompt + output tokens) / elapsed / peak dense bf16; attention FLOPs are "
        "ignored and the LM head is counted for every token, so it is an approximation",
    ]
    if metrics["dtype"] not in ("bfloat16", "float16"):
        notes.append(f"mfu compares a {metrics['dtype']} run with the bf16 tensor-core peak")


def _hf_dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """transformers >= 4.56 spells it `dtype`; older releases only know `torch_dtype`."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _hf_model(source: _HFSource, notes: list[str]) -> torch.nn.Module:
    """The same model in transformers: the folder our engine loaded, or the dummy config (+ our weights)."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError:
        raise LmstackError("the HF baseline needs transformers: `pip install transformers`, "
                           "or pass --no-hf to skip it") from None
    kwargs = {"attn_implementation": "sdpa", **_hf_dtype_kwarg(source.dtype)}
    if source.model_path is not None:
        return AutoModelForCausalLM.from_pretrained(source.model_path, **kwargs).to(source.device).eval()
    hf_config = dict(source.hf_config)
    config = AutoConfig.for_model(hf_config.pop("model_type"), **hf_config)
    with torch.device(source.device):
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    return model.eval()


@torch.inference_mode()
def _hf_phase(source: _HFSource, requests: list[BenchRequest], batch_size: int,
              notes: list[str]) -> dict[str, Any]:
    """Static batching with `generate`: every batch runs as long as its longest replayed answer."""
    from transformers import GenerationConfig

    model = _hf_model(source, notes)
    pad = source.eos_token_ids[0] if source.eos_token_ids else 0

    def generate(batch: list[BenchRequest], new_tokens: int) -> None:
        width = max(len(r.prompt_token_ids) for r in batch)
        ids = torch.tensor([[pad] * (width - len(r.prompt_token_ids)) + r.prompt_token_ids for r in batch],
                           device=source.device)
        mask = torch.tensor([[0] * (width - len(r.prompt_token_ids)) + [1] * len(r.prompt_token_ids)
                             for r in batch], device=source.device)
        # No EOS id: generation never stops early, HF's cheapest equivalent of ignore_eos.
        gen = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad, eos_token_id=None)
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)
        if out.shape[1] - width != new_tokens:
            raise RuntimeError(f"HF generated {out.shape[1] - width} tokens per row, expected {new_tokens}")

    generate(requests[:2], 4)
    batches = [requests[i:i + batch_size] for i in range(0, len(requests), batch_size)]
    _, elapsed = _timed(lambda: [generate(b, max(r.output_len for r in b)) for b in batches], source.device)
    useful = sum(r.output_len for r in requests)
    padded = sum(len(b) * max(r.output_len for r in b) for b in batches)
    notes.append("HF baseline: static batches in request order, left padding, greedy, every row decodes its "
                 "batch's longest replayed length; hf_throughput counts only the replayed (useful) tokens")
    return {"hf_num_prompts": len(requests), "hf_batch_size": batch_size, "hf_elapsed_s": elapsed,
            "hf_output_tokens": useful, "hf_padded_output_tokens": padded,
            "hf_throughput_tok_s": useful / elapsed}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark described by `args` (see add_arguments), write the results file, return metrics."""
    if args.hf_batch_size < 1:
        raise LmstackError(f"--hf-batch-size must be >= 1 (got {args.hf_batch_size})")
    if args.hf_num_prompts is not None and not 1 <= args.hf_num_prompts <= args.num_prompts:
        raise LmstackError(f"--hf-num-prompts must be between 1 and --num-prompts ({args.num_prompts}), "
                           f"got {args.hf_num_prompts}")
    device = resolve_device(args.device)
    kind = "gpu" if device.type == "cuda" else "cpu"
    output = Path(args.output or f"benchmarks/results/engine_{kind}.json")
    hardware = None
    if device.type == "cuda":
        hardware = _Hardware(copy_bandwidth(device), *peak_bf16_flops(device))
    metrics: dict[str, Any] = {}
    notes: list[str] = []
    requests, source = _engine_phase(args, hardware, metrics, notes)
    # The engine (and its KV cache) is unreachable now: give its memory to the HF model.
    gc.collect()
    if source.device.type == "cuda":
        torch.cuda.empty_cache()
    metrics.update(hf_num_prompts=None, hf_elapsed_s=None, hf_throughput_tok_s=None, speedup_vs_hf=None)
    if not args.no_hf:
        hf_n = args.hf_num_prompts
        if hf_n is None:
            hf_n = len(requests)
            if source.device.type == "cuda":
                hf_n = min(hf_n, _GPU_HF_DEFAULT_BATCHES * args.hf_batch_size)
        metrics.update(_hf_phase(source, requests[:hf_n], args.hf_batch_size, notes))
        metrics["speedup_vs_hf"] = metrics["throughput_tok_s"] / metrics["hf_throughput_tok_s"]
        if hf_n < len(requests):
            notes.append(f"HF ran the first {hf_n} of {len(requests)} prompts; throughputs are rates, "
                         "so the speed-up compares them directly")
    metrics["notes"] = notes
    write_results(output, _command(args, output), metrics, device=source.device)
    _print_table(metrics, output)
    return metrics


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:,.1f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _print_table(metrics: dict[str, Any], output: Path) -> None:
    rows = [(key, _fmt(metrics[key])) for key in _TABLE if metrics.get(key) is not None]
    width = max(len(key) for key, _ in rows)
    print(f"{metrics['model']} on {metrics['device']} ({metrics['dtype']})")
    for key, value in rows:
        print(f"  {key:<{width}}  {value:>14}")
    print(f"results: {output}")


if __name__ == "__main__":
    from lmstack.bench import module_main

    module_main("lmstack.bench.throughput", __doc__, add_arguments, run)
