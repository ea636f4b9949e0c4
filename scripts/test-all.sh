#!/usr/bin/env bash
# The one command that runs every test (README: "Run the tests").
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace --release
