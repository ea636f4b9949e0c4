#!/usr/bin/env bash
# Runs every test: the Rust workspace (unit, property, simulation and process tests) and the
# Python interoperability tests. This is the README's test command; .ci/run calls it.
set -euo pipefail
cd "$(dirname "$0")/.."

# As root, node/tests/netns.rs records the server's links with tcpdump and node/tests/faults
# mounts small tmpfs file systems (mount, from util-linux); install what is missing (Debian).
if [ "$(id -u)" = 0 ] && ! command -v tcpdump >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tcpdump
fi

# The dashboard's browser test and the TensorBoard screenshot drive Debian's headless Chromium.
bash scripts/install-chromium.sh

cargo build --release -p flare-hub -p flare-client   # flare-test-trainer: the user program of the Client API tests
cargo test --workspace --release

# Python side: an independent reader of the files Flare writes.
VENV=.venv-test
if [ ! -x "$VENV/bin/pytest" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check pytest numpy safetensors
fi
# TensorBoard itself reads the event files the metric pipeline writes.
if ! "$VENV/bin/python" -c 'import tensorboard' 2>/dev/null; then
  "$VENV/bin/pip" install --quiet --disable-pip-version-check tensorboard
fi
"$VENV/bin/pip" install --quiet --disable-pip-version-check ./clients/python
FLARE_NODE_BIN="${CARGO_TARGET_DIR:-$PWD/target}/release/flare-node" "$VENV/bin/pytest" -q tests/python/test_safetensors_interop.py tests/python/test_client_api.py tests/python/test_tensorboard.py tests/python/test_stats.py
