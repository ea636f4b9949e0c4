#!/usr/bin/env python3
"""FL overhead of a torch job, from the node logs of its run and its metrics.

    python3 bench/fl_overhead.py <metrics> <log> [<log> ...]

<metrics> is the simulator's `metrics.json` or what `flare-node admin --json status <job>`
prints for a federation of real processes (both hold `metrics`: version -> accuracy, loss).
Each <log> is the simulator's stderr or one site's `log.txt` of a POC federation; the sites
must log at `info` for `flare_node` (a node started from a kit does by default; the
simulator needs `RUST_LOG=flare_node=info`). ANSI colours are stripped.

Each site logs a timestamped `trained` line with its training-step time (`train_s`: the
epochs over its data, nothing else). A round's span is the time between the last `trained`
line of the previous round and the last one of this round, so it holds everything on the
critical path: sending the result (to the server, or in a swarm to the round's aggregator,
sealed, after its grant), aggregation, sending the next global model to every site,
validating it at each site, moving weights in and out of LibTorch, and training.
Overhead = 1 - (train_s of the round's last site) / span; of the rest, `local_s` is that
site's validation and weight moves (from its `trained` line) and `between` everything else
(messages, aggregation, waiting for other sites). The first round also pays for
start-up (data loading, CUDA and cuDNN initialization, the first connections between the
sites) and is left out. All logs must come from one machine (one clock).
"""

import datetime
import json
import re
import sys

ANSI = re.compile(r"\x1b\[[0-9;]*m")
FIELD = re.compile(r"(\w+)=([^\s]+)")


def trained_lines(paths):
    """round -> [(timestamp, site, train_s, samples_per_s, local_s)] over every log, where
    local_s is the site's time on the round beside training (validating the incoming model,
    moving weights into and out of LibTorch)."""
    rounds = {}
    for path in paths:
        for line in open(path, errors="replace"):
            line = ANSI.sub("", line).strip()
            if " trained " not in line:
                continue
            f = dict(FIELD.findall(line))
            if "train_s" not in f:
                continue
            stamp = line.split()[0].replace("Z", "+00:00")
            ts = datetime.datetime.fromisoformat(stamp).timestamp()
            local = sum(float(f.get(k, 0)) for k in ("validate_s", "load_s", "export_s"))
            rounds.setdefault(int(f["round"]), []).append(
                (ts, int(f["site"]), float(f["train_s"]), float(f["samples_per_s"]), local))
    return rounds


def aggregators(report):
    """round -> the site that aggregated it, from a swarm job's history notes."""
    out = {}
    for h in report.get("history", []):
        m = re.match(r"epoch (\d+)\.\d+ aggregated by (\S+?):", h.get("note", ""))
        if m:
            out[int(m.group(1))] = m.group(2)
    return out


def main(argv):
    if len(argv) < 3:
        sys.exit(__doc__)
    report = json.load(open(argv[1]))
    rounds = trained_lines(argv[2:])
    if not rounds:
        sys.exit(f"no `trained` lines in {argv[2:]} (log at info for flare_node?)")
    aggr = aggregators(report)
    metrics = report.get("metrics", {})
    v0 = metrics.get("0", {}).get("accuracy")
    if v0 is not None:
        print(f"held-out accuracy of the initial model (version 0): {v0:.4f}")
    head = (f"{'round':>5} {'span_s':>7} {'train_s':>7} {'local_s':>7} {'between':>7}"
            f" {'overhead':>8} {'held-out acc':>12}")
    print(head + ("  aggregator" if aggr else "") + "  training samples/s per site")
    fracs, prev = [], None
    for rnd in sorted(rounds):
        last = max(rounds[rnd])
        acc = metrics.get(str(rnd + 1), {}).get("accuracy", float("nan"))
        sps = " ".join(f"site-{r[1]}:{r[3]:.0f}" for r in sorted(rounds[rnd], key=lambda r: r[1]))
        who = f"  {aggr.get(rnd, '?'):>10}" if aggr else ""
        if prev is None:
            print(f"{rnd:>5} {'-':>7} {last[2]:>7.3f} {last[4]:>7.3f} {'-':>7} {'-':>8}"
                  f" {acc:>12.4f}{who}  {sps}")
        else:
            span = last[0] - prev
            frac = 1 - last[2] / span
            fracs.append(frac)
            between = span - last[2] - last[4]
            print(f"{rnd:>5} {span:>7.3f} {last[2]:>7.3f} {last[4]:>7.3f} {between:>7.3f}"
                  f" {frac:>8.1%} {acc:>12.4f}{who}  {sps}")
        prev = last[0]
    if fracs:
        print(f"mean FL overhead over rounds after the first: {sum(fracs) / len(fracs):.1%}")
    sites = {}
    steady = sorted(rounds)[1:] or sorted(rounds)
    for rnd in steady:
        for r in rounds[rnd]:
            sites.setdefault(r[1], []).append(r[3])
    print(f"mean training samples/s per site over rounds {steady[0]}..{steady[-1]}: "
          + " ".join(f"site-{s}:{sum(v) / len(v):.0f}" for s, v in sorted(sites.items())))


if __name__ == "__main__":
    main(sys.argv)
