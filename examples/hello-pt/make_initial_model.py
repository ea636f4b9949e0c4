"""Writes app/models/initial.safetensors (and the swarm variant's copy): the CNN of
centralized/train.py initialized with torch.manual_seed(0), the global model of round 0.

    python3 examples/hello-pt/make_initial_model.py
"""

import os
import shutil
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "centralized"))
from train import Net  # noqa: E402


def main():
    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in Net().state_dict().items()}
    out = os.path.join(HERE, "app", "models", "initial.safetensors")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    try:
        from safetensors.torch import save_file
    except ImportError:  # flare_client writes safetensors by itself
        from flare_client import _params, _st

        _st.write(out, _params.items_for(state), {"format": "pt"})
    else:
        save_file(state, out, metadata={"format": "pt"})
    swarm = os.path.join(HERE, "..", "hello-pt-swarm", "app", "models", "initial.safetensors")
    if os.path.isdir(os.path.dirname(os.path.dirname(swarm))):
        os.makedirs(os.path.dirname(swarm), exist_ok=True)
        shutil.copyfile(out, swarm)
    print("%s: %d tensors, %d bytes" % (out, len(state), os.path.getsize(out)))


if __name__ == "__main__":
    main()
