"""The OpenAI-compatible server, driven over real HTTP by the official `openai` package and httpx.

Most tests share one in-process server (uvicorn in a thread) over the tiny random model; the queue limit
gets its own small server, SIGTERM draining a subprocess of `lmstack serve`, and one test uses SmolLM2.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import openai
import pytest
import uvicorn
from fastapi import FastAPI

from lmstack import LLM, SamplingParams
from lmstack.engine import RequestOutput
from lmstack.engine.async_engine import AsyncEngine, EngineClosedError, EngineStepError, QueueFullError
from lmstack.errors import RequestError
from lmstack.models.tokenizer import Tokenizer
from lmstack.server import create_app

MODEL = "dummy:tiny-llama"
KEY = "test-key"
MAX_MODEL_LEN = 512
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = [{"role": "user", "content": "Say something."}]
LONG = {"ignore_eos": True}  # random weights: without this, a stray EOS could end a request early


@dataclass
class Live:
    url: str
    app: FastAPI
    engine: AsyncEngine
    tokenizer: Tokenizer

    def client(self, api_key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=60)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics").text
        return {m[1]: float(m[2]) for m in re.finditer(r"^(\w+(?:\{[^}]*\})?) (\S+)$", text, re.M)}

    def wait_idle(self, timeout: float = 15.0) -> dict[str, float]:
        """Poll /metrics until no request holds KV blocks (aborts are applied between engine steps)."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            busy = m["lmstack_kv_blocks_used"] or m["lmstack_num_requests_running"] or m["lmstack_num_requests_waiting"]
            if not busy or time.monotonic() > deadline:
                return m
            time.sleep(0.05)


@contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def _live(llm: LLM, name: str = MODEL, max_queue: int | None = None, **app_options) -> tuple[AsyncEngine, FastAPI]:
    engine = AsyncEngine(llm.engine, max_queue=max_queue)
    return engine, create_app(engine, llm.tokenizer, name, **app_options)


@pytest.fixture(scope="module")
def live() -> Iterator[Live]:
    llm = LLM(MODEL, device="cpu", num_kv_blocks=2048, max_model_len=MAX_MODEL_LEN)
    engine, app = _live(llm, api_key=KEY)
    with serve(app) as url:
        yield Live(url, app, engine, llm.tokenizer)


def _prompt_tokens(tok: Tokenizer, messages: list[dict]) -> int:
    return len(tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True)))


def _sse(lines: Iterator[str]) -> Iterator[dict | str]:
    for line in lines:
        if line.startswith("data: "):
            payload = line[len("data: "):]
            yield payload if payload == "[DONE]" else json.loads(payload)


# ----- happy paths -----
def test_chat_completion(live: Live) -> None:
    r = live.client().chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5, extra_body=LONG)
    assert r.object == "chat.completion" and r.model == MODEL
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5
    assert r.usage.prompt_tokens == _prompt_tokens(live.tokenizer, CHAT)
    models = live.client().models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_chat_stream_matches_non_stream_with_usage_and_n(live: Live) -> None:
    client = live.client()
    args = dict(model=MODEL, messages=CHAT, max_tokens=6, temperature=0, extra_body=LONG)
    expected = client.chat.completions.create(**args).choices[0].message.content
    texts, logprob_counts, usage, finishes = ["", ""], [0, 0], None, {}
    stream = client.chat.completions.create(**args, n=2, stream=True, logprobs=True,
                                            stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            logprob_counts[c.index] += len(c.logprobs.content) if c.logprobs else 0
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert texts == [expected, expected]  # greedy: both choices and the non-streamed call agree
    assert logprob_counts == [6, 6] and finishes == {0: "length", 1: "length"}
    assert usage.completion_tokens == 12 and usage.prompt_tokens == _prompt_tokens(live.tokenizer, CHAT)
    assert usage.total_tokens == usage.prompt_tokens + 12


def test_completions_batch_n_and_stream(live: Live) -> None:
    client = live.client()
    r = client.completions.create(model=MODEL, prompt=["Hello", "The sky is"], n=2, max_tokens=4, temperature=0,
                                  extra_body=LONG)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text and r.choices[2].text == r.choices[3].text
    n_prompt = len(live.tokenizer.encode("Hello", add_special_tokens=True)) + len(
        live.tokenizer.encode("The sky is", add_special_tokens=True))
    assert r.usage.completion_tokens == 16 and r.usage.prompt_tokens == n_prompt
    streamed, usage = "", None
    for chunk in client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0, stream=True,
                                           stream_options={"include_usage": True}, extra_body=LONG):
        streamed += "".join(c.text for c in chunk.choices)
        usage = chunk.usage or usage
    assert streamed == r.choices[0].text and usage.completion_tokens == 4
    ids = live.tokenizer.encode("Hello")
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0, extra_body=LONG)
    assert by_ids.choices[0].text == r.choices[0].text


def test_stop_strings_cut_the_text_streamed_or_not(live: Live) -> None:
    client = live.client()
    args = dict(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0, extra_body=LONG)
    full = client.completions.create(**args).choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 3]  # likely spans two tokens: exercises the stream hold-back
    expected = full[: full.index(stop)]
    r = client.completions.create(**args, stop=[stop, "never-appears"])
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(**args, stop=stop, stream=True)
                       if c.choices)
    assert streamed == expected
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0, extra_body=LONG)
    text = chat.choices[0].message.content
    stop = text[3:6]
    cut = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0, extra_body=LONG,
                                         stop=stop)
    assert cut.choices[0].message.content == text[: text.index(stop)]


def test_logprobs(live: Live) -> None:
    client = live.client()
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, logprobs=True, top_logprobs=3,
                                       extra_body=LONG)
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert entry.logprob <= 0 and bytes(entry.bytes).decode() == entry.token
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
    assert client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2).choices[0].logprobs is None
    c = client.completions.create(model=MODEL, prompt="Hi", max_tokens=5, logprobs=2, temperature=0,
                                  extra_body=LONG).choices[0]
    lp = c.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert chosen == pytest.approx(max(top.values()))  # greedy picks the most likely token


def test_seed_makes_sampling_reproducible(live: Live) -> None:
    client = live.client()
    args = dict(model=MODEL, prompt="Hello", max_tokens=8, temperature=1.0, n=2, seed=1234, extra_body=LONG)
    a = [c.text for c in client.completions.create(**args).choices]
    b = [c.text for c in client.completions.create(**args).choices]
    assert a == b and a[0] != a[1]  # each choice gets its own seed derived from `seed`


# ----- errors -----
def _error(resp: httpx.Response, status: int, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code
    return err


def test_bad_bodies_are_400_in_openai_shape(live: Live) -> None:
    client = live.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=CHAT, temperature=-1)
    assert e.value.status_code == 400 and e.value.body["param"] == "temperature"
    post = f"{live.url}/v1/chat/completions"
    assert _error(httpx.post(post, headers=AUTH, json={"model": MODEL}), 400)["param"] == "messages"
    _error(httpx.post(post, headers=AUTH, content=b"{not json"), 400)
    _error(httpx.post(post, headers=AUTH, json={"model": MODEL, "messages": CHAT, "n": 0}), 400)
    _error(httpx.post(post, headers=AUTH, json={"model": MODEL, "messages": CHAT, "bogus": 1}), 400)
    _error(httpx.post(post, headers=AUTH, json={"model": MODEL, "messages": CHAT, "top_logprobs": 2}), 400)
    _error(httpx.post(f"{live.url}/v1/completions", headers=AUTH, json={"model": MODEL, "prompt": []}), 400)
    _error(httpx.post(f"{live.url}/v1/completions", headers=AUTH,
                      json={"model": MODEL, "prompt": [10**9], "max_tokens": 2}), 400)


def test_context_length_exceeded(live: Live) -> None:
    client = live.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "word " * 600}])
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=MAX_MODEL_LEN)
    assert e.value.code == "context_length_exceeded"


def test_auth(live: Live) -> None:
    with pytest.raises(openai.AuthenticationError):
        live.client(api_key="wrong").chat.completions.create(model=MODEL, messages=CHAT, max_tokens=1)
    _error(httpx.post(f"{live.url}/v1/completions", json={"model": MODEL, "prompt": "Hi"}), 401, "invalid_api_key")
    _error(httpx.get(f"{live.url}/v1/models"), 401)
    assert httpx.get(f"{live.url}/health").status_code == 200  # health and metrics stay open
    assert httpx.get(f"{live.url}/metrics").status_code == 200


def test_unknown_model_is_404(live: Live) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        live.client().chat.completions.create(model="gpt-9", messages=CHAT, max_tokens=1)
    assert e.value.code == "model_not_found"
    _error(httpx.get(f"{live.url}/v1/models/gpt-9", headers=AUTH), 404, "model_not_found")
    _error(httpx.get(f"{live.url}/no/such/route"), 404)


def test_body_size_limit_is_413(live: Live) -> None:
    with pytest.raises(openai.APIStatusError) as e:
        live.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x" * (5 << 20)}])
    assert e.value.status_code == 413

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit must hold on the streamed size too
        yield b'{"model": "%s", "prompt": "' % MODEL.encode()
        for _ in range(80):
            yield b"y" * (64 << 10)
        yield b'"}'

    _error(httpx.post(f"{live.url}/v1/completions", headers=AUTH, content=chunked()), 413, "request_too_large")


def test_draining_server_answers_503(live: Live) -> None:
    state = live.app.state.lmstack
    state.draining = True
    try:
        with pytest.raises(openai.InternalServerError) as e:
            live.client().completions.create(model=MODEL, prompt="Hi", max_tokens=1)
        assert e.value.status_code == 503
        assert httpx.get(f"{live.url}/health").status_code == 503
    finally:
        state.draining = False
    assert httpx.get(f"{live.url}/health").status_code == 200


def test_engine_failure_fails_the_request_not_the_server(live: Live) -> None:
    inner = live.engine.engine
    step = inner.step

    def broken(on_launch: object = None) -> list:
        inner.step = step
        raise RuntimeError("injected fault")

    inner.step = broken
    with pytest.raises(openai.InternalServerError) as e:
        live.client().completions.create(model=MODEL, prompt="Hi", max_tokens=3)
    assert e.value.status_code == 500 and "injected fault" in e.value.message
    m = live.wait_idle()
    assert m["lmstack_kv_blocks_used"] == m["lmstack_num_requests_waiting"] == 0
    assert live.client().completions.create(model=MODEL, prompt="Hi", max_tokens=3, extra_body=LONG).usage \
        .completion_tokens == 3


# ----- disconnects and load -----
def test_disconnect_aborts_and_frees_kv_blocks(live: Live, monkeypatch: pytest.MonkeyPatch) -> None:
    inner = live.engine.engine
    step = inner.step

    def slow_step(on_launch: object = None) -> list:  # ~20 ms a token: requests surely still run when clients leave
        time.sleep(0.02)
        return step(on_launch)

    monkeypatch.setattr(inner, "step", slow_step)
    before = live.metrics()
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 400, "stream": True, **LONG}
    with httpx.stream("POST", f"{live.url}/v1/completions", headers=AUTH, json=body, timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # held: dropping a half-read iterator would already close the connection
        for _ in range(4):
            next(lines)
        assert live.metrics()["lmstack_kv_blocks_used"] > 0
    # a non-streaming client that gives up (read timeout) also aborts its request
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{live.url}/v1/completions", headers=AUTH, timeout=0.5,
                   json={"model": MODEL, "prompt": "Hi", "max_tokens": 450, **LONG})
    m = live.wait_idle()
    assert m["lmstack_kv_blocks_used"] == 0 and m["lmstack_num_requests_running"] == 0
    assert m["lmstack_requests_aborted_total"] == before["lmstack_requests_aborted_total"] + 2
    assert m["lmstack_generation_tokens_total"] == before["lmstack_generation_tokens_total"]  # neither finished


def test_load_with_disconnects_and_malformed_bodies(live: Live) -> None:
    rng = random.Random(0)
    leaving = set(rng.sample(range(40), 10))  # these leave after two chunks, long before their 200 tokens
    plans = [(200 if i in leaving else rng.randint(4, 12), i in leaving) for i in range(40)]
    before = live.metrics()

    async def client(http: httpx.AsyncClient, max_tokens: int, disconnect: bool) -> str | int:
        body = {"model": MODEL, "messages": CHAT, "max_tokens": max_tokens, "stream": True,
                "stream_options": {"include_usage": True}, **LONG}
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            chunks, usage, done = 0, None, False
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    continue
                chunk = json.loads(line[6:])
                chunks += 1
                usage = chunk.get("usage") or usage
                if disconnect and chunks == 2:
                    return "aborted"  # leaving the `async with` closes the connection
            assert done
            return usage["completion_tokens"]

    async def malformed(http: httpx.AsyncClient, body: bytes) -> int:
        return (await http.post("/v1/chat/completions", content=body)).status_code

    async def main() -> tuple[list, list]:
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
        async with httpx.AsyncClient(base_url=live.url, headers=AUTH, timeout=60, limits=limits) as http:
            bad = [b"{", b'{"model": "%s"}' % MODEL.encode(), b"[]", b'{"model": 1, "messages": 2}']
            results = await asyncio.gather(*(client(http, n, d) for n, d in plans),
                                           *(malformed(http, b) for b in bad))
        return results[:len(plans)], results[len(plans):]

    results, bad_statuses = asyncio.run(main())
    assert bad_statuses == [400] * 4
    assert results == [("aborted" if disconnect else max_tokens) for max_tokens, disconnect in plans]
    m = live.wait_idle()
    assert m["lmstack_kv_blocks_used"] == 0 and m["lmstack_num_requests_waiting"] == 0
    assert m["lmstack_requests_aborted_total"] - before["lmstack_requests_aborted_total"] == len(leaving)
    completed = sum(n for n, disconnect in plans if not disconnect)
    assert m["lmstack_generation_tokens_total"] - before["lmstack_generation_tokens_total"] == completed
    assert httpx.get(f"{live.url}/health").status_code == 200


def test_queue_full_is_429() -> None:
    llm = LLM(MODEL, device="cpu", num_kv_blocks=256, max_num_seqs=1)
    engine, app = _live(llm, max_queue=1)
    with serve(app) as url:
        async def one(http: httpx.AsyncClient) -> httpx.Response:
            return await http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 30, **LONG})

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=60) as http:
                return await asyncio.gather(*(one(http) for _ in range(6)))

        responses = asyncio.run(burst())
        statuses = sorted(r.status_code for r in responses)
        assert 429 in statuses and 200 in statuses and set(statuses) <= {200, 429}
        for r in responses:
            if r.status_code == 429:
                _error(r, 429, "rate_limit_exceeded")
                assert r.headers["Retry-After"]
            else:
                assert r.json()["usage"]["completion_tokens"] == 30
        assert engine.stats().kv_blocks_used == 0


# ----- the AsyncEngine on its own -----
def test_async_engine_abort_shutdown_and_errors() -> None:
    llm = LLM(MODEL, device="cpu", num_kv_blocks=256)
    engine = AsyncEngine(llm.engine, max_queue=2)
    params = SamplingParams(max_tokens=20, ignore_eos=True)

    async def main() -> None:
        async for out in engine.generate([1, 2, 3], params):  # a consumer that stops early aborts
            if len(out.outputs[0].token_ids) >= 2:
                break
        outs = []
        async for out in engine.generate([1, 2, 3], params, request_id="mine"):  # abort() ends the stream
            outs.append(out)
            engine.abort("mine")
        assert not outs[-1].finished and len(outs) <= 2
        results = await asyncio.gather(*(_drain(engine.generate([1, 2], params)) for _ in range(4)),
                                       return_exceptions=True)
        assert sum(isinstance(r, QueueFullError) for r in results) == 2
        assert [len(r.outputs[0].token_ids) for r in results if not isinstance(r, Exception)] == [20, 20]
        with pytest.raises(RequestError):  # the engine rejects an over-long prompt
            await _drain(engine.generate([1] * 3000, params))
        step = llm.engine.step

        def broken(on_launch: object = None) -> list:
            llm.engine.step = step
            raise ValueError("boom")

        llm.engine.step = broken
        with pytest.raises(EngineStepError, match="boom"):
            await _drain(engine.generate([1, 2], params))
        long = asyncio.ensure_future(_drain(engine.generate([4, 5], SamplingParams(max_tokens=40, ignore_eos=True))))
        await asyncio.sleep(0.05)
        await engine.shutdown(drain_timeout=30)  # in-flight work finishes first
        assert len((await long).outputs[0].token_ids) == 40
        with pytest.raises(EngineClosedError):
            await _drain(engine.generate([1], params))

    asyncio.run(main())
    assert not engine.is_running and engine.stats().kv_blocks_used == 0


async def _drain(gen: AsyncIterator[RequestOutput]) -> RequestOutput | None:
    """The last output of a generation."""
    last = None
    async for out in gen:
        last = out
    return last


# ----- the CLI: SIGTERM drains -----
def test_sigterm_drains_in_flight_requests_then_exits_0() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "lmstack.cli", "serve", "--model", MODEL, "--port", "0",
                             "--num-kv-blocks", "256", "--device", "cpu", "--drain-timeout", "30"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith(f"serving {MODEL} on http://127.0.0.1:"), line + proc.stderr.read()
        url = line.split()[-1]
        body = {"model": MODEL, "prompt": "Hi", "max_tokens": 300, "stream": True,
                "stream_options": {"include_usage": True}, **LONG}
        usage, after_signal, done = None, 0, False
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            events = _sse(r.iter_lines())
            next(events)
            proc.send_signal(signal.SIGTERM)
            for event in events:
                after_signal += 1
                if event == "[DONE]":
                    done = True
                else:
                    usage = event["usage"] or usage
        assert done and after_signal > 1 and usage["completion_tokens"] == 300
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ----- a real model -----
@pytest.mark.slow
def test_smollm2_chat_is_sensible(smollm_path) -> None:
    llm = LLM(str(smollm_path), device="cpu", dtype="float32", num_kv_blocks=256, max_model_len=512)
    _, app = _live(llm, name="smollm2")
    with serve(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        r = client.chat.completions.create(model="smollm2", temperature=0, max_tokens=24, messages=[
            {"role": "user", "content": "What is the capital of France? Answer in one sentence."}])
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
