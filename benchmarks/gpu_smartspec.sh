#!/usr/bin/env bash
# SmartSpec (issue 5) on one GPU: draft qwen2.5-coder-0.5b-instruct → target qwen2.5-coder-1.5b-instruct on the
# coding prompts, no speculation vs fixed k = 1, 3, 5 vs SmartSpec across Poisson rates, in one run.
# Needs .carry/ah/ from `DRAFT=1 benchmarks/prepare_arena_carry.sh` with every model and draft part carried
# (see that script). Writes $OUT/smartspec_gpu.json (+ .jsonl log, .png, .profile.json).
set -uo pipefail
C=${CARRY:-.carry/ah}
OUT=${OUT:-/tmp/lmstack-out}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $C/whl/*.whl || exit 1
export PYTHONPATH="$PWD/src:/tmp/site" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
source benchmarks/carried_gguf.sh
assemble qwen2.5-coder-1.5b-instruct "$C/model" "$C/model.size" || exit 1
assemble qwen2.5-coder-0.5b-instruct "$C/draft" "$C/draft.size" || exit 1
timeout "${BUDGET:-400}" python3 -m lmstack.bench.smartspec --proposer draft --data code \
  --policies nospec,1,3,5,smart --rates "${RATES:-2,8,32}" --num-requests "${NUM_REQUESTS:-32}" \
  --max-tokens "${MAX_TOKENS:-256}" --max-prompt-len 320 --max-num-seqs "${MAX_NUM_SEQS:-32}" --spec-max-k 5 \
  --dtype bfloat16 --device "${DEVICE:-cuda}" --output "$OUT/smartspec_gpu.json" 2>&1 | tr "\r" "\n" | grep -v -E "^(Loading|generate)" | tail -40
