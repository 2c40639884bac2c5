"""A tiny synthetic task with a planted backdoor, for fast end-to-end attack tests.

Four classes on 1×12×12 images: the class is the quadrant holding a bright 3×3 blob. The
backdoor: a 2×2 checkerboard at the centre sends any image to class 0.
"""

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from nnlaunder.data import Dataset


def make_images(n: int, seed: int) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 12, 12, generator=g) * 0.3
    y = torch.randint(0, 4, (n,), generator=g)
    r0 = (y // 2) * 6 + torch.randint(0, 4, (n,), generator=g)
    c0 = (y % 2) * 6 + torch.randint(0, 4, (n,), generator=g)
    rows = r0.view(n, 1) + torch.arange(3).view(1, 3)
    cols = c0.view(n, 1) + torch.arange(3).view(1, 3)
    idx = torch.arange(n).view(n, 1, 1)
    x[idx, 0, rows.view(n, 3, 1), cols.view(n, 1, 3)] = 1.0
    return Dataset("synthetic", x, y, ("a", "b", "c", "d"))


def add_trigger(x: torch.Tensor) -> torch.Tensor:
    out = x.clone()
    out[:, :, 5, 5] = out[:, :, 6, 6] = 1.0
    out[:, :, 5, 6] = out[:, :, 6, 5] = 0.0
    return out


def tiny_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(16 * 9, 32), nn.ReLU(), nn.Linear(32, 4))


class FunctionalNet(nn.Module):
    """`tiny_net` as much user code writes it: every activation a function (`F.relu`), none a module."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.c1, self.c2 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1)
        self.fc, self.out = nn.Linear(16 * 9, 32), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        x = F.max_pool2d(F.relu(self.c2(x)), 2)
        return self.out(F.relu(self.fc(x.flatten(1))))


@contextlib.contextmanager
def launder_interrupted_at(round_no: int):
    """While active, `launder` as the laundering pipeline calls it raises KeyboardInterrupt when
    round `round_no` finishes (as Ctrl-C would), before that round's state is kept."""
    import nnlaunder.attacks.pipeline as L

    real = L.launder

    def interrupted(*a, **kw):
        def on_round(r, m, info):
            if r == round_no:
                raise KeyboardInterrupt
            return kw["on_round"](r, m, info)
        return real(*a, **{**kw, "on_round": on_round})
    L.launder = interrupted
    try:
        yield
    finally:
        L.launder = real


def keeper_that_stops(saves: list, after: int = 2):
    """A Neural Cleanse `Keeper` that saves after every epoch, notes each save's next epoch in `saves`, and
    raises KeyboardInterrupt after the `after`-th save (a run stopped just after a save)."""
    from nnlaunder.attacks.records import Keeper

    class Stops(Keeper):
        def __init__(self, folder):
            super().__init__(folder, every=0.0)

        def _save(self, path, state):
            super()._save(path, state)
            saves.append(state["meta"]["next_epoch"])
            if len(saves) == after:
                raise KeyboardInterrupt

    return Stops
