#!/usr/bin/env bash
# Builds .carry/ah/ (git-ignored) for benchmarks/gpu_arena_hard.sh: the gguf wheel, the Arena-Hard v0.1 questions
# and answers, the first user turns of ShareGPT that `arena-hard curate` reads by default (so the GPU annotations
# line up with a local curate run: prompt ids are content hashes) and the qwen2.5-coder-1.5b-instruct GGUF cut
# into parts that fit one call beside the working tree. A device call carries at most 64 MiB, and carried paths stay while the machine is warm, so
# the parts go over in back-to-back calls (one part each), the last call carrying data/ and whl/ and running.
# With DRAFT=1 the qwen2.5-coder-0.5b-instruct GGUF is cut into draft/ too, for benchmarks/gpu_smartspec.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
C=.carry/ah
NUM_PROMPTS=${NUM_PROMPTS:-2000}
DATA=${ARENA_DATA:-../shared/data/arena_hard_v01}
rm -rf "$C"
mkdir -p "$C/whl" "$C/data/model_answer" "$C/model"
python3 -m pip download -q --no-deps -d "$C/whl" gguf==0.19.0
cp "$DATA/question.jsonl" "$C/data/"
cp "$DATA"/model_answer/*.jsonl "$C/data/model_answer/"
python3 - "$C/data/prompts.jsonl" "$NUM_PROMPTS" <<'PY'
import json
import sys

from lmstack.evals.arena_hard.curate import load_prompts

with open(sys.argv[1], "w", encoding="utf-8") as f:
    for _, text in load_prompts(None, int(sys.argv[2])):
        f.write(json.dumps({"prompt": text}, ensure_ascii=False) + "\n")
PY
# Parts as large as a call allows: 64 MiB less the working tree, data/ and whl/ (the last call carries those too).
TREE=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 du -cb | tail -1 | cut -f1)
PART=$(( (64 * 1048576 - TREE - $(du -sb "$C/data" "$C/whl" | awk '{s += $1} END {print s}') - 1048576) / 1048576 ))
[ "$PART" -ge 4 ] || { echo "the working tree leaves only ${PART} MiB per call; carry less"; exit 1; }
GGUF=$(python3 -c "from lmstack.models.registry import resolve_embedded; print(resolve_embedded('qwen2.5-coder-1.5b-instruct'))")
split -b "${PART}m" -d -a 2 "$GGUF" "$C/model/part"
stat -c %s "$GGUF" > "$C/model.size"
if [ -n "${DRAFT:-}" ]; then
  mkdir -p "$C/draft"
  GGUF=$(python3 -c "from lmstack.models.registry import resolve_embedded; print(resolve_embedded('qwen2.5-coder-0.5b-instruct'))")
  split -b "${PART}m" -d -a 2 "$GGUF" "$C/draft/part"
  stat -c %s "$GGUF" > "$C/draft.size"
fi
echo "$C ready: $(ls "$C/model" | wc -l) model parts of ${PART} MiB, data $(du -sh "$C/data" | cut -f1)"
