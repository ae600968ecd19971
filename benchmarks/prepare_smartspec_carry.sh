#!/usr/bin/env bash
# Builds .carry/ss/ (git-ignored) for `PROPOSER=ngram benchmarks/gpu_smartspec.sh`: the gguf wheel, the wikitext-2
# test JSONL the quote prompts come from, and the SmolLM2-135M-Instruct GGUF cut in three. A call carries at most
# 64 MiB together with the working tree, and carried paths stay while the machine is warm, so .carry/ss/smol/part00
# and part01 go over in two first calls and the rest of .carry/ss in the call that runs.
set -euo pipefail
cd "$(dirname "$0")/.."
C=.carry/ss
rm -rf "$C"
mkdir -p "$C/whl" "$C/smol"
python3 -m pip download -q --no-deps -d "$C/whl" gguf==0.19.0
cp ../shared/data/wikitext2/wikitext-2-raw-v1_test.jsonl "$C/"
GGUF=$(python3 -c "from lmstack.models.registry import resolve_embedded; print(resolve_embedded('smollm2-135m-instruct'))")
split -n 3 -d -a 2 "$GGUF" "$C/smol/part"
stat -c %s "$GGUF" > "$C/smol.size"
echo "$C ready: $(du -sh "$C" | cut -f1)"
