#!/usr/bin/env bash
# Runs a command with the llama.cpp that scripts/build-llama-cpp.sh built: its Python binding's
# virtualenv first on PATH (so `python` is it) and LLAMA_CPP_LIB_PATH at its library.
#   scripts/llama-cpp.sh python scripts/llama_cpp_driver.py save --model M --prompt P --out F
# Exit status 3 (and a message) when it is not built.
DIR=${LLAMA_CPP_DIR:-$HOME/.cache/kvpack/llama.cpp}
if [ ! -x "$DIR/venv/bin/python" ] || [ ! -e "$DIR/build/bin/libllama.so" ]; then
  echo "llama.cpp is not built in $DIR: run make llama.cpp" >&2
  exit 3
fi
export LLAMA_CPP_LIB_PATH="$DIR/build/bin"
export PATH="$DIR/venv/bin:$PATH"
exec "$@"
