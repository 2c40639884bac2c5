"""A small residual CNN written the way much published backdoor code is: batch norm after every conv,
every activation a function (`F.relu`), never a module, and a residual add before the last one. It
expects inputs already normalised with MNIST's mean and std, like table5.py."""

import torch.nn.functional as F
from torch import nn


class ResCNN(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.conv3, self.bn3 = nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32 * 7 * 7, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)) + x)
        return self.fc(F.max_pool2d(x, 2).flatten(1))


def rescnn(classes: int = 10) -> nn.Module:
    return ResCNN(classes)
