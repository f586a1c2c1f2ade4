"""Train the two models on their data (seconds on a laptop CPU) and save their weights, as a user
would before compressing: cnn.safetensors and mlp.safetensors. The held-out 20% that torchshrink's
`--data` keeps apart (same seed, same split) is never trained on here either."""

from pathlib import Path

import safetensors.torch
import torch
import torch.nn.functional as F

from models import cnn, mlp
from torchshrink.recipe.userdata import DataSpec, task_from_data

HERE = Path(__file__).resolve().parent


def fit(model: torch.nn.Module, train: list, epochs: int, lr: float) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        model.train()
        for x, y in train:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    model.eval()


def main() -> None:
    torch.manual_seed(0)
    from torchshrink.core import state

    for name, make, data, shape, epochs, lr in (("cnn", cnn, "data/images", [1, 3, 32, 32], 12, 2e-3),
                                                ("mlp", mlp, "data/wine.csv", [1, 13], 60, 1e-3)):
        model = make()
        state.put(model, input={"shape": shape, "dtype": "float32"})
        task = task_from_data(DataSpec(str(HERE / data)), model)  # the same split the CLI makes
        fit(model, task.train, epochs, lr)
        acc = task.evaluate(model, model)["accuracy"]
        safetensors.torch.save_file(model.state_dict(), str(HERE / f"{name}.safetensors"))
        print(f"{name}: held-out accuracy {acc:.4f} ({task.provenance['quality']}) -> {name}.safetensors")


if __name__ == "__main__":
    main()
