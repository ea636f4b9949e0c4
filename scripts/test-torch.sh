#!/usr/bin/env bash
# The LibTorch back-end's tests on the CPU: creates the torch venv when missing (pip,
# torch 2.11.0 as tch 0.24 expects), builds flare-node with `--features torch`, runs the
# Rust tests with the feature, then the Python interop test against what they exported.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${FLARE_TORCH_VENV:-.venv-torch}
PY=${PYTHON:-python3}

if ! "$VENV/bin/python" -c 'import torch, safetensors, pytest, numpy; assert torch.__version__.startswith("2.11.0")' 2>/dev/null; then
    echo "== creating $VENV (torch 2.11.0 from PyPI, about 5 GB)"
    "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check torch==2.11.0 pytest safetensors numpy
fi
# TensorBoard's own reader checks the event files the Client API example leaves.
if ! "$VENV/bin/python" -c 'import tensorboard' 2>/dev/null; then
    "$VENV/bin/pip" install --quiet --disable-pip-version-check tensorboard
fi
"$VENV/bin/pip" install --quiet --disable-pip-version-check ./clients/python

# shellcheck disable=SC1091
source "$VENV/bin/activate"
export LIBTORCH_USE_PYTORCH=1
TORCH_LIB=$(python -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export FLARE_TORCH_INTEROP_DIR=${FLARE_TORCH_INTEROP_DIR:-$PWD/target/torch-interop}
rm -rf "$FLARE_TORCH_INTEROP_DIR"

echo "== cargo build --release -p flare-hub --features torch (the flare-node binary)"
cargo build --release -p flare-hub --features torch
echo "== cargo test --release -p flare-node --features torch"
cargo test --release -p flare-node --features torch
echo "== pytest tests/python/test_torch_interop.py test_client_api.py test_hello_pt.py"
FLARE_NODE_BIN="${FLARE_NODE_BIN:-${CARGO_TARGET_DIR:-$PWD/target}/release/flare-node}" \
    python -m pytest -q tests/python/test_torch_interop.py tests/python/test_client_api.py tests/python/test_hello_pt.py
