#!/usr/bin/env bash
# .venv-llamacpp: llama-cpp-python built from source (the engine bench_gguf.py runs our files in) plus
# llama.cpp's llama-imatrix and llama-quantize built from the very source it vendors, so the tools and the
# evaluator are one llama.cpp version and the tools run on the evaluator's own libllama. About 15 minutes
# on 2 cores. Not a dependency of the project; bench/bench_gguf.py finds the tools beside this venv's Python.
set -euo pipefail
PY=${PY:-python3}
VENV=${LLAMACPP_VENV:-.venv-llamacpp}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/llamacpp-build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
"$PY" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$WORK/src"
tar xzf "$WORK"/src/*.tar.gz -C "$WORK/src"
test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install --quiet 'scikit-build-core[pyproject]>=0.9.2' numpy typing-extensions diskcache jinja2
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} "$VENV/bin/pip" install --no-build-isolation --no-deps \
    -Cbuild-dir="$WORK/build" "$WORK"/src/llama_cpp_python-*/
cmake "$WORK/build" -DLLAMA_BUILD_TOOLS=ON -DLLAVA_BUILD=OFF > /dev/null
cmake --build "$WORK/build" --target llama-imatrix llama-quantize -j"${CMAKE_BUILD_PARALLEL_LEVEL:-2}"
cp "$WORK"/build/bin/{llama-imatrix,llama-quantize,libllama-quantize-impl.so} "$VENV/bin/"
cp -L "$WORK/build/bin/libllama-common.so.0" "$VENV/bin/"
"$VENV/bin/python" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
