"""The paper's architectures, one registry (`ARCHS`), normalisation as each model's first layer.

- `mnist-cnn`: Table 5 of Aiken et al. (Zhang et al.'s MNIST network), valid padding.
- `cifar-cnn`: Table 7 (Zhang et al.'s CIFAR-10 network): same padding, ReLU then batch norm,
  dropout 0.2/0.3/0.4 after each pooling, weight decay 1e-4 on the kernels.
- `resnet20`: Keras' `cifar10_resnet.py` v1 with n=3 (depth 20), used by the paper for Adi et
  al.'s scheme: 3 stages of 3 basic blocks (16/32/64 filters), 1×1 projection shortcuts without
  batch norm, global 8×8 average pooling, one dense layer; L2 1e-4 on the kernels.

Every model takes pixels in [0, 1] and normalises inside (`Normalize`), so triggers are always
stamped in pixel space. Every activation is its own `nn.ReLU` module so attacks can hook it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..device import compute_device
from ..errors import UserError


class Normalize(nn.Module):
    """(x - mean) / std per channel; x is (N,C,H,W) in [0, 1]."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


MNIST_NORM = ((0.1307,), (0.3081,))
CIFAR_NORM = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))


def mnist_cnn(num_classes: int = 10) -> nn.Sequential:
    """Table 5: Conv32(5×5)-ReLU-Pool-Conv16(5×5)-ReLU-Pool-Dense512-ReLU-Dense(num_classes)."""
    return nn.Sequential(
        Normalize(*MNIST_NORM),
        nn.Conv2d(1, 32, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 512), nn.ReLU(),
        nn.Linear(512, num_classes),
    )


def cifar_cnn(num_classes: int = 10) -> nn.Sequential:
    """Table 7: 3 × [Conv-ReLU-BN, Conv-ReLU-BN, MaxPool, Dropout] with 32/64/128 filters, Dense."""
    layers: list[nn.Module] = [Normalize(*CIFAR_NORM)]
    cin = 3
    for width, drop in ((32, 0.2), (64, 0.3), (128, 0.4)):
        for _ in range(2):
            layers += [nn.Conv2d(cin, width, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(width)]
            cin = width
        layers += [nn.MaxPool2d(2), nn.Dropout(drop)]
    layers += [nn.Flatten(), nn.Linear(128 * 4 * 4, num_classes)]
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """Keras resnet_v1 block: conv-BN-ReLU-conv-BN (+ shortcut) -ReLU; 1×1 conv shortcut, no BN."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride) if (stride != 1 or cin != cout) else None
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(y + (x if self.shortcut is None else self.shortcut(x)))


class ResNet20(nn.Module):
    """Keras cifar10_resnet v1, n=3: depth 6n+2 = 20."""

    def __init__(self, num_classes: int = 10, n: int = 3) -> None:
        super().__init__()
        self.normalize = Normalize(*CIFAR_NORM)
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU())
        blocks: list[nn.Module] = []
        cin = 16
        for stage, width in enumerate((16, 32, 64)):
            for b in range(n):
                stride = 2 if (stage > 0 and b == 0) else 1
                blocks.append(BasicBlock(cin, width, stride))
                cin = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AvgPool2d(8)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.blocks(self.stem(self.normalize(x))))))


@dataclass(frozen=True)
class ArchSpec:
    """What a registered architecture needs: builder, input shape, datasets it fits (its owner recipe
    is in recipes.py)."""

    build: Callable[[int], nn.Module]
    input_shape: tuple[int, int, int]
    datasets: tuple[str, ...]


ARCHS: dict[str, ArchSpec] = {
    "mnist-cnn": ArchSpec(mnist_cnn, (1, 28, 28), ("mnist", "fashion-mnist")),   # the paper's Table 5
    "cifar-cnn": ArchSpec(cifar_cnn, (3, 32, 32), ("cifar10",)),                  # the paper's Table 7
    "resnet20": ArchSpec(ResNet20, (3, 32, 32), ("cifar10",)),                    # Keras cifar10_resnet v1, n=3
}

DEFAULT_ARCH = {"mnist": "mnist-cnn", "fashion-mnist": "mnist-cnn", "cifar10": "cifar-cnn"}


def spec(arch: str) -> ArchSpec:
    if arch not in ARCHS:
        raise UserError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHS)}")
    return ARCHS[arch]


def build(arch: str, num_classes: int = 10, *, seed: int | None = None) -> nn.Module:
    """A fresh model; with `seed`, its initial weights are reproducible."""
    s = spec(arch)
    if num_classes < 2:
        raise UserError(f"num_classes must be >= 2, got {num_classes}")
    if seed is None:
        return s.build(num_classes).to(compute_device())
    with torch.random.fork_rng(devices=[]):     # weights are drawn on the CPU: same on every device
        torch.manual_seed(seed)
        return s.build(num_classes).to(compute_device())


def check_fits(arch: str, dataset: str, shape: tuple[int, ...] | None = None) -> None:
    """Raise a UserError when `dataset` (or an input of `shape`) does not fit `arch`."""
    s = spec(arch)
    if dataset not in s.datasets:
        raise UserError(f"architecture {arch!r} is for {', '.join(s.datasets)}, not {dataset!r}")
    if shape is not None and tuple(shape) != s.input_shape:
        raise UserError(f"architecture {arch!r} takes inputs {s.input_shape}, got {tuple(shape)}")


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def check_data(arch: str, dataset: str, *sets: object) -> None:
    """`check_fits` for the dataset and for the image shape (C, H, W) of every set given, naming both."""
    check_fits(arch, dataset)
    for ds in sets:
        if tuple(ds.shape) != spec(arch).input_shape:  # type: ignore[attr-defined]
            raise UserError(f"{dataset}'s images are {tuple(ds.shape)} but {arch!r} takes {spec(arch).input_shape}; "
                            "the data folder holds images of another size")
