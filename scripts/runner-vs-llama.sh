#!/usr/bin/env bash
# The model runner against llama.cpp on the same GGUF, in one run (issue 23): prefill of a
# 512-token prompt and decode of 128 tokens, at 1 and 2 threads, with f32 activations (the
# default, exact) and 8-bit activations (KVPACK_ACTIVATIONS=q8, llama.cpp's arithmetic); then
# llama-bench's pp512 and tg128 with the same thread counts.
#   scripts/runner-vs-llama.sh [KVPACK] [GGUF] [LLAMA_BENCH]
# Our figures are wall-clock differences of `kvpack generate` runs (a 1-token run subtracted,
# which removes start-up and model loading): prefill = 512 / (t(512-token prompt) - t(1)),
# decode = 128 / (t(1 + 128 steps) - t(1)). The cache is a raw:f16 .kvpack file, written as it
# goes; llama-bench keeps its cache in memory.
set -euo pipefail
KVPACK=${1:-.build/release/kvpack}
GGUF=${2:-$HOME/.cache/kvpack/SmolLM2-135M-Instruct.Q4_1.gguf}
LLAMA_BENCH=${3:-$HOME/.cache/kvpack/llama.cpp/build/bin/llama-bench}
for f in "$KVPACK" "$GGUF" "$LLAMA_BENCH"; do
  [ -e "$f" ] || { echo "runner-vs-llama: $f is missing (make build, make models, make llama.cpp)"; exit 1; }
done
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
prompt=$(python3 -c "import random; random.seed(1); print(','.join(str(random.randrange(100, 40000)) for _ in range(512)))")
seconds() {  # threads activations prompt steps
  rm -f "$tmp/g.kvpack"
  local start end
  start=$(date +%s.%N)
  KVPACK_THREADS=$1 KVPACK_ACTIVATIONS=$2 "$KVPACK" generate --model "$GGUF" --save "$tmp/g.kvpack" --prompt-tokens "$3" \
    --steps "$4" --temperature 0 --scheme raw:f16 --no-fsync --json > /dev/null
  end=$(date +%s.%N)
  echo "$end - $start" | bc -l
}
best() {  # the fastest of three runs
  local a b c
  a=$(seconds "$@"); b=$(seconds "$@"); c=$(seconds "$@")
  printf '%s\n%s\n%s\n' "$a" "$b" "$c" | sort -g | head -1
}
echo "| runner | threads | prefill 512 (tok/s) | decode 128 (tok/s) |"
echo "|---|---|---|---|"
for threads in 1 2; do
  for act in f32 q8; do
    t0=$(best "$threads" "$act" 1 1)
    tp=$(best "$threads" "$act" "$prompt" 1)
    td=$(best "$threads" "$act" 1 129)
    printf '| kvpack (%s activations) | %s | %.1f | %.1f |\n' "$act" "$threads" "$(echo "512 / ($tp - $t0)" | bc -l)" "$(echo "128 / ($td - $t0)" | bc -l)"
  done
done
"$LLAMA_BENCH" -m "$GGUF" -t 1,2 -p 512 -n 128 -r 3 -o csv 2>/dev/null | python3 -c '
import csv, sys
rows = {}
for r in csv.DictReader(sys.stdin):
    key = int(r["n_threads"])
    test = "pp" if int(r["n_prompt"]) > 0 else "tg"
    rows.setdefault(key, {})[test] = float(r["avg_ts"])
for t in sorted(rows):
    pp, tg = rows[t].get("pp", 0), rows[t].get("tg", 0)
    print(f"| llama.cpp llama-bench | {t} | {pp:.1f} | {tg:.1f} |")
'
