#!/usr/bin/env bash
# Learning-to-rank length predictor on one GPU: CUDA correctness checks, then full fine-tuning of MiniLM with
# ListMLE (a small learning-rate sweep chosen by validation tau), the 10-bucket classifier baselines on the same
# encoder, and Kendall's tau of all of them on the 2,500 held-out ShareGPT prompts, plus the ranker's GPU cost.
# Needs .carry/ltr/ from benchmarks/prepare_ltr_carry.sh. Writes $OUT/ltr_rank.json and $OUT/ltr-ranker/ (fp16).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry/ltr/whl/*.whl || exit 1
export PYTHONPATH="$PWD/src:/tmp/site" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/lmstack-out}
WORK=${WORK:-/tmp/ltr-work}
DATA=.carry/ltr/sharegpt.jsonl.gz
ENC=.carry/ltr/encoder
MAXLEN=${MAXLEN:-512}
EPOCHS=${EPOCHS:-5}
LRS=${LRS:-"2e-5 5e-5 1e-4"}
mkdir -p "$OUT" "$WORK"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_encoder.py tests/test_ranking.py 2>&1 \
  | tee "$OUT/ltr_gpu_tests.log" | tail -4
train() {  # NAME, then extra `lmstack ltr train` options
  local name=$1; shift
  python3 -m lmstack.cli ltr train --data "$DATA" --encoder "$ENC" --device cuda --max-length "$MAXLEN" \
    --epochs "$EPOCHS" --output "$WORK/$name" "$@" 2>&1 | tr "\r" "\n" | grep -E "^(epoch|/|lmstack)" \
    | sed "s|^|[$name] |"
}
best_lr="" best_tau=-2
for lr in $LRS; do
  SECONDS=0
  train "listmle-$lr" --lr "$lr"
  tau=$(python3 -c "import json; print(json.load(open('$WORK/listmle-$lr/ranker.json'))['info']['training']['best_val_tau'])")
  echo "[listmle-$lr] val tau $tau in ${SECONDS}s"
  if python3 -c "import sys; sys.exit(0 if $tau > $best_tau else 1)"; then best_lr=$lr best_tau=$tau; fi
done
echo "chosen learning rate $best_lr (val tau $best_tau)"
python3 - "$WORK/listmle-$best_lr" "$OUT/ltr-ranker" <<'PY'
import sys

import torch

from lmstack.ranking import LengthRanker

LengthRanker.load(sys.argv[1]).save(sys.argv[2], dtype=torch.float16)  # what ships, and what is evaluated
PY
train bucket-uniform --objective bucket --buckets uniform --lr "$best_lr"
train bucket-quantile --objective bucket --buckets quantile --lr "$best_lr"
python3 -m lmstack.cli ltr eval --data "$DATA" --ranker "$OUT/ltr-ranker" --device cuda \
  --bucket-classifier "$WORK/bucket-uniform" --extra-classifier "quantile=$WORK/bucket-quantile" \
  --label "MiniLM-L6 fully fine-tuned on GPU (ListMLE, lr $best_lr by val tau, max length $MAXLEN, $EPOCHS epochs)" \
  --output "$OUT/ltr_rank.json" 2>&1 | tr "\r" "\n" | grep -v -E "^(scoring|timing)" | tail -30
du -sh "$OUT/ltr-ranker"
