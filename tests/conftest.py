"""Shared fixtures: the real SmolLM2-135M (converted once per session) and tiny random models."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm_path():
    """HF folder of the embedded default model (skips when its package is not installed)."""
    from lmstack.errors import ModelLoadError
    from lmstack.models.loader import resolve_model_path

    try:
        return resolve_model_path("smollm2-135m-instruct")
    except ModelLoadError as e:
        pytest.skip(str(e))
