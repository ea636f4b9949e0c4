#!/usr/bin/env bash
# Swarm learning with the LibTorch CNN across real processes: provisions a POC federation
# (a server and site-1..3, each a `flare-node` process from its own startup kit on
# 127.0.0.1, all sites sharing one device), submits examples/swarm-mnist-torch with the
# admin console, waits for it, and reports accuracy per round, training samples/s per site
# and the FL overhead per round (bench/fl_overhead.py over the sites' log.txt).
#   bash bench/gpu-swarm.sh <flare-node> <folder with data/ examples/ bench/> <out> [device]
# device: cuda (default), cpu, cuda:N, auto. Environment: EPOCHS, ROUNDS (override the
# example's local epochs and rounds), NAME (file prefix in <out>, default "swarm"),
# TIMEOUT (seconds for the job, default 540). The binary must find LibTorch
# (LD_LIBRARY_PATH). Exits non-zero if the job does not finish.
set -uo pipefail
BIN=$(realpath "$1"); ROOT=$(realpath "$2"); OUT=$(realpath -m "$3"); DEV=${4:-cuda}
NAME=${NAME:-swarm}; TIMEOUT=${TIMEOUT:-540}
mkdir -p "$OUT"
WS=$(mktemp -d /tmp/flare-swarm.XXXXXX)
POC=$WS/poc
admin() { "$BIN" admin --kit "$PROD/admin@nvidia.com/startup" "$@"; }
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }

"$BIN" poc prepare -n 3 -w "$POC" > "$OUT/$NAME-prepare.txt" || { cat "$OUT/$NAME-prepare.txt"; exit 1; }
PROD=$(find "$POC" -maxdepth 2 -type d -name prod_00 | head -1)

# The shipped example, with the device (and, if asked, epochs and rounds) set.
JOB=$WS/swarm-mnist-torch
cp -r "$ROOT/examples/swarm-mnist-torch" "$JOB"
CLIENT=$JOB/app/config/config_fed_client.json SERVER=$JOB/app/config/config_fed_server.json
sed -i "s|\"device\": \"[a-z0-9:]*\"|\"device\": \"$DEV\"|" "$CLIENT"
[ -n "${EPOCHS:-}" ] && sed -i "s|\"epochs\": [0-9]*|\"epochs\": $EPOCHS|" "$CLIENT"
[ -n "${ROUNDS:-}" ] && sed -i "s|\"num_rounds\": [0-9]*|\"num_rounds\": $ROUNDS|" "$SERVER"
echo "== swarm-mnist-torch across 4 processes (server + 3 sites), device $DEV," \
    "$(grep -o '"epochs": [0-9]*' "$CLIENT"), $(grep -o '"num_rounds": [0-9]*' "$SERVER")"

stop() {
    "$BIN" poc stop -w "$POC" > /dev/null 2>&1
    for p in server site-1 site-2 site-3; do
        cp "$PROD/$p/log.txt" "$OUT/$NAME-$p.log" 2> /dev/null
    done
    rm -rf "$WS" # the kits (with their keys) and the sites' models
}
trap stop EXIT
# Started from the root so the sites find data/mnist (poc start passes FLARE_DATA_ROOT).
(cd "$ROOT" && "$BIN" poc start -w "$POC") || exit 1

for _ in $(seq 120); do
    n=$(admin --json sites 2> /dev/null | json 'len(d)' 2> /dev/null || echo 0)
    [ "$n" -ge 3 ] && break
    sleep 0.5
done
echo "sites connected: $n"
T0=$(date +%s.%N)
ID=$(admin --json submit "$JOB" | json 'd["job_id"]') || exit 1
admin wait "$ID" --timeout "$TIMEOUT" > "$OUT/$NAME-wait.txt"
RC=$?
T1=$(date +%s.%N)
cat "$OUT/$NAME-wait.txt"
admin --json status "$ID" > "$OUT/$NAME-status.json"
echo "job $ID: rc $RC, submit to end $(python3 -c "print(f'{$T1 - $T0:.1f}')") s"
stop
trap - EXIT
grep -h -E "torch CNN learner ready|device auto" "$OUT"/$NAME-site-*.log | sed 's/\x1b\[[0-9;]*m//g'
python3 "$ROOT/bench/fl_overhead.py" "$OUT/$NAME-status.json" "$OUT"/$NAME-site-*.log \
    | tee "$OUT/$NAME-overhead.txt"
exit $RC
