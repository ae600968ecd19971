"""The serving benchmark: vLLM's metric definitions on hand-made timings, Poisson arrivals, and small live
runs (benchmark, sweep, load test) against a real `lmstack serve` of the tiny random model."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from conftest import live_server
from lmstack.bench.load_test import kv_blocks_in_use
from lmstack.bench.serve import (
    RequestRecord,
    add_arguments,
    arrival_offsets,
    compute_metrics,
    load_tokenizer,
    parse_slo,
    run,
)
from lmstack.data.sharegpt import sample_requests
from lmstack.errors import LmstackError

MODEL = "dummy:tiny-llama"


def _records() -> list[RequestRecord]:
    return [
        RequestRecord(True, prompt_tokens=10, output_tokens=5, ttft=0.1, itl=[0.1] * 4, e2e=0.5),
        RequestRecord(True, prompt_tokens=20, output_tokens=1, ttft=0.2, itl=[], e2e=0.2),
        RequestRecord(True, prompt_tokens=30, output_tokens=3, ttft=0.3, itl=[0.5, 0.5], e2e=1.3),
        RequestRecord(False, prompt_tokens=40, error="503: busy"),
    ]


def test_metrics_follow_vllm_definitions() -> None:
    m = compute_metrics(_records(), duration=2.0)
    assert (m["completed"], m["failed"]) == (3, 1)
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (60, 9)
    assert m["request_throughput"] == pytest.approx(1.5)
    assert m["output_throughput"] == pytest.approx(4.5)
    assert m["total_token_throughput"] == pytest.approx(34.5)
    assert m["mean_ttft_ms"] == pytest.approx(200.0) and m["median_ttft_ms"] == pytest.approx(200.0)
    # TPOT = (E2E - TTFT) / (tokens - 1) per request; the one-token request has no TPOT.
    assert m["mean_tpot_ms"] == pytest.approx(300.0) and m["median_tpot_ms"] == pytest.approx(300.0)
    assert m["p99_tpot_ms"] == pytest.approx(100.0 + 0.99 * 400.0)
    # ITL pools every gap of every request.
    assert m["mean_itl_ms"] == pytest.approx((4 * 100.0 + 2 * 500.0) / 6)
    assert m["median_itl_ms"] == pytest.approx(100.0)
    assert m["p90_itl_ms"] == pytest.approx(500.0)
    assert m["mean_e2e_ms"] == pytest.approx(2000.0 / 3)
    assert m["p99_e2e_ms"] == pytest.approx(500.0 + 0.98 * 800.0)
    assert "goodput" not in m


def test_goodput_counts_requests_meeting_every_slo() -> None:
    # ttft <= 250 ms fails the third request; the one-token request has no TPOT and passes that SLO.
    m = compute_metrics(_records(), duration=2.0, slo=parse_slo("ttft=250,tpot=200"))
    assert m["goodput"] == pytest.approx(2 / 2.0)
    assert compute_metrics(_records(), 2.0, slo={"tpot": 99.0})["goodput"] == pytest.approx(1 / 2.0)
    assert compute_metrics(_records(), 2.0, slo={"e2e": 1300.0})["goodput"] == pytest.approx(1.5)


def test_slo_parsing() -> None:
    assert parse_slo("ttft=500, tpot_ms=50,e2e=2000") == {"ttft": 500.0, "tpot": 50.0, "e2e": 2000.0}
    assert parse_slo(None) == {}
    for bad in ("ttft", "ttft=fast", "itl=5", "ttft=-1"):
        with pytest.raises(LmstackError, match="--slo"):
            parse_slo(bad)


def test_poisson_arrivals_have_the_asked_rate_and_follow_the_seed() -> None:
    offsets = arrival_offsets(20000, rate=4.0, seed=3)
    gaps = np.diff(offsets)
    assert offsets[0] == 0.0 and np.all(gaps >= 0)
    assert gaps.mean() == pytest.approx(0.25, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)  # exponential: std == mean
    assert arrival_offsets(50, 4.0, seed=3) == offsets[:50]
    assert arrival_offsets(50, 4.0, seed=4) != offsets[:50]
    assert arrival_offsets(5, float("inf")) == [0.0] * 5
    with pytest.raises(LmstackError, match="rate"):
        arrival_offsets(5, 0.0)


def test_kv_blocks_gauge_is_read_from_prometheus_text() -> None:
    text = ("# HELP lmstack_kv_blocks_used KV cache blocks in use\n# TYPE lmstack_kv_blocks_used gauge\n"
            "lmstack_kv_blocks_used 7.0\nlmstack_kv_blocks_total 512.0\n")
    assert kv_blocks_in_use(text) == 7.0
    assert kv_blocks_in_use('lmstack_kv_blocks_used{gpu="0"} 2\nlmstack_kv_blocks_used{gpu="1"} 3\n') == 5.0
    assert kv_blocks_in_use("other_metric 1\n") is None


# ---------------------------------------------------------------- live runs

@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A real `lmstack serve` of the tiny random model; yields (base URL, served model name)."""
    with live_server(["--model", MODEL], tmp_path_factory.mktemp("server")) as url:
        yield url, httpx.get(f"{url}/v1/models").json()["data"][0]["id"]


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_bench_serve_end_to_end(server: tuple[str, str], tmp_path) -> None:
    url, served = server
    out = tmp_path / "serve.json"
    metrics = run(_args("--base-url", url, "--model", served, "--tokenizer", MODEL, "--num-prompts", "8",
                        "--request-rate", "20", "--replay-lengths", "--max-model-len", "256",
                        "--slo", "ttft=600000,tpot=600000", "--output", str(out)))
    expected = sample_requests(load_tokenizer(MODEL), 8, seed=0, max_prompt_len=128, max_total_len=256)
    assert (metrics["completed"], metrics["failed"]) == (8, 0)
    assert metrics["total_output_tokens"] == sum(r.output_len for r in expected)  # replayed exactly
    # Every request meets so loose an SLO.
    assert metrics["goodput"] == pytest.approx(metrics["request_throughput"])
    assert 0 < metrics["median_ttft_ms"] <= metrics["median_e2e_ms"]
    assert metrics["mean_tpot_ms"] > 0 and metrics["p99_itl_ms"] >= metrics["median_itl_ms"] > 0
    saved = json.loads(out.read_text())
    assert saved["metrics"] == metrics and "--replay-lengths" in saved["command"]


def test_sweep_writes_json_list_and_plot(server: tuple[str, str], tmp_path) -> None:
    url, served = server
    out = tmp_path / "sweep.json"
    result = run(_args("--base-url", url, "--tokenizer", MODEL, "--num-prompts", "3", "--sweep", "10,40",
                       "--max-model-len", "128", "--endpoint", "chat", "--output", str(out)))
    runs = json.loads(out.read_text())["metrics"]["sweep"]
    assert runs == result["sweep"] and [r["request_rate"] for r in runs] == [10.0, 40.0]
    assert all(r["completed"] == 3 for r in runs)
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_load_test_loses_nothing_and_leaks_no_kv_blocks(server: tuple[str, str], tmp_path) -> None:
    url, served = server
    out = tmp_path / "serve_load.json"
    m = run(_args("--base-url", url, "--load-test", "--num-clients", "16", "--disconnect-fraction", "0.25",
                  "--malformed", "6", "--max-tokens", "12", "--output", str(out)))
    assert (m["requests_ok"], m["requests_aborted"], m["requests_lost"]) == (12, 4, 0), m["problems"]
    assert m["kv_blocks_leaked"] == 0
    assert m["server_up"] and (m["malformed_rejected"], m["malformed_unexpected"]) == (6, 0)
    assert json.loads(out.read_text())["metrics"]["requests_lost"] == 0
