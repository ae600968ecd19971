"""OpenAI-compatible HTTP server over `engine.AsyncEngine`: `create_app(engine, tokenizer, name)`.

`create_app` is imported on first use, so that `lmstack` builds its parser without loading FastAPI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lmstack.server.app import create_app

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from lmstack.server.app import create_app

        return create_app
    raise AttributeError(f"module 'lmstack.server' has no attribute {name!r}")
