"""Reads a TensorBoard logdir with TensorBoard's own EventAccumulator and prints what it
finds as JSON: {run: {tag: [[step, value], ...]}}, one run per folder that holds event files
(named by its path relative to the logdir, "." for the logdir itself). Scalars come as
numbers; text (string tensors of the "text" plugin) as strings.

Usage: python3 tb_read.py LOGDIR   (needs `pip install tensorboard`)

The cross-check for Flare's event writer (node/src/tracking/tb.rs, test
tensorboard_reads_our_files, run with FLARE_TB_PYTHON set to this interpreter)."""

import json
import os
import sys

from tensorboard.backend.event_processing.event_accumulator import (
    SCALARS,
    TENSORS,
    EventAccumulator,
)


def run_dirs(logdir):
    for folder, _dirs, files in sorted(os.walk(logdir)):
        if any("tfevents" in f for f in files):
            yield os.path.relpath(folder, logdir), folder


def read_run(folder):
    acc = EventAccumulator(folder, size_guidance={SCALARS: 0, TENSORS: 0})
    acc.Reload()
    tags = acc.Tags()
    out = {}
    for tag in tags.get("scalars", []):
        out[tag] = [[e.step, e.value] for e in acc.Scalars(tag)]
    for tag in tags.get("tensors", []):
        if acc.SummaryMetadata(tag).plugin_data.plugin_name != "text":
            continue
        out[tag] = [
            [e.step, b"".join(e.tensor_proto.string_val).decode("utf-8")]
            for e in acc.Tensors(tag)
        ]
    return out


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: tb_read.py LOGDIR")
    logdir = sys.argv[1]
    result = {run: read_run(folder) for run, folder in run_dirs(logdir)}
    json.dump(result, sys.stdout, indent=1, sort_keys=True)
    print()


if __name__ == "__main__":
    main()
