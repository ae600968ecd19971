#!/usr/bin/env bash
# Builds .carry/c2/ (git-ignored) for benchmarks/gpu_double_sparsity.sh: the gguf wheel the GPU machine lacks
# (lmstack.models imports it) and a tokenizer folder for dummy: models (the embedded SmolLM2 tokenizer's files).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .carry/c2/whl .carry/c2/tokenizer
python3 -m pip download -q --no-deps -d .carry/c2/whl gguf==0.19.0
python3 - <<'PY'
import shutil

from lmstack.models.loader import resolve_model_path

tok = resolve_model_path("smollm2-135m-instruct")
for f in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(tok / f, f".carry/c2/tokenizer/{f}")
PY
echo ".carry/c2 ready: $(du -sh .carry/c2 | cut -f1)"
