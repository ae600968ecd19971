"""`BucketedScorer`: bucket padding and CUDA-graph replay give the ranker's own scores, and the ltr policy
collects them without waiting."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from lmstack.engine.policies.ltr import LearnedRankPolicy, load_ranker
from lmstack.engine.sampling_params import SamplingParams
from lmstack.engine.sequence import Sequence
from lmstack.errors import LmstackError
from lmstack.ranking import LengthRanker
from lmstack.ranking.graphed import BucketedScorer, bucket_of, buckets
from test_encoder import make_tiny_encoder
from test_ranking_decoder import make_tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = [
    "the", "sea", "harbour", "ship", "storm", "sail", "wind", "rope",
    "anchor", "gull", "tide", "wave", "deck", "mast", "crew", "light",
]


def _prompts(n: int, seed: int = 0) -> list[str]:
    """Prompts of 1..60 words, so that batches span several length buckets and some get truncated."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 60))) for _ in range(n)]


@pytest.fixture(scope="module")
def ranker_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    enc = make_tiny_encoder(tmp_path_factory.mktemp("enc") / "enc", hidden=32, layers=2)
    folder = tmp_path_factory.mktemp("ranker") / "ranker"
    LengthRanker.create(str(enc), max_length=48, seed=3).save(folder)
    return folder


def test_buckets() -> None:
    assert buckets(16, 48) == [16, 32, 48]
    assert buckets(16, 64) == [16, 32, 64]
    assert buckets(1, 32) == [1, 2, 4, 8, 16, 32]
    assert buckets(1, 1) == [1]
    assert bucket_of(17, [16, 32, 48]) == 32 and bucket_of(48, [16, 32, 48]) == 48


@pytest.mark.parametrize("max_batch", [1, 4, 32])
def test_bucket_padding_gives_the_rankers_scores(ranker_dir: Path, max_batch: int) -> None:
    ranker = LengthRanker.load(ranker_dir)
    prompts = _prompts(23)
    want = ranker.score(prompts)
    scorer = BucketedScorer(ranker, max_batch=max_batch, use_graphs=False)
    assert scorer.score(prompts) == pytest.approx(want, rel=1e-4, abs=1e-5)
    pending = scorer.launch(prompts)
    assert len(pending) == -(-23 // max_batch) and all(p.done() for p in pending)
    assert sorted(i for p in pending for i in p.index) == list(range(23))
    assert scorer.launch([]) == []


def test_decoder_ranker_bucket_padding(tmp_path: Path, tiny_tokenizer_dir: Path) -> None:
    llama = make_tiny_llama(tmp_path / "llama", tiny_tokenizer_dir)
    LengthRanker.create(str(llama), max_length=40, seed=1, pooling="last").save(tmp_path / "r")
    ranker = LengthRanker.load(tmp_path / "r")
    prompts = _prompts(9, seed=1)
    got = BucketedScorer(ranker, max_batch=4, use_graphs=False).score(prompts)
    assert got == pytest.approx(ranker.score(prompts), rel=1e-4, abs=1e-5)


def test_bad_settings(ranker_dir: Path) -> None:
    ranker = LengthRanker.load(ranker_dir)
    with pytest.raises(LmstackError, match="max_batch"):
        BucketedScorer(ranker, max_batch=0)
    if not torch.cuda.is_available():
        with pytest.raises(LmstackError, match="CUDA graphs"):
            BucketedScorer(ranker, use_graphs=True)


def test_policy_with_a_bucketed_scorer_serves_by_score(ranker_dir: Path) -> None:
    scorer = BucketedScorer(LengthRanker.load(ranker_dir), max_batch=4, use_graphs=False)
    prompts = _prompts(6, seed=2)
    policy = LearnedRankPolicy(ranker=scorer, device="cpu", batch_size=8)
    seqs = [Sequence(request_id=str(i), prompt_token_ids=[1, 2, 3], prompt=p, seq_no=i, arrival_time=float(i),
                     params=SamplingParams(max_tokens=2)) for i, p in enumerate(prompts)]
    policy.on_arrival(seqs)
    policy.on_step(1, seqs, [])
    assert policy.stats.num_scored == 6 and all(policy.ready(s) for s in seqs)
    want = LengthRanker.load(ranker_dir).score(prompts)
    order = sorted(range(6), key=lambda i: want[i])
    assert sorted(range(6), key=lambda i: policy.key(seqs[i])) == order


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_graphs_match_eager(ranker_dir: Path, dtype: torch.dtype) -> None:
    ranker = LengthRanker.load(ranker_dir, device="cuda", dtype=dtype)
    prompts = _prompts(37, seed=4)
    eager = BucketedScorer(ranker, max_batch=8, use_graphs=False).score(prompts)
    graphed = BucketedScorer(ranker, max_batch=8)
    graphed.capture()
    assert len(graphed._graphs) == len(graphed.batch_sizes) * len(graphed.lengths)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for _ in range(2):  # replays reuse the graphs' buffers: a second round must not see the first one's data
        pending = graphed.launch(prompts)
        torch.cuda.synchronize()
        assert all(p.done() for p in pending)
        got = [0.0] * len(prompts)
        for p in pending:
            for i, s in zip(p.index, p.result(), strict=True):
                got[i] = s
            assert p.gpu_s > 0
        assert got == pytest.approx(eager, rel=tol, abs=tol)
    cpu = LengthRanker.load(ranker_dir).score(prompts)
    assert graphed.score(prompts) == pytest.approx(cpu, rel=tol, abs=tol)


@pytest.mark.gpu
def test_load_ranker_on_cuda_is_bucketed_and_16_bit(ranker_dir: Path) -> None:
    scorer = load_ranker(ranker_dir, "cuda")
    assert isinstance(scorer, BucketedScorer) and scorer.use_graphs
    assert scorer.ranker.head[-1].weight.dtype == torch.float16


def test_bench_ranker_cli(tmp_path: Path, ranker_dir: Path) -> None:
    import json

    from lmstack.cli import main

    data = tmp_path / "data.jsonl"
    rows = [{"id": str(i), "prompt": p, "prompt_len": len(p.split()), "output_len": 3 + 7 * i, "split": "test"}
            for i, p in enumerate(_prompts(12, seed=5))]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "speed.json"
    assert main(["bench", "ranker", "--ranker", str(ranker_dir), "--data", str(data), "--batch-sizes", "1,4",
                 "--repeats", "2", "--device", "cpu", "--output", str(out)]) == 0
    m = json.loads(out.read_text())["metrics"]
    assert [r["batch"] for r in m["rows"]] == [1, 4] and all(r["bucketed_ms"] > 0 for r in m["rows"])
    assert m["kendall_tau_eager_vs_bucketed"] > 0.99 and not m["cuda_graphs"]
    assert main(["bench", "ranker", "--ranker", str(ranker_dir), "--data", str(data), "--batch-sizes", "64",
                 "--device", "cpu", "--output", str(out)]) == 2  # more than the 12 prompts: a clear error
