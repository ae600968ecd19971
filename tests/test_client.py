"""One client suite for both clients: LocalClient in-process and OpenAIClient against a live lmstack server.

The retry, backoff and concurrency tests use a small scripted HTTP app instead: they test how the client
treats overload and faults, which a healthy server does not produce on demand.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from conftest import free_port, live_server
from lmstack import LLM
from lmstack.client import Completion, GenParams, LLMClient, LocalClient, OpenAIClient
from lmstack.errors import LmstackError

MODEL = "dummy:tiny-llama"
API_KEY = "client-suite-key"
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Tell me a story about a dragon and a knight"}],
    [{"role": "user", "content": "What is two plus two? Answer with one number and nothing else, please."},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And three plus three?"}],
]
PROMPTS = ["The sea", "Once upon a time there was", "def add(a, b):\n    return a + b\n\n# now multiply"]
GREEDY = GenParams(max_tokens=6, temperature=0.0, extra={"ignore_eos": True})


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A real `lmstack serve` of the tiny random model; yields (base URL, served model name)."""
    with live_server(["--model", MODEL, "--api-key", API_KEY], tmp_path_factory.mktemp("server")) as url:
        models = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).json()
        yield url, models["data"][0]["id"]


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(MODEL, device="cpu")


ClientFactory = Callable[..., Any]


@pytest.fixture(params=["local", "openai"])
def make_client(request: pytest.FixtureRequest, llm: LLM) -> ClientFactory:
    """Builds the client under test, with any extra options (e.g. cache_dir)."""
    if request.param == "local":
        return lambda **kw: LocalClient(llm, name=MODEL, **kw)
    url, served = request.getfixturevalue("server")
    return lambda **kw: OpenAIClient(url, served, api_key=API_KEY, **kw)


def test_both_clients_satisfy_the_protocol(make_client: ClientFactory) -> None:
    assert isinstance(make_client(), LLMClient)


def test_batches_come_back_in_input_order(make_client: ClientFactory) -> None:
    client = make_client()
    for call, inputs in ((client.chat, CONVERSATIONS), (client.complete, PROMPTS)):
        batch = call(inputs, GREEDY)
        singles = [call([x], GREEDY)[0] for x in inputs]
        assert [c.text for c in batch] == [c.text for c in singles]
        prompt_tokens = [c.usage.prompt_tokens for c in batch]
        assert prompt_tokens == sorted(prompt_tokens) and len(set(prompt_tokens)) == len(inputs)


def test_max_tokens_is_respected(make_client: ClientFactory) -> None:
    client = make_client()
    for completion in client.complete(PROMPTS, GenParams(max_tokens=5, temperature=0.0,
                                                         extra={"ignore_eos": True})):
        assert completion.usage.completion_tokens == 5
        assert completion.finish_reason == "length"
        assert completion.token_ids is None or len(completion.token_ids) == 5
    short = client.chat(CONVERSATIONS, GenParams(max_tokens=2, temperature=0.0))
    assert all(c.usage.completion_tokens <= 2 for c in short)


def test_greedy_and_seeded_sampling_are_deterministic(make_client: ClientFactory) -> None:
    client = make_client()
    assert [c.text for c in client.chat(CONVERSATIONS, GREEDY)] == [c.text for c in client.chat(CONVERSATIONS,
                                                                                                GREEDY)]
    seeded = GenParams(max_tokens=6, temperature=1.0, seed=1234, extra={"ignore_eos": True})
    assert [c.text for c in client.complete(PROMPTS, seeded)] == [c.text for c in client.complete(PROMPTS,
                                                                                                  seeded)]


def test_logprobs_have_one_entry_per_token_with_top_alternatives(make_client: ClientFactory) -> None:
    client = make_client()
    params = GenParams(max_tokens=4, temperature=0.0, logprobs=3, extra={"ignore_eos": True})
    for completion in client.chat(CONVERSATIONS[:2], params) + client.complete(PROMPTS[:2], params):
        assert completion.logprobs is not None and len(completion.logprobs) == 4
        for lp in completion.logprobs:
            assert lp.logprob <= 0.0
            assert 1 <= len(lp.top) <= 3
            # Greedy picks the argmax, so no alternative is more likely than the chosen token.
            assert lp.logprob >= max(lp.top.values()) - 1e-4
    assert client.complete(PROMPTS[:1], GREEDY)[0].logprobs is None


def test_disk_cache_answers_without_a_model_call(make_client: ClientFactory, tmp_path) -> None:
    client = make_client(cache_dir=tmp_path)
    first = client.chat(CONVERSATIONS, GREEDY)
    sent = client.num_requests
    assert sent >= len(CONVERSATIONS) and client.num_cache_hits == 0
    again = client.chat(CONVERSATIONS, GREEDY)
    assert client.num_requests == sent and client.num_cache_hits == len(CONVERSATIONS)
    assert again == first
    fresh = make_client(cache_dir=tmp_path)  # a new process would see the same files
    assert fresh.chat(CONVERSATIONS, GREEDY) == first and fresh.num_requests == 0
    fresh.chat(CONVERSATIONS[:1], GenParams(max_tokens=3, temperature=0.0))  # other params: a miss
    assert fresh.num_requests == 1
    assert not list(tmp_path.rglob("*.tmp"))


def test_user_mistakes_are_clear_errors(make_client: ClientFactory) -> None:
    client = make_client()
    with pytest.raises(LmstackError, match="list"):
        client.chat(CONVERSATIONS[0], GREEDY)  # one conversation, not a batch of them
    with pytest.raises(LmstackError, match="no embedding model"):
        client.embed(["text"])


def test_local_and_server_give_the_same_greedy_text(llm: LLM, server: tuple[str, str]) -> None:
    local = LocalClient(llm, name=MODEL).complete(PROMPTS, GREEDY)
    remote = OpenAIClient(server[0], server[1], api_key=API_KEY).complete(PROMPTS, GREEDY)
    assert [c.text for c in local] == [c.text for c in remote]


# ---------------------------------------------------------------- OpenAIClient only: the server says no

def test_bad_api_key_is_an_error_without_retries(server: tuple[str, str]) -> None:
    client = OpenAIClient(server[0], server[1], api_key="wrong-key")
    with pytest.raises(LmstackError, match="401"):
        client.chat(CONVERSATIONS[:1], GREEDY)
    assert client.num_requests == 1


def test_unknown_model_is_an_error_without_retries(server: tuple[str, str]) -> None:
    client = OpenAIClient(server[0], "no-such-model", api_key=API_KEY)
    with pytest.raises(LmstackError, match="404"):
        client.complete(PROMPTS[:1], GREEDY)
    assert client.num_requests == 1


def test_invalid_params_are_a_400_with_the_servers_message(server: tuple[str, str]) -> None:
    client = OpenAIClient(server[0], server[1], api_key=API_KEY)
    with pytest.raises(LmstackError, match="400"):
        client.complete(PROMPTS[:1], GenParams(max_tokens=4, temperature=-1.0))
    assert client.num_requests == 1


# ---------------------------------------------------------------- OpenAIClient only: overload and faults

class ScriptedServer:
    """An OpenAI-shaped /v1/completions whose next answers are scripted: status codes, delays, headers."""

    def __init__(self) -> None:
        self.script: list[tuple[int, dict[str, str]]] = []
        self.delay = 0.0
        self.calls = 0
        self.in_flight = 0
        self.max_in_flight = 0
        app = FastAPI()
        app.post("/v1/completions")(self._completions)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error")
        self._server = uvicorn.Server(config)

    def reset(self, script: list[tuple[int, dict[str, str]]] | None = None, delay: float = 0.0) -> None:
        self.script, self.delay, self.calls, self.max_in_flight = list(script or []), delay, 0, 0

    async def _completions(self, request: Request) -> JSONResponse:
        body = await request.json()
        self.calls += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.in_flight -= 1
        status, headers = self.script.pop(0) if self.script else (200, {})
        if status != 200:
            return JSONResponse({"error": {"message": f"scripted {status}", "code": status}}, status, headers)
        choice = {"index": 0, "text": f"echo:{body['prompt']}", "finish_reason": "stop"}
        return JSONResponse({"choices": [choice],
                             "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

    def __enter__(self) -> ScriptedServer:
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("scripted server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


@pytest.fixture(scope="module")
def scripted() -> Iterator[ScriptedServer]:
    with ScriptedServer() as s:
        yield s


def _fast_client(url: str, **kw: Any) -> OpenAIClient:
    return OpenAIClient(url, "m", **{"backoff_base": 0.01, "backoff_max": 0.05, **kw})


def test_429_and_503_are_retried_until_success(scripted: ScriptedServer) -> None:
    scripted.reset([(429, {"Retry-After": "0"}), (503, {}), (500, {})])
    out = _fast_client(scripted.url, max_retries=4).complete(["x"], GenParams(max_tokens=1))
    assert out[0].text == "echo:x" and scripted.calls == 4


def test_retry_after_is_honoured(scripted: ScriptedServer) -> None:
    scripted.reset([(429, {"Retry-After": "0.4"})])
    start = time.perf_counter()
    _fast_client(scripted.url, backoff_max=5.0).complete(["x"], GenParams(max_tokens=1))
    assert time.perf_counter() - start >= 0.4 and scripted.calls == 2


def test_retries_are_bounded(scripted: ScriptedServer) -> None:
    scripted.reset([(503, {})] * 10)
    with pytest.raises(LmstackError, match="failed 3 times.*503"):
        _fast_client(scripted.url, max_retries=2).complete(["x"], GenParams(max_tokens=1))
    assert scripted.calls == 3


def test_client_errors_are_not_retried(scripted: ScriptedServer) -> None:
    scripted.reset([(400, {})])
    with pytest.raises(LmstackError, match="scripted 400"):
        _fast_client(scripted.url).complete(["x"], GenParams(max_tokens=1))
    assert scripted.calls == 1


def test_concurrency_is_bounded_and_order_kept(scripted: ScriptedServer) -> None:
    scripted.reset(delay=0.05)
    prompts = [f"p{i}" for i in range(8)]
    out = _fast_client(scripted.url, max_concurrency=2).complete(prompts, GenParams(max_tokens=1))
    assert [c.text for c in out] == [f"echo:{p}" for p in prompts]
    assert scripted.max_in_flight == 2


def test_timeouts_and_refused_connections_become_clear_errors(scripted: ScriptedServer) -> None:
    scripted.reset(delay=1.0)
    with pytest.raises(LmstackError, match="timeout"):
        _fast_client(scripted.url, timeout=0.2, max_retries=0).complete(["x"], GenParams(max_tokens=1))
    nobody = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(LmstackError, match="connection failed"):
        _fast_client(nobody, max_retries=1).complete(["x"], GenParams(max_tokens=1))


def test_completion_round_trips_through_json() -> None:
    c = Completion(text="hi", finish_reason="stop", token_ids=[1, 2], usage=None)
    assert Completion.from_dict(c.to_dict()) == c
