#!/usr/bin/env python3
"""Tier-1 traffic of a tiered job against the same sites in a flat one.

Runs two POC federations on 127.0.0.1 with the flare-node binary:
- tiered: `poc prepare --regions R -n N`, examples/hub-mnist with `local_rounds` K and G
  global rounds;
- flat: `poc prepare -n R*N`, the same model and data as ScatterAndGather with G*K rounds
  (the same number of site trainings).

It counts the bytes on the tier-1 server's peer-to-peer port (every TCP connection on it,
both directions, from the kernel's tcp_info through `ss -tin`) from just before the submit to
the end of the job, and prints them per global round (K flat rounds) and in models.

    python3 bench/hub_traffic.py [--bin target/release/flare-node] [--regions 2] [-n 3]
"""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def port_bytes(port):
    """Bytes sent plus received over every established TCP connection on local `port`."""
    out = subprocess.run(["ss", "-tinH", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True, check=True).stdout
    total = 0
    for m in re.finditer(r"bytes_(?:sent|received):(\d+)", out):
        total += int(m.group(1))
    return total


class Poc:
    def __init__(self, binary, args, port):
        self.bin = binary
        self.dir = tempfile.mkdtemp(prefix="flare-hub-traffic-")
        ws = os.path.join(self.dir, "poc")
        run([binary, "poc", "prepare", *args, "--base-port", str(port), "-w", ws])
        self.prod = os.path.join(ws, "example_project", "prod_00")
        self.port = port
        self.procs = []

    def start(self, kit):
        log = open(os.path.join(self.prod, kit, "log.txt"), "a")
        p = subprocess.Popen([self.bin, "--kit", os.path.join(self.prod, kit, "startup")],
                             cwd=ROOT, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        self.procs.append(p)

    def admin(self, *args, kit="admin@nvidia.com"):
        out = run([self.bin, "admin", "--kit", os.path.join(self.prod, kit, "startup"),
                   "--json", *args], cwd=ROOT)
        return json.loads(out.stdout)

    def wait_sites(self, n, kit="admin@nvidia.com"):
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if len(self.admin("sites", kit=kit)) >= n:
                    return
            except subprocess.CalledProcessError:
                pass
            time.sleep(0.3)
        sys.exit(f"{kit}: sites did not connect")

    def stop(self):
        for p in self.procs:
            p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def job(dir, workflow, args):
    src = os.path.join(ROOT, "examples", "hub-mnist")
    dst = os.path.join(dir, "job")
    shutil.copytree(src, dst)
    path = os.path.join(dst, "app", "config", "config_fed_server.json")
    with open(path) as f:
        server = json.load(f)
    server["workflows"][0] = {"id": "wf", "name": workflow, "args": args}
    with open(path, "w") as f:
        json.dump(server, f)
    meta = os.path.join(dst, "meta.json")
    with open(meta) as f:
        m = json.load(f)
    m["min_clients"] = args.get("min_regions", args.get("min_clients", 1))
    with open(meta, "w") as f:
        json.dump(m, f)
    return dst


def measure(poc, job_dir):
    before = port_bytes(poc.port)
    started = time.time()
    jid = poc.admin("submit", job_dir)["job_id"]
    while True:
        st = poc.admin("status", jid)
        if st["state"] in ("finished", "failed", "aborted"):
            break
        time.sleep(0.2)
    if st["state"] != "finished":
        sys.exit(f"job {jid} {st['state']}: {st['history'][-1]}")
    return port_bytes(poc.port) - before, time.time() - started, st


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "flare-node"))
    ap.add_argument("--regions", type=int, default=2)
    ap.add_argument("-n", type=int, default=3, help="sites per region")
    ap.add_argument("--global-rounds", type=int, default=2)
    ap.add_argument("--local-rounds", type=int, default=3)
    ap.add_argument("--port", type=int, default=26000)
    a = ap.parse_args()
    r, n, g, k = a.regions, a.n, a.global_rounds, a.local_rounds
    # The MLP of hub-mnist: 784·64 + 64 + 64·10 + 10 f32 parameters.
    model = (784 * 64 + 64 + 64 * 10 + 10) * 4
    tmp = tempfile.mkdtemp()
    results = {}
    tiered = Poc(a.bin, ["--regions", str(r), "-n", str(n)], a.port)
    try:
        tiered.start("server")
        for i in range(1, r + 1):
            tiered.start(f"region-{i}/region-{i}")
        for i in range(1, r + 1):
            for j in range(1, n + 1):
                tiered.start(f"region-{i}/site-{j}")
        tiered.wait_sites(r)
        for i in range(1, r + 1):
            tiered.wait_sites(n, kit=f"region-{i}/admin@region-{i}")
        d = job(os.path.join(tmp, "t"), "TieredScatterAndGather",
                {"num_rounds": g, "local_rounds": k, "min_regions": r, "min_clients": n,
                 "wait_time_after_min_received": 1, "validate_final": False})
        results["tiered"] = measure(tiered, d)
    finally:
        tiered.stop()
    flat = Poc(a.bin, ["-n", str(r * n)], a.port + 100)
    try:
        flat.start("server")
        for j in range(1, r * n + 1):
            flat.start(f"site-{j}")
        flat.wait_sites(r * n)
        d = job(os.path.join(tmp, "f"), "ScatterAndGather",
                {"num_rounds": g * k, "min_clients": r * n,
                 "wait_time_after_min_received": 1, "validate_final": False})
        results["flat"] = measure(flat, d)
    finally:
        flat.stop()
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"{r} regions x {n} sites, {g} global rounds x {k} local rounds "
          f"(flat: {r * n} sites, {g * k} rounds); model {model} bytes")
    for name, (b, secs, st) in results.items():
        acc = st["metrics"][str(max(int(v) for v in st["metrics"]))]["accuracy"]
        print(f"{name:>6}: tier-1 port {b} bytes, {b / g:.0f} per global round = "
              f"{b / g / model:.2f} models; {secs:.1f} s; final accuracy {acc:.4f}")
    t, f = results["tiered"][0], results["flat"][0]
    print(f"flat / tiered tier-1 bytes: {f / t:.2f}x (R x 2 models per global round is "
          f"{2 * r} models; flat N x 2 x K is {2 * r * n * k})")


if __name__ == "__main__":
    main()
