#!/usr/bin/env bash
# Writes the llama.cpp state files the interop tests read (Tests/Fixtures/llama.cpp/), with the
# real llama.cpp that `make llama.cpp` builds, SmolLM2-135M-Instruct (`make models`), and
# scripts/llama_cpp_driver.py. Each file is llama.cpp's own `llama_state_save_file` (session,
# 'ggsn' v10) or `llama_state_seq_save_file` (sequence, 'ggsq' v3) output after evaluating the
# same short ChatML prompt; which cache types, value layout and rotation each has is in its name
# and in fixtures.json. Run: make llama-cpp-fixtures (the files are committed; CI only reads them).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-$ROOT/Tests/Fixtures/llama.cpp}
MODEL=${MODEL:-$HOME/.cache/kvpack/SmolLM2-135M-Instruct.Q4_1.gguf}
[ -f "$MODEL" ] || { echo "make-llama-cpp-fixtures: $MODEL missing (make models)"; exit 1; }
mkdir -p "$OUT"
prompt=$(mktemp)
trap 'rm -f "$prompt"' EXIT
printf '<|im_start|>user\nName a color.<|im_end|>\n<|im_start|>assistant\n' > "$prompt"
driver() { "$ROOT/scripts/llama-cpp.sh" python "$ROOT/scripts/llama_cpp_driver.py" "$@" --model "$MODEL" --prompt-file "$prompt"; }
entries=()
# name kind type_k type_v flash_attn rotation-disabled
while read -r name kind tk tv fa norot; do
  [ -n "$name" ] || continue
  env_prefix=()
  [ "$norot" = 1 ] && env_prefix=(env LLAMA_ATTN_ROT_DISABLE=1)
  tokens=$("${env_prefix[@]}" "$ROOT/scripts/llama-cpp.sh" python "$ROOT/scripts/llama_cpp_driver.py" save --model "$MODEL" \
    --prompt-file "$prompt" --out "$OUT/$name.bin" --kind "$kind" --type-k "$tk" --type-v "$tv" --flash-attn "$fa" 2>/dev/null \
    | python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin)["tokens"]))')
  vtrans=$([ "$fa" = off ] && echo 1 || echo 0)
  entries+=("{\"file\": \"$name.bin\", \"kind\": \"$kind\", \"type_k\": \"$tk\", \"type_v\": \"$tv\", \"v_trans\": $vtrans, \"attn_rot_disabled\": $([ "$norot" = 1 ] && echo true || echo false), \"tokens\": $tokens}")
  echo "make-llama-cpp-fixtures: $name.bin ($(stat -c %s "$OUT/$name.bin") bytes)"
done <<'EOF'
session-f16 session f16 f16 on 0
session-f16-vtrans session f16 f16 off 0
session-q8_0-f16-vtrans session q8_0 f16 off 0
seq-q8_0 seq q8_0 q8_0 on 0
seq-q4_0 seq q4_0 q4_0 on 0
seq-q5_0-q5_1 seq q5_0 q5_1 on 0
seq-q4_1-iq4_nl seq q4_1 iq4_nl on 0
seq-bf16-f32 seq bf16 f32 on 0
seq-q8_0-unrotated seq q8_0 q8_0 on 1
EOF
{
  echo "{\"llama_cpp_python\": \"0.3.36\", \"model\": \"SmolLM2-135M-Instruct.Q4_1.gguf\","
  echo " \"prompt\": $(python3 -c 'import json,sys; print(json.dumps(open(sys.argv[1]).read()))' "$prompt"),"
  echo " \"fixtures\": ["
  for i in "${!entries[@]}"; do echo "  ${entries[$i]}$([ "$i" -lt $((${#entries[@]} - 1)) ] && echo ,)"; done
  echo " ]}"
} > "$OUT/fixtures.json"
echo "make-llama-cpp-fixtures: ${#entries[@]} files and fixtures.json in $OUT"
