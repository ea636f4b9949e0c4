"""Metric streaming on and off, on the same POC federation in one run: submits
examples/swarm-mnist with metric streaming on (the default) and a copy with
`"stream_metrics": false`, alternately, REPEATS times each, and compares the time per round
(the job's `running` to `finished` in its history, over its rounds) and the records the
sites sent. Writes bench/results/tracking/results.json and prints a table.

Also reports the difference of the medians with a 95% bootstrap interval and P(on > off),
the share of (on, off) pairs where the streamed run was slower (0.5: no difference).

Usage: python3 scripts/bench-tracking.py [REPEATS]
       python3 scripts/bench-tracking.py --analyze   (again, from results.json)   (builds nothing: flare-node on PATH or
FLARE_NODE_BIN; prepares and starts its own POC federation under /tmp/flare-bench-tracking)."""

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("FLARE_NODE_BIN") or shutil.which("flare-node") or os.path.join(ROOT, "target", "release", "flare-node")
WS = "/tmp/flare-bench-tracking"


def node(*args, check=True):
    out = subprocess.run([BIN, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    if check and out.returncode != 0:
        sys.exit("flare-node %s: %s %s" % (" ".join(args), out.stdout, out.stderr))
    return out.stdout


def analyze(res):
    import random

    on, off = res["on"]["runs"], res["off"]["runs"]
    rng = random.Random(0)
    diffs = sorted(statistics.median(rng.choices(on, k=len(on))) - statistics.median(rng.choices(off, k=len(off)))
                   for _ in range(5000))
    res["median_diff_ms"] = statistics.median(on) - statistics.median(off)
    res["median_diff_ci95_ms"] = [diffs[125], diffs[4874]]
    res["p_on_slower"] = sum((a > b) + 0.5 * (a == b) for a in on for b in off) / (len(on) * len(off))
    print("on - off median: %.1f ms, 95%% bootstrap interval [%.1f, %.1f] ms; P(on > off) = %.2f"
          % (res["median_diff_ms"], diffs[125], diffs[4874], res["p_on_slower"]))
    return res


def main():
    out = os.path.join(ROOT, "bench", "results", "tracking", "results.json")
    if sys.argv[1:] == ["--analyze"]:
        json.dump(analyze(json.load(open(out))), open(out, "w"), indent=1)
        return
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    shutil.rmtree(WS, ignore_errors=True)
    node("poc", "prepare", "-n", "3", "-w", WS)
    kit = [os.path.join(WS, d, "prod_00", "admin@nvidia.com", "startup") for d in os.listdir(WS)
           if os.path.isdir(os.path.join(WS, d, "prod_00"))][0]
    node("poc", "start", "-w", WS)
    tmp = tempfile.mkdtemp()
    try:
        off = os.path.join(tmp, "swarm-mnist-off")
        shutil.copytree(os.path.join(ROOT, "examples", "swarm-mnist"), off)
        cfg = os.path.join(off, "app", "config", "config_fed_server.json")
        c = json.load(open(cfg))
        c["stream_metrics"] = False
        json.dump(c, open(cfg, "w"))
        # The copy's data_dir is relative to the job folder: point it at the repository's.
        client = os.path.join(off, "app", "config", "config_fed_client.json")
        cc = json.load(open(client))
        cc["executors"][0]["executor"]["args"]["data_dir"] = os.path.join(ROOT, "data", "mnist")
        json.dump(cc, open(client, "w"))
        jobs = {"on": os.path.join(ROOT, "examples", "swarm-mnist"), "off": off}
        deadline = time.monotonic() + 60
        while len(json.loads(node("admin", "--kit", kit, "--json", "sites", check=False) or "[]")) < 3:
            assert time.monotonic() < deadline, "the sites did not connect"
            time.sleep(0.5)
        per_round = {"on": [], "off": []}
        for i in range(repeats):
            for mode in (("on", "off") if i % 2 == 0 else ("off", "on")):
                job = json.loads(node("admin", "--kit", kit, "--json", "submit", jobs[mode]))["job_id"]
                st = json.loads(node("admin", "--kit", kit, "--json", "wait", job, "--timeout", "300"))
                hist = {}
                for h in st["history"]:  # the first entry of each state
                    hist.setdefault(h["state"], h["at_ms"])
                rounds = st["num_rounds"]
                per_round[mode].append((hist["finished"] - hist["running"]) / rounds)
                print("%s %-3s %6.1f ms/round" % (job, mode, per_round[mode][-1]), flush=True)
        res = {m: {"median_ms_per_round": statistics.median(v), "mean_ms_per_round": statistics.mean(v),
                   "stdev_ms": statistics.stdev(v) if len(v) > 1 else 0.0, "runs": v} for m, v in per_round.items()}
        res["ratio_on_over_off"] = res["on"]["median_ms_per_round"] / res["off"]["median_ms_per_round"]
        res["repeats"] = repeats
        json.dump(analyze(res), open(out, "w"), indent=1)
        print("streaming  median ms/round  mean   stdev")
        for m in ("on", "off"):
            r = res[m]
            print("%-9s  %15.1f  %5.1f  %5.1f" % (m, r["median_ms_per_round"], r["mean_ms_per_round"], r["stdev_ms"]))
        print("on/off median ratio: %.3f  (%s)" % (res["ratio_on_over_off"], out))
    finally:
        node("poc", "stop", "-w", WS, check=False)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
