#!/usr/bin/env bash
# The LibTorch back-end's GPU proof, on a machine with PyTorch 2.11 and a CUDA GPU but no
# Rust: (a) the CNN training step in PyTorch and in flare-node (bench/torch_step.sh);
# (b) hello-fedavg-torch in the simulator on CUDA with 3 sites: accuracy per round,
# training samples/s per site, FL overhead (bench/fl_overhead.py), and the same job with
# shorter local training; (c) the error for a GPU that is not there; (d) swarm-mnist-torch
# across real processes, a POC server and 3 sites sharing the GPU (bench/gpu-swarm.sh), as
# shipped and with longer local training (SWARM_EPOCHS, default 20).
#   bash bench/gpu-proof.sh <flare-node binary> <folder with data/ examples/ bench/> <out>
set -uo pipefail
BIN=$(realpath "$1"); ROOT=$(realpath "$2"); OUT=$3
mkdir -p "$OUT"
TL=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib
export LD_LIBRARY_PATH=$TL${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export NO_COLOR=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name(0))'
echo "== flare-node links: $(readelf -d "$BIN" | grep -o 'lib[a-z0-9_]*torch[a-z0-9_]*\.so' | tr '\n' ' ')(no libtorch_cuda.so, no LD_PRELOAD)"

echo "== (a) training step, PyTorch vs flare-node (tch)"
for opt in adam sgd; do
    bash "$ROOT/bench/torch_step.sh" "$BIN" cuda "$opt" 2>&1
done | tee "$OUT/step.txt"

sim() { # name epochs rounds
    local job=/tmp/job-$1
    rm -rf "$job" "/tmp/ws-$1"; cp -r "$ROOT/examples/hello-fedavg-torch" "$job"
    sed -i "s|\"../../data/mnist\"|\"$ROOT/data/mnist\"|; s|\"device\": \"auto\"|\"device\": \"cuda\"|; s|\"epochs\": [0-9]*|\"epochs\": $2|" "$job/app/config/config_fed_client.json"
    sed -i "s|\"num_rounds\": [0-9]*|\"num_rounds\": $3|" "$job/app/config/config_fed_server.json"
    echo "== (b) simulate $1: $2 local epochs, $3 rounds, 3 sites on one GPU"
    RUST_LOG=flare_node=info "$BIN" simulate "$job" -n 3 -w "/tmp/ws-$1" > "$OUT/sim-$1.out" 2> "$OUT/sim-$1.err"
    echo "rc $?"; cat "$OUT/sim-$1.out"; grep -E "ready|WARN|ERROR|auto" "$OUT/sim-$1.err" | head -5
    python3 "$ROOT/bench/fl_overhead.py" "/tmp/ws-$1/server/simulate_job/metrics.json" "$OUT/sim-$1.err" | tee "$OUT/overhead-$1.txt"
}
sim example 5 3   # as shipped
sim short 2 4     # shorter local training: the fixed per-round cost weighs more
echo "== (c) cuda:7 on a one-GPU machine must be a clear error:"
sed -i 's|"device": "cuda"|"device": "cuda:7"|' /tmp/job-example/app/config/config_fed_client.json
timeout 120 "$BIN" simulate /tmp/job-example -n 3 -w /tmp/ws-err -q 2>&1 | tail -2

echo "== (d) swarm-mnist-torch: POC server + 3 site processes on one GPU, as shipped"
NAME=swarm bash "$ROOT/bench/gpu-swarm.sh" "$BIN" "$ROOT" "$OUT" cuda
echo "rc $?"
echo "== (d) swarm-mnist-torch: the same with ${SWARM_EPOCHS:-20} local epochs a round"
NAME=swarm-long EPOCHS=${SWARM_EPOCHS:-20} bash "$ROOT/bench/gpu-swarm.sh" "$BIN" "$ROOT" "$OUT" cuda
echo "rc $?"
