#!/usr/bin/env bash
# Builds .carry/ltr_serving/ (git-ignored, ~50 MiB) for benchmarks/gpu_ltr_serving.sh: the trained length ranker
# (re-saved in fp16), the held-out test split of the ranker's data file, Llama-3-8B shapes with the SmolLM2
# tokenizer (vocabulary cut to its 49,152 ids, the tokenizer the lengths were counted with), and the gguf wheel.
#
#   bash benchmarks/prepare_ltr_serving_carry.sh RANKER_DIR DATA_FILE
#
# RANKER_DIR: a folder from `lmstack ltr train` (e.g. the one benchmarks/gpu_ltr_train.sh returns);
# DATA_FILE: the `lmstack ltr build-data` file it was trained on (only its test split is carried).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -ne 2 ] || [ ! -d "$1" ] || [ ! -f "$2" ]; then
  echo "usage: bash benchmarks/prepare_ltr_serving_carry.sh RANKER_DIR DATA_FILE" >&2
  exit 2
fi
OUT=.carry/ltr_serving
rm -rf "$OUT"
mkdir -p "$OUT/whl"
python3 -m pip download -q --no-deps -d "$OUT/whl" gguf==0.19.0
python3 - "$1" "$2" "$OUT" <<'PY'
import gzip
import json
import shutil
import sys
from pathlib import Path

import torch

from lmstack.models.config import ModelConfig
from lmstack.models.dummy import PRESETS
from lmstack.models.loader import resolve_model_path
from lmstack.ranking import LengthRanker
from lmstack.ranking.data import read_examples

ranker_dir, data_file, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
ranker = LengthRanker.load(ranker_dir, device="cpu")
ranker.save(out / "ranker", dtype=torch.float16)
probe = ["Write a long essay about the history of Rome.", "Answer yes or no: is water wet?"]
half = LengthRanker.load(out / "ranker", device="cpu").score(probe)
print("ranker scores fp32 / fp16:", [round(s, 4) for s in ranker.score(probe)], [round(s, 4) for s in half])

test = read_examples(data_file, split="test")
with gzip.open(out / "test.jsonl.gz", "wt", encoding="utf-8") as f:
    for ex in test:
        f.write(json.dumps(ex.__dict__) + "\n")
print(f"{len(test)} held-out test prompts from {data_file}")

tok = resolve_model_path("smollm2-135m-instruct")
cfg = ModelConfig.from_dict(PRESETS["llama-3-8b"]).to_hf_dict()
cfg["vocab_size"] = 49152  # every generated id decodes with the borrowed tokenizer
model = out / "llama-3-8b-v49k"
model.mkdir()
(model / "config.json").write_text(json.dumps(cfg, indent=1))
for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(tok / name, model / name)
PY
echo "$OUT ready: $(du -sh "$OUT" | cut -f1)"
