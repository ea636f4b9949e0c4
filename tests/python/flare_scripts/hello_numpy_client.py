# A Client API script written for NVIDIA FLARE (the style of its hello-numpy example). The
# tests run it unchanged except for the two import lines of nvflare.
import copy
import sys

import numpy as np

import nvflare.client as flare
from nvflare.client.tracking import SummaryWriter


def train(input_arr):
    output_arr = copy.deepcopy(input_arr)
    # mock training with plus 1
    return output_arr + 1


def evaluate(input_arr):
    # mock evaluation metrics
    return float(np.mean(input_arr))


def main():
    flare.init()
    sys_info = flare.system_info()
    site_name = sys_info["site_name"]
    print(f"system info is: {sys_info}", flush=True)
    summary_writer = SummaryWriter()
    local = None
    while flare.is_running():
        input_model = flare.receive()
        print(f"{site_name}: task {flare.get_task_name()} current_round={input_model.current_round}")

        if flare.is_submit_model():
            flare.send(flare.FLModel(params={"numpy_key": local}))
            continue
        params = np.array(input_model.params["numpy_key"], dtype=np.float32)
        if flare.is_evaluate():
            flare.send(flare.FLModel(metrics={"accuracy": evaluate(params)}))
            continue
        new_params = train(params)
        local = new_params
        for step in range(10):
            summary_writer.add_scalar(tag="loss", scalar=1.0 / (step + 1), global_step=input_model.current_round * 10 + step)
        output_model = flare.FLModel(
            params={"numpy_key": new_params},
            params_type="FULL",
            metrics={"accuracy": evaluate(params)},
            current_round=input_model.current_round,
            meta={"NUM_STEPS_CURRENT_ROUND": 10},
        )
        flare.send(output_model)
    print("done", file=sys.stderr)


if __name__ == "__main__":
    main()
