"""HTTP overhead: one streaming workload through the in-process `AsyncEngine` and through `lmstack serve`.

The server should cost little on top of the engine it wraps; this measures how little. Both paths get the
same engine settings, the same prompts (as token ids, so tokenization is not part of either) and the same
greedy `ignore_eos` requests, all sent at once and streamed to the end. In process, coroutines consume every
output delta as the server would; over HTTP, an aiohttp client streams `/v1/completions` and counts the tokens
the usage chunk reports. Repetitions alternate the two paths (in ABBA order) so that drift in the machine's
speed hits both alike, and medians are compared. Both engines stay loaded, but only one generates at a
time: an idle `AsyncEngine` thread and an idle server sleep rather than poll.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import IO, Any

from lmstack.bench.http import BenchClient
from lmstack.bench.results import cli_command, write_results
from lmstack.bench.serve import http_client, request_body, stream_request
from lmstack.engine.config import EngineConfig
from lmstack.errors import LmstackError

DEFAULT_MODEL = "smollm2-135m-instruct"
_SERVER_START_S = 600.0  # model load, plus CUDA graph capture on a GPU
_READY = re.compile(r"serving .+ on (http://\S+)")
_STEP_METRIC = re.compile(r'^lmstack_engine_(steps|graph_steps|step_seconds)_total(?:\{phase="(\w+)"\})? (\S+)$', re.M)
_PHASES = ("schedule", "forward", "sample", "postprocess")
RunResult = tuple[int, float, dict[str, float]]  # output tokens, seconds, engine step counters spent on the run
# Our own filler text: prompts are cut from it so that the model reads (and detokenizes) ordinary words.
_TEXT = ("The harbour town woke slowly. Fishing boats came in with the tide, gulls argued over the nets, and "
         "the baker on the corner set out loaves that were still too hot to hold. Children ran to school along "
         "the sea wall while their grandparents compared the weather with the weather of forty years ago. ")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="embedded name, HF folder, .gguf file or dummy:<preset>")
    parser.add_argument("--tokenizer", default=None, help="take the tokenizer from this folder or model (both paths)")
    parser.add_argument("--num-requests", type=int, default=32, help="concurrent streaming requests (default 32)")
    parser.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per request (default 128)")
    parser.add_argument("--max-tokens", type=int, default=64, help="output tokens per request (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each path (default 3)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--max-num-seqs", type=int, default=None, help="engine batch limit (engine default)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one HTTP request may take")
    parser.add_argument("--output", default=None,
                        help="results JSON (default benchmarks/results/serve_overhead.json, "
                             "serve_overhead_gpu.json on CUDA)")


def _check(args: argparse.Namespace) -> None:
    for name in ("num_requests", "prompt_len", "max_tokens", "repeats"):
        if getattr(args, name) < 1:
            raise LmstackError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_num_seqs is not None and args.max_num_seqs < 1:
        raise LmstackError(f"--max-num-seqs must be >= 1, got {args.max_num_seqs}")


def engine_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Engine options given to both paths. The KV pool is sized to the workload, not to a share of the device,
    so that two engines fit side by side on one GPU; the context window is just what a request needs."""
    blocks_per_request = -(-(args.prompt_len + args.max_tokens) // EngineConfig.block_size) + 1
    settings: dict[str, Any] = {"max_model_len": args.prompt_len + args.max_tokens,
                                "num_kv_blocks": args.num_requests * blocks_per_request + 1}
    if args.max_num_seqs is not None:
        settings["max_num_seqs"] = args.max_num_seqs
    return settings


def make_prompts(tokenizer: Any, num: int, length: int) -> list[list[int]]:
    """`num` different prompts of exactly `length` tokens: a numbered opening, then the filler text."""
    filler = tokenizer.encode(_TEXT, add_special_tokens=False)
    copies = length // max(1, len(filler)) + 2
    prompts = []
    for i in range(num):
        ids = tokenizer.encode(f"Story {i}. ", add_special_tokens=False) + filler * copies
        prompts.append(ids[:length])
    return prompts


# ---------------------------------------------------------------- the two paths

def _delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Engine counters spent between two readings: steps, CUDA-graph steps, seconds per phase."""
    keys = ("steps", "graph_steps", *(f"{p}_s" for p in _PHASES))
    return {k: after.get(k, 0.0) - before.get(k, 0.0) for k in keys}


async def scrape_step_stats(http: BenchClient) -> dict[str, float]:
    """The server's engine step counters, read from its Prometheus `/metrics`."""
    _, text = await http.get_text(http.root + "/metrics")
    stats: dict[str, float] = {}
    for name, phase, value in _STEP_METRIC.findall(text):
        stats[f"{phase}_s" if phase else name] = float(value)
    return stats


async def run_inprocess(engine: Any, prompts: list[list[int]], max_tokens: int) -> RunResult:
    """(output tokens, seconds, step counters) for all prompts at once through `AsyncEngine.generate`, every delta
    consumed."""
    from lmstack.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    async def one(ids: list[int]) -> int:
        sent, tokens = 0, 0
        async for out in engine.generate(ids, params):
            text = out.outputs[0].text
            delta = text[sent:]  # what a server would put in this chunk
            sent += len(delta)
            tokens = len(out.outputs[0].token_ids)
        return tokens

    before = engine.step_stats()
    start = time.perf_counter()
    counts = await asyncio.gather(*(one(p) for p in prompts))
    elapsed = time.perf_counter() - start
    _expect(counts, max_tokens, "in process")
    return sum(counts), elapsed, _delta(before, engine.step_stats())


async def run_http(http: BenchClient, model: str, prompts: list[list[int]], max_tokens: int) -> RunResult:
    """(output tokens, seconds, step counters) for all prompts at once, streamed from `/v1/completions`."""
    bodies = [request_body("completions", model, ids, max_tokens, ignore_eos=True) for ids in prompts]
    before = await scrape_step_stats(http)
    start = time.perf_counter()
    records = await asyncio.gather(*(stream_request(http, "completions", b, len(p))
                                     for b, p in zip(bodies, prompts, strict=True)))
    elapsed = time.perf_counter() - start
    failed = [r.error for r in records if not r.success]
    if failed:
        raise LmstackError(f"{len(failed)} of {len(records)} HTTP requests failed, e.g. {failed[0]}")
    counts = [r.output_tokens for r in records]
    _expect(counts, max_tokens, "over HTTP")
    return sum(counts), elapsed, _delta(before, await scrape_step_stats(http))


def _expect(counts: list[int], want: int, path: str) -> None:
    """With ignore_eos every request must produce exactly `want` tokens, or the two paths did different work."""
    wrong = [c for c in counts if c != want]
    if wrong:
        raise LmstackError(f"{len(wrong)} requests {path} produced {wrong[0]} tokens instead of {want}")


# ---------------------------------------------------------------- the server subprocess

def server_command(args: argparse.Namespace, settings: dict[str, Any]) -> list[str]:
    """`lmstack serve` with the same model and engine settings, on a free loopback port (it prints which)."""
    cmd = [sys.executable, "-m", "lmstack.cli", "serve", "--model", args.model, "--host", "127.0.0.1",
           "--port", "0", "--dtype", args.dtype, "--device", args.device, "--log-level", "warning"]
    if args.tokenizer is not None:
        cmd += ["--tokenizer", args.tokenizer]
    for key, value in settings.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    return cmd


def _log_tail(log: IO[str]) -> str:
    log.seek(0)
    return log.read()[-3000:]


def wait_for_server(proc: subprocess.Popen[bytes], log: IO[str], timeout: float = _SERVER_START_S) -> str:
    """The server's base URL once it has printed it; an error with its log if it exits or takes too long."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log.seek(0)
        found = _READY.search(log.read())
        if found:
            return found.group(1)
        if proc.poll() is not None:
            raise LmstackError(f"the server exited with status {proc.returncode}:\n{_log_tail(log)}")
        time.sleep(0.2)
    raise LmstackError(f"the server did not start within {timeout:.0f} s:\n{_log_tail(log)}")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (the server drains, here nothing), then SIGKILL if it does not exit in time."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


# ---------------------------------------------------------------- the benchmark

async def _alternate(engine: Any, base_url: str, args: argparse.Namespace,
                     prompts: list[list[int]]) -> tuple[dict[str, list[float]], dict[str, list[dict[str, float]]]]:
    """Warm both paths up, then time them in ABBA order; tok/s and engine step counters of every repetition."""
    n = len(prompts)
    async with http_client(base_url, None, args.timeout, n) as http:
        paths: dict[str, Callable[[int], Awaitable[RunResult]]] = {
            "inprocess": lambda m: run_inprocess(engine, prompts, m),
            "http": lambda m: run_http(http, args.model, prompts, m),
        }
        for run_path in paths.values():  # first-call costs (kernel selection, connections) stay out of timing
            await run_path(min(args.max_tokens, 4))
        rates: dict[str, list[float]] = {name: [] for name in paths}
        steps: dict[str, list[dict[str, float]]] = {name: [] for name in paths}
        for rep in range(args.repeats):
            order = list(paths) if rep % 2 == 0 else list(reversed(paths))
            for name in order:
                tokens, seconds, stats = await paths[name](args.max_tokens)
                rates[name].append(tokens / seconds)
                steps[name].append(stats)
            print(f"  repeat {rep + 1}/{args.repeats}: in-process {rates['inprocess'][-1]:,.1f} tok/s "
                  f"({_describe(steps['inprocess'][-1])}), HTTP {rates['http'][-1]:,.1f} tok/s "
                  f"({_describe(steps['http'][-1])})", flush=True)
    return rates, steps


def _describe(stats: dict[str, float]) -> str:
    phases = " + ".join(f"{p} {stats[f'{p}_s']:.2f}" for p in _PHASES)
    return f"{stats['steps']:.0f} steps, {stats['graph_steps']:.0f} as graphs; s: {phases}"


def _event_loop_runner() -> asyncio.Runner:
    """uvloop when installed, as `lmstack serve` uses through uvicorn, so both sides run the same loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


def _command(args: argparse.Namespace, output: Path) -> str:
    options = ("model", "tokenizer", "num_requests", "prompt_len", "max_tokens", "repeats", "dtype", "device",
               "max_num_seqs", "timeout")
    return f"{cli_command('bench overhead', args, options)} --output {shlex.quote(str(output))}"


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure both paths as `args` describe, write the results file, return its metrics."""
    _check(args)
    from lmstack.engine.async_engine import AsyncEngine
    from lmstack.engine.llm import LLM

    settings = engine_settings(args)
    llm = LLM(args.model, dtype=args.dtype, device=args.device, tokenizer=args.tokenizer, **settings)
    device = llm.device
    output = Path(args.output or ("benchmarks/results/serve_overhead_gpu.json" if device.type == "cuda"
                                  else "benchmarks/results/serve_overhead.json"))
    prompts = make_prompts(llm.tokenizer, args.num_requests, args.prompt_len)
    cmd = server_command(args, settings)
    with _event_loop_runner() as runner, tempfile.TemporaryFile("w+") as log:
        engine = AsyncEngine(llm.engine)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            base_url = wait_for_server(proc, log)
            print(f"server up at {base_url}; {args.repeats} repetitions of {args.num_requests} requests x "
                  f"{args.max_tokens} tokens", flush=True)
            rates, steps = runner.run(_alternate(engine, base_url, args, prompts))
        finally:
            stop_server(proc)
            runner.run(engine.shutdown(drain_timeout=0))
        loop_name = type(runner.get_loop()).__module__.split(".")[0]
    inprocess, http = statistics.median(rates["inprocess"]), statistics.median(rates["http"])
    metrics: dict[str, Any] = {
        "http_over_inprocess": http / inprocess, "inprocess_tok_s": inprocess, "http_tok_s": http,
        "inprocess_tok_s_runs": rates["inprocess"], "http_tok_s_runs": rates["http"],
        "inprocess_engine_steps_runs": steps["inprocess"], "http_engine_steps_runs": steps["http"],
        "model": args.model, "device": str(device),
        "dtype": str(next(llm.model.parameters()).dtype).removeprefix("torch."),
        "num_requests": args.num_requests, "prompt_len": args.prompt_len, "max_tokens": args.max_tokens,
        "repeats": args.repeats, "engine_settings": settings, "event_loop": loop_name,
    }
    write_results(output, _command(args, output), metrics, device=device, server_command=shlex.join(cmd))
    print(f"in-process {inprocess:,.1f} tok/s, HTTP {http:,.1f} tok/s, "
          f"http_over_inprocess {metrics['http_over_inprocess']:.3f}\nresults: {output}")
    return metrics


if __name__ == "__main__":
    from lmstack.bench import module_main

    module_main("lmstack.bench.overhead", __doc__, add_arguments, run)
