"""Server-sent events and client disconnects: the streaming half of the OpenAI API, apart from what it streams."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import TypeVar

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client went away before the response was ready."""


class SSEResponse(StreamingResponse):
    """A StreamingResponse that always closes its generator, so an early disconnect aborts the requests."""

    def __init__(self, content: AsyncGenerator[bytes, None]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._gen = content

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._gen.aclose()


def sse(payload: str) -> bytes:
    return f"data: {payload}\n\n".encode()


_MARK = "\x00lmstack-text\x00"
_MARK_JSON = json.dumps(_MARK)  # how pydantic writes it too: \u0000 escapes


class TextChunks:
    """A stream's common chunk, where only the text differs, as JSON without building models each time.

    A stream sends one such chunk per token per choice, so its cost is the server's per-token overhead. The
    chunk is rendered once per choice by pydantic with a marker as its text and split there; each chunk is
    then one `json.dumps` of the new text (escaped as pydantic escapes it) between the two halves.
    """

    def __init__(self, build: Callable[[int, str], BaseModel]) -> None:
        self._build = build
        self._halves: dict[int, tuple[str, str]] = {}

    def __call__(self, index: int, text: str) -> str:
        halves = self._halves.get(index)
        if halves is None:
            head, _, tail = self._build(index, _MARK).model_dump_json().partition(_MARK_JSON)
            halves = self._halves[index] = (head, tail)
        return halves[0] + json.dumps(text, ensure_ascii=False) + halves[1]


def held_back(text: str, stops: list[str]) -> int:
    """Characters at the end of `text` that are the start of some stop string."""
    held = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), held, -1):
            if text.endswith(s[:k]):
                held = k
                break
    return held


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and so aborting its requests) if the client disconnects first."""

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (task, watcher):
            t.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
    if task.cancelled():
        raise ClientDisconnected
    return task.result()
