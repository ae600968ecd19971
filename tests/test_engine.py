"""The engine's greedy output equals transformers' greedy generation, with and without preemption."""

from __future__ import annotations

import pytest
import torch

from lmstack import LLM, SamplingParams
from lmstack.engine.config import EngineConfig
from lmstack.engine.llm_engine import LLMEngine
from lmstack.errors import LmstackError, RequestError

transformers = pytest.importorskip("transformers")

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "def fibonacci(n):",
    "List three colors:",
    "Once upon a time, in a small village by the mountains, there lived an old clockmaker who",
    "Q: What is 12 times 7?\nA:",
    "Translate to French: good morning",
    "The quick brown fox",
    "import numpy as np\n\n# compute the mean of a list\n",
    "Explain photosynthesis in one sentence.",
    "A",
    "Paris, London, Berlin, Madrid,",
    "SELECT name FROM users WHERE",
    "The best way to learn a language is",
    "1, 2, 3, 5, 8, 13,",
    "In 1969, Neil Armstrong",
]


def _hf_greedy(hf: torch.nn.Module, prompt_ids: list[list[int]], n: int) -> list[list[int]]:
    out = []
    for ids in prompt_ids:
        x = torch.tensor([ids])
        with torch.no_grad():
            y = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                            eos_token_id=None, pad_token_id=0)
        out.append(y[0, len(ids):].tolist())
    return out


@pytest.fixture(scope="module")
def smol(smollm_path):
    llm = LLM(str(smollm_path), dtype="float32", device="cpu", max_num_seqs=16, max_num_batched_tokens=256)
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm_path, torch_dtype=torch.float32).eval()
    prompt_ids = [llm.tokenizer.encode(p) for p in PROMPTS]
    return llm, hf, prompt_ids, _hf_greedy(hf, prompt_ids, 24)


@pytest.mark.parametrize("batch", [1, 4, 16])
def test_greedy_matches_hf(smol, batch: int) -> None:
    llm, _, prompt_ids, expected = smol
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    for i in range(0, len(PROMPTS), batch):
        chunk = [{"prompt_token_ids": ids} for ids in prompt_ids[i:i + batch]]
        outs = llm.generate(chunk, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == expected[i:i + batch]
        if batch == 1 and i >= 4:
            break


def test_greedy_matches_hf_under_preemption(smol, smollm_path) -> None:
    llm, _, prompt_ids, expected = smol
    engine = LLMEngine(llm.model, llm.tokenizer, EngineConfig(num_kv_blocks=12, max_num_seqs=16,
                                                              max_num_batched_tokens=64, max_model_len=128))
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    for ids in prompt_ids:
        engine.add_request(ids, params)
    done = {}
    while engine.has_unfinished:
        for out in engine.step():
            if out.finished:
                done[int(out.request_id)] = out.outputs[0].token_ids
    assert engine.scheduler.num_preemptions > 0
    assert [done[i] for i in range(len(prompt_ids))] == expected
    assert engine.blocks.num_used == 0


def test_chunked_prefill_matches_hf(smol) -> None:
    """A prompt longer than the step's token budget is prefilled in chunks; output is unchanged."""
    llm, _, prompt_ids, expected = smol
    engine = LLMEngine(llm.model, llm.tokenizer, EngineConfig(max_num_batched_tokens=8, max_model_len=256,
                                                              num_kv_blocks=64))
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    engine.add_request(prompt_ids[4], params)
    outs = []
    while engine.has_unfinished:
        outs.extend(engine.step())
    assert outs[-1].outputs[0].token_ids == expected[4]


def test_seeded_sampling_is_reproducible(smol) -> None:
    llm, _, prompt_ids, _ = smol
    p = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    a = llm.generate([{"prompt_token_ids": prompt_ids[0]}], p, use_tqdm=False)[0].outputs[0].token_ids
    others = [{"prompt_token_ids": ids} for ids in prompt_ids[1:6]]
    mixed = llm.generate([{"prompt_token_ids": prompt_ids[0]}, *others],
                         [p] + [SamplingParams(max_tokens=16, temperature=1.0)] * len(others), use_tqdm=False)
    assert mixed[0].outputs[0].token_ids == a
    c = llm.generate([{"prompt_token_ids": prompt_ids[0]}], SamplingParams(
        max_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=99, ignore_eos=True), use_tqdm=False)
    assert c[0].outputs[0].token_ids != a


def test_stop_strings_tokens_and_logprobs(smol) -> None:
    llm, _, _, _ = smol
    chat = [{"role": "user", "content": "Count from 1 to 20 separated by commas."}]
    full = llm.generate(chat, SamplingParams(max_tokens=40, temperature=0.0), use_tqdm=False)[0].outputs[0]
    assert "5" in full.text
    stopped = llm.generate(chat, SamplingParams(max_tokens=40, temperature=0.0, stop=["5"]), use_tqdm=False)[0]
    assert stopped.outputs[0].finish_reason == "stop" and "5" not in stopped.outputs[0].text
    assert full.text.startswith(stopped.outputs[0].text)
    first = full.token_ids[0]
    by_id = llm.generate(chat, SamplingParams(max_tokens=40, temperature=0.0, stop_token_ids=[full.token_ids[2]]),
                         use_tqdm=False)[0].outputs[0]
    assert by_id.token_ids == full.token_ids[:3] and by_id.finish_reason == "stop"
    lp = llm.generate(chat, SamplingParams(max_tokens=3, temperature=0.0, logprobs=5), use_tqdm=False)[0].outputs[0]
    assert lp.logprobs[0].token_id == first and len(lp.logprobs[0].top) == 5
    assert max(lp.logprobs[0].top.values()) == pytest.approx(lp.logprobs[0].logprob)
    assert lp.finish_reason == "length" and len(lp.token_ids) == 3


def test_bad_input_is_a_clear_error(smol) -> None:
    llm, _, _, _ = smol
    with pytest.raises(RequestError, match="context window"):
        llm.generate([{"prompt_token_ids": [1] * (llm.engine.max_model_len + 5)}], use_tqdm=False)
    for bad in (dict(temperature=-1), dict(top_p=0), dict(max_tokens=0), dict(top_k=-3), dict(min_p=2.0),
                dict(logprobs=99)):
        with pytest.raises(RequestError):
            SamplingParams(**bad)
    with pytest.raises(LmstackError, match="smollm2-135m-instruct"):
        LLM("no-such-model")
    assert llm.engine.blocks.num_used == 0


def test_lru_get_keeps_the_most_recently_used() -> None:
    from collections import OrderedDict

    from lmstack.engine.runner import lru_get

    made: list[str] = []

    def make(k: str) -> str:
        made.append(k)
        return k.upper()

    cache: OrderedDict[str, str] = OrderedDict()
    for k in "abab":
        assert lru_get(cache, k, lambda k=k: make(k), 2) == k.upper()
    assert made == ["a", "b"]  # hits are not made again
    lru_get(cache, "a", lambda: make("a"), 2)  # a is now the most recent: c replaces b
    lru_get(cache, "c", lambda: make("c"), 2)
    assert list(cache) == ["a", "c"] and made == ["a", "b", "c"]
    lru_get(cache, "b", lambda: make("b"), 2)
    assert list(cache) == ["c", "b"]
    for k in "defg":
        lru_get(cache, k, lambda k=k: make(k), None)  # no limit
    assert len(cache) == 6
    with pytest.raises(LmstackError, match="max_lazy_graphs"):
        EngineConfig(max_lazy_graphs=0)
    for bad in (-1, 1.5, "2048"):
        with pytest.raises(LmstackError, match="token_graph_tokens"):
            EngineConfig(token_graph_tokens=bad)
