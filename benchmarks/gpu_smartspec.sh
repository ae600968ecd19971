#!/usr/bin/env bash
# SmartSpec (issue 5) on one GPU: no speculation vs fixed k = 1, 3, 5 vs SmartSpec across Poisson rates, in one run.
# PROPOSER=draft (default): draft qwen2.5-coder-0.5b-instruct → target qwen2.5-coder-1.5b-instruct on the coding
#   prompts; needs .carry/ah/ from `DRAFT=1 benchmarks/prepare_arena_carry.sh` with every model and draft part
#   carried (see that script). Writes $OUT/smartspec_gpu.json.
# PROPOSER=ngram: prompt lookup on SmolLM2-135M-Instruct repeating and editing wikitext-2 paragraphs; needs
#   .carry/ss/ from benchmarks/prepare_smartspec_carry.sh (its three GGUF parts). Writes $OUT/smartspec_ngram_gpu.json.
# Each also writes the run log (.jsonl), the plot (.png) and the SmartSpec profile (.profile.json) beside it.
set -uo pipefail
OUT=${OUT:-/tmp/lmstack-out}
PROPOSER=${PROPOSER:-draft}
export PYTHONPATH="$PWD/src:/tmp/site" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
source benchmarks/carried_gguf.sh
[ "$PROPOSER" = ngram ] && C=${CARRY:-.carry/ss} || C=${CARRY:-.carry/ah}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $C/whl/*.whl || exit 1
if [ "$PROPOSER" = ngram ]; then
  assemble smollm2-135m-instruct "$C/smol" "$C/smol.size" || exit 1
  ARGS=(--proposer ngram --model "$LMSTACK_CACHE/gguf/smollm2-135m-instruct.gguf" --data quote
        --data-file "$C/wikitext-2-raw-v1_test.jsonl" --rates "${RATES:-4,32,128}" --repeats "${REPEATS:-2}"
        --num-requests "${NUM_REQUESTS:-64}" --max-tokens "${MAX_TOKENS:-128}" --output "$OUT/smartspec_ngram_gpu.json")
else
  assemble qwen2.5-coder-1.5b-instruct "$C/model" "$C/model.size" || exit 1
  assemble qwen2.5-coder-0.5b-instruct "$C/draft" "$C/draft.size" || exit 1
  ARGS=(--proposer draft --data code --rates "${RATES:-2,8,32}" --repeats "${REPEATS:-1}"
        --num-requests "${NUM_REQUESTS:-32}" --max-tokens "${MAX_TOKENS:-256}" --output "$OUT/smartspec_gpu.json")
fi
timeout "${BUDGET:-400}" python3 -m lmstack.bench.smartspec "${ARGS[@]}" --policies nospec,1,3,5,smart \
  --max-prompt-len 320 --max-num-seqs "${MAX_NUM_SEQS:-32}" --spec-max-k 5 --dtype bfloat16 \
  --device "${DEVICE:-cuda}" 2>&1 | tr "\r" "\n" | grep -v -E "^(Loading|generate)" | tail -40
echo "exit ${PIPESTATUS[0]} at ${SECONDS}s"
