"""A CNN trained by Flare's LibTorch learner loads into the equivalent PyTorch module by
name (`load_state_dict(strict=True)`) and gives the same predictions on the held-out split.

The inputs are written by the Rust test
`learner::torch::tests::cpu_training_improves_accuracy_and_exports_for_pytorch` into
`$FLARE_TORCH_INTEROP_DIR` (scripts/test-torch.sh runs both): the trained model, the held-out
images (raw pixels 0..255) and labels, and the logits our network computed for them.
"""

import os
import pathlib
import sys

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "bench"))
from torch_step import Net  # noqa: E402  (the same module the step benchmark times)

MEAN, STD = 0.1307, 0.3081


@pytest.fixture(scope="module")
def exported():
    d = os.environ.get("FLARE_TORCH_INTEROP_DIR")
    if not d or not (pathlib.Path(d) / "model.safetensors").is_file():
        pytest.fail("run the Rust test with FLARE_TORCH_INTEROP_DIR set first (scripts/test-torch.sh)")
    d = pathlib.Path(d)
    return (
        load_file(d / "model.safetensors"),
        load_file(d / "heldout.safetensors"),
        float((d / "accuracy.txt").read_text()),
    )


def test_state_dict_names_shapes_and_dtypes_match(exported):
    state, _, _ = exported
    want = Net().state_dict()
    assert sorted(state) == sorted(want)
    for k, v in want.items():
        assert state[k].shape == v.shape, k
        assert state[k].dtype == v.dtype == torch.float32, k


def test_loads_strictly_and_predicts_like_flare(exported):
    state, held, rust_acc = exported
    net = Net()
    net.load_state_dict(state, strict=True)
    net.eval()
    x = (held["images"] / 255.0 - MEAN) / STD
    y = held["labels"]
    assert x.shape == (2000, 1, 28, 28) and y.shape == (2000,)
    with torch.no_grad():
        logits = net(x)
    torch.testing.assert_close(logits, held["logits"], atol=1e-3, rtol=1e-3)
    acc = (logits.argmax(1) == y).float().mean().item()
    assert abs(acc - rust_acc) <= 1.0 / 2000 + 1e-9, (acc, rust_acc)
    assert acc >= 0.9, acc
