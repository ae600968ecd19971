#!/usr/bin/env bash
# Double Sparsity on one GPU, in one device call (about 5 minutes on an H100): the Triton kernels and the
# offload backends against the torch reference first, then `lmstack bench double-sparsity-speed` (attention
# op dense vs 1/16 over contexts x batches, end-to-end engine decode, offload vs full-KV streaming).
# TESTS overrides the pytest arguments. Needs .carry/c2/ from benchmarks/prepare_carry_ds.sh. Writes
# $OUT/double_sparsity_speed.{json,png} and logs; copy the JSON and PNG to benchmarks/results/.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry/c2/whl/*.whl || exit 1
export PYTHONPATH="$PWD/src:/tmp/site" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/lmstack-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
free -g | head -2
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
TESTS=${TESTS:-tests/test_double_sparse_triton.py tests/test_ds_offload.py tests/test_gpu.py tests/test_double_sparse.py}
# shellcheck disable=SC2086  # TESTS is a list of pytest arguments
python3 -m pytest -q -p no:cacheprovider $TESTS 2>&1 \
  | tee "$OUT/ds_gpu_tests.log" | tail -15
python3 -m lmstack.bench.double_sparsity_speed --tokenizer .carry/c2/tokenizer \
  --output "$OUT/double_sparsity_speed.json" "$@" 2>&1 | tee "$OUT/ds_speed.log" | tail -70
