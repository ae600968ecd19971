# Sourced by the GPU scripts: `assemble NAME PARTS_DIR SIZE_FILE` joins a GGUF that travelled in parts
# (benchmarks/prepare_arena_carry.sh) into $LMSTACK_CACHE/gguf/NAME.gguf, where `lmstack` finds embedded models,
# checking the size so that a missing part stops the run instead of loading a cut file.
export LMSTACK_CACHE=${LMSTACK_CACHE:-/tmp/lmstack-cache}
mkdir -p "$LMSTACK_CACHE/gguf"
assemble() {
  local gguf="$LMSTACK_CACHE/gguf/$1.gguf"
  [ -f "$gguf" ] && return 0
  cat "$2"/part* > "$gguf.tmp" || return 1
  [ "$(stat -c %s "$gguf.tmp")" = "$(cat "$3")" ] || { echo "parts of $1 missing: $(ls "$2")"; return 1; }
  mv "$gguf.tmp" "$gguf"
}
