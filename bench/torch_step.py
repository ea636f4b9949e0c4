#!/usr/bin/env python3
"""Times one training step of the MNIST CNN in PyTorch, as `flare-node bench torch-step`
does in Rust through tch: the same module, loss, optimizer and batch sizes, batches sliced
from an 8192-example random pool kept on the device, the clock read after a device sync.

Prints one JSON object per batch size. Usage:
    python3 bench/torch_step.py --device cuda --batch-sizes 64,256 --steps 300 --warmup 50
"""

import argparse
import json
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Net(nn.Module):
    """PyTorch's classic MNIST example network (returns logits)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = self.dropout2(x)
        return self.fc2(x)


def make_optimizer(name, params, lr):
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "adadelta":
        return torch.optim.Adadelta(params, lr=lr)
    raise SystemExit(f"unknown optimizer {name!r}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch-sizes", default="64,256")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--optimizer", default="adam")
    ap.add_argument("--lr", type=float, default=1e-3)
    a = ap.parse_args()
    dev = torch.device(a.device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    pool = 8192
    x = torch.randn(pool, 1, 28, 28, device=dev)
    y = torch.randint(0, 10, (pool,), device=dev)
    for bs in (int(b) for b in a.batch_sizes.split(",")):
        net = Net().to(dev).train()
        opt = make_optimizer(a.optimizer, net.parameters(), a.lr)
        batches = pool // bs

        def run(steps):
            loss = None
            for i in range(steps):
                s = (i % batches) * bs
                opt.zero_grad()
                loss = F.cross_entropy(net(x[s : s + bs]), y[s : s + bs])
                loss.backward()
                opt.step()
            sync()
            return None if loss is None else loss.item()

        run(a.warmup)
        t0 = time.perf_counter()
        last = run(a.steps)
        secs = time.perf_counter() - t0
        print(json.dumps({
            "impl": "pytorch",
            "torch": torch.__version__,
            "device": str(dev),
            "optimizer": a.optimizer,
            "batch_size": bs,
            "steps": a.steps,
            "seconds": secs,
            "ms_per_step": 1e3 * secs / max(a.steps, 1),
            "samples_per_s": a.steps * bs / secs,
            "last_loss": last,
        }), flush=True)


if __name__ == "__main__":
    main()
