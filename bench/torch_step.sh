#!/usr/bin/env bash
# Times the same CNN training step in PyTorch (bench/torch_step.py) and in Flare's tch
# trainer (`flare-node bench torch-step`) on one device, one after the other, and prints
# samples/s and the ratio ours / PyTorch per batch size.
#   bash bench/torch_step.sh [FLARE_NODE_BINARY] [DEVICE] [OPTIMIZER]
# The binary must find LibTorch (LD_LIBRARY_PATH) and python3 must import torch.
set -euo pipefail
BIN=${1:-target/release/flare-node}
DEV=${2:-cuda}
OPT=${3:-adam}
ARGS=(--batch-sizes "${BATCH_SIZES:-64,256}" --steps "${STEPS:-300}" --warmup "${WARMUP:-50}" --optimizer "$OPT")
HERE=$(dirname "$0")
OUT=$(mktemp)
python3 "$HERE/torch_step.py" --device "$DEV" "${ARGS[@]}" | tee -a "$OUT"
"$BIN" bench torch-step --device "$DEV" "${ARGS[@]}" | tee -a "$OUT"
python3 - "$OUT" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
by = {}
for r in rows:
    by.setdefault(r["batch_size"], {})[r["impl"]] = r
print(f"{'batch':>6} {'pytorch samples/s':>18} {'flare-tch samples/s':>20} {'ratio':>6}")
for bs, d in sorted(by.items()):
    p, f = d["pytorch"]["samples_per_s"], d["flare-tch"]["samples_per_s"]
    print(f"{bs:>6} {p:>18.0f} {f:>20.0f} {f / p:>6.3f}")
PY
rm -f "$OUT"
