"""OpenAI-compatible HTTP server over `engine.AsyncEngine`: `create_app(engine, tokenizer, name)`."""

from lmstack.server.app import create_app

__all__ = ["create_app"]
