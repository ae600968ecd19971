"""Online serving benchmark against an OpenAI-compatible URL, with `vllm bench serve`'s metric definitions.

ShareGPT prompts arrive as a Poisson process (exponential gaps at `--request-rate`; `--burst` sends them all
at t=0) and stream from `/v1/completions` (or chat); `lmstack.bench.serving_metrics` turns the per-request
timings into vLLM's aggregates. `--load-test` runs `lmstack.bench.load_test` instead. The streaming client
here is shared by both, and by `lmstack.bench.overhead`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import shlex
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from lmstack.bench.http import HTTP_ERRORS, BenchClient, response_error
from lmstack.bench.results import write_results
from lmstack.bench.serving_metrics import RequestRecord, compute_metrics, parse_slo
from lmstack.client.openai_client import api_root
from lmstack.data.sharegpt import BenchRequest, sample_requests
from lmstack.errors import LmstackError

DEFAULT_OUTPUT = "benchmarks/results/serve_bench.json"
DEFAULT_LOAD_OUTPUT = "benchmarks/results/serve_load.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", required=True, help="server root, e.g. http://127.0.0.1:8000 (or /v1)")
    parser.add_argument("--model", default=None, help="served model name (default: first of GET /v1/models)")
    parser.add_argument("--tokenizer", default=None,
                        help="model whose tokenizer samples and measures prompts (default: --model)")
    parser.add_argument("--api-key", default=None, help="bearer key, when the server was started with one")
    parser.add_argument("--endpoint", choices=("completions", "chat"), default="completions",
                        help="stream /v1/completions (raw prompt) or /v1/chat/completions (one user turn)")
    parser.add_argument("--dataset", choices=("sharegpt",), default="sharegpt")
    parser.add_argument("--num-prompts", type=int, default=200, help="requests per rate (default 200)")
    rate = parser.add_mutually_exclusive_group()
    rate.add_argument("--request-rate", type=float, default=None, help="Poisson arrivals, requests/s")
    rate.add_argument("--burst", action="store_true", help="send every request at t=0")
    rate.add_argument("--sweep", default=None,
                      help="comma-separated request rates run one after the other, e.g. 1,2,4,8; "
                           "writes the JSON list and a latency-vs-rate PNG beside --output")
    parser.add_argument("--replay-lengths", action="store_true",
                        help="decode exactly each ShareGPT answer's length (max_tokens + ignore_eos)")
    parser.add_argument("--slo", default=None, help="goodput SLOs in ms, e.g. ttft=500,tpot=50 (also e2e=)")
    parser.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    parser.add_argument("--max-model-len", type=int, default=2048,
                        help="prompt + answer length limit when sampling prompts (default 2048)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds one request may take")
    parser.add_argument("--seed", type=int, default=0, help="prompt sampling and arrival times")
    parser.add_argument("--output", default=None, help=f"results JSON (default {DEFAULT_OUTPUT})")
    load = parser.add_argument_group("load test (--load-test)")
    load.add_argument("--load-test", action="store_true",
                      help="robustness check: concurrent streams, early hang-ups, malformed bodies, KV leaks")
    load.add_argument("--num-clients", type=int, default=200)
    load.add_argument("--disconnect-fraction", type=float, default=0.25)
    load.add_argument("--malformed", type=int, default=20, help="malformed request bodies mixed in")
    load.add_argument("--max-tokens", type=int, default=32, help="tokens per load-test request (upper bound)")


# ---------------------------------------------------------------- arrivals

def arrival_offsets(n: int, rate: float, seed: int = 0) -> list[float]:
    """Send times (s after start) of a Poisson process: the first at 0, then exponential gaps of mean 1/rate.

    `rate=inf` is a burst: every request at 0.
    """
    if n < 1:
        return []
    if math.isinf(rate):
        return [0.0] * n
    if not rate > 0:
        raise LmstackError(f"request rate must be > 0 (or inf for a burst), got {rate}")
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=n - 1)
    return [0.0, *np.cumsum(gaps).tolist()]


def parse_rates(text: str) -> list[float]:
    try:
        rates = [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        rates = []
    if not rates or not all(0 < r < math.inf for r in rates):
        raise LmstackError(f"--sweep takes positive finite rates like 1,2,4,8 (got {text!r}); "
                           "run --burst separately")
    return rates


# ---------------------------------------------------------------- one streamed request

def _chunk_text(chunk: dict[str, Any]) -> tuple[str, str | None]:
    """(new text, finish reason) of a completions or chat stream chunk."""
    choices = chunk.get("choices") or []
    if not choices:
        return "", None
    c = choices[0]
    text = c.get("text") if "text" in c else (c.get("delta") or {}).get("content")
    return text or "", c.get("finish_reason")


def request_body(endpoint: str, model: str, prompt: str | list[int], max_tokens: int,
                 ignore_eos: bool) -> dict[str, Any]:
    """A greedy streaming request that reports usage; a token-id prompt only fits the completions endpoint."""
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
                            "stream_options": {"include_usage": True}}
    if ignore_eos:
        body["ignore_eos"] = True
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


def _path(endpoint: str) -> str:
    return "/chat/completions" if endpoint == "chat" else "/completions"


async def stream_request(http: BenchClient, endpoint: str, body: dict[str, Any], prompt_tokens: int,
                         stop_after: int | None = None) -> RequestRecord:
    """Send one streaming request and time it; `stop_after=k` hangs up after k content chunks."""
    record = RequestRecord(success=False, prompt_tokens=prompt_tokens)
    start = last = time.perf_counter()
    chunks = 0
    try:
        async with http.post(_path(endpoint), body) as response:
            if response.status != 200:
                record.error = await response_error(response)
                record.finish_reason = f"http_{response.status}"
                return record
            async for raw in response.content:  # one line at a time
                if not raw.startswith(b"data:"):
                    continue
                data = raw[5:].decode().strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    record.error = f"error in stream: {chunk['error']}"
                    return record
                usage = chunk.get("usage")
                if isinstance(usage, dict):
                    record.output_tokens = int(usage.get("completion_tokens") or 0)
                    record.prompt_tokens = int(usage.get("prompt_tokens") or prompt_tokens)
                text, finish = _chunk_text(chunk)
                record.finish_reason = finish or record.finish_reason
                if not text:
                    continue
                now = time.perf_counter()
                if chunks == 0:
                    record.ttft = now - start
                else:
                    record.itl.append(now - last)
                last = now
                chunks += 1
                if stop_after is not None and chunks >= stop_after:
                    record.finish_reason = "client_disconnect"
                    return record
    except HTTP_ERRORS as e:
        record.error = f"{type(e).__name__}: {e}"
        return record
    record.e2e = time.perf_counter() - start
    if chunks == 0:
        record.error = "the stream carried no tokens"
        return record
    record.output_tokens = record.output_tokens or chunks
    record.success = True
    return record


# ---------------------------------------------------------------- the benchmark

def load_tokenizer(name: str) -> Any:
    """The tokenizer of a model name, without loading weights; dummy models borrow the default model's."""
    from lmstack.models import DEFAULT_MODEL, Tokenizer
    from lmstack.models.dummy import dummy_config
    from lmstack.models.loader import resolve_model_path

    if name.startswith("dummy:"):
        _, folder = dummy_config(name.removeprefix("dummy:"))
        if folder is not None and (folder / "tokenizer.json").is_file():
            return Tokenizer.from_folder(folder)
        return Tokenizer.from_folder(resolve_model_path(DEFAULT_MODEL))
    return Tokenizer.from_folder(resolve_model_path(name))


def http_client(base_url: str, api_key: str | None, timeout: float, connections: int | None) -> BenchClient:
    return BenchClient(base_url, api_key, timeout, connections)


async def served_model(base_url: str, api_key: str | None) -> str:
    """The first model the server lists: what to benchmark when --model is not given."""
    async with http_client(base_url, api_key, 30.0, 1) as http:
        try:
            status, body, message = await http.get_json("/models")
        except HTTP_ERRORS as e:
            raise LmstackError(f"cannot reach {api_root(base_url)}/models ({e}); is the server up?") from None
        if status != 200:
            raise LmstackError(f"GET {api_root(base_url)}/models answered {status}: {message}")
        models = (body.get("data") if isinstance(body, dict) else None) or []
    if not models:
        raise LmstackError(f"{api_root(base_url)}/models lists no model; pass --model")
    return str(models[0]["id"])


async def check_server(http: BenchClient, endpoint: str, model: str) -> None:
    """One tiny request first, so a wrong URL, model or key fails at once instead of N times."""
    record = await stream_request(http, endpoint, request_body(endpoint, model, "Hello", 2, True), 0)
    if not record.success:
        raise LmstackError(f"the test request to {http.base_url}{_path(endpoint).lstrip('/')} for model "
                           f"{model!r} failed: {record.error}; check --base-url, --model and --api-key")


async def _run_rate(args: argparse.Namespace, model: str, requests: list[BenchRequest],
                    rate: float) -> tuple[list[RequestRecord], float]:
    offsets = arrival_offsets(len(requests), rate, args.seed)
    gate = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    connections = args.max_concurrency or len(requests)
    async with http_client(args.base_url, args.api_key, args.timeout, connections) as http:
        await check_server(http, args.endpoint, model)
        label = "burst" if math.isinf(rate) else f"{rate:g} req/s"
        bar = tqdm(total=len(requests), desc=f"bench serve {label}", unit="req", dynamic_ncols=True)
        start = time.perf_counter()

        async def one(offset: float, req: BenchRequest) -> RequestRecord:
            await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
            body = request_body(args.endpoint, model, req.prompt, req.output_len, args.replay_lengths)
            if gate is None:
                record = await stream_request(http, args.endpoint, body, len(req.prompt_token_ids))
            else:
                async with gate:
                    record = await stream_request(http, args.endpoint, body, len(req.prompt_token_ids))
            bar.update(1)
            return record

        try:
            records = await asyncio.gather(*(one(o, r) for o, r in zip(offsets, requests, strict=True)))
        finally:
            bar.close()
        return list(records), time.perf_counter() - start


def _command(args: argparse.Namespace, output: Path) -> str:
    """The command that reproduces this run, every option spelled out (sys.argv may be pytest's)."""
    parts = ["lmstack", "bench", "serve"]
    names = (("base_url", "model", "tokenizer", "endpoint", "num_clients", "disconnect_fraction", "malformed",
              "max_tokens", "timeout", "seed") if args.load_test else
             ("base_url", "model", "tokenizer", "endpoint", "dataset", "num_prompts", "request_rate", "sweep",
              "slo", "max_concurrency", "max_model_len", "timeout", "seed"))
    for name in names:
        value = getattr(args, name)
        if value is not None:
            parts += [f"--{name.replace('_', '-')}", str(value)]
    flags = {"--load-test": args.load_test, "--burst": args.burst, "--replay-lengths": args.replay_lengths}
    parts += [flag for flag, on in flags.items() if on]
    return shlex.join([*parts, "--output", str(output)])


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark (or the load test) that `args` describe, write the results file, return metrics."""
    output = Path(args.output or (DEFAULT_LOAD_OUTPUT if args.load_test else DEFAULT_OUTPUT))
    if args.load_test:
        from lmstack.bench.load_test import run_load_test  # it builds on this module's client

        metrics = asyncio.run(run_load_test(
            args.base_url, args.model, num_clients=args.num_clients, malformed=args.malformed,
            disconnect_fraction=args.disconnect_fraction, max_tokens=args.max_tokens, seed=args.seed,
            api_key=args.api_key, timeout=args.timeout))
        write_results(output, _command(args, output), metrics, base_url=args.base_url)
        _print_rows(metrics, output)
        return metrics
    if args.num_prompts < 1:
        raise LmstackError(f"--num-prompts must be >= 1, got {args.num_prompts}")
    if args.request_rate is None and not args.burst and args.sweep is None:
        raise LmstackError("say how requests arrive: --request-rate R, --burst or --sweep 1,2,4")
    rates = (parse_rates(args.sweep) if args.sweep else
             [math.inf] if args.burst else [float(args.request_rate)])
    slo = parse_slo(args.slo)
    model = args.model or asyncio.run(served_model(args.base_url, args.api_key))
    tokenizer = load_tokenizer(args.tokenizer or model)
    requests = sample_requests(tokenizer, args.num_prompts, seed=args.seed,
                               max_prompt_len=args.max_model_len // 2, max_total_len=args.max_model_len)
    runs = []
    for rate in rates:
        records, duration = asyncio.run(_run_rate(args, model, requests, rate))
        metrics = {"request_rate": "inf" if math.isinf(rate) else rate,
                   **compute_metrics(records, duration, slo)}
        errors = [r.error for r in records if not r.success]
        if errors:
            metrics["errors"] = errors[:5]
        runs.append(metrics)
        print(f"== {model} at {metrics['request_rate']} req/s ==")
        _print_rows(metrics, None)
    extra = {"base_url": args.base_url, "model": model, "endpoint": args.endpoint,
             "replay_lengths": args.replay_lengths}
    if args.sweep:
        result: dict[str, Any] = {"sweep": runs}
        write_results(output, _command(args, output), result, **extra)
        plot = output.with_suffix(".png")
        plot_sweep(runs, plot, title=f"{model} @ {args.base_url}")
        print(f"results: {output}\nplot: {plot}")
        return result
    write_results(output, _command(args, output), runs[0], **extra)
    print(f"results: {output}")
    return runs[0]


def _print_rows(metrics: dict[str, Any], output: Path | None) -> None:
    rows = [(k, v) for k, v in metrics.items() if isinstance(v, int | float)]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        shown = f"{value:,.3f}" if isinstance(value, float) else str(value)  # bools and ints as they are
        print(f"  {key:<{width}}  {shown:>14}")
    if output is not None:
        print(f"results: {output}")


def plot_sweep(runs: list[dict[str, Any]], path: Path, title: str) -> None:
    """TTFT, TPOT, ITL and E2E (mean, median, p99) against the offered request rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = [r["request_rate"] for r in runs]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    for ax, name in zip(axes.flat, ("ttft", "tpot", "itl", "e2e"), strict=True):
        for stat in ("mean", "median", "p99"):
            values = [r[f"{stat}_{name}_ms"] for r in runs]
            ax.plot(rates, [math.nan if v is None else v for v in values], marker="o", label=stat)
        ax.set_title(name.upper())
        ax.set_ylabel("ms")
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("request rate (req/s)")
        if max(rates) >= 8 * min(rates):  # doubling sweeps (1,2,4,8,...) read best on a log axis
            ax.set_xscale("log", base=2)
    axes[0][0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
