"""Writes small PyTorch models in every format the torch backend serves, plus eager references.

Run as a script (``python torch_test_models.py OUT [--aoti]``) so torch's own deprecation
warnings while scripting, exporting and compiling stay out of pytest's warnings-as-errors.

OUT/<model>/1/<file> and OUT/<model>/model.yaml for each model, and OUT/expected.npz holding the
inputs and the eager fp32 outputs the tests compare the server's answers with.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn


class Net(nn.Module):
    """Two inputs, two outputs: x [B, 8], y [B, 4] -> fc2(relu(fc1(x))) + y, sum of hidden."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = torch.relu(self.fc1(x))
        return self.fc2(hidden) + y, hidden.sum(dim=1, keepdim=True)


class DictNet(nn.Module):
    """Integer ids [B, 3] -> {"embedded": [B, 3, 4] FP32, "count": [B] INT64}."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(10, 4)

    def forward(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"embedded": self.embedding(ids), "count": (ids > 0).sum(dim=1)}


class ConvNet(nn.Module):
    """image [B, 3, 8, 8] -> per-channel mean of relu(conv(image)): [B, 4]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(image)).mean(dim=(2, 3))


NET_IO = {
    "max_batch_size": 8,
    "inputs": [
        {"name": "x", "datatype": "FP32", "dims": [8]},
        {"name": "y", "datatype": "FP32", "dims": [4]},
    ],
    "outputs": [
        {"name": "OUTPUT0", "datatype": "FP32", "dims": [4]},
        {"name": "OUTPUT1", "datatype": "FP32", "dims": [1]},
    ],
}


def write(root: Path, name: str, filename: str, config: dict[str, object]) -> Path:
    version = root / name / "1"
    version.mkdir(parents=True, exist_ok=True)
    (root / name / "model.yaml").write_text(yaml.safe_dump(config))
    return version / filename


def main(root: Path, aoti: bool) -> None:
    torch.manual_seed(0)
    net = Net().eval()
    dict_net = DictNet().eval()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 8)).astype(np.float32)
    y = rng.standard_normal((3, 4)).astype(np.float32)
    ids = rng.integers(0, 10, size=(2, 3)).astype(np.int64)
    conv_net = ConvNet().eval()
    image = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    with torch.inference_mode():
        out0, out1 = net(torch.from_numpy(x), torch.from_numpy(y))
        d = dict_net(torch.from_numpy(ids))
        pooled = conv_net(torch.from_numpy(image))
    np.savez(
        root / "expected.npz", x=x, y=y, out0=out0.numpy(), out1=out1.numpy(), ids=ids,
        embedded=d["embedded"].numpy(), count=d["count"].numpy(), image=image,
        pooled=pooled.numpy(),
    )  # fmt: skip

    example = (torch.from_numpy(x), torch.from_numpy(y))
    scripted = torch.jit.script(net)
    scripted.save(str(write(root, "net_script", "model.pt", {"backend": "pytorch", **NET_IO})))
    traced = torch.jit.trace(net, example)
    traced.save(str(write(root, "net_trace", "model.pt", dict(NET_IO))))  # backend from file

    batch = torch.export.Dim("batch", max=64)
    program = torch.export.export(net, example, dynamic_shapes={"x": {0: batch}, "y": {0: batch}})
    # No inputs/outputs in model.yaml: they come from the program's signature.
    torch.export.save(program, write(root, "net_export", "model.pt2", {"max_batch_size": 8}))
    for dtype in ("fp16", "bf16"):
        config = {"backend": "torch", "max_batch_size": 8, "parameters": {"dtype": dtype}}
        torch.export.save(program, write(root, f"net_export_{dtype}", "model.pt2", config))
    config = {"backend": "torch", "max_batch_size": 8, "parameters": {"compile": True}}
    torch.export.save(program, write(root, "net_compile", "model.pt2", config))

    ids_batch = torch.export.Dim("batch", max=64)
    dict_program = torch.export.export(
        dict_net, (torch.from_numpy(ids),), dynamic_shapes={"ids": {0: ids_batch}}
    )
    torch.export.save(dict_program, write(root, "dict_export", "model.pt2", {"backend": "torch"}))

    conv_program = torch.export.export(
        conv_net, (torch.from_numpy(image),), dynamic_shapes={"image": {0: ids_batch}}
    )
    config = {"backend": "torch", "parameters": {"channels_last": True}}
    torch.export.save(conv_program, write(root, "conv_channels_last", "model.pt2", config))

    if aoti:
        from torch._inductor import aoti_compile_and_package

        path = write(root, "net_aoti", "net.aoti.pt2", {
            "backend": "torch", "default_model_filename": "net.aoti.pt2", **NET_IO,
        })  # fmt: skip
        aoti_compile_and_package(program, package_path=str(path))
    print(f"wrote test models to {root}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), "--aoti" in sys.argv[2:])
