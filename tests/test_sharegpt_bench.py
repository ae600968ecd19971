"""ShareGPT loading/sampling and benchmark result files (no model, no GPU)."""

from __future__ import annotations

import json
import os

import pytest

from lmstack.bench.results import env_info, write_results
from lmstack.data.sharegpt import BenchRequest, load_sharegpt, sample_requests, sharegpt_path
from lmstack.errors import LmstackError


class WordTokenizer:
    """One token per whitespace-separated word: lengths are easy to reason about in the filter tests."""

    def encode(self, text: str) -> list[int]:
        return [len(word) for word in text.split()]


def _conv(i: int, prompt_words: int, answer_words: int) -> dict:
    return {"id": f"c{i}", "conversations": [
        {"from": "human", "value": " ".join(["ask"] * prompt_words)},
        {"from": "gpt", "value": " ".join(["answer"] * answer_words)},
    ]}


def _write_truncated(path, records: list[dict], tail: str) -> None:
    text = "[\n" + ",\n".join(json.dumps(r, indent=2) for r in records) + ",\n" + tail
    path.write_text(text, encoding="utf-8")


def test_loader_keeps_complete_records_and_drops_truncated_tail(tmp_path, caplog):
    records = [_conv(i, 5 + i, 7) for i in range(50)]
    records[3]["conversations"][0]["value"] = "naïve ünïcödé, \"quoted\" [brackets] {braces} ]"
    path = tmp_path / "cut.json"
    tail = '{"id": "broken", "conversations": [{"from": "human", "value": "half a sen'
    _write_truncated(path, records, tail)
    with caplog.at_level("DEBUG", logger="lmstack.data.sharegpt"):
        loaded = load_sharegpt(path)
    assert loaded == records
    assert "1 truncated tail dropped" in caplog.text
    assert load_sharegpt(path, limit=7) == records[:7]


def test_loader_reads_records_that_straddle_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr("lmstack.data.sharegpt._CHUNK_CHARS", 64)  # far smaller than one record
    records = [_conv(i, 40, 3) for i in range(5)]
    path = tmp_path / "whole.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    assert load_sharegpt(path) == records


def test_loader_errors_name_the_problem(tmp_path):
    with pytest.raises(LmstackError, match="does not exist"):
        load_sharegpt(tmp_path / "missing.json")
    (tmp_path / "obj.json").write_text('{"id": 1}')
    with pytest.raises(LmstackError, match="not a JSON array"):
        load_sharegpt(tmp_path / "obj.json")


def test_sample_requests_filters_like_vllm_and_is_seeded():
    convs = [
        _conv(0, 3, 10),     # prompt < 4 tokens
        _conv(1, 10, 3),     # output < 4 tokens
        _conv(2, 30, 10),    # prompt > max_prompt_len (20)
        _conv(3, 15, 30),    # prompt + output > max_total_len (40)
        {"id": "gpt-first", "conversations": [{"from": "gpt", "value": "hi there you all"}]},
    ] + [_conv(10 + i, 4 + i % 16, 4 + i % 20) for i in range(40)]
    kwargs = {"max_prompt_len": 20, "max_total_len": 40, "conversations": convs}
    reqs = sample_requests(WordTokenizer(), 20, seed=1, **kwargs)
    assert len(reqs) == 20 and all(isinstance(r, BenchRequest) for r in reqs)
    for r in reqs:
        n = len(r.prompt_token_ids)
        assert 4 <= n <= 20 and r.output_len >= 4 and n + r.output_len <= 40
        assert n == len(r.prompt.split())
    assert reqs == sample_requests(WordTokenizer(), 20, seed=1, **kwargs)
    assert reqs != sample_requests(WordTokenizer(), 20, seed=2, **kwargs)
    with pytest.raises(LmstackError, match="lower num_prompts"):
        sample_requests(WordTokenizer(), 100, **kwargs)


def test_real_sharegpt_file_has_the_expected_conversations():
    conversations = load_sharegpt(sharegpt_path())
    assert len(conversations) > 17_000
    first = conversations[0]
    assert set(first) == {"id", "conversations"}
    assert {"from", "value"} <= set(first["conversations"][0])


def test_write_results_is_atomic_and_complete(tmp_path, monkeypatch):
    path = tmp_path / "nested" / "dir" / "results.json"
    write_results(path, "lmstack bench throughput --num-prompts 4", {"throughput_tok_s": 12.5},
                  device="cpu", model="dummy:tiny-llama")
    data = json.loads(path.read_text())
    assert {"command", "device", "git_sha", "env", "metrics", "timestamp", "model"} <= set(data)
    assert data["metrics"] == {"throughput_tok_s": 12.5}
    assert data["device"] == data["env"]["device"] and data["git_sha"] == data["env"]["git_sha"]
    assert os.listdir(path.parent) == ["results.json"]  # no temp file left behind

    def fail(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("lmstack.bench.results.os.replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_results(path, "second run", {"throughput_tok_s": 1.0}, device="cpu")
    assert json.loads(path.read_text())["command"] == "lmstack bench throughput --num-prompts 4"
    assert os.listdir(path.parent) == ["results.json"]


def test_env_info_has_versions_and_device(monkeypatch):
    """The code is named as it was when the benchmark started, not as edited while it ran."""
    from lmstack.bench import results

    env = env_info("cpu")
    assert "cores" in env["device"]
    for key in ("torch", "transformers", "python", "git_sha"):
        assert env[key]
    monkeypatch.setattr(results, "source_tree", lambda: "edited since")
    monkeypatch.setattr(results, "git_sha", lambda: "edited since")
    assert env_info("cpu")["source_tree"] == env["source_tree"] != "edited since"
    assert env_info("cpu")["git_sha"] == env["git_sha"]


def test_source_tree_names_the_code_on_disk_without_writing_to_the_repository(tmp_path, monkeypatch):
    """The id is the commit's `src` tree while src/ is as committed, and changes with an edited or a new
    untracked file there; the repository's object store is not written to (a copied checkout may be
    read-only, and results are not commits)."""
    import shutil
    import subprocess

    if shutil.which("git") is None:
        pytest.skip("needs git")

    from lmstack.bench import results

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True,
                              text=True).stdout.strip()

    (tmp_path / "src" / "pkg").mkdir(parents=True)
    (tmp_path / "src" / "pkg" / "a.py").write_text("A = 1\n")
    (tmp_path / "README").write_text("outside src\n")
    git("init", "-q")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    monkeypatch.setattr(results, "_REPO_DIR", tmp_path / "src" / "pkg")
    objects = sorted(p for p in (tmp_path / ".git" / "objects").rglob("*") if p.is_file())
    assert results.source_tree() == git("rev-parse", "HEAD:src")
    (tmp_path / "README").write_text("edited outside src\n")
    assert results.source_tree() == git("rev-parse", "HEAD:src")
    (tmp_path / "src" / "pkg" / "a.py").write_text("A = 2\n")
    edited = results.source_tree()
    assert edited not in (None, git("rev-parse", "HEAD:src"))
    (tmp_path / "src" / "pkg" / "b.py").write_text("B = 1\n")
    assert results.source_tree() not in (None, edited)
    assert sorted(p for p in (tmp_path / ".git" / "objects").rglob("*") if p.is_file()) == objects
    monkeypatch.setattr(results, "_REPO_DIR", tmp_path.parent)  # not a repository
    assert results.source_tree() is None
