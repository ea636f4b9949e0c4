#!/usr/bin/env bash
# Simulator benchmarks: median seconds per round and peak RSS, one process per configuration.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p flare-hub >/dev/null
B=target/release/flare-node
$B bench sim --params 10 --clients 8 --rounds 10
$B bench sim --params 10 --clients 32 --rounds 10
$B bench sim --params 10 --clients 1000 --rounds 10
$B bench sim --params 100000000 --clients 4 --rounds 3
$B bench centralized --epochs 5
