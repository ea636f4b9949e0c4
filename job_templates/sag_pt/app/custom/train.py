"""MNIST with a small CNN in PyTorch, federated with Flare's Client API: centralized/train.py
with the lines marked `# FL` added (see examples/hello-pt/README.md).

The data is the vendored MNIST test set (data/mnist, 10,000 images): 2,000 images chosen by a
fixed seed are held out for evaluation, the other 8,000 are for training, and site `site-<k>`
of `--num-sites` trains on every num-sites-th of them, starting at the (k-1)-th.

A flare-node runs it in the job's app folder (ScriptExecutor); locally:

    python3 -m flare_client.sim app/custom/train.py --rounds 3 \
        --initial app/models/initial.safetensors
"""

import argparse
import gzip
import os
import struct

import torch
import torch.nn as nn
import torch.nn.functional as F

import flare_client as flare  # FL
from flare_client.tracking import SummaryWriter  # FL

HELD_OUT = 2000
SPLIT_SEED = 0


class Net(nn.Module):
    """2 conv + 2 fc, 46,730 parameters (187 KB as F32)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 5)  # 28x28 -> 24x24, pooled to 12x12
        self.conv2 = nn.Conv2d(16, 32, 5)  # 12x12 -> 8x8, pooled to 4x4
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


def find_mnist(data_dir=None):
    """The folder of the MNIST IDX files: `data_dir`, else `$FLARE_DATA_ROOT/data/mnist`, else
    the first `data/mnist` found walking up from the working directory (or, in a program a
    flare-node started, from the node's working directory)."""
    if data_dir:
        return data_dir
    roots = [os.environ["FLARE_DATA_ROOT"]] if os.environ.get("FLARE_DATA_ROOT") else []
    starts = [os.getcwd()]
    node = os.environ.get("FLARE_CLIENT_PARENT_PID")
    if node:
        try:
            starts.append(os.readlink("/proc/%s/cwd" % node))
        except OSError:
            pass
    for start in starts:
        d = os.path.abspath(start)
        while True:
            roots.append(d)
            if os.path.dirname(d) == d:
                break
            d = os.path.dirname(d)
    for root in roots:
        folder = os.path.join(root, "data", "mnist")
        if os.path.isfile(os.path.join(folder, "t10k-images-idx3-ubyte.gz")):
            return folder
    raise SystemExit("data/mnist not found: pass --data-dir or set FLARE_DATA_ROOT to the folder holding data/mnist")


def read_idx(path):
    """A gzipped IDX file as a uint8 tensor (images: N x 28 x 28, labels: N)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, n = struct.unpack(">II", data[:8])
    if magic == 2051:
        rows, cols = struct.unpack(">II", data[8:16])
        return torch.frombuffer(bytearray(data[16:]), dtype=torch.uint8).reshape(n, rows, cols)
    if magic == 2049:
        return torch.frombuffer(bytearray(data[8:]), dtype=torch.uint8).reshape(n)
    raise ValueError("%s: not an IDX file (magic %d)" % (path, magic))


def load_mnist(folder):
    """(images as N x 1 x 28 x 28 floats, normalized; labels as int64), split into
    (training, held-out) with the fixed seed."""
    x = read_idx(os.path.join(folder, "t10k-images-idx3-ubyte.gz")).float().div_(255.0)
    x = x.sub_(0.1307).div_(0.3081).unsqueeze(1)
    y = read_idx(os.path.join(folder, "t10k-labels-idx1-ubyte.gz")).long()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(SPLIT_SEED))
    held, train = perm[:HELD_OUT], perm[HELD_OUT:]
    return (x[train], y[train]), (x[held], y[held])


def evaluate(net, data, batch_size=500):
    """(accuracy, mean loss) of `net` on `data`."""
    x, y = data
    net.eval()
    correct, loss = 0, 0.0
    with torch.no_grad():
        for i in range(0, len(y), batch_size):
            out = net(x[i : i + batch_size])
            loss += F.cross_entropy(out, y[i : i + batch_size], reduction="sum").item()
            correct += (out.argmax(1) == y[i : i + batch_size]).sum().item()
    return correct / len(y), loss / len(y)


def train(net, data, epochs, batch_size, lr, seed):
    """Trains `net` in place with Adam; returns (steps, mean loss of the last epoch)."""
    x, y = data
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    steps, total = 0, 0.0
    for _ in range(epochs):
        total, batches = 0.0, 0
        for idx in torch.randperm(len(y), generator=g).split(batch_size):
            opt.zero_grad()
            loss = F.cross_entropy(net(x[idx]), y[idx])
            loss.backward()
            opt.step()
            total += loss.item()
            batches += 1
            steps += 1
        total /= max(batches, 1)
    return steps, total


def shard(data, site_name, num_sites):  # FL: this site's part of the training data
    k = int(site_name.rsplit("-", 1)[-1])  # FL: site-<k>, k from 1
    x, y = data  # FL
    return x[k - 1 :: num_sites], y[k - 1 :: num_sites]  # FL


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", help="the folder of the MNIST IDX files (default: find data/mnist)")
    p.add_argument("--epochs", type=int, default=1)  # FL: local epochs a round
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: sites share the CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-sites", type=int, default=int(os.environ.get("FLARE_NUM_SITES", "3")))  # FL
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    train_set, held_out = load_mnist(find_mnist(args.data_dir))
    flare.init()  # FL
    site_name = flare.system_info()["site_name"]  # FL
    train_set = shard(train_set, site_name, args.num_sites)  # FL
    writer = SummaryWriter()  # FL
    net = Net()
    while flare.is_running():  # FL
        input_model = flare.receive()  # FL
        if input_model.params is not None:  # FL
            net.load_state_dict(input_model.params)  # FL
        accuracy, held_loss = evaluate(net, held_out)  # FL: the received model
        metrics = {"accuracy": accuracy, "loss": held_loss}  # FL
        if flare.is_evaluate():  # FL
            flare.send(flare.FLModel(metrics=metrics))  # FL
            continue  # FL
        if flare.is_submit_model():  # FL
            flare.send(flare.FLModel(params=net.state_dict()))  # FL
            continue  # FL
        round_ = input_model.current_round or 0  # FL
        steps, loss = train(net, train_set, args.epochs, args.batch_size, args.lr, args.seed + round_)  # FL: a round
        writer.add_scalar("train_loss", loss, global_step=round_)  # FL
        print("%s round %d: received model accuracy %.4f; train loss %.4f" % (site_name, round_, accuracy, loss))  # FL
        flare.send(flare.FLModel(params=net.state_dict(), metrics=metrics, meta={"NUM_STEPS_CURRENT_ROUND": steps}))  # FL


if __name__ == "__main__":
    main()
