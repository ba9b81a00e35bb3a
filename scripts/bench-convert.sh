#!/usr/bin/env bash
# Peak memory of streaming passes over a 1 GiB cache (llama-3-8b geometry, 8,192 tokens, raw f16):
# convert to int and to f32+zstd, validate --deep, info. Peak RSS counts every page mapped into the
# process, file-backed ones included; the passes release pages they are done with.
set -euo pipefail
KVPACK=${1:-.build/release/kvpack}
DIR=${2:-$(mktemp -d)}
mkdir -p "$DIR"
trap 'rm -f "$DIR"/bench-*.kvpack' EXIT
peak() {  # label command...
  local label=$1; shift
  /usr/bin/time -v "$@" > "$DIR/out.txt" 2> "$DIR/time.txt"
  printf '%-40s peak RSS %6.1f MiB, %s s\n' "$label" \
    "$(awk '/Maximum resident/ {print $6 / 1024}' "$DIR/time.txt")" \
    "$(awk -F': ' '/Elapsed/ {print $2}' "$DIR/time.txt")"
}
"$KVPACK" synth "$DIR/bench-src.kvpack" --model llama-3-8b --tokens 8192 --scheme raw:f16 --overwrite 2> /dev/null
echo "source: $(stat -c %s "$DIR/bench-src.kvpack") bytes ($(awk "BEGIN {print $(stat -c %s "$DIR/bench-src.kvpack") / 1073741824}") GiB)"
peak "convert to int:k4v2" "$KVPACK" convert "$DIR/bench-src.kvpack" "$DIR/bench-int.kvpack" --scheme int:k4v2 --no-fsync
grep "error added" "$DIR/out.txt"
peak "convert to raw:f32:zstd" "$KVPACK" convert "$DIR/bench-src.kvpack" "$DIR/bench-f32.kvpack" --scheme raw:f32:zstd --no-fsync
peak "validate --deep" "$KVPACK" validate --deep "$DIR/bench-src.kvpack"
peak "info" "$KVPACK" info "$DIR/bench-src.kvpack"
peak "export npy f16" "$KVPACK" export "$DIR/bench-src.kvpack" "$DIR/bench-npy" --dtype f16
rm -rf "$DIR/bench-npy"
