"""Sentence embeddings for topic clustering: the embedded MiniLM in-process, or any client's `embed()`."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from lmstack.errors import LmstackError

Embedder = Callable[[list[str]], np.ndarray]  # texts → [N, D] float32, rows L2-normalized


def minilm_embedder(device: str = "cpu") -> Embedder:
    """all-MiniLM-L6-v2 (384-d, mean pooled, normalized), the default of BenchBuilder-style clustering."""
    from lmstack.models.encoder import load_encoder

    encoder = load_encoder("all-minilm-l6-v2", device=device)

    def embed(texts: list[str]) -> np.ndarray:
        return encoder.embed(texts, batch_size=64).numpy()  # [N, 384]

    return embed


def client_embedder(spec: str) -> Embedder:
    """`NAME=URL` of an OpenAI-compatible embeddings endpoint, through `LLMClient.embed`."""
    from lmstack.evals.arena_hard.clients import make_client

    client = make_client(spec)

    def embed(texts: list[str]) -> np.ndarray:
        vectors = np.asarray(client.embed(texts), dtype=np.float32)  # [N, D]
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)

    return embed


def make_embedder(spec: str, device: str = "cpu") -> Embedder:
    """`minilm` or `client:NAME=URL`."""
    if spec == "minilm":
        return minilm_embedder(device)
    if spec.startswith("client:"):
        return client_embedder(spec.removeprefix("client:"))
    raise LmstackError(f"unknown embedder {spec!r}; use `minilm` or `client:NAME=URL`")
