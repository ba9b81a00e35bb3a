#!/usr/bin/env bash
# `make demo`: the main job end to end on the bundled model. Writes into $2 (default demo-out/).
set -euo pipefail
KVPACK=${1:-.build/release/kvpack}
OUT=${2:-demo-out}
MODEL=models/stories260K.bin
mkdir -p "$OUT"
rm -f "$OUT"/*.kvpack
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

SMOL=${KVPACK_MODEL_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kvpack}/SmolLM2-135M-Instruct.Q4_1.gguf
if [ -f "$SMOL" ]; then
  step "A real chat: SmolLM2-135M-Instruct (GGUF, 30 layers, GQA 9/3, head_dim 64); its KV cache goes to $OUT/smol.kvpack"
  "$KVPACK" chat --temperature 0 --save "$OUT/smol.kvpack" --message "What is the capital of France?" --message "And of Italy?"
  step "A new process resumes the chat from the file (the past is attended from the mapped file)"
  "$KVPACK" chat --temperature 0 --resume "$OUT/smol.kvpack" --message "I am planning a picnic in the park. What food should I bring?" --max-tokens 80
  step "The file's token ids are the transcript"
  "$KVPACK" info "$OUT/smol.kvpack" --text
  step "Convert the chat to 4-bit keys / 2-bit values and keep chatting from the converted file"
  "$KVPACK" convert "$OUT/smol.kvpack" "$OUT/smol-int.kvpack" --scheme int:k4v2:kc64 --overwrite
  "$KVPACK" chat --temperature 0 --resume "$OUT/smol-int.kvpack" --message "Thank you! Which of those can I prepare the night before?" --max-tokens 60
else
  step "SmolLM2 is not downloaded (make models), so the real-chat part of the demo is skipped"
fi

step "Turn 1: start a conversation with stories260K (5 layers, GQA 8/4, head_dim 8); its KV cache is written to $OUT/chat.kvpack"
"$KVPACK" generate --model "$MODEL" --save "$OUT/chat.kvpack" --steps 80 | tee "$OUT/chat.txt"
step "Turn 2, a new process: resume from the file (past tokens attended straight from the mapped file)"
"$KVPACK" generate --resume "$OUT/chat.kvpack" --steps 60 | tee -a "$OUT/chat.txt"
step "Turn 3: feed three tokens as a 'user turn', then continue"
"$KVPACK" generate --resume "$OUT/chat.kvpack" --prompt-tokens 13,431,400 --steps 40 | tee -a "$OUT/chat.txt"

step "The same conversation without interruption gives the same tokens"
"$KVPACK" generate --model "$MODEL" --save "$OUT/straight.kvpack" --steps 140 > "$OUT/straight.txt"
"$KVPACK" generate --resume "$OUT/straight.kvpack" --prompt-tokens 13,431,400 --steps 40 >> "$OUT/straight.txt"
tokens() { tr ',' '\n' < "$1" | grep -v '^$'; }
"$KVPACK" attend "$OUT/chat.kvpack" --layer 4 --head 3 > "$OUT/a.txt"
"$KVPACK" attend "$OUT/straight.kvpack" --layer 4 --head 3 > "$OUT/b.txt"
if cmp -s <(tokens "$OUT/chat.txt") <(tokens "$OUT/straight.txt") && cmp -s "$OUT/a.txt" "$OUT/b.txt"; then
  echo "identical: the same $(tokens "$OUT/chat.txt" | wc -l) generated tokens, and the same attention output from both files"
else
  echo "DIFFERENT"; exit 1
fi

step "Validate the conversation file (every checksum, every value decoded)"
"$KVPACK" validate --deep "$OUT/chat.kvpack"
step "Summarise it"
"$KVPACK" info "$OUT/chat.kvpack"
step "Attention over the file, checked against a dense reference"
"$KVPACK" attend "$OUT/chat.kvpack" --layer 2 --head 1 --query-seed 7 --check

step "Convert the conversation to 4-bit keys and 2-bit values (KV-AdaQuant, keys grouped per channel) and keep talking from the converted file"
"$KVPACK" convert "$OUT/chat.kvpack" "$OUT/chat-int.kvpack" --scheme int:k4v2:kc64 --overwrite
"$KVPACK" generate --resume "$OUT/chat-int.kvpack" --steps 20

step "Prune the conversation to half its tokens with KVCrush (attention signatures), in int:k4v2, and keep talking: positions continue where it ended"
"$KVPACK" prune "$OUT/chat.kvpack" "$OUT/chat-pruned.kvpack" --scheme crush:0.5+int:k4v2 --overwrite
"$KVPACK" info "$OUT/chat-pruned.kvpack" | grep -E "^(tokens|selection)"
"$KVPACK" generate --resume "$OUT/chat-pruned.kvpack" --steps 20

step "What each scheme does to the model (teacher forcing over 1280 tokens of its own stories)"
"$KVPACK" eval --model "$MODEL" --scheme raw:f16 --scheme int:k4v2:kc64:vc64 --scheme int:k2v4:kc64:vc64 --scheme int:auto:3.0:kc64:vc64

step "The format at a real geometry: a llama-3-8b-shaped synthetic cache (4 of 32 layers), bf16 + zstd"
"$KVPACK" synth "$OUT/llama.kvpack" --model llama-3-8b --layers 4 --tokens 1024 --scheme raw:bf16:zstd --overwrite
"$KVPACK" attend "$OUT/llama.kvpack" --layer 1 --head 5 --tokens "100..<1000" --check | tail -1
