"""The length ranker end to end: data building (answers and generation, resumable), training, save/load, CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from lmstack.cli import main
from lmstack.client.base import Completion, GenParams, LLMClient, Usage
from lmstack.errors import LmstackError
from lmstack.ranking import LengthRanker, kendall_tau
from lmstack.ranking.baselines import BucketObjective, PromptLengthBaseline, quantile_edges, uniform_edges
from lmstack.ranking.data import LengthExample, SourceItem, SplitSpec, build_dataset, read_examples
from lmstack.ranking.training import TrainConfig
from test_encoder import make_tiny_encoder

TOPICS = ["cats", "dragons", "France", "quantum computing", "German", "birds", "dogs", "stories", "code", "x"]
STYLES = [("Answer briefly, in one word: yes or no.", 8), ("Explain it in detail, step by step.", 200),
          ("Write a long essay about it.", 900)]


pytestmark = pytest.mark.usefixtures("one_thread")


def synthetic(n: int, seed: int = 0) -> list[SourceItem]:
    """Prompts whose instruction decides the answer length (plus noise), answers of that many words."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        style, base = STYLES[i % 3]
        length = max(1, int(base * rng.uniform(0.7, 1.3)))
        prompt = f"Tell me about {rng.choice(TOPICS)} number {i}. {style}"
        items.append(SourceItem(id=f"q{i}", prompt=prompt, answer=" ".join(["word"] * length)))
    return items


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_encoder(tmp_path_factory.mktemp("encoder") / "enc", hidden=32, layers=2)


def synthetic_dataset(out: Path, n: int, tokenizer_dir: Path) -> Path:
    """`n` synthetic prompts built into a length data file: a fifth held out for test, a tenth for validation."""
    build_dataset(synthetic(n), out, SplitSpec(test_size=n // 5, val_size=n // 10, seed=0),
                  label_tokenizer=str(tokenizer_dir))
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    return synthetic_dataset(tmp_path_factory.mktemp("data") / "data.jsonl", 600, tiny_tokenizer_dir)


def test_build_dedupes_splits_and_resumes(tmp_path: Path, tiny_tokenizer_dir: Path) -> None:
    items = synthetic(50) + [SourceItem("dup", synthetic(1)[0].prompt, "again"), SourceItem("empty", "  ", "x"),
                             SourceItem("noanswer", "What now?", None)]
    spec = SplitSpec(test_size=10, val_size=5, seed=3)
    out = tmp_path / "d.jsonl"
    first = build_dataset(items, out, spec, label_tokenizer=str(tiny_tokenizer_dir), batch_size=8)
    assert len(first) == 50 and {ex.id for ex in first} == {f"q{i}" for i in range(50)}
    assert [sum(ex.split == s for ex in first) for s in ("train", "val", "test")] == [35, 5, 10]
    assert all(ex.output_len > 0 and ex.prompt_len > 0 for ex in first)
    # Interrupted mid-write: the last record is torn and a batch is missing. Resuming completes it identically.
    lines = out.read_text(encoding="utf-8").split("\n")
    out.write_text("\n".join(lines[:30]) + "\n" + lines[30][:17], encoding="utf-8")
    assert len(read_examples(out)) == 30
    again = build_dataset(items, out, spec, label_tokenizer=str(tiny_tokenizer_dir), batch_size=8)
    assert sorted(json.dumps(ex.__dict__) for ex in again) == sorted(json.dumps(ex.__dict__) for ex in first)
    with pytest.raises(LmstackError, match="other settings"):
        build_dataset(items, out, SplitSpec(10, 5, seed=4), label_tokenizer=str(tiny_tokenizer_dir))
    with pytest.raises(LmstackError, match="not enough"):
        build_dataset(items, tmp_path / "e.jsonl", SplitSpec(40, 20), label_tokenizer=str(tiny_tokenizer_dir))


class _FlakyClient:
    """Wraps a real client and fails on the n-th call, like a crash in the middle of a labelling job."""

    def __init__(self, inner: LLMClient, fail_on: int | None) -> None:
        self.inner, self.model, self.fail_on, self.calls, self.prompts = inner, inner.model, fail_on, 0, 0

    def chat(self, conversations: list, params: GenParams | None = None) -> list[Completion]:
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("server went away")
        self.prompts += len(conversations)
        return self.inner.chat(conversations, params)

    def complete(self, prompts: list[str], params: GenParams | None = None) -> list[Completion]:
        raise NotImplementedError

    def embed(self, texts: list[str]) -> list[list[float]]:
        raise NotImplementedError


def test_labels_by_generation_with_a_real_model_and_resumes(tmp_path: Path, smollm_path: Path) -> None:
    from lmstack.client import LocalClient

    items = [SourceItem(f"g{i}", p, None) for i, p in enumerate(
        ["Reply with only the word yes.", "Count from one to twenty in words.", "What is 2+2? Answer with a digit.",
         "Write a poem about the sea.", "Say hi.", "List five fruits.", "Name a color.", "Describe Paris.",
         "Say ok.", "Spell 'cat'."])]
    local = LocalClient(str(smollm_path), device="cpu", name="smollm2")
    params = GenParams(max_tokens=24, temperature=1.0, seed=0)
    out = tmp_path / "gen.jsonl"
    spec = SplitSpec(test_size=3, val_size=1)
    flaky = _FlakyClient(local, fail_on=2)
    with pytest.raises(RuntimeError):
        build_dataset(items, out, spec, label_tokenizer=str(smollm_path), client=flaky, params=params, batch_size=4)
    assert len(read_examples(out)) == 4  # the first batch survived the crash
    resumed = _FlakyClient(local, fail_on=None)
    examples = build_dataset(items, out, spec, label_tokenizer=str(smollm_path), client=resumed, params=params,
                             batch_size=4)
    assert resumed.prompts == 6 and len(examples) == 10  # only the unfinished prompts were generated
    assert all(1 <= ex.output_len <= 24 for ex in examples)
    assert all(ex.truncated == (ex.output_len == 24) for ex in examples)
    assert any(not ex.truncated for ex in examples)  # real answers end on their own, at different lengths
    assert len({ex.output_len for ex in examples}) > 2


def test_generation_lengths_come_from_usage(tmp_path: Path, tiny_tokenizer_dir: Path) -> None:
    class Fixed:
        model = "fixed"

        def chat(self, conversations: list, params: GenParams | None = None) -> list[Completion]:
            return [Completion(text="t", finish_reason="stop", usage=Usage(3, 7 + i))
                    for i in range(len(conversations))]

    examples = build_dataset(synthetic(12), tmp_path / "u.jsonl", SplitSpec(2, 1), str(tiny_tokenizer_dir),
                             client=Fixed(), batch_size=12)  # type: ignore[arg-type]
    assert sorted(ex.output_len for ex in examples) == list(range(7, 19))


def _taus(ranker: LengthRanker, examples: list[LengthExample]) -> float:
    return kendall_tau([ex.output_len for ex in examples], ranker.predict([ex.prompt for ex in examples]))


def test_gzipped_prompt_file_reads_like_plain(tmp_path: Path) -> None:
    import gzip

    from lmstack.ranking.data import jsonl_items

    lines = "".join(json.dumps({"id": f"p{i}", "prompt": f"line\u2028{i}", "output": "x" * i}, ensure_ascii=False)
                    + "\n" for i in range(5))
    (tmp_path / "p.jsonl").write_text(lines, encoding="utf-8")
    with gzip.open(tmp_path / "p.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(lines)
    plain, packed = jsonl_items(tmp_path / "p.jsonl"), jsonl_items(tmp_path / "p.jsonl.gz")
    assert plain == packed and [it.answer for it in packed] == ["x" * i for i in range(5)]
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(LmstackError, match="cannot read prompts file"):
        jsonl_items(tmp_path / "bad.jsonl.gz")


def test_fine_tuned_ranker_learns_length_order_and_round_trips(tmp_path: Path, tiny_encoder: Path, data: Path) -> None:
    train, val, test = (read_examples(data, s) for s in ("train", "val", "test"))
    ranker = LengthRanker.create(str(tiny_encoder), max_length=32, seed=0)
    before = _taus(ranker, test)
    ranker.fit(train, val, TrainConfig(epochs=6, list_size=16, lr=1e-3, head_lr=3e-3, seed=0))
    after = _taus(ranker, test)
    assert after > 0.5 and after > before + 0.3, (before, after)
    history = ranker.info["training"]["history"]
    assert len(history) == 6 and history[-1]["train_loss"] < history[0]["train_loss"]
    ranker.save(tmp_path / "r")
    loaded = LengthRanker.load(tmp_path / "r")
    prompts = [ex.prompt for ex in test[:20]]
    scores = loaded.score(prompts)
    assert isinstance(scores, list) and all(isinstance(s, float) for s in scores)
    assert scores == pytest.approx(ranker.score(prompts), abs=1e-5)
    assert loaded.score(prompts[:1]) == pytest.approx(scores[:1], abs=1e-5)  # batch size does not matter
    long, short = loaded.score(["Tell me about cats. Write a long essay about it.",
                                "Tell me about cats. Answer briefly, in one word: yes or no."])
    assert long > short  # higher score = longer predicted output
    ranker.save(tmp_path / "r", dtype=torch.float16)  # replaces the folder; fp16 loads back as fp32
    assert LengthRanker.load(tmp_path / "r").score(prompts) == pytest.approx(scores, abs=0.05)


def test_frozen_head_and_bucket_classifier(tmp_path: Path, tiny_encoder: Path, data: Path) -> None:
    train, val, test = (read_examples(data, s) for s in ("train", "val", "test"))
    cache = tmp_path / "cache"
    frozen = LengthRanker.create(str(tiny_encoder), head_hidden=64, max_length=32)
    weights = frozen.encoder.model.word.weight.clone()
    frozen.fit(train, val, TrainConfig(epochs=30, list_size=16, head_lr=3e-3, freeze_encoder=True,
                                       cache_dir=str(cache)))
    assert torch.equal(frozen.encoder.model.word.weight, weights)  # the encoder did not move
    assert len(list(cache.rglob("*.safetensors"))) == 2  # train and val embeddings cached
    assert _taus(frozen, test) > 0.3
    edges = quantile_edges([ex.output_len for ex in train], 3)
    clf = LengthRanker.create(str(tiny_encoder), BucketObjective(edges), max_length=32)
    clf.fit(train, val, TrainConfig(epochs=4, list_size=16, lr=1e-3, head_lr=3e-3))
    assert _taus(clf, test) > 0.5
    clf.save(tmp_path / "clf")
    assert isinstance(LengthRanker.load(tmp_path / "clf").objective, BucketObjective)


def test_bucket_edges_and_prompt_length_baseline() -> None:
    assert uniform_edges(10, 8192) == [820 * k for k in range(1, 10)]
    objective = BucketObjective(edges=[10, 100])
    assert objective.labels(torch.tensor([0, 9, 10, 99, 100, 5000])).tolist() == [0, 0, 1, 1, 2, 2]
    logits = torch.tensor([[10.0, 0.0, 0.0], [0.0, 0.0, 10.0]])
    assert objective.score(logits).tolist() == pytest.approx([0.0, 2.0], abs=1e-3)
    baseline = PromptLengthBaseline().fit([1, 2, 3, 4], [40, 30, 20, 10])
    assert baseline.sign == -1.0 and kendall_tau([40, 30, 20, 10], baseline.predict([1, 2, 3, 4])) == 1.0


def test_cli_build_train_eval(tmp_path: Path, tiny_encoder: Path, tiny_tokenizer_dir: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": it.id, "prompt": it.prompt, "answer": it.answer}) + "\n"
                               for it in synthetic(300, seed=1)), encoding="utf-8")
    data = tmp_path / "d.jsonl"
    common = ["--device", "cpu", "--max-length", "32", "--list-size", "16"]
    assert main(["ltr", "build-data", "--input", str(prompts), "--output", str(data), "--label-tokenizer",
                 str(tiny_tokenizer_dir), "--test-size", "64", "--val-size", "32"]) == 0
    assert main(["ltr", "train", "--data", str(data), "--output", str(tmp_path / "r"), "--encoder", str(tiny_encoder),
                 "--epochs", "3", "--lr", "1e-3", *common]) == 0
    assert main(["ltr", "train", "--data", str(data), "--output", str(tmp_path / "b"), "--encoder", str(tiny_encoder),
                 "--objective", "bucket", "--max-steps", "3", *common]) == 0
    out = tmp_path / "rank.json"
    assert main(["ltr", "eval", "--data", str(data), "--ranker", str(tmp_path / "r"), "--bucket-classifier",
                 str(tmp_path / "b"), "--extra-classifier", f"again={tmp_path / 'b'}", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    m = result["metrics"]
    for key in ("kendall_tau", "kendall_tau_per_list", "kendall_tau_prompt_len", "kendall_tau_bucket_classifier",
                "ranker_ms_per_prompt_batch1", "ranker_ms_per_prompt_batch32"):
        assert isinstance(m[key], float), key
    # A barely trained classifier may put every prompt in one bucket: its argmax tau is undefined, written null.
    assert m["kendall_tau_bucket_classifier_argmax"] is None or isinstance(m["kendall_tau_bucket_classifier_argmax"],
                                                                           float)
    assert m["kendall_tau_bucket_classifier_again"] == m["kendall_tau_bucket_classifier"]
    assert m["num_test_prompts"] == 64 and m["kendall_tau"] > 0.3
    assert result["command"].startswith("lmstack ltr eval --data")
    capsys.readouterr()
    assert main(["ltr", "eval", "--data", str(tmp_path / "missing.jsonl"), "--ranker", str(tmp_path / "r")]) == 2
    assert main(["ltr", "eval", "--data", str(data), "--ranker", str(tmp_path)]) == 2
    assert main(["ltr", "eval", "--data", str(data), "--ranker", str(tmp_path / "r"), "--bucket-classifier",
                 str(tmp_path / "r"), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "not a length-ranker folder" in err and "not a bucket classifier" in err
    assert "Traceback" not in err


@pytest.mark.gpu
def test_fine_tunes_on_cuda_and_scores_like_cpu(tmp_path: Path, tiny_encoder: Path, data: Path) -> None:
    train, val = read_examples(data, "train"), read_examples(data, "val")
    ranker = LengthRanker.create(str(tiny_encoder), max_length=32, device="cuda")
    ranker.fit(train, val, TrainConfig(epochs=2, list_size=16, lr=1e-3, head_lr=3e-3))  # bf16 autocast on CUDA
    ranker.save(tmp_path / "r")
    prompts = [ex.prompt for ex in val]
    on_gpu = LengthRanker.load(tmp_path / "r", device="cuda").score(prompts)
    on_cpu = LengthRanker.load(tmp_path / "r", device="cpu").score(prompts)
    assert on_gpu == pytest.approx(on_cpu, abs=1e-3)
