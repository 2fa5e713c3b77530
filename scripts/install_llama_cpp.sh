#!/usr/bin/env bash
# Install llama-cpp-python 0.3.36 built for a portable AVX2 CPU.
# The default native build emits instructions that SIGILL on quantized GGUF on
# our CI CPUs, and pip's wheel cache ignores CMAKE_ARGS, so we build the wheel
# ourselves once, keyed by version + flags, and reuse it across fresh venvs.
# GGML_OPENMP=OFF: ggml's own thread pool instead of libgomp. Our build process runs torch and
# llama.cpp in one process; torch loads its libgomp first and keeps its worker threads, so libgomp
# counts more threads than CPUs and cuts every ggml barrier's spin to a futex sleep: batched decodes
# ran 20% slower after any torch op. ggml's pool is as fast alone (measured on 2 cores) and immune.
set -euo pipefail
PY=${1:-.venv/bin/python}
VERSION=0.3.36
export CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_OPENMP=OFF"
KEY=$(printf '%s %s' "$VERSION" "$CMAKE_ARGS" | sha256sum | cut -c1-16)
CACHE=${EDGEDISTILL_CACHE:-$HOME/.cache/edgedistill}/wheels/llama-cpp-$KEY
STAMP=$("$PY" -c 'import sys; print(sys.prefix)')/.llama-cpp-build-$KEY

if [ -f "$STAMP" ] && "$PY" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" 2>/dev/null; then
  echo "llama-cpp-python $VERSION (portable AVX2 build) already installed"
  exit 0
fi
if ! ls "$CACHE"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  echo "Building llama-cpp-python $VERSION (portable AVX2; ~7 min on 2 cores)..."
  mkdir -p "$CACHE.tmp"
  "$PY" -m pip wheel --no-cache-dir --no-deps "llama-cpp-python==$VERSION" -w "$CACHE.tmp"
  rm -rf "$CACHE"; mv "$CACHE.tmp" "$CACHE"
fi
"$PY" -m pip install --no-cache-dir --force-reinstall --no-deps "$CACHE"/llama_cpp_python-*.whl
"$PY" -m pip install -c constraints.txt "diskcache>=5.6.1" "jinja2>=2.11.3" "typing-extensions>=4.5.0" "numpy>=1.20.0"
touch "$STAMP"
