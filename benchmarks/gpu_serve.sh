#!/usr/bin/env bash
# CUDA engine tests and the HTTP-overhead benchmark in one device call. The overhead run uses Llama-3-8B's
# shapes with the vocabulary cut to the borrowed tokenizer's 49,152 ids, so every generated id decodes to text.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry/whl/*.whl .carry/srvwhl/*.whl || exit 1
export PYTHONPATH="$PWD/src:/tmp/site" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/lmstack-out}
mkdir -p "$OUT"
python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -3
python3 -m lmstack.bench.overhead --model dummy:.carry/llama-3-8b-v49k \
  --num-requests 64 --max-tokens 128 --repeats 3 --output "$OUT/serve_overhead_gpu.json" \
  2>&1 | tr "\r" "\n" | grep -v -E "^(generate|Loading)" | tail -12
