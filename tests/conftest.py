"""Shared fixtures: the real SmolLM2-135M (converted once per session) and tiny random models."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lmstack.engine.attention import AttentionBackend, AttentionMetadata

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def dummy_model(config: dict, tokenizer_dir: Path, device: str = "cpu") -> tuple[torch.nn.Module, object]:
    """Random fp32 weights of the architecture `config` describes (HF config keys), with the tiny tokenizer."""
    import json

    from lmstack.models import load

    model, tok, _ = load("dummy:" + json.dumps(config), dtype=torch.float32, device=device,
                         tokenizer=str(tokenizer_dir))
    return model, tok


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and on a busy machine waiting on them costs 10-60x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def no_cache_ctx(lengths: list[int]) -> AttentionBackend:
    """The engine's attention over a flat batch of whole prompts, without a KV cache."""
    qsl = [0]
    for n in lengths:
        qsl.append(qsl[-1] + n)
    ctx = AttentionBackend(None)
    t = torch.tensor
    ctx.meta = AttentionMetadata(slot_mapping=t([]), query_start_loc=t(qsl), seq_lens=t(lengths),
                                 block_tables=t([[0]]), query_start_loc_cpu=qsl, seq_lens_cpu=lengths,
                                 max_query_len=max(lengths), max_seq_len=max(lengths))
    return ctx


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


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory):
    """A real byte-level BPE tokenizer trained on a few lines: dummy models without any model package."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["The quick brown fox jumps over the lazy dog.", "def f(x):\n    return x * 2\n",
              "Paris is the capital of France.", "1, 2, 3, 5, 8, 13, 21"] * 20
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    folder = tmp_path_factory.mktemp("tiny_tokenizer")
    tok.save(str(folder / "tokenizer.json"))
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": template, "eos_token": "<|im_end|>", "bos_token": None}))
    return folder


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(args: list[str], log_dir: Path) -> Iterator[str]:
    """`lmstack serve ARGS` in a subprocess on a free loopback port; yields its base URL once healthy."""
    import httpx

    port = free_port()
    with (log_dir / "server.log").open("w+") as log:
        proc = subprocess.Popen([sys.executable, "-m", "lmstack.cli", "serve", *args, "--host", "127.0.0.1",
                                 "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    pytest.fail(f"server exited with {proc.returncode}:\n{log.read()[-3000:]}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    pytest.fail("server did not become healthy within 120 s")
                time.sleep(0.3)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
