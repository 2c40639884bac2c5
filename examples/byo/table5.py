"""Aiken et al.'s Table 5 MNIST network written from scratch in plain PyTorch, as someone outside
this project would: it expects inputs already normalised with MNIST's mean and std (so the
laundering command is told `--mean 0.1307 --std 0.3081`)."""

from torch import nn


class Table5(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 32, 5), nn.Conv2d(32, 16, 5)
        self.fc1, self.fc2 = nn.Linear(256, 512), nn.Linear(512, classes)
        self.relu1, self.relu2, self.relu3 = nn.ReLU(), nn.ReLU(), nn.ReLU()
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        x = self.pool(self.relu1(self.conv1(x)))
        x = self.pool(self.relu2(self.conv2(x)))
        return self.fc2(self.relu3(self.fc1(x.flatten(1))))


def table5(classes: int = 10) -> nn.Module:
    return Table5(classes)
