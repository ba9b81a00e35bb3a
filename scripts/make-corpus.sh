#!/usr/bin/env bash
# Writes the reader's seed and regression files into corpus/ (used by `make fuzz` as seeds and
# by Tests/KVPackTests/CorpusTests.swift). File names state the expectation:
#   valid__NAME.kvpack          opens, validates (--deep) with no problem
#   warn__NAME.kvpack           opens, validates with warnings only (e.g. a torn tail)
#   error-CODE__NAME.kvpack     validate reports an error with that code
# Bytes are reproducible: fixed seeds and salts.
set -euo pipefail
KVPACK=${1:-.build/release/kvpack}
OUT=${2:-corpus}
mkdir -p "$OUT"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

synth() {  # name scheme extra-args...
  local name=$1 scheme=$2; shift 2
  "$KVPACK" synth "$tmp/$name.kvpack" --model stories260k --layers 2 --tokens 37 --segment-tokens 8 \
    --commit-every 5 --batch 3 --seed 7 --salt 4242 --scheme "$scheme" --overwrite "$@"
}

for s in f32 f16 bf16; do
  synth "raw-$s" "raw:$s";        cp "$tmp/raw-$s.kvpack" "$OUT/valid__v1-raw-$s.kvpack"
  synth "raw-$s-zstd" "raw:$s:zstd"; cp "$tmp/raw-$s-zstd.kvpack" "$OUT/valid__v1-raw-$s-zstd.kvpack"
done
synth mixed "raw:f32+v:raw:bf16:zstd=9"; cp "$tmp/mixed.kvpack" "$OUT/valid__v1-mixed-k-f32-v-bf16-zstd.kvpack"
# An empty file: created, never appended to.
"$KVPACK" synth "$tmp/empty.kvpack" --model stories260k --layers 1 --tokens 0 --salt 4242 --overwrite
cp "$tmp/empty.kvpack" "$OUT/valid__v1-empty.kvpack"

base="$tmp/raw-f16.kvpack"
size=$(stat -c %s "$base")
# A writer that died mid-append: the committed file plus bytes it wrote but never committed.
cp "$base" "$OUT/warn__v1-torn-tail.kvpack"
dd if="$tmp/raw-f16-zstd.kvpack" bs=1 skip=1024 count=700 status=none >> "$OUT/warn__v1-torn-tail.kvpack"
# The last commit frame cut in half: the previous commit is used.
head -c $((size - 32)) "$base" > "$OUT/warn__v1-torn-commit.kvpack"
# Truncations: inside the header, inside the manifest.
head -c 40 "$base" > "$OUT/error-truncated__v1-cut-header.kvpack"
head -c 100 "$base" > "$OUT/error-truncated__v1-cut-manifest.kvpack"
# A flipped bit in a sealed block's payload (the first BLCK frame's payload starts 64 bytes in).
python3 - "$base" "$OUT/error-checksumMismatch__v1-flipped-block-bit.kvpack" <<'PY'
import sys
b = bytearray(open(sys.argv[1], 'rb').read())
off = 64
while off + 64 <= len(b):
    tag = bytes(b[off:off+4]); length = int.from_bytes(b[off+8:off+16], 'little')
    if tag == b'BLCK':
        b[off + 64 + 5] ^= 0x04
        break
    off += 64 + (length + 63) // 64 * 64
open(sys.argv[2], 'wb').write(b)
PY
# Unknown major version.
python3 - "$base" "$OUT/error-unsupportedVersion__v2-major.kvpack" <<'PY'
import sys
b = bytearray(open(sys.argv[1], 'rb').read()); b[8] = 2
open(sys.argv[2], 'wb').write(b)
PY
echo "corpus: $(ls "$OUT" | wc -l) files in $OUT"
