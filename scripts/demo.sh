#!/usr/bin/env bash
# `make demo`: the main job end to end on bundled data. Writes into $2 (default demo-out/).
set -euo pipefail
KVPACK=${1:-.build/release/kvpack}
OUT=${2:-demo-out}
mkdir -p "$OUT"
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "Write a synthetic cache with the bundled model's geometry (stories260K: 5 layers, 8 query heads, 4 KV heads, head_dim 8)"
"$KVPACK" synth "$OUT/synthetic.kvpack" --model stories260k --tokens 300 --segment-tokens 64 --commit-every 50 --scheme raw:f16 --overwrite
step "Append 150 more tokens to the same file (resume)"
"$KVPACK" synth "$OUT/synthetic.kvpack" --resume --tokens 150 --commit-every 25
step "Describe it"
"$KVPACK" info "$OUT/synthetic.kvpack"
step "Validate it (every checksum, every value decoded)"
"$KVPACK" validate --deep "$OUT/synthetic.kvpack"
step "Attend over it straight from the mapped file, checked against a dense reference"
"$KVPACK" attend "$OUT/synthetic.kvpack" --layer 3 --head 2 --query-seed 7 --check
step "A llama-3-8b-shaped cache (4 of 32 layers), bf16 + zstd"
"$KVPACK" synth "$OUT/llama.kvpack" --model llama-3-8b --layers 4 --tokens 1024 --scheme raw:bf16:zstd --overwrite
"$KVPACK" info "$OUT/llama.kvpack"
"$KVPACK" attend "$OUT/llama.kvpack" --layer 1 --head 5 --tokens "100..<1000" --check
