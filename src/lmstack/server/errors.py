"""Engine refusals and failures as OpenAI-shaped HTTP errors."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from lmstack.engine.async_engine import EngineClosedError, QueueFullError
from lmstack.errors import LmstackError
from lmstack.server.protocol import ApiError


def to_api_error(e: Exception) -> ApiError:
    """The HTTP error for an exception from the engine or the request's own validation."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, QueueFullError):
        return ApiError(429, str(e), type="rate_limit_error", code="rate_limit_exceeded",
                        headers={"Retry-After": "1"})
    if isinstance(e, EngineClosedError):
        return ApiError(503, str(e), type="server_error", code="service_unavailable")
    if isinstance(e, LmstackError):
        return ApiError(400, str(e))
    return ApiError(500, str(e) or type(e).__name__, type="server_error", code="internal_error")


@contextmanager
def engine_errors() -> Iterator[None]:
    """Raise the engine's refusals and failures as HTTP errors."""
    try:
        yield
    except Exception as e:
        raise to_api_error(e) from e
