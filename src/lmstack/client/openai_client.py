"""`OpenAIClient`: the `LLMClient` interface over any OpenAI-compatible URL (lmstack, vLLM, hosted APIs).

A batch becomes concurrent HTTP requests (at most `max_concurrency` in flight). Overload and transient
faults (429, 5xx, dropped connections, timeouts) are retried with exponential backoff and full jitter, waiting
at least as long as the server's Retry-After asks; mistakes in the request (400, 401, 403, 404, 422) are
raised at once as `LmstackError` carrying the server's own message, since retrying cannot fix them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import email.utils
import json
import random
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx

from lmstack.client.base import Completion, Conversation, GenParams, TokenLogprob, Usage, check_batch
from lmstack.client.cache import DiskCache, request_key
from lmstack.errors import LmstackError

T = TypeVar("T")

_HINTS = {
    401: "check api_key (the server was started with an API key, or the key is wrong)",
    403: "the API key is not allowed to use this model or endpoint",
    404: "check the model name (GET /v1/models lists what the server serves) and the base URL",
}


def is_retryable(status: int) -> bool:
    """Overload (429), request timeout (408) and server faults (5xx) can pass; anything else will not."""
    return status in (408, 429) or status >= 500


def api_root(base_url: str) -> str:
    """`http://host:port` and `http://host:port/v1` both mean the `/v1` API; any other path is kept as is."""
    url = base_url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise LmstackError(f"base URL {base_url!r} must look like http://host:port or https://host/v1")
    return url + "/v1" if parts.path in ("", "/") else url


def error_message(response: httpx.Response) -> str:
    """The server's own words: OpenAI error JSON, FastAPI's {"detail"}, else the start of the body."""
    return error_text(response.text, response.reason_phrase)


def error_text(text: str, reason: str) -> str:
    """`error_message` from a body's text and the status line's reason phrase."""
    try:
        body = json.loads(text)
    except ValueError:
        return text[:500] or reason
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if err:
            return str(err)
        if body.get("detail"):
            return str(body["detail"])
    return str(body)[:500]


def retry_after_seconds(response: httpx.Response) -> float | None:
    """Retry-After as delay seconds or an HTTP date; None when absent or unreadable."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine from sync code, also when the caller already runs an event loop (e.g. Jupyter)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


class OpenAIClient:
    """Batched chat/completions against `base_url` for `model`; `achat`/`acomplete` for async callers."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, *, max_concurrency: int = 16,
                 timeout: float = 60.0, max_retries: int = 4, backoff_base: float = 0.5,
                 backoff_max: float = 30.0, cache_dir: str | Path | None = None) -> None:
        if max_concurrency < 1:
            raise LmstackError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if max_retries < 0:
            raise LmstackError(f"max_retries must be >= 0, got {max_retries}")
        if timeout <= 0:
            raise LmstackError(f"timeout must be > 0 seconds, got {timeout}")
        self.base_url = api_root(base_url)
        self.model = model
        self.api_key = api_key
        self.max_concurrency = max_concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.cache = DiskCache(cache_dir) if cache_dir is not None else None
        self.num_requests = 0  # HTTP requests sent, retries included (cache hits send none)
        self.num_cache_hits = 0

    def chat(self, conversations: list[Conversation], params: GenParams | None = None) -> list[Completion]:
        return run_sync(self.achat(conversations, params))

    def complete(self, prompts: list[str], params: GenParams | None = None) -> list[Completion]:
        return run_sync(self.acomplete(prompts, params))

    def embed(self, texts: list[str]) -> list[list[float]]:
        raise LmstackError("this client has no embedding model; use an embedding client for embed()")

    async def achat(self, conversations: list[Conversation],
                    params: GenParams | None = None) -> list[Completion]:
        check_batch(conversations, "conversations")
        return await self._batch("chat", conversations, params or GenParams())

    async def acomplete(self, prompts: list[str], params: GenParams | None = None) -> list[Completion]:
        check_batch(prompts, "prompts")
        return await self._batch("complete", prompts, params or GenParams())

    async def _batch(self, api: str, inputs: list[Any], params: GenParams) -> list[Completion]:
        """All requests concurrently; the first failure cancels the rest (finished ones stay cached)."""
        semaphore = asyncio.Semaphore(self.max_concurrency)
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        limits = httpx.Limits(max_connections=self.max_concurrency,
                              max_keepalive_connections=self.max_concurrency)
        async with httpx.AsyncClient(base_url=self.base_url, headers=headers, limits=limits,
                                     timeout=httpx.Timeout(self.timeout)) as http:
            tasks = [asyncio.ensure_future(self._one(http, semaphore, api, x, params)) for x in inputs]
            try:
                return list(await asyncio.gather(*tasks))
            except BaseException:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise

    async def _one(self, http: httpx.AsyncClient, semaphore: asyncio.Semaphore, api: str, prompt: Any,
                   params: GenParams) -> Completion:
        key = request_key(api, self.model, prompt, params) if self.cache else ""
        if self.cache:
            cached = self.cache.get(key)
            if cached is not None:
                self.num_cache_hits += 1
                return cached
        path, body = _request_body(api, self.model, prompt, params)
        async with semaphore:
            data = await self._post(http, path, body)
        completion = _parse_chat(data) if api == "chat" else _parse_completion(data)
        if self.cache:
            self.cache.put(key, completion)
        return completion

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        delay = random.uniform(0.0, min(self.backoff_max, self.backoff_base * 2**attempt))
        return max(delay, min(retry_after, self.backoff_max)) if retry_after is not None else delay

    async def _post(self, http: httpx.AsyncClient, path: str, body: dict[str, Any]) -> dict[str, Any]:
        url = f"{self.base_url}{path}"
        last = ""
        for attempt in range(self.max_retries + 1):
            retry_after = None
            self.num_requests += 1
            try:
                response = await http.post(path, json=body)
            except httpx.TimeoutException:
                last = f"no answer within timeout={self.timeout}s"
            except httpx.TransportError as e:
                last = f"connection failed ({type(e).__name__}: {e})"
            else:
                if response.is_success:
                    try:
                        return response.json()
                    except ValueError:
                        raise LmstackError(f"{url} answered {response.status_code} with a body that is not "
                                           f"JSON: {response.text[:200]!r}; is base_url an OpenAI-compatible "
                                           "API?") from None
                message = error_message(response)
                if not is_retryable(response.status_code):
                    hint = _HINTS.get(response.status_code, "fix the request")
                    raise LmstackError(f"{url} rejected the request for model {self.model!r} "
                                       f"({response.status_code}): {message}; {hint}")
                last = f"{response.status_code}: {message}"
                retry_after = retry_after_seconds(response)
            if attempt < self.max_retries:
                await asyncio.sleep(self._backoff(attempt, retry_after))
        raise LmstackError(f"{url} failed {self.max_retries + 1} times, last: {last}; check that the server "
                           "is up and not overloaded, or raise max_retries / timeout")


def _request_body(api: str, model: str, prompt: Any, params: GenParams) -> tuple[str, dict[str, Any]]:
    body: dict[str, Any] = {"model": model, "max_tokens": params.max_tokens,
                            "temperature": params.temperature, "top_p": params.top_p}
    if params.stop:
        body["stop"] = list(params.stop)
    if params.seed is not None:
        body["seed"] = params.seed
    if api == "chat":
        body["messages"] = prompt
        if params.logprobs is not None:
            body["logprobs"] = True
            body["top_logprobs"] = params.logprobs
        path = "/chat/completions"
    else:
        body["prompt"] = prompt
        if params.logprobs is not None:
            body["logprobs"] = params.logprobs
        path = "/completions"
    body.update(params.extra)
    return path, body


def _usage(data: dict[str, Any]) -> Usage | None:
    u = data.get("usage")
    if not isinstance(u, dict) or "completion_tokens" not in u:
        return None
    return Usage(prompt_tokens=int(u.get("prompt_tokens") or 0),
                 completion_tokens=int(u["completion_tokens"]))


def _first_choice(data: dict[str, Any]) -> dict[str, Any]:
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise LmstackError(f"the server's answer has no choices: {str(data)[:200]}")
    return choices[0]


def _token_ids(choice: dict[str, Any]) -> list[int] | None:
    """Servers that return ids (lmstack, vLLM with return_token_ids) put them on the choice."""
    ids = choice.get("token_ids")
    return [int(t) for t in ids] if isinstance(ids, list) else None


def _with_ids(logprobs: list[TokenLogprob], ids: list[int] | None) -> list[TokenLogprob]:
    if ids is not None and len(ids) == len(logprobs):
        for lp, token_id in zip(logprobs, ids, strict=True):
            lp.token_id = token_id
    return logprobs


def _parse_chat(data: dict[str, Any]) -> Completion:
    choice = _first_choice(data)
    ids = _token_ids(choice)
    logprobs = None
    content = (choice.get("logprobs") or {}).get("content")
    if isinstance(content, list):
        logprobs = _with_ids([TokenLogprob(token=e["token"], logprob=float(e["logprob"]),
                                           top={t["token"]: float(t["logprob"])
                                                for t in e.get("top_logprobs") or []})
                              for e in content], ids)
    text = (choice.get("message") or {}).get("content") or ""
    return Completion(text=text, finish_reason=choice.get("finish_reason"), token_ids=ids, logprobs=logprobs,
                      usage=_usage(data))


def _parse_completion(data: dict[str, Any]) -> Completion:
    choice = _first_choice(data)
    ids = _token_ids(choice)
    logprobs = None
    lp = choice.get("logprobs")
    if isinstance(lp, dict) and isinstance(lp.get("tokens"), list):
        tops = lp.get("top_logprobs") or [None] * len(lp["tokens"])
        rows = zip(lp["tokens"], lp["token_logprobs"], tops, strict=True)
        logprobs = _with_ids([TokenLogprob(token=tok, logprob=float(value),
                                           top={k: float(v) for k, v in (top or {}).items()})
                              for tok, value, top in rows], ids)
    return Completion(text=choice.get("text") or "", finish_reason=choice.get("finish_reason"), token_ids=ids,
                      logprobs=logprobs, usage=_usage(data))
