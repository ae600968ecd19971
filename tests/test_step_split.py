"""`measure_step_split`: a step's time by phase at a given batch, and a clear error where the batch cannot fit."""

from __future__ import annotations

import pytest

from conftest import dummy_model
from lmstack.bench.step_split import measure_step_split
from lmstack.engine.config import EngineConfig
from lmstack.engine.llm_engine import LLMEngine
from lmstack.errors import LmstackError

CONFIG = dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, eos_token_id=[2])


@pytest.fixture(scope="module")
def model(tiny_tokenizer_dir):
    return dummy_model(CONFIG, tiny_tokenizer_dir)


def test_split_of_a_batch_that_fits(model) -> None:
    engine = LLMEngine(*model, EngineConfig(max_model_len=64, num_kv_blocks=17, block_size=16, max_num_seqs=4))
    split = measure_step_split(engine, batch=4, prompt_len=40, steps=4)
    assert split["batch"] == 4 and split["step_ms"] > 0 and split["forward_ms"] > 0
    assert 0 < split["attention_share_of_forward"] < 1
    assert not engine.has_unfinished and engine.blocks.num_used == 0


def test_a_batch_the_cache_cannot_hold_is_refused(model) -> None:
    """One block short of four full windows: before, the scheduler preempted the last prompts until the first
    request finished, and the caller met a KeyError."""
    engine = LLMEngine(*model, EngineConfig(max_model_len=64, num_kv_blocks=16, block_size=16, max_num_seqs=4))
    with pytest.raises(LmstackError, match="need 16 KV blocks but the cache has 15"):
        measure_step_split(engine, batch=4, prompt_len=40, steps=4)
    assert not engine.has_unfinished
