#!/usr/bin/env bash
# Token graphs (engine/token_graphs.py) on one GPU: prefill and mixed steps eager vs replayed, side by side, on
# random weights of SmolLM2-135M's and Llama-3-8B's shapes. Needs .carry/c2/ from benchmarks/prepare_carry_ds.sh
# (the gguf wheel and a tokenizer folder). Writes $OUT/token_graphs_gpu_{smollm2-135m,llama-3-8b}.{json,png}.
set -uo pipefail
OUT=${OUT:-/tmp/lmstack-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry/c2/whl/*.whl || exit 1
export PYTHONPATH="$PWD/src:/tmp/site" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
SMOL='{"model_type":"llama","vocab_size":49152,"hidden_size":576,"intermediate_size":1536,"num_hidden_layers":30,"num_attention_heads":9,"num_key_value_heads":3,"rope_theta":100000.0,"max_position_embeddings":8192,"rms_norm_eps":1e-05,"tie_word_embeddings":true,"eos_token_id":[2]}'
for pair in "smollm2-135m:$SMOL" "llama-3-8b:llama-3-8b"; do
  timeout "${BUDGET:-120}" python3 -m lmstack.cli bench token-graphs --model "dummy:${pair#*:}" \
    --tokenizer .carry/c2/tokenizer --output "$OUT/token_graphs_gpu_${pair%%:*}.json" 2>&1 | tail -9
done
echo "done at ${SECONDS}s"
