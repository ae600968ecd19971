#!/usr/bin/env bash
# Scheduling policies on one GPU (issue 4): fcfs, mlfq, ltr and oracle-sjf on Llama-3-8B shapes (random weights,
# bf16) with held-out ShareGPT prompts replaying their answer lengths, so every policy does identical work.
# Needs .carry/ltr_serving/ from `bash benchmarks/prepare_ltr_serving_carry.sh RANKER_DIR DATA_FILE`. ~8 minutes.
#
# Sizes: the burst (2,000 requests at t=0, synthetic data generation) runs with up to 256 requests at once; the
# Poisson sweep caps the batch at 64, as a deployment holding a per-token latency target would, because the
# scheduling effect needs a queue (with an uncapped batch nearly every request is admitted at once and order
# does not matter). The KV pool is the engine's default share of the GPU. --time-budget skips (and lists) the
# least important runs if the machine is slower than planned: mlfq's and oracle-sjf's bursts, then low rates.
set -uo pipefail
C=.carry/ltr_serving
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $C/whl/*.whl || exit 1
export PYTHONPATH="$PWD/src:/tmp/site" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/lmstack-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

# 1. Correctness first: the policy tests (scheduler level, engine, async engine, a real LengthRanker folder).
python3 -m pytest -q -p no:cacheprovider tests/test_policies.py 2>&1 | tee "$OUT/policy_tests.log" | tail -3
# The carried ranker scores the same on CUDA as on CPU, and what one score costs on the GPU.
python3 - <<'PY' || exit 1
import gzip
import json
import time

import torch

from lmstack.ranking import LengthRanker, kendall_tau

with gzip.open(".carry/ltr_serving/test.jsonl.gz", "rt", encoding="utf-8") as f:
    prompts = [json.loads(line)["prompt"] for line in f][:256]
cpu = LengthRanker.load(".carry/ltr_serving/ranker", device="cpu").score(prompts)
ranker = LengthRanker.load(".carry/ltr_serving/ranker", device="cuda")
gpu = ranker.score(prompts)
tau = kendall_tau(cpu, gpu)
times = {}
for batch in (1, 32):
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(0, 64, batch):
        ranker.score(prompts[i:i + batch])
    torch.cuda.synchronize()
    times[batch] = (time.perf_counter() - start) / 64 * 1e3
print(f"ranker CUDA vs CPU on 256 prompts: Kendall tau {tau:.4f}, max |diff| "
      f"{max(abs(a - b) for a, b in zip(cpu, gpu)):.2e}; ms/prompt at batch 1 {times[1]:.2f}, batch 32 {times[32]:.2f}")
if not tau > 0.99:
    raise SystemExit("the ranker disagrees between CUDA and CPU")
PY

# 2. The benchmark: burst, capacity at the sweep's batch cap, then Poisson rates (highest sustainable first).
python3 -m lmstack.bench.policies --model "dummy:$C/llama-3-8b-v49k" --ranker "$C/ranker" --data "$C/test.jsonl.gz" \
  --burst-requests "${BURST:-2000}" --burst-max-num-seqs "${BURST_MAX_NUM_SEQS:-256}" \
  --num-requests "${NUM_REQUESTS:-250}" --max-num-seqs "${MAX_NUM_SEQS:-64}" \
  --max-prompt-len 512 --max-total-len 1024 --rate-fractions "${RATE_FRACTIONS:-0.6,0.8,0.95}" \
  --time-budget "${TIME_BUDGET:-390}" --output "$OUT/ltr_serving.json" \
  2>&1 | tr "\r" "\n" | grep -v -E "^(generate|Loading)" | tail -45
echo "copy back: $OUT/ltr_serving.json (+ .jsonl run log) -> benchmarks/results/; without matplotlib on this machine"
echo "draw the plot there with: python -m lmstack.bench.policy_summary benchmarks/results/ltr_serving.json"
