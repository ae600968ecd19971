#!/usr/bin/env bash
# Arena-Hard (issue 7) on one GPU, in one call, with qwen2.5-coder-1.5b-instruct as annotator and judge:
#  1. BenchBuilder annotation of the ShareGPT prompts on the seven criteria (clustering and selection run
#     on the CPU afterwards: `lmstack arena-hard curate` finds the annotations and skips straight to them);
#  2. pairwise judgments of gpt-4-0613 and gpt-3.5-turbo-0125 against gpt-4-0314, position-swapped, on the
#     v0.1 questions, stopped when the call has run BUDGET seconds (default 560): what is finished comes back,
#     and a rerun on the still-warm machine resumes from $WORK.
# STEPS picks the steps (default "annotate judge"), TEMPLATE the judge prompt (default arena-hard). Needs .carry/ah/ from benchmarks/prepare_arena_carry.sh, with every model part already carried.
# Writes $OUT/annotations.jsonl, $OUT/<template>/<model>.jsonl judgments and judge_runs.jsonl, and
# $OUT/gpu_arena_hard.log.
set -uo pipefail
C=${CARRY:-.carry/ah}
MODEL=${MODEL:-qwen2.5-coder-1.5b-instruct}
OUT=${OUT:-/tmp/lmstack-out}
WORK=${WORK:-/tmp/ah-work}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $C/whl/*.whl || exit 1
export PYTHONPATH="$PWD/src:/tmp/site" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT" "$WORK"
source benchmarks/carried_gguf.sh
exec > >(tee "$OUT/gpu_arena_hard.log") 2>&1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
SECONDS=0
assemble "$MODEL" "$C/model" "$C/model.size" || exit 1
STEPS=${STEPS:-annotate judge}
TEMPLATE=${TEMPLATE:-arena-hard}
if [[ " $STEPS " == *" annotate "* ]]; then
python3 - "$MODEL" "$C/data/prompts.jsonl" "$WORK/annotations.jsonl" "${NUM_PROMPTS:-2000}" \
  "${ANNOTATE_BATCH:-512}" "${DEVICE:-cuda}" <<'PY'
import collections
import sys
import time

from lmstack.evals.arena_hard.annotate import AnnotateConfig, annotate_prompts
from lmstack.evals.arena_hard.clients import make_client
from lmstack.evals.arena_hard.curate import load_prompts

model, prompts, out, n, batch, device = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
items = load_prompts(prompts, n)
client = make_client(model, device=device, dtype="bfloat16", max_model_len=4096)
t = time.monotonic()
# The settings of benchmarks/results/arena_hard/curate.json: 600 characters of each prompt, two re-asks.
records = annotate_prompts(client, items, out, AnnotateConfig(max_prompt_chars=600, batch_size=batch), progress=False)
scores = [r["score"] for r in records]
print(f"annotated {len(records)} prompts in {time.monotonic() - t:.0f}s; unparsed {scores.count(None)}; "
      f"score histogram {sorted(collections.Counter(scores).items(), key=lambda kv: (kv[0] is None, kv[0]))}")
PY
cp "$WORK/annotations.jsonl" "$OUT/"
echo "annotation done at ${SECONDS}s"
fi
[[ " $STEPS " == *" judge "* ]] || exit 0
timeout "$(( ${BUDGET:-560} - SECONDS ))" python3 -m lmstack.cli arena-hard judge --data "$C/data" --judge "$MODEL" \
  --models gpt-4-0613 gpt-3.5-turbo-0125 --out "$WORK/model_judgment_$TEMPLATE" --template "$TEMPLATE" ${NUM_QUESTIONS:+--num-questions $NUM_QUESTIONS} \
  --max-tokens "${JUDGE_MAX_TOKENS:-1024}" --max-answer-chars "${MAX_ANSWER_CHARS:-6000}" --max-model-len 8192 \
  --batch-size "${JUDGE_BATCH:-512}" --dtype bfloat16 --device "${DEVICE:-cuda}" --no-progress
echo "judge exit $? at ${SECONDS}s"
mkdir -p "$OUT/$TEMPLATE"
for f in "$WORK/model_judgment_$TEMPLATE/$MODEL"/*.jsonl; do
  [ -f "$f" ] && cp "$f" "$OUT/$TEMPLATE/" && echo "$TEMPLATE/$(basename "$f"): $(wc -l < "$f") lines"
done
