#!/usr/bin/env bash
# Create .venv and install axolotl-treft with its demo, test and DeepSpeed extras (CPU torch, pinned).
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}  # llama-cpp-python (test extra) builds from source
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip wheel setuptools
# torch is pinned through constraints.txt: an unpinned torch would pull several GB of CUDA packages.
.venv/bin/python -m pip install -q -c constraints.txt torch==2.13.0
.venv/bin/python -m pip install -q -c constraints.txt -e ".[demo,test,deepspeed]"
.venv/bin/axolotl-treft model smollm2 >/dev/null
echo "axolotl-treft installed in .venv"
