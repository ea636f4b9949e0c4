# A Client API script written for NVIDIA FLARE (the style of its hello-pt client.py, with the
# cross-site evaluation branches). The tests run it unchanged except for the two import lines
# of nvflare.
import torch
import torch.nn as nn
import torch.nn.functional as F

import nvflare.client as flare
from nvflare.client.tracking import SummaryWriter

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class SimpleNetwork(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 2)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


def data(seed, n=256):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    return x, y


def evaluate(model, x, y):
    model.eval()
    with torch.no_grad():
        return (model(x.to(DEVICE)).argmax(1).cpu() == y).float().mean().item()


def main():
    torch.set_num_threads(1)
    model = SimpleNetwork()
    epochs = 2
    x, y = data(0)
    x_val, y_val = data(1)
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    flare.init()
    sys_info = flare.system_info()
    client_name = sys_info["site_name"]
    summary_writer = SummaryWriter()

    while flare.is_running():
        input_model = flare.receive()
        print(f"current_round={input_model.current_round}")

        if flare.is_submit_model():
            flare.send(flare.FLModel(params=model.cpu().state_dict()))
            continue

        model.load_state_dict(input_model.params)
        model.to(DEVICE)
        accuracy = evaluate(model, x_val, y_val)

        if flare.is_evaluate():
            flare.send(flare.FLModel(metrics={"accuracy": accuracy}))
            continue

        steps = 0
        model.train()
        for epoch in range(epochs):
            for i in range(0, len(y), 32):
                optimizer.zero_grad()
                loss = loss_fn(model(x[i : i + 32].to(DEVICE)), y[i : i + 32].to(DEVICE))
                loss.backward()
                optimizer.step()
                steps += 1
                global_step = input_model.current_round * 100 + steps
                summary_writer.add_scalar(tag="loss_for_each_batch", scalar=loss.item(), global_step=global_step)
        print(f"Finished Training for {client_name}")

        output_model = flare.FLModel(
            params=model.cpu().state_dict(),
            metrics={"accuracy": accuracy},
            meta={"NUM_STEPS_CURRENT_ROUND": steps},
        )
        flare.send(output_model)


if __name__ == "__main__":
    main()
