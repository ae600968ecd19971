#!/usr/bin/env bash
# Builds .carry/ltr/ (git-ignored, <= 60 MiB) for benchmarks/gpu_ltr_train.sh: the ShareGPT length data (labels =
# the first answer's length in SmolLM2 tokens, seeded split with 2,500 held-out prompts) gzipped, the MiniLM
# encoder in fp16 safetensors (the fp32 file is 87 MiB), and the gguf wheel that `import lmstack` needs.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${LTR_BUILD:-${TMPDIR:-/tmp}/lmstack-ltr}
mkdir -p .carry/ltr/whl "$BUILD"
python3 -m pip download -q --no-deps -d .carry/ltr/whl gguf==0.19.0
# Resumable: re-running with the same options only finishes what is missing.
python3 -m lmstack.cli ltr build-data --output "$BUILD/sharegpt.jsonl" --test-size 2500 --val-size 500 --seed 0 \
  2>&1 | tr "\r" "\n" | tail -1
gzip -9 -c "$BUILD/sharegpt.jsonl" > .carry/ltr/sharegpt.jsonl.gz.tmp
mv .carry/ltr/sharegpt.jsonl.gz.tmp .carry/ltr/sharegpt.jsonl.gz
python3 - <<'PY'
import torch

from lmstack.models.encoder import load_encoder

load_encoder("all-minilm-l6-v2").save(".carry/ltr/encoder", dtype=torch.float16)
PY
echo ".carry/ltr ready: $(du -sh .carry/ltr | cut -f1)"
