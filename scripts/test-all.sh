#!/usr/bin/env bash
# Runs every test: the Rust workspace (unit, property, simulation and process tests) and the
# Python interoperability tests. This is the README's test command; .ci/run calls it.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release -p flare-node
cargo test --workspace --release

# Python side: an independent reader of the files Flare writes.
VENV=.venv-test
if [ ! -x "$VENV/bin/pytest" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check pytest numpy safetensors
fi
FLARE_NODE_BIN="${CARGO_TARGET_DIR:-$PWD/target}/release/flare-node" "$VENV/bin/pytest" -q tests/python/test_safetensors_interop.py
