#!/usr/bin/env python3
"""FL overhead of a simulator run of a torch job, from its stderr (run it with
`RUST_LOG=flare_node=info NO_COLOR=1`) and its metrics.json.

Each site logs a timestamped `trained` line with its training-step time (`train_s`: the
epochs over its data, nothing else). A round's span is the time between the last `trained`
line of the previous round and the last one of this round, so it holds everything on the
critical path: sending the result, aggregation, writing the global model, sending the next
tasks, validating the global model at each site, moving weights in and out of LibTorch, and
training. Overhead = 1 - (train_s of the round's last site) / span. The first round also pays
for start-up (data loading, CUDA and cuDNN initialization) and is left out.

    python3 bench/fl_overhead.py <simulate stderr> <metrics.json>
"""

import datetime
import json
import re
import sys

ANSI = re.compile(r"\x1b\[[0-9;]*m")
FIELD = re.compile(r"(\w+)=([^\s]+)")

log, metrics = sys.argv[1], sys.argv[2]
rounds = {}  # round -> [(timestamp, site, train_s, samples_per_s)]
for line in open(log, errors="replace"):
    line = ANSI.sub("", line).strip()
    if " trained " not in line:
        continue
    f = dict(FIELD.findall(line))
    if "train_s" not in f:
        continue
    ts = datetime.datetime.fromisoformat(line.split()[0].replace("Z", "+00:00")).timestamp()
    rounds.setdefault(int(f["round"]), []).append(
        (ts, int(f["site"]), float(f["train_s"]), float(f["samples_per_s"])))
report = json.load(open(metrics))
print(f"{'round':>5} {'span_s':>7} {'train_s':>7} {'overhead':>8} {'held-out acc':>12}  training samples/s per site")
fracs, prev = [], None
for rnd in sorted(rounds):
    last = max(rounds[rnd])
    acc = report["metrics"].get(str(rnd + 1), {}).get("accuracy", float("nan"))
    sps = " ".join(f"site-{s}:{v:.0f}" for _, s, _, v in sorted(rounds[rnd], key=lambda r: r[1]))
    if prev is None:
        print(f"{rnd:>5} {'-':>7} {last[2]:>7.3f} {'-':>8} {acc:>12.4f}  {sps}")
    else:
        span = last[0] - prev
        frac = 1 - last[2] / span
        fracs.append(frac)
        print(f"{rnd:>5} {span:>7.3f} {last[2]:>7.3f} {frac:>8.1%} {acc:>12.4f}  {sps}")
    prev = last[0]
if fracs:
    print(f"mean FL overhead over rounds after the first: {sum(fracs) / len(fracs):.1%}")
