#!/usr/bin/env bash
# Double Sparsity quality (issue 6) on one GPU: wikitext-2 perplexity and key-value retrieval, dense vs 1/8 and
# 1/16 sparsity vs uncalibrated channels, on the carried Qwen2.5-Coder models: the 1.5B has head dim 128 (1/16 of
# the channels = 8 labels, the paper's setting), the 0.5B head dim 64 (1/16 = 4 labels). Needs .carry/ltr/wikitext2
# (`LABELS=generate benchmarks/prepare_ltr_carry.sh`) and the GGUF parts in .carry/ah/model and .carry/ah/draft
# (`DRAFT=1 benchmarks/prepare_arena_carry.sh`). Stopped after BUDGET seconds; a rerun on the still-warm machine
# resumes from $WORK/records.jsonl. Writes $OUT/double_sparsity_quality.json and $OUT/ds_quality.log.
set -uo pipefail
OUT=${OUT:-/tmp/lmstack-out}
WORK=${WORK:-/tmp/ds-quality}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry/ah/whl/*.whl || exit 1
export PYTHONPATH="$PWD/src:/tmp/site" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT" "$WORK"
source benchmarks/carried_gguf.sh
assemble qwen2.5-coder-1.5b-instruct .carry/ah/model .carry/ah/model.size || exit 1
assemble qwen2.5-coder-0.5b-instruct .carry/ah/draft .carry/ah/draft.size || exit 1
W=.carry/ltr/wikitext2
timeout "${BUDGET:-300}" python3 -m lmstack.cli bench double-sparsity-quality \
  --models "${MODELS:-qwen2.5-coder-1.5b-instruct,qwen2.5-coder-0.5b-instruct}" --work-dir "$WORK" \
  --calib-data "$W/valid.txt" --eval-data "$W/wikitext-2-raw-v1_test.jsonl" --window "${WINDOW:-2048}" \
  --num-windows "${NUM_WINDOWS:-16}" --retrieval-lengths "${LENGTHS:-1024,2048,4096}" \
  --retrieval-samples "${SAMPLES:-16}" \
  --ppl-variants dense,ds_1_8,ds_1_16,random_channels_1_16,first_channels_1_16,ds_1_16_int8 \
  --dtype bfloat16 --device cuda --output "$OUT/double_sparsity_quality.json" 2>&1 | tr "\r" "\n" \
  | grep -v -E "^(Loading|generate|ppl|retrieval|calibrat)" | tee "$OUT/ds_quality.log" | tail -30
echo "exit ${PIPESTATUS[0]} at ${SECONDS}s"
