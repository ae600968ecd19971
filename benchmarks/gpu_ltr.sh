#!/usr/bin/env bash
# Learning to rank on one GPU (issue 4). STEPS picks the steps (default "train serve"):
#  label  label the ShareGPT prompts with the output lengths of a served model's own answers (GEN_MODEL, default
#         qwen2.5-coder-1.5b-instruct, sampled at temperature 1.0 as the paper does) through `lmstack ltr
#         build-data --generate-with`; needs .carry/ltr/ from `LABELS=generate benchmarks/prepare_ltr_carry.sh`
#         and the model's GGUF parts in .carry/ah/ (benchmarks/prepare_arena_carry.sh). Stopped after BUDGET
#         seconds; a rerun on the still-warm machine resumes where it stopped. Writes $OUT/labels.jsonl.gz.
#  train  full fine-tuning of MiniLM with ListMLE (a learning-rate sweep chosen by validation tau), the 10-bucket
#         classifier baselines on the same encoder, tau of all of them on the held-out prompts ($OUT/ltr_rank.json,
#         the fp16 ranker as $OUT/ranker.tar.part*: cat them, untar: the folder `ranker`), then its cost per batch
#         eager vs CUDA graphs ($OUT/ltr_ranker_speed.json, `lmstack bench ranker`). Data: the labels of
#         the label step, else DATA (default .carry/ltr/labels.jsonl.gz when prepared with LABELS=results, else
#         .carry/ltr/sharegpt.jsonl.gz: lengths of ShareGPT's own answers). With ENCODER=NAME (as given to
#         `ENCODER=NAME benchmarks/prepare_ltr_carry.sh`, e.g. smollm2-135m-instruct) the backbone is that
#         decoder-only LM, fully fine-tuned like the paper's OPT-125M, its GGUF assembled from .carry/ltr_enc/;
#         its defaults: LRS "2e-5 5e-5", POOLING mean, LIST_SIZE 32. Finished trainings are skipped, so a rerun
#         on the still-warm machine resumes; CLASSIFIERS (default "uniform quantile") picks the bucket baselines.
#  fetch  copy 4 of the trained ranker's tar parts, from index FETCH (default 0), to $OUT: a SmolLM2 ranker is
#         ~270 MB in fp16 and a call returns at most 64 MiB, so it comes back over several calls.
#  serve  fcfs, mlfq, ltr and oracle-sjf on Llama-3-8B shapes (random weights, bf16) with the held-out prompts
#         replaying their labelled lengths, so every policy does identical work: a burst (synthetic data
#         generation), then Poisson rates around the measured capacity with the batch capped at MAX_NUM_SEQS.
#         With RANKER=folder and TEST=held-out file (e.g. a ranker an earlier run returned), no training is needed.
#         POLICIES: default fcfs,mlfq,ltr,oracle-sjf; ltr+evict and oracle-sjf+evict add the evicting variants.
#         Traces of NUM_REQUESTS (default 1000) arrivals, long enough for a queue to form at the capacity; runs
#         that do not fit TOTAL_BUDGET are skipped and a rerun on the still-warm machine does them (the run log
#         is $WORK/ltr_serving.jsonl), so the whole sweep takes two back-to-back calls.
# Settings are environment variables; logs go to $OUT/gpu_ltr.log.
set -uo pipefail
C=${CARRY:-.carry/ltr}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $C/whl/*.whl || exit 1
export PYTHONPATH="$PWD/src:/tmp/site" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/lmstack-out}
WORK=${WORK:-/tmp/ltr-work}
DEVICE=${DEVICE:-cuda}
MODEL=${MODEL:-dummy:$C/llama-3-8b-v49k}
STEPS=${STEPS:-train serve}
if [ -f "$C/labels.jsonl.gz" ]; then DATA=${DATA:-$C/labels.jsonl.gz}; else DATA=${DATA:-$C/sharegpt.jsonl.gz}; fi
mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/gpu_ltr.log") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
SECONDS=0
if [[ " $STEPS " == *" label "* ]]; then
  GEN_MODEL=${GEN_MODEL:-qwen2.5-coder-1.5b-instruct}
  source benchmarks/carried_gguf.sh
  assemble "$GEN_MODEL" .carry/ah/model .carry/ah/model.size || exit 1
  timeout "${BUDGET:-560}" python3 -m lmstack.cli ltr build-data --input "$C/prompts.jsonl.gz" \
    --output "$WORK/labels.jsonl" --generate-with "$GEN_MODEL" --label-tokenizer "$C/llama-3-8b-v49k" \
    --max-prompt-len 1024 --max-tokens 1024 --temperature 1.0 --batch-size 2048 --max-num-seqs 512 \
    --max-model-len 4096 --device "$DEVICE" --dtype bfloat16 2>&1 | tr "\r" "\n" | grep -v "^labelling" | tail -5
  echo "label exit ${PIPESTATUS[0]} at ${SECONDS}s: $(wc -l < "$WORK/labels.jsonl") prompts labelled"
  gzip -c "$WORK/labels.jsonl" > "$OUT/labels.jsonl.gz"
  DATA=$WORK/labels.jsonl
fi
if [ -n "${ENCODER:-}" ]; then
  source benchmarks/carried_gguf.sh
  assemble "ltr-encoder-$ENCODER" .carry/ltr_enc .carry/ltr_enc.size || exit 1
  ENC_ARGS=(--encoder "$LMSTACK_CACHE/gguf/ltr-encoder-$ENCODER.gguf" --pooling "${POOLING:-mean}")
  ENC_LABEL="$ENCODER (decoder-only, ${POOLING:-mean} pooling)"
  LRS=${LRS:-2e-5 5e-5}
else
  ENC_ARGS=(--encoder "$C/encoder")
  ENC_LABEL=MiniLM-L6
  LRS=${LRS:-5e-5 1e-4}
fi
train() {  # NAME, then extra `lmstack ltr train` options; skipped when an earlier call finished it
  local name=$1; shift
  [ -f "$WORK/$name/ranker.json" ] && { echo "[$name] already trained"; return 0; }
  python3 -m lmstack.cli ltr train --data "$DATA" "${ENC_ARGS[@]}" --device "$DEVICE" \
    --max-length "${MAXLEN:-512}" --epochs "${EPOCHS:-4}" --list-size "${LIST_SIZE:-32}" --output "$WORK/$name" \
    ${TRAIN_EXTRA:-} "$@" 2>&1 | tr "\r" "\n" | grep -E "^(epoch|/|lmstack|error)" | sed "s|^|[$name] |"
}
train_and_eval() {
  local best_lr="" best_tau=-2 lr tau
  [ "$DEVICE" = cuda ] && python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_encoder.py tests/test_ranking.py tests/test_ranking_decoder.py \
    tests/test_ranking_graphed.py tests/test_policies.py | tail -2
  for lr in $LRS; do
    train "listmle-$lr" --lr "$lr"
    tau=$(python3 -c "import json; print(json.load(open('$WORK/listmle-$lr/ranker.json'))['info']['training']['best_val_tau'])")
    echo "[listmle-$lr] val tau $tau at ${SECONDS}s"
    if python3 -c "import sys; sys.exit(0 if $tau > $best_tau else 1)"; then best_lr=$lr best_tau=$tau; fi
  done
  echo "chosen learning rate $best_lr (val tau $best_tau)"
  # What ships, and what is evaluated: the fp16 copy.
  python3 -c "import sys, torch; from lmstack.ranking import LengthRanker
LengthRanker.load(sys.argv[1]).save(sys.argv[2], dtype=torch.float16)" "$WORK/listmle-$best_lr" "$WORK/ranker"
  local kind clf=()
  for kind in ${CLASSIFIERS-uniform quantile}; do
    train "bucket-$kind" --objective bucket --buckets "$kind" --lr "$best_lr"
    if [ ${#clf[@]} = 0 ]; then clf=(--bucket-classifier "$WORK/bucket-$kind")
    else clf+=(--extra-classifier "$kind=$WORK/bucket-$kind"); fi
  done
  python3 -m lmstack.cli ltr eval --data "$DATA" --ranker "$WORK/ranker" --device "$DEVICE" "${clf[@]}" \
    --label "$ENC_LABEL fully fine-tuned on $DEVICE (ListMLE, lists of ${LIST_SIZE:-32}, lr $best_lr by val tau, max length ${MAXLEN:-512}, ${EPOCHS:-4} epochs)" \
    --output "$OUT/ltr_rank.json" 2>&1 | tr "\r" "\n" | grep -v -E "^(scoring|timing)" | tail -24
  python3 -m lmstack.bench.ranker_speed --ranker "$WORK/ranker" --data "$DATA" --device "$DEVICE" \
    --output "$OUT/ltr_ranker_speed.json" 2>&1 | tail -7
  rm -f "$WORK"/ranker.tar.part*
  tar -C "$WORK" -cf - ranker | split -b 15m - "$WORK/ranker.tar.part"
  local parts=("$WORK"/ranker.tar.part*)
  if [ ${#parts[@]} -le 4 ]; then cp "${parts[@]}" "$OUT/"
  else echo "the ranker is ${#parts[@]} parts of 15 MiB, too many for one call: fetch them 4 at a time with" \
    "STEPS=fetch FETCH=0, 4, 8, ... on the still-warm machine"; fi
  echo "ranker trained and evaluated at ${SECONDS}s"
  zcat -f "$DATA" | grep '"split": "test"' | gzip > "$WORK/test.jsonl.gz"
}
if [[ " $STEPS " == *" fetch "* ]]; then  # parts FETCH.. FETCH+3 of a trained ranker (4 x 15 MiB a call)
  parts=("$WORK"/ranker.tar.part*)
  cp "${parts[@]:${FETCH:-0}:4}" "$OUT/" && echo "fetched parts from ${FETCH:-0} of ${#parts[@]}"
  exit
fi
if [ -n "${RANKER:-}" ]; then
  cp "$TEST" "$WORK/test.jsonl.gz" && cp -r "$RANKER" "$WORK/ranker" || exit 1
elif [[ " $STEPS " == *" train "* ]]; then
  train_and_eval
fi
[[ " $STEPS " == *" serve "* ]] || exit 0
python3 -m lmstack.bench.policies --model "$MODEL" --ranker "$WORK/ranker" --data "$WORK/test.jsonl.gz" \
  --policies "${POLICIES:-fcfs,mlfq,ltr,oracle-sjf}" \
  --device "$DEVICE" --burst-requests "${BURST:-2000}" --burst-max-num-seqs "${BURST_MAX_NUM_SEQS:-256}" \
  --num-requests "${NUM_REQUESTS:-1000}" --max-num-seqs "${MAX_NUM_SEQS:-64}" \
  --max-prompt-len "${MAX_PROMPT_LEN:-512}" --max-total-len "${MAX_TOTAL_LEN:-1536}" \
  --rate-fractions "${RATE_FRACTIONS:-1.0,1.2}" --time-budget "$(( ${TOTAL_BUDGET:-560} - SECONDS > 60 ? ${TOTAL_BUDGET:-560} - SECONDS : 60 ))" \
  --output "$WORK/ltr_serving.json" 2>&1 | tr "\r" "\n" | grep -v -E "^(generate|Loading)" | tail -60
# The run log stays in $WORK: a rerun on the still-warm machine skips every finished run and does the rest.
cp "$WORK"/ltr_serving.json* "$WORK"/ltr_serving.png "$OUT/" 2>/dev/null
echo "done at ${SECONDS}s"
