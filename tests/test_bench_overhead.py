"""The HTTP overhead benchmark end to end on the tiny random model: both paths run, the file has the keys."""

from __future__ import annotations

import argparse
import json

from lmstack.bench.overhead import add_arguments, run

MODEL = "dummy:tiny-llama"


def test_overhead_bench_measures_both_paths(tmp_path) -> None:
    out = tmp_path / "serve_overhead.json"
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    metrics = run(parser.parse_args(["--model", MODEL, "--num-requests", "4", "--prompt-len", "16",
                                     "--max-tokens", "8", "--repeats", "2", "--device", "cpu",
                                     "--output", str(out)]))
    saved = json.loads(out.read_text())
    assert saved["metrics"] == metrics
    assert metrics["inprocess_tok_s"] > 0 and metrics["http_tok_s"] > 0
    assert metrics["http_over_inprocess"] == metrics["http_tok_s"] / metrics["inprocess_tok_s"]
    assert len(metrics["inprocess_tok_s_runs"]) == len(metrics["http_tok_s_runs"]) == 2
    assert "lmstack bench overhead" in saved["command"] and "--port 0" in saved["server_command"]
