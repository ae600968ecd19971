"""The serving robustness load test (`lmstack bench serve --load-test`).

Many concurrent streaming clients, a random share of them hanging up early, malformed bodies mixed in. It
passes when the server stays up, every request that was not hung up on ends with exactly the tokens it asked
for, and the server's KV-blocks-in-use gauge returns to zero: an abort that forgets its blocks would
otherwise starve the server slowly, long after the test that caused it.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from typing import Any
from urllib.parse import urlsplit

from tqdm.auto import tqdm

from lmstack.bench.http import HTTP_ERRORS, BenchClient
from lmstack.bench.serve import check_server, http_client, request_body, served_model, stream_request
from lmstack.bench.serving_metrics import RequestRecord
from lmstack.client.openai_client import api_root, is_retryable
from lmstack.errors import LmstackError

KV_BLOCKS_METRIC = "lmstack_kv_blocks_used"  # lmstack.server.metrics: KV-cache blocks held by requests

_MALFORMED: tuple[str, ...] = (
    "{not json",
    "[]",
    '{"model": MODEL}',
    '{"model": MODEL, "prompt": "hi", "max_tokens": "ten"}',
    '{"model": MODEL, "prompt": "hi", "max_tokens": -5}',
    '{"model": MODEL, "prompt": "hi", "temperature": -1}',
    '{"model": MODEL, "prompt": 42, "stream": true}',
    '{"model": MODEL, "prompt": "hi", "top_p": 7, "stream": true}',
)


def kv_blocks_in_use(metrics_text: str, name: str = KV_BLOCKS_METRIC) -> float | None:
    """The KV-blocks-in-use gauge from Prometheus text, summed over label sets; None when absent."""
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{[^}}]*\}})?\s+(\S+)", re.MULTILINE)
    values = [float(v) for v in pattern.findall(metrics_text)]
    return sum(values) if values else None


async def _post_malformed(http: BenchClient, body: str) -> int | None:
    try:
        return await http.post_raw("/completions", body.encode())
    except HTTP_ERRORS:
        return None


async def _stream_with_retry(http: BenchClient, body: dict[str, Any], stop_after: int | None,
                             attempts: int = 20) -> RequestRecord:
    """A polite client: when the server sheds load (429/503) it backs off and tries again."""
    for attempt in range(attempts - 1):
        record = await stream_request(http, "completions", body, 0, stop_after=stop_after)
        status = record.finish_reason or ""
        if not (status.startswith("http_") and is_retryable(int(status[5:]))):
            return record
        await asyncio.sleep(min(2.0, 0.05 * 2**attempt) * random.random())
    return await stream_request(http, "completions", body, 0, stop_after=stop_after)


async def _get_root(http: BenchClient, root: str, path: str) -> tuple[int, str] | None:
    """(status, text) of a GET at the server root (outside /v1); None when the server does not answer at all."""
    try:
        return await http.get_text(f"{root}{path}")
    except HTTP_ERRORS:
        return None


async def _wait_kv_free(http: BenchClient, root: str, settle_s: float) -> float | None:
    """KV blocks in use, polled until zero or `settle_s` passes: aborts free their blocks a step later."""
    deadline = time.perf_counter() + settle_s
    while True:
        response = await _get_root(http, root, "/metrics")
        ok = response is not None and response[0] == 200
        used = kv_blocks_in_use(response[1]) if ok else None
        if used == 0 or time.perf_counter() > deadline:
            return used
        await asyncio.sleep(0.2)


def _got_exactly(record: RequestRecord, want: int) -> bool:
    """Ended on its own with exactly the tokens asked for: with ignore_eos that is the only right answer."""
    return record.success and record.output_tokens == want and record.finish_reason == "length"


async def run_load_test(base_url: str, model: str | None = None, *, num_clients: int = 200,
                        disconnect_fraction: float = 0.25, malformed: int = 20, max_tokens: int = 32,
                        seed: int = 0, api_key: str | None = None, timeout: float = 300.0,
                        settle_s: float = 10.0) -> dict[str, Any]:
    """Concurrent streaming clients, some hanging up early, malformed bodies mixed in; then count leaks.

    Every client asks for an exact number of tokens (`ignore_eos`). One that stays connected must get them,
    with finish_reason "length"; `requests_lost` counts those that did not. A client meant to hang up after
    k content chunks may see its request finish first (one chunk can carry several tokens): that is a
    success, counted in `requests_ok` (and in `leavers_finished_first`), held to the same exact-count check.
    `kv_blocks_leaked` is the server's KV-blocks-in-use gauge once everything has ended (None when the server
    exposes none).
    """
    if num_clients < 1 or not 0 <= disconnect_fraction <= 1 or malformed < 0 or max_tokens < 2:
        raise LmstackError("load test needs num_clients >= 1, 0 <= disconnect_fraction <= 1, malformed >= 0 "
                           "and max_tokens >= 2")
    model = model or await served_model(base_url, api_key)
    rng = random.Random(seed)
    leaving = set(rng.sample(range(num_clients), round(num_clients * disconnect_fraction)))
    async with http_client(base_url, api_key, timeout, num_clients + malformed + 2) as http:
        await check_server(http, "completions", model)
        jobs: list[tuple[str, Any, asyncio.Future[Any]]] = []
        start = time.perf_counter()
        for i in range(num_clients):
            want = rng.randint(max(2, max_tokens // 2), max_tokens)
            words = " ".join(rng.choice(("alpha", "beta", "gamma", "delta", "sea", "sky")) for _ in range(8))
            body = request_body("completions", model, f"Client {i}: {words}", want, ignore_eos=True)
            stop_after = rng.randint(1, want // 2) if i in leaving else None
            jobs.append(("leave" if i in leaving else "stay", want,
                         asyncio.ensure_future(_stream_with_retry(http, body, stop_after))))
        for j in range(malformed):
            body = _MALFORMED[j % len(_MALFORMED)].replace("MODEL", json.dumps(model))
            jobs.append(("malformed", body, asyncio.ensure_future(_post_malformed(http, body))))
        rng.shuffle(jobs)
        bar = tqdm(total=len(jobs), desc="load test", unit="req", dynamic_ncols=True)
        for job in jobs:
            job[2].add_done_callback(lambda _: bar.update(1))
        try:
            await asyncio.gather(*(job[2] for job in jobs))
        finally:
            bar.close()
        duration = time.perf_counter() - start
        root = "{0.scheme}://{0.netloc}".format(urlsplit(api_root(base_url)))
        health = await _get_root(http, root, "/health")
        leaked = await _wait_kv_free(http, root, settle_s)
    ok = aborted = lost = rejected = unexpected = leavers_finished = 0
    problems: list[str] = []
    for kind, want, future in jobs:
        result = future.result()
        if kind == "malformed":
            good = result is not None and 400 <= result < 500 and result != 429
            rejected += good
            unexpected += not good
            if not good:
                problems.append(f"malformed body {want!r} answered {result}")
        elif kind == "leave" and result.finish_reason == "client_disconnect":
            aborted += 1
        elif _got_exactly(result, want):
            ok += 1
            leavers_finished += kind == "leave"
        else:
            lost += 1
            problems.append(f"wanted {want} tokens, got {result.output_tokens} "
                            f"(finish {result.finish_reason}) {result.error}".strip())
    return {"model": model, "num_clients": num_clients, "disconnect_fraction": disconnect_fraction,
            "requests_ok": ok, "requests_aborted": aborted, "requests_lost": lost,
            "leavers_finished_first": leavers_finished,
            "kv_blocks_leaked": None if leaked is None else int(leaked), "malformed_sent": malformed,
            "malformed_rejected": rejected, "malformed_unexpected": unexpected, "duration_s": duration,
            "server_up": health is not None and health[0] == 200,
            "problems": problems[:10]}
