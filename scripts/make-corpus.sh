#!/usr/bin/env bash
# Writes the reader's seed and regression files into corpus/ (used by `make fuzz` as seeds and
# by Tests/KVPackTests/CorpusTests.swift). File names state the expectation:
#   valid__NAME.kvpack          opens, validates (--deep) with no problem
#   warn__NAME.kvpack           opens, validates with warnings only (e.g. a torn tail)
#   error-CODE__NAME.kvpack     validate reports an error with that code
# Bytes are reproducible: fixed seeds and salts. Existing files are never replaced: they record
# what earlier writers produced, and the reader must keep accepting them (Spec/ 3.1). Into an empty
# directory the script writes what the current writer produces. Names below say v1 (the version
# they were first written in); a file the current writer produces in another major version is
# kept under that version's name (valid__v1.1-int-k4v2 -> valid__v2-int-k4v2), so running the
# script after a major bump adds the new version's files beside the old ones.
set -euo pipefail
KVPACK=${1:-.build/release/kvpack}
OUT=${2:-corpus}
mkdir -p "$OUT"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# Copies into the corpus unless a file of that name is already there.
keep() {  # source name
  local name=$2 major
  major=$(od -An -tu2 -j8 -N2 "$1" 2>/dev/null | tr -d ' ')
  # The major is at bytes 8-9: any file that reaches them says which writer made it (a cut
  # header included).
  if [ -n "$major" ] && [ "$major" != 1 ] && [ "$(stat -c %s "$1")" -ge 10 ]; then
    name=$(echo "$name" | sed -E "s/__v1(\.[0-9]+)?-/__v$major-/")
  fi
  if [ -e "$OUT/$name" ]; then echo "corpus: keeping existing $name"; else cp "$1" "$OUT/$name"; fi
}

synth() {  # name scheme extra-args...
  local name=$1 scheme=$2; shift 2
  "$KVPACK" synth "$tmp/$name.kvpack" --model stories260k --layers 2 --tokens 37 --segment-tokens 8 \
    --commit-every 5 --batch 3 --seed 7 --salt 4242 --scheme "$scheme" --overwrite "$@"
}

for s in f32 f16 bf16; do
  synth "raw-$s" "raw:$s";        keep "$tmp/raw-$s.kvpack" "valid__v1-raw-$s.kvpack"
  synth "raw-$s-zstd" "raw:$s:zstd"; keep "$tmp/raw-$s-zstd.kvpack" "valid__v1-raw-$s-zstd.kvpack"
done
synth mixed "raw:f32+v:raw:bf16:zstd=9"; keep "$tmp/mixed.kvpack" "valid__v1-mixed-k-f32-v-bf16-zstd.kvpack"
synth int-k4v2 "int:k4v2";            keep "$tmp/int-k4v2.kvpack" "valid__v1.1-int-k4v2.kvpack"
synth int-k3v1-kc8 "int:k3v1:kc8:vc8"; keep "$tmp/int-k3v1-kc8.kvpack" "valid__v1.1-int-k3v1-per-channel.kvpack"
synth int-auto "int:auto:3.0:kc8";     keep "$tmp/int-auto.kvpack" "valid__v1.1-int-auto-per-layer.kvpack"
synth polar-r4a4 "polar:r4a4+v:int:k4v2";   keep "$tmp/polar-r4a4.kvpack" "valid__v1.2-polar-r4a4-v-int2.kvpack"
synth polar-r2a3 "k:polar:r2a3:g4:half+v:polar:r8a8:adjacent"; keep "$tmp/polar-r2a3.kvpack" "valid__v1.2-polar-r2a3-half-g4.kvpack"
synth svdq "k:svdq:2+v:svdq:8-4-0-2:shared"; keep "$tmp/svdq.kvpack" "valid__v1.2-svdq-per-head-k-shared-v.kvpack"
synth nsn1 "nsn:1";                      keep "$tmp/nsn1.kvpack" "valid__v1.3-nsn-1bit.kvpack"
synth nsn2 "k:nsn:2:seed9+v:nsn:1";      keep "$tmp/nsn2.kvpack" "valid__v1.3-nsn-2bit-k-1bit-v.kvpack"
# Rewrites bytes of the first frame tagged TAG, at PAYLOAD_OFFSET into its payload, and then its
# checksums, so the damage sits behind valid frame checksums: OP is set:HEX (store those bytes) or
# xor:HEX (flip those bits).
patch_first_frame() {  # in out tag payload-offset op
python3 - "$@" <<'PY'
import sys, xxhash
src, dst, tag, at, op = sys.argv[1], sys.argv[2], sys.argv[3].encode(), int(sys.argv[4]), sys.argv[5]
b = bytearray(open(src, 'rb').read())
salt = int.from_bytes(b[24:32], 'little')
off = 64
while off + 64 <= len(b):
    length = int.from_bytes(b[off+8:off+16], 'little')
    if bytes(b[off:off+4]) == tag:
        kind, data = op.split(':')
        for i, v in enumerate(bytes.fromhex(data)):
            b[off + 64 + at + i] = v if kind == 'set' else b[off + 64 + at + i] ^ v
        b[off+24:off+32] = xxhash.xxh3_64_intdigest(bytes(b[off+64:off+64+length])).to_bytes(8, 'little')
        b[off+56:off+64] = xxhash.xxh3_64_intdigest(bytes(b[off:off+56]), seed=salt ^ off).to_bytes(8, 'little')
        break
    off += 64 + (length + 63) // 64 * 64
open(dst, 'wb').write(b)
PY
}
# The codebook blob changed (one bit of its first entry): its hash no longer matches the
# descriptor's, and the reader must refuse the file rather than decode with the wrong codewords.
patch_first_frame "$tmp/nsn1.kvpack" "$tmp/nsn-hash.kvpack" BLOB 5 xor:01
keep "$tmp/nsn-hash.kvpack" "error-invalidField__v1.3-nsn-codebook-hash-mismatch.kvpack"

# A pruned file (format 1.4, tsel frame): a real stories260K cache (greedy, deterministic), pruned
# by KVCrush to 40% in int:k4v2. Run from inside $tmp so the recorded source path is fixed.
model=$(realpath ../shared/models/stories260K.bin)
kvpack_abs=$(realpath "$KVPACK")
"$KVPACK" generate --model ../shared/models/stories260K.bin --save "$tmp/gen.kvpack" --steps 47 --segment-tokens 8 --no-fsync > /dev/null
(cd "$tmp" && "$kvpack_abs" prune gen.kvpack crush.kvpack --budget 0.4 --scheme int:k4v2 --recent 4 --window 8 \
  --segment-tokens 8 --salt 4242 --no-fsync --model "$model" > /dev/null 2>&1)
keep "$tmp/crush.kvpack" "valid__v1.4-kvcrush-40pct-int-k4v2.kvpack"
# ... whose second source index is patched to 0 (no longer increasing), behind valid checksums.
patch_first_frame "$tmp/crush.kvpack" "$tmp/crush-index.kvpack" tsel 28 set:00000000
keep "$tmp/crush-index.kvpack" "error-invalidField__v1.4-tsel-source-index-not-increasing.kvpack"
# Metadata notes (format 2.1 / 1.5): three notes at three commits, the third replacing the first's
# value of key a (the file's metadata: a=3, b=2 after the manifest's entries).
for v in 1 2; do
  synth "notes-v$v" raw:f16 --format-version $v --note a=1 --note b=2 --note a=3
done
keep "$tmp/notes-v1.kvpack" "valid__v1.5-notes.kvpack"
keep "$tmp/notes-v2.kvpack" "valid__v2.1-notes.kvpack"
# Format 2.2: int codes with signed scales, as an mlx-lm QuantizedKVCache holds them (codes
# copied by import; Tests/Fixtures/mlx, written by the real mlx-lm 0.21.5).
"$KVPACK" import Tests/Fixtures/mlx/q4-g64-v021.safetensors "$tmp/mlx-q4.kvpack" --query-heads 9 --rope-theta 100000 \
  --salt 4242 --no-fsync --overwrite > /dev/null
keep "$tmp/mlx-q4.kvpack" "valid__v2.2-int-signed-scales-mlx-q4.kvpack"
# Format 2.3: a lossless window of 12 tokens and 3 sink tokens in int:k4v2 (37 tokens in segments
# of 8: 24 sealed, 13 in tail runs that span two segments, tokens 0-2 read from the SINK frame).
synth window-sinks "int:k4v2+window:12+sinks:3"
keep "$tmp/window-sinks.kvpack" "valid__v2.3-int-k4v2-window12-sinks3.kvpack"
# Format 2.3: raw rows compressed as byte planes, one zstd frame per plane (codec 2), in f16
# (two planes) and f32 (four).
synth raw-f16-planes "raw:f16:zstd:planes";  keep "$tmp/raw-f16-planes.kvpack" "valid__v2.3-raw-f16-zstd-planes.kvpack"
synth raw-f32-planes "raw:f32:zstd=9:planes"; keep "$tmp/raw-f32-planes.kvpack" "valid__v2.3-raw-f32-zstd-planes.kvpack"
# Format 2.4: int keys with per-channel widths averaging 2.5 bits (calibrated on the synthetic
# keys' own outlier channels), values 2 bits, in SmolLM2's geometry: widths change in runs of 8
# channels, so head_dim 8 has room for one width only. Then one width made 5 (no such width).
"$KVPACK" synth "$tmp/channel-widths.kvpack" --model smollm2-135m --layers 1 --tokens 37 --segment-tokens 8 \
  --commit-every 5 --batch 3 --seed 7 --salt 4242 --scheme "int:k2.5v2:kc8" --overwrite
keep "$tmp/channel-widths.kvpack" "valid__v2.4-int-k2.5v2-channel-widths.kvpack"
# Manifest payload: 64 fixed bytes, 1 layer's scheme pair (4), the key descriptor's 8-byte head and
# 8 parameter bytes: head 0's first width at 84.
patch_first_frame "$tmp/channel-widths.kvpack" "$tmp/channel-width-5.kvpack" MANI 84 set:05
keep "$tmp/channel-width-5.kvpack" "error-invalidField__v2.4-int-channel-width-5.kvpack"
# Its manifest with the LOSSLESS_TOKENS flag but no window and no sinks (payload offsets 56..63
# zeroed), and with more sinks than a segment holds (9 > 8): invalid fields, not misreadings.
patch_first_frame "$tmp/window-sinks.kvpack" "$tmp/lossless-no-counts.kvpack" MANI 56 set:0000000000000000
keep "$tmp/lossless-no-counts.kvpack" "error-invalidField__v2.3-lossless-tokens-flag-without-counts.kvpack"
patch_first_frame "$tmp/window-sinks.kvpack" "$tmp/sinks-past-segment.kvpack" MANI 60 set:09000000
keep "$tmp/sinks-past-segment.kvpack" "error-invalidField__v2.3-sinks-past-first-segment.kvpack"
# A duplicate key inside one note is an error of that note: with no intermediate commits both
# --note entries go into one note (a=1, b=2); its second key (payload offset 10) becomes "a".
synth notes-dup raw:f16 --note a=1 --note b=2 --commit-every 0
patch_first_frame "$tmp/notes-dup.kvpack" "$tmp/notes-dup-key.kvpack" note 10 set:61
keep "$tmp/notes-dup-key.kvpack" "error-invalidField__v2.1-note-duplicate-key.kvpack"
# An int block and a polar block whose first scale is NaN (f16 0x7E00): content errors, not bit
# rot. Both blocks (8 tokens, head_dim 8, 4-bit codes) hold 32 bytes of codes first (polar: 16 of
# angles, 16 of radii), then the scales.
patch_first_frame "$tmp/int-k4v2.kvpack" "$tmp/nan-scale.kvpack" BLCK 32 set:007e
patch_first_frame "$tmp/polar-r4a4.kvpack" "$tmp/polar-nan-scale.kvpack" BLCK 32 set:007e
keep "$tmp/nan-scale.kvpack" "error-corruptPayload__v1.1-int-nan-scale.kvpack"
keep "$tmp/polar-nan-scale.kvpack" "error-corruptPayload__v1.2-polar-nan-radius-scale.kvpack"
# A manifest claiming a GQA group of 16384 query heads and 65536-token segments, checksums valid:
# before the group limits (Spec/ 12), one attention call over it allocated 4 GiB of score rows.
"$KVPACK" synth "$tmp/tail-only.kvpack" --model stories260k --layers 1 --tokens 5 --segment-tokens 8 --salt 4242 --overwrite
python3 - "$tmp/tail-only.kvpack" "$tmp/huge-group.kvpack" <<'PY'
import sys, xxhash
b = bytearray(open(sys.argv[1], 'rb').read())
salt = int.from_bytes(b[24:32], 'little')
off, length = 64, int.from_bytes(b[72:80], 'little')
p = off + 64
b[p + 4:p + 8] = (65536).to_bytes(4, 'little')    # queryHeadCount (kvHeadCount stays 4)
b[p + 16:p + 20] = (65536).to_bytes(4, 'little')   # segmentTokens
b[off+24:off+32] = xxhash.xxh3_64_intdigest(bytes(b[p:p+length])).to_bytes(8, 'little')
b[off+56:off+64] = xxhash.xxh3_64_intdigest(bytes(b[off:off+56]), seed=salt ^ off).to_bytes(8, 'little')
open(sys.argv[2], 'wb').write(b)
PY
keep "$tmp/huge-group.kvpack" "error-invalidField__v1-huge-gqa-group.kvpack"
# An empty file: created, never appended to.
"$KVPACK" synth "$tmp/empty.kvpack" --model stories260k --layers 1 --tokens 0 --salt 4242 --overwrite
keep "$tmp/empty.kvpack" "valid__v1-empty.kvpack"

base="$tmp/raw-f16.kvpack"
size=$(stat -c %s "$base")
# A writer that died mid-append: the committed file plus bytes it wrote but never committed.
cp "$base" "$tmp/torn-tail.kvpack"
dd if="$tmp/raw-f16-zstd.kvpack" bs=1 skip=1024 count=700 status=none >> "$tmp/torn-tail.kvpack"
keep "$tmp/torn-tail.kvpack" "warn__v1-torn-tail.kvpack"
# The last commit frame cut in half: the previous commit is used.
head -c $((size - 32)) "$base" > "$tmp/torn-commit.kvpack"; keep "$tmp/torn-commit.kvpack" "warn__v1-torn-commit.kvpack"
# Truncations: inside the header, inside the manifest.
head -c 40 "$base" > "$tmp/cut-header.kvpack"; keep "$tmp/cut-header.kvpack" "error-truncated__v1-cut-header.kvpack"
head -c 100 "$base" > "$tmp/cut-manifest.kvpack"; keep "$tmp/cut-manifest.kvpack" "error-truncated__v1-cut-manifest.kvpack"
# A flipped bit in a sealed block's payload (the first BLCK frame's payload starts 64 bytes in).
python3 - "$base" "$tmp/flipped.kvpack" <<'PY'
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
keep "$tmp/flipped.kvpack" "error-checksumMismatch__v1-flipped-block-bit.kvpack"
# Version 2: a flipped bit in the first segment table's payload (a checksum error of the call that
# first reaches segment 0, not of opening), and a segment table whose first block offset names
# the table itself, behind valid checksums (an invalid field, caught before anything is read there).
python3 - "$base" "$tmp/segt-flipped.kvpack" "$tmp/segt-offset.kvpack" <<'PY'
import sys, xxhash
b = bytearray(open(sys.argv[1], 'rb').read())
if b[8] == 2:
    salt = int.from_bytes(b[24:32], 'little')
    off = 64
    while off + 64 <= len(b):
        tag = bytes(b[off:off+4]); length = int.from_bytes(b[off+8:off+16], 'little')
        if tag == b'SEGT':
            flipped = bytearray(b); flipped[off + 64 + 3] ^= 0x10
            open(sys.argv[2], 'wb').write(flipped)
            b[off + 64:off + 72] = off.to_bytes(8, 'little')
            b[off+24:off+32] = xxhash.xxh3_64_intdigest(bytes(b[off+64:off+64+length])).to_bytes(8, 'little')
            b[off+56:off+64] = xxhash.xxh3_64_intdigest(bytes(b[off:off+56]), seed=salt ^ off).to_bytes(8, 'little')
            open(sys.argv[3], 'wb').write(b)
            break
        off += 64 + (length + 63) // 64 * 64
PY
if [ -e "$tmp/segt-flipped.kvpack" ]; then
  keep "$tmp/segt-flipped.kvpack" "error-checksumMismatch__v2-flipped-segment-table-bit.kvpack"
  keep "$tmp/segt-offset.kvpack" "error-invalidField__v2-segment-table-block-offset.kvpack"
fi
# Unknown major version (3: this reader implements 1 and 2).
python3 - "$base" "$tmp/v3.kvpack" <<'PY'
import sys
b = bytearray(open(sys.argv[1], 'rb').read()); b[8] = 3
open(sys.argv[2], 'wb').write(b)
PY
if [ ! -e "$OUT/error-unsupportedVersion__v3-major.kvpack" ]; then cp "$tmp/v3.kvpack" "$OUT/error-unsupportedVersion__v3-major.kvpack"; fi
echo "corpus: $(ls "$OUT" | wc -l) files in $OUT"
