"""The benchmarks' HTTP client: an aiohttp session bound to one OpenAI-compatible server.

A serving benchmark must be able to put a burst of requests on the wire at once, or the client's own
slowness is charged to the server. Measured on one machine against a server that answers at once, 64
concurrent streaming requests reached it within about 10 ms through aiohttp and spread over 100-500 ms
through httpx, so the benchmarks use aiohttp (as `vllm bench serve` does); the library clients in
`lmstack.client` keep httpx, where per-request cost does not matter.
"""

from __future__ import annotations

import json
from types import TracebackType
from typing import Any

import aiohttp

from lmstack.client.openai_client import api_root, error_text

# What a failed exchange can raise: the connection, the timeout, or a body that is not what was promised.
HTTP_ERRORS = (aiohttp.ClientError, TimeoutError, ValueError)


class BenchClient:
    """`api` is the `/v1` root, `root` the server root (for /health and /metrics)."""

    def __init__(self, base_url: str, api_key: str | None, timeout: float, connections: int | None) -> None:
        self.api = api_root(base_url)
        self.root = self.api.removesuffix("/v1")
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # Per-read timeout, as a stream may rightly last longer than `timeout` while it keeps sending.
        self._timeout = aiohttp.ClientTimeout(total=None, connect=min(timeout, 10.0), sock_read=timeout)
        self._connections = connections or 0  # 0: no limit
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> BenchClient:
        self.session = aiohttp.ClientSession(headers=self._headers, timeout=self._timeout,
                                             connector=aiohttp.TCPConnector(limit=self._connections))
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self.session is not None:
            await self.session.close()

    def post(self, path: str, body: dict[str, Any]) -> Any:
        """A POST of JSON to an API path, as an `async with` response whose body can be streamed."""
        return self.session.post(self.api + path, json=body)

    async def post_raw(self, path: str, data: bytes) -> int:
        """POST bytes declared as JSON (malformed bodies in the load test); the status code."""
        async with self.session.post(self.api + path, data=data,
                                     headers={"Content-Type": "application/json"}) as response:
            await response.read()
            return response.status

    async def get_text(self, url: str) -> tuple[int, str]:
        """GET an absolute URL; (status, body text)."""
        async with self.session.get(url) as response:
            return response.status, await response.text()

    async def get_json(self, path: str) -> tuple[int, Any, str]:
        """GET an API path; (status, parsed JSON or None, the server's message when it failed)."""
        status, text = await self.get_text(self.api + path)
        try:
            body = json.loads(text)
        except ValueError:
            body = None
        return status, body, ("" if status == 200 else error_text(text, f"HTTP {status}"))


async def response_error(response: aiohttp.ClientResponse) -> str:
    """`status: message` of a failed response, in the server's own words."""
    text = await response.text()
    return f"{response.status}: {error_text(text, response.reason or '')}"
