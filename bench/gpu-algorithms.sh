#!/usr/bin/env bash
# The learning-quality study with the LibTorch CNN on a CUDA GPU (a machine with PyTorch 2.11
# and no Rust): `flare-node bench algorithms --learner cnn` with the given extra arguments,
# its table, curves and plot written under <out>/algorithms-cnn.
#   bash bench/gpu-algorithms.sh <flare-node built with --features torch> <out> [bench args]
set -euo pipefail
BIN=$(realpath "$1"); OUT=$2; shift 2
mkdir -p "$OUT"
TL=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib
export LD_LIBRARY_PATH=$TL${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export NO_COLOR=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$BIN" bench algorithms --learner cnn --out "$OUT/algorithms-cnn" "$@"
