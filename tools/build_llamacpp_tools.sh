#!/usr/bin/env bash
# Build llama.cpp's own command-line tools (llama-quantize, llama-imatrix, llama-perplexity) from the
# same llama.cpp version that llama-cpp-python 0.3.36 vendors, for the side-by-side benchmarks in tools/.
# The sdist comes from PyPI (package registry); nothing else is downloaded. Output: .llamacpp-tools/bin/.
#   bash tools/build_llamacpp_tools.sh [JOBS]
set -euo pipefail
cd "$(dirname "$0")/.."
VER=0.3.36
DEST=.llamacpp-tools
JOBS=${1:-2}
PIP=${PIP:-.venv/bin/pip}
mkdir -p "$DEST"
if [ ! -f "$DEST/llama_cpp_python-$VER.tar.gz" ]; then
  "$PIP" download "llama-cpp-python==$VER" --no-deps --no-binary :all: -d "$DEST"
fi
if [ ! -d "$DEST/src" ]; then
  mkdir -p "$DEST/src"
  tar -xzf "$DEST/llama_cpp_python-$VER.tar.gz" -C "$DEST/src" --strip-components=1
fi
cmake -S "$DEST/src/vendor/llama.cpp" -B "$DEST/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
  -DLLAMA_BUILD_TOOLS=ON -DGGML_NATIVE=ON >/dev/null
cmake --build "$DEST/build" -j "$JOBS" --target llama-quantize llama-imatrix llama-perplexity
mkdir -p "$DEST/bin"
for t in llama-quantize llama-imatrix llama-perplexity; do cp "$DEST/build/bin/$t" "$DEST/bin/"; done
echo "built: $(ls "$DEST/bin")"
