"""A decoder-only LM as the ranker's backbone: matches the serving forward, ignores padding, trains, round trips."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import no_cache_ctx
from lmstack.cli import main
from lmstack.errors import ModelLoadError
from lmstack.models import load
from lmstack.models.decoder_encoder import is_decoder_model, load_decoder_encoder
from lmstack.models.dummy import PRESETS
from lmstack.ranking import LengthRanker, kendall_tau
from lmstack.ranking.data import read_examples
from lmstack.ranking.training import TrainConfig
from test_ranking import synthetic_dataset

TEXTS = ["Hello world", "Write a long essay about cats, dogs and birds.", "def f(x):\n    return x * 2\n" * 3,
         "", "ok"]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_tiny_llama(folder: Path, tokenizer_dir: Path, preset: str = "tiny-llama") -> Path:
    """A random-weight HF Llama/Qwen2 folder (config.json, model.safetensors, tokenizer files) with a 400-id vocab."""
    cfg = dict(PRESETS[preset], vocab_size=400, max_position_embeddings=256, bos_token_id=None)
    model, _, config = load("dummy:" + json.dumps(cfg), dtype=torch.float32, device="cpu", seed=1,
                            tokenizer=str(tokenizer_dir))
    state = {k: v.contiguous() for k, v in model.hf_state_dict().items()}
    if config.tie_word_embeddings:
        del state["lm_head.weight"]
    folder.mkdir(parents=True)
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config.to_hf_dict()))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("llama") / "m", tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    return synthetic_dataset(tmp_path_factory.mktemp("data") / "data.jsonl", 360, tiny_tokenizer_dir)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2"])
def test_backbone_matches_the_serving_forward(tmp_path: Path, tiny_tokenizer_dir: Path, preset: str) -> None:
    """Final hidden states of the padded training forward = the engine's flat forward, per sequence."""
    folder = make_tiny_llama(tmp_path / preset, tiny_tokenizer_dir, preset)
    model, _, _ = load(str(folder), dtype=torch.float32, device="cpu")
    encoder = load_decoder_encoder(str(folder))
    ids = encoder.token_ids(TEXTS)
    lengths = [len(x) for x in ids]
    flat = torch.tensor([i for x in ids for i in x])
    positions = torch.cat([torch.arange(n) for n in lengths])
    with torch.no_grad():
        want = model(flat, positions, no_cache_ctx(lengths)).split(lengths)
        hidden = encoder.model(*encoder.pad(ids))
    for row, (n, w) in enumerate(zip(lengths, want, strict=True)):
        torch.testing.assert_close(hidden[row, :n], w, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_padding_side_and_batch_do_not_change_a_prompt(tiny_llama: Path, pooling: str) -> None:
    encoder = load_decoder_encoder(str(tiny_llama), pooling=pooling)
    ids = encoder.token_ids(TEXTS)
    assert all(ids)  # an empty prompt still gets one token
    right_ids, right_mask = encoder.pad(ids)
    t = right_ids.shape[1]
    left_ids = torch.stack([torch.cat([r[n:], r[:n]]) for r, n in zip(right_ids, right_mask.sum(1), strict=True)])
    left_mask = torch.stack([torch.cat([m[n:], m[:n]]) for m, n in zip(right_mask, right_mask.sum(1), strict=True)])
    with torch.no_grad():
        right, left = encoder(right_ids, right_mask), encoder(left_ids, left_mask)
        alone = torch.cat([encoder(*encoder.pad([x])) for x in ids])
    assert t > min(len(x) for x in ids)  # some rows are padded
    assert torch.isfinite(left).all()
    torch.testing.assert_close(left, right, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(alone, right, atol=1e-5, rtol=1e-4)


def test_decoder_ranker_trains_and_round_trips(tmp_path: Path, tiny_llama: Path, data: Path) -> None:
    train, val, test = (read_examples(data, s) for s in ("train", "val", "test"))
    ranker = LengthRanker.create(str(tiny_llama), max_length=32, seed=0)
    assert ranker.info["pooling"] == "mean"
    assert all(p.requires_grad for p in ranker.encoder.parameters())
    embed_before = ranker.encoder.model.embed_tokens.weight.detach().clone()
    ranker.fit(train, val, TrainConfig(epochs=4, list_size=16, lr=1e-3, head_lr=3e-3, seed=0))
    history = ranker.info["training"]["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"], history
    assert not torch.equal(ranker.encoder.model.embed_tokens.weight, embed_before)  # fully fine-tuned
    prompts = [ex.prompt for ex in test]
    scores = ranker.score(prompts)
    assert kendall_tau([ex.output_len for ex in test], scores) > 0.3
    ranker.save(tmp_path / "r")
    files = {f.name for f in (tmp_path / "r").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "head.safetensors", "ranker.json"} <= files
    loaded = LengthRanker.load(tmp_path / "r")
    assert loaded.encoder.pooling == "mean" and loaded.max_length == 32
    assert loaded.score(prompts) == pytest.approx(scores, abs=1e-5)
    assert loaded.score(prompts[:1]) == pytest.approx(scores[:1], abs=1e-5)
    model, _, _ = load(str(tmp_path / "r"), dtype=torch.float32, device="cpu")  # an ordinary checkpoint too
    assert torch.equal(model.embed_tokens.weight, loaded.encoder.model.embed_tokens.weight)
    ranker.save(tmp_path / "r", dtype=torch.float16)
    assert LengthRanker.load(tmp_path / "r").score(prompts) == pytest.approx(scores, abs=0.05)


def test_cli_trains_a_decoder_ranker_with_last_token_pooling(tmp_path: Path, tiny_llama: Path, data: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r"
    assert main(["ltr", "train", "--data", str(data), "--output", str(out), "--encoder", str(tiny_llama),
                 "--pooling", "last", "--max-length", "32", "--list-size", "16", "--max-steps", "4",
                 "--save-dtype", "float16"]) == 0
    ranker = LengthRanker.load(out)
    assert ranker.encoder.pooling == "last" and "--pooling last" in ranker.info["command"]
    assert len(ranker.score(["a", "b c"])) == 2
    capsys.readouterr()
    bert_with_pooling = ["ltr", "train", "--data", str(data), "--output", str(tmp_path / "x"), "--pooling", "last"]
    assert main(bert_with_pooling) == 2
    assert main(["ltr", "train", "--data", str(data), "--output", str(tmp_path / "x"), "--encoder", "no-such"]) == 2
    err = capsys.readouterr().err
    assert "decoder-only backbones" in err and "not found" in err and "Traceback" not in err


def test_which_names_are_decoders(tmp_path: Path, tiny_llama: Path) -> None:
    assert is_decoder_model("smollm2-135m-instruct") and is_decoder_model(str(tiny_llama))
    assert not is_decoder_model("all-minilm-l6-v2") and not is_decoder_model(str(tmp_path))
    with pytest.raises(ModelLoadError, match="dummy"):
        load_decoder_encoder("dummy:tiny-llama")
    with pytest.raises(ModelLoadError, match="pooling"):
        load_decoder_encoder(str(tiny_llama), pooling="max")


@pytest.mark.gpu
def test_decoder_ranker_fine_tunes_on_cuda_and_scores_like_cpu(tmp_path: Path, tiny_llama: Path, data: Path) -> None:
    train, val = read_examples(data, "train"), read_examples(data, "val")
    ranker = LengthRanker.create(str(tiny_llama), max_length=32, device="cuda")
    embed_before = ranker.encoder.model.embed_tokens.weight.detach().clone()
    ranker.fit(train, val, TrainConfig(epochs=1, list_size=16, lr=1e-3, head_lr=3e-3))  # bf16 autocast on CUDA
    assert not torch.equal(ranker.encoder.model.embed_tokens.weight, embed_before)  # gradients reached the backbone
    ranker.save(tmp_path / "r")
    prompts = [ex.prompt for ex in val]
    on_gpu = LengthRanker.load(tmp_path / "r", device="cuda").score(prompts)
    on_cpu = LengthRanker.load(tmp_path / "r", device="cpu").score(prompts)
    assert on_gpu == pytest.approx(on_cpu, abs=1e-3)
