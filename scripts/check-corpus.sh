#!/usr/bin/env bash
# Regenerates corpus/ into an empty directory with the same seeds and salts (scripts/make-corpus.sh)
# and compares every regenerated file with the committed one, byte for byte. Run it after any
# change that should not change a byte of what the writer produces (a refactor): `make corpus-check`.
# Files in corpus/ that the current writer does not produce (written by older writers, in older
# versions, or found by fuzzing) are listed, not compared.
set -euo pipefail
KVPACK=${1:-.build/release/kvpack}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
bash "$(dirname "$0")/make-corpus.sh" "$KVPACK" "$tmp" > "$tmp.log" 2>&1 || { cat "$tmp.log"; exit 1; }
same=0; differ=0; missing=0
for f in "$tmp"/*.kvpack; do
  name=$(basename "$f")
  if [ ! -e "corpus/$name" ]; then
    echo "corpus-check: $name is produced now but not in corpus/ (run make corpus to add it)"; missing=$((missing + 1))
  elif cmp -s "$f" "corpus/$name"; then
    same=$((same + 1))
  else
    echo "corpus-check: $name DIFFERS: $(cmp "$f" "corpus/$name" 2>&1 | head -1)"; differ=$((differ + 1))
  fi
done
older=0
for f in corpus/*.kvpack; do [ -e "$tmp/$(basename "$f")" ] || older=$((older + 1)); done
echo "corpus-check: $same regenerated files identical to corpus/, $differ different, $missing new; $older corpus files come from older writers or fuzzing (not regenerated)"
rm -f "$tmp.log"
[ "$differ" -eq 0 ] && [ "$missing" -eq 0 ]
