#!/usr/bin/env bash
# Builds the real llama.cpp that KVPack's interop is tested against, once, into a cache directory
# outside the repository (default ~/.cache/kvpack/llama.cpp; override with LLAMA_CPP_DIR):
#   - the llama-cpp-python sdist from PyPI, pinned by version and sha256; it vendors llama.cpp;
#   - llama.cpp's library and tools (llama-completion, llama-simple, llama-bench, llama-tokenize)
#     built with CMake and Ninja from PyPI wheels, for this machine's CPU (GGML_NATIVE);
#   - a virtualenv with the Python binding from the same sdist, without a second C++ build,
#     pointed at that library (scripts/llama-cpp.sh runs Python in it).
# Nothing of it is committed. Takes 3 to 9 minutes on 2 cores; later runs are no-ops.
set -euo pipefail
VERSION=0.3.36
SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
DIR=${LLAMA_CPP_DIR:-$HOME/.cache/kvpack/llama.cpp}
SRC="$DIR/llama_cpp_python-$VERSION"
mkdir -p "$DIR"
if [ -x "$DIR/build/bin/llama-completion" ] && [ -x "$DIR/venv/bin/python" ] && [ -f "$DIR/build-ok-$VERSION" ]; then
  echo "llama.cpp: $DIR already built (llama-cpp-python $VERSION); remove $DIR to rebuild"
  exit 0
fi
start=$(date +%s)
cd "$DIR"
sdist="sdist/llama_cpp_python-$VERSION.tar.gz"
if [ ! -f "$sdist" ]; then
  echo "llama.cpp: downloading the llama-cpp-python $VERSION sdist from PyPI"
  python3 -m pip download --quiet --no-deps --no-binary llama-cpp-python "llama-cpp-python==$VERSION" -d sdist
fi
echo "$SHA256  $sdist" | sha256sum -c --quiet || { echo "llama.cpp: $sdist does not match the pinned sha256"; exit 1; }
[ -d "$SRC" ] || tar xzf "$sdist"
command -v cmake >/dev/null && command -v ninja >/dev/null || python3 -m pip install --quiet cmake ninja
echo "llama.cpp: configuring and building (about 3-9 minutes on 2 cores)"
cmake -S "$SRC/vendor/llama.cpp" -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
  -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=ON > build-configure.log
cmake --build build -j "$(nproc)" --target llama-completion llama-simple llama-bench llama-tokenize > build.log
[ -x venv/bin/python ] || python3 -m venv venv
CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" venv/bin/pip install --quiet "$sdist"
touch "build-ok-$VERSION"
echo "llama.cpp: built in $(( $(date +%s) - start )) s into $DIR (llama-cpp-python $VERSION)"
