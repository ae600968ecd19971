#!/usr/bin/env bash
# Learning to rank on one GPU (issue 4), in one call: train the length ranker, measure Kendall's tau against the
# baselines, then run the scheduling benchmark with it. Needs .carry/ltr/ from benchmarks/prepare_ltr_carry.sh.
#  1. full fine-tuning of MiniLM with ListMLE (a learning-rate sweep chosen by validation tau), the 10-bucket
#     classifier baselines on the same encoder, tau of all of them on the 2,500 held-out ShareGPT prompts;
#  2. fcfs, mlfq, ltr and oracle-sjf on Llama-3-8B shapes (random weights, bf16) with the held-out prompts
#     replaying their answer lengths, so every policy does identical work: a burst (synthetic data generation,
#     up to 256 at once), then Poisson rates with the batch capped at 64, as a deployment holding a per-token
#     latency target would (the scheduling effect needs a queue). --time-budget skips the least important runs.
# Writes $OUT/ltr_rank.json, $OUT/ltr_serving.json(+.jsonl), $OUT/gpu_ltr.log and the fp16 ranker as
# $OUT/ranker.tar.part* (cat them, untar: the folder `ranker`). Settings are environment variables; with
# RANKER=folder and TEST=held-out file (e.g. a ranker an earlier run returned), step 1 is
# skipped.
set -uo pipefail
C=${CARRY:-.carry/ltr}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $C/whl/*.whl || exit 1
export PYTHONPATH="$PWD/src:/tmp/site" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/lmstack-out}
WORK=${WORK:-/tmp/ltr-work}
DEVICE=${DEVICE:-cuda}
MODEL=${MODEL:-dummy:$C/llama-3-8b-v49k}
mkdir -p "$OUT" "$WORK"
exec > >(tee "$OUT/gpu_ltr.log") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
SECONDS=0
[ "$DEVICE" = cuda ] && python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_encoder.py tests/test_ranking.py | tail -2
train() {  # NAME, then extra `lmstack ltr train` options
  local name=$1; shift
  python3 -m lmstack.cli ltr train --data "$C/sharegpt.jsonl.gz" --encoder "$C/encoder" --device "$DEVICE" \
    --max-length "${MAXLEN:-512}" --epochs "${EPOCHS:-4}" --output "$WORK/$name" ${TRAIN_EXTRA:-} "$@" 2>&1 \
    | tr "\r" "\n" | grep -E "^(epoch|/|lmstack|error)" | sed "s|^|[$name] |"
}
train_and_eval() {
  local best_lr="" best_tau=-2 lr tau
  for lr in ${LRS:-5e-5 1e-4}; do
    train "listmle-$lr" --lr "$lr"
    tau=$(python3 -c "import json; print(json.load(open('$WORK/listmle-$lr/ranker.json'))['info']['training']['best_val_tau'])")
    echo "[listmle-$lr] val tau $tau at ${SECONDS}s"
    if python3 -c "import sys; sys.exit(0 if $tau > $best_tau else 1)"; then best_lr=$lr best_tau=$tau; fi
  done
  echo "chosen learning rate $best_lr (val tau $best_tau)"
  # What ships, and what is evaluated: the fp16 copy.
  python3 -c "import sys, torch; from lmstack.ranking import LengthRanker
LengthRanker.load(sys.argv[1]).save(sys.argv[2], dtype=torch.float16)" "$WORK/listmle-$best_lr" "$WORK/ranker"
  train bucket-uniform --objective bucket --buckets uniform --lr "$best_lr"
  train bucket-quantile --objective bucket --buckets quantile --lr "$best_lr"
  python3 -m lmstack.cli ltr eval --data "$C/sharegpt.jsonl.gz" --ranker "$WORK/ranker" --device "$DEVICE" \
    --bucket-classifier "$WORK/bucket-uniform" --extra-classifier "quantile=$WORK/bucket-quantile" \
    --label "MiniLM-L6 fully fine-tuned on $DEVICE (ListMLE, lr $best_lr by val tau, max length ${MAXLEN:-512}, ${EPOCHS:-4} epochs)" \
    --output "$OUT/ltr_rank.json" 2>&1 | tr "\r" "\n" | grep -v -E "^(scoring|timing)" | tail -24
  tar -C "$WORK" -cf - ranker | split -b 15m - "$OUT/ranker.tar.part"
  echo "ranker trained and evaluated at ${SECONDS}s"
  zcat "$C/sharegpt.jsonl.gz" | grep '"split": "test"' | gzip > "$WORK/test.jsonl.gz"
}
if [ -n "${RANKER:-}" ]; then
  cp "$TEST" "$WORK/test.jsonl.gz" && cp -r "$RANKER" "$WORK/ranker" || exit 1
else
  train_and_eval
fi
python3 -m lmstack.bench.policies --model "$MODEL" --ranker "$WORK/ranker" --data "$WORK/test.jsonl.gz" \
  --device "$DEVICE" --burst-requests "${BURST:-2000}" --burst-max-num-seqs "${BURST_MAX_NUM_SEQS:-256}" \
  --num-requests "${NUM_REQUESTS:-250}" --max-num-seqs "${MAX_NUM_SEQS:-64}" \
  --max-prompt-len "${MAX_PROMPT_LEN:-512}" --max-total-len "${MAX_TOTAL_LEN:-1024}" \
  --rate-fractions "${RATE_FRACTIONS:-0.6,0.8,0.95}" --time-budget "$(( ${TOTAL_BUDGET:-560} - SECONDS > 60 ? ${TOTAL_BUDGET:-560} - SECONDS : 60 ))" \
  --output "$OUT/ltr_serving.json" 2>&1 | tr "\r" "\n" | grep -v -E "^(generate|Loading)" | tail -40
echo "done at ${SECONDS}s"
