"""Model specs on the command line → `LLMClient`s: `NAME` runs in-process, `NAME=URL` talks to a server."""

from __future__ import annotations

import os

from lmstack.client import LLMClient, LocalClient, OpenAIClient
from lmstack.errors import LmstackError


def parse_spec(spec: str) -> tuple[str, str | None]:
    """`qwen2.5-coder-1.5b-instruct` → (name, None); `gpt-4o=https://api.openai.com/v1` → (name, url)."""
    name, sep, url = spec.partition("=")
    if not name.strip() or (sep and not url.strip()):
        raise LmstackError(f"model spec {spec!r} must be NAME (an embedded model, folder or .gguf) or NAME=URL "
                           "(an OpenAI-compatible server)")
    return name.strip(), url.strip() or None


def make_client(spec: str, *, device: str = "auto", dtype: str = "auto", max_model_len: int | None = None,
                api_key_env: str = "OPENAI_API_KEY", cache_dir: str | None = None) -> LLMClient:
    """The client for one spec; local models get device, dtype and max_model_len, remote ones the env API key."""
    name, url = parse_spec(spec)
    if url is not None:
        return OpenAIClient(url, name, api_key=os.environ.get(api_key_env), cache_dir=cache_dir)
    options = {"device": device, "dtype": dtype} | ({"max_model_len": max_model_len} if max_model_len else {})
    return LocalClient(name, cache_dir=cache_dir, **options)


def model_name(spec: str) -> str:
    """The name results are filed under (the part before `=`, path separators made safe)."""
    return parse_spec(spec)[0].rstrip("/").replace("/", "_")
