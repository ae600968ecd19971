#!/usr/bin/env bash
# The H100 serving results in one device call: the HTTP-overhead benchmark, then a request-rate sweep of
# `lmstack bench serve` against `lmstack serve` on ShareGPT with replayed output lengths. Both use Llama-3-8B's
# shapes with the vocabulary cut to the borrowed tokenizer's 49,152 ids, so every generated id decodes to text.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry/whl/*.whl .carry/srvwhl/*.whl || exit 1
export PYTHONPATH="$PWD/src:/tmp/site" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/lmstack-out}
MODEL=dummy:.carry/llama-3-8b-v49k
mkdir -p "$OUT"
python3 -m lmstack.bench.overhead --model $MODEL --num-requests 64 --max-tokens 128 --repeats 5 \
  --output "$OUT/serve_overhead_gpu.json" 2>&1 | tr "\r" "\n" | grep -v -E "^(generate|Loading)" | tail -8

python3 -m lmstack.cli serve --model $MODEL --port 8321 --max-model-len 2048 --max-num-seqs 256 --log-level warning \
  > "$OUT/server.log" 2>&1 &
SERVER=$!
for _ in $(seq 1 300); do curl -sf http://127.0.0.1:8321/health > /dev/null && break; sleep 1; done
python3 -m lmstack.cli bench serve --base-url http://127.0.0.1:8321 --dataset sharegpt --num-prompts 300 \
  --replay-lengths --sweep 8,16,32,64,128 --slo ttft=1000,tpot=100 --max-model-len 2048 \
  --output "$OUT/serve_sweep_gpu.json" 2>&1 | grep -E "^==|request_throughput|output_throughput|mean_ttft|mean_tpot|p99_e2e|goodput|results|plot"
kill -TERM $SERVER; wait $SERVER
