"""The FastAPI app: routes, auth, the body size limit, and errors in OpenAI's JSON shape.

Bodies are read and validated here rather than by FastAPI, so that every bad body is a 400 in OpenAI's
error shape (FastAPI's default is a 422 in its own) and the size limit holds for chunked uploads too.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response

from lmstack import __version__
from lmstack.engine.async_engine import AsyncEngine
from lmstack.models.tokenizer import Tokenizer
from lmstack.server.metrics import ServerMetrics
from lmstack.server.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
)
from lmstack.server.serving import OpenAIServing

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024

M = TypeVar("M", bound=BaseModel)


@dataclass
class ServerState:
    """What the request dependencies need; `draining` is set on SIGTERM so that new requests get a 503."""

    engine: AsyncEngine
    api_key: str | None
    max_body_bytes: int
    draining: bool = False


def _error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body().model_dump(), status_code=e.status, headers=e.headers)


def _loc(loc: tuple[int | str, ...]) -> str:
    """A pydantic error location as a parameter path: ('body', 'messages', 0, 'role') → 'messages[0].role'."""
    out = ""
    for part in loc[1:] if loc[:1] == ("body",) else loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def validation_error(errors: Sequence[Any]) -> ApiError:
    """One 400 naming the first bad field and listing (up to three of) the problems."""
    locs = [_loc(tuple(e.get("loc", ()))) for e in errors]
    parts = [f"{loc}: {e['msg']}" if loc else e["msg"] for loc, e in zip(locs, errors, strict=True)]
    more = f" (and {len(parts) - 3} more)" if len(parts) > 3 else ""
    return ApiError(400, "invalid request: " + "; ".join(parts[:3]) + more, param=(locs[0] or None) if locs else None,
                    code="invalid_request")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with a 413 as soon as it is known to exceed `limit` bytes."""
    too_large = ApiError(413, f"the request body exceeds the server's limit of {limit} bytes",
                         code="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "invalid Content-Length header")
        if int(declared) > limit:
            raise too_large
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise too_large
    return bytes(data)


def _state(request: Request) -> ServerState:
    return request.app.state.lmstack


async def authorize(request: Request) -> None:
    """Async (as every dependency here): a sync one would cost each request a threadpool round trip."""
    key = _state(request).api_key
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise ApiError(401, "Incorrect or missing API key: send the header 'Authorization: Bearer <key>'.",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


async def accepting(request: Request) -> None:
    state = _state(request)
    if state.draining or not state.engine.accepting:
        raise ApiError(503, "the server is shutting down and takes no new requests", type="server_error",
                       code="service_unavailable")


def _json_body(model: type[M]) -> Callable[[Request], Awaitable[M]]:
    async def parse(request: Request) -> M:
        raw = await read_body(request, _state(request).max_body_bytes)
        try:
            return model.model_validate_json(raw)
        except ValidationError as e:
            raise validation_error(e.errors()) from None

    return parse


ChatBody = Annotated[ChatCompletionRequest, Depends(_json_body(ChatCompletionRequest))]
CompletionBody = Annotated[CompletionRequest, Depends(_json_body(CompletionRequest))]
GUARDED = [Depends(authorize), Depends(accepting)]


def create_app(engine: AsyncEngine, tokenizer: Tokenizer, model_name: str, *, api_key: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, drain_timeout: float = 30.0) -> FastAPI:
    """An OpenAI-compatible app over `engine`. Its lifespan shuts the engine down (draining) on exit."""
    state = ServerState(engine, api_key, max_body_bytes)
    metrics = ServerMetrics(engine)
    serving = OpenAIServing(engine, tokenizer, model_name, metrics)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        state.draining = True
        await engine.shutdown(drain_timeout)

    app = FastAPI(title="lmstack", version=__version__, lifespan=lifespan)
    app.state.lmstack = state
    app.state.metrics = metrics

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> Response:
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> Response:
        return _error_response(validation_error(e.errors()))

    @app.exception_handler(HTTPException)
    async def _http(_: Request, e: HTTPException) -> Response:
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return _error_response(ApiError(e.status_code, str(e.detail), type=kind, headers=e.headers))

    @app.exception_handler(Exception)
    async def _crash(_: Request, e: Exception) -> Response:
        return _error_response(ApiError(500, f"internal server error: {type(e).__name__}", type="server_error",
                                        code="internal_error"))

    @app.post("/v1/chat/completions", dependencies=GUARDED)
    async def chat_completions(request: Request, req: ChatBody) -> Response:
        return await serving.chat(req, request)

    @app.post("/v1/completions", dependencies=GUARDED)
    async def completions(request: Request, req: CompletionBody) -> Response:
        return await serving.completions(req, request)

    def card() -> ModelCard:
        return ModelCard(id=model_name, created=created, max_model_len=engine.max_model_len)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def list_models() -> ModelList:
        return ModelList(data=[card()])

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(authorize)])
    async def get_model(model_id: str) -> ModelCard:
        if model_id != model_name:
            raise ApiError(404, f"The model `{model_id}` does not exist.", param="model", code="model_not_found")
        return card()

    @app.get("/health")
    async def health() -> Response:
        if state.draining or not engine.is_running:
            return JSONResponse({"status": "draining" if state.draining else "engine stopped"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        data, content_type = metrics.render()
        return Response(data, media_type=content_type)

    return app
