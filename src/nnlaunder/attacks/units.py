"""Generic layer discovery for Algorithm 1: every hidden Conv2d / Linear with its activation.

A forward pass with hooks records the order in which leaf modules run. For each Conv2d / Linear
except the output layer, its *activation* is the first ReLU that runs after it and its batch
norm is the first BatchNorm2d/1d with matching width that runs after it and before the next
Conv2d / Linear. This covers conv-ReLU (Table 5), conv-ReLU-BN (Table 7) and conv-BN-(add)-ReLU
(ResNet) without a table per architecture. Layers it cannot handle (grouped convolutions,
anything without a ReLU after it) are returned in `skipped` with a reason, never mis-reset.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..device import model_device


@dataclass(frozen=True)
class Unit:
    name: str                 # the Conv2d / Linear module's name
    kind: str                 # "conv" or "dense"
    width: int                # output channels / features
    act: str                  # name of the ReLU whose output is the activation
    bn: str | None            # name of the batch norm to reset with it, if any
    own: str = ""             # the module whose output is this unit's own output: its batch norm when
    #                           that runs before the ReLU (conv-BN-ReLU, a ResNet branch), else the layer


def discover_units(model: nn.Module, example: torch.Tensor) -> tuple[list[Unit], list[tuple[str, str]]]:
    """(units in forward order, [(name, why skipped)]). `example` is one input batch (N,C,H,W)."""
    order: list[str] = []
    names = {m: n for n, m in model.named_modules()}
    hooks = [m.register_forward_hook(lambda mod, i, o: order.append(names[mod]))
             for m in model.modules() if len(list(m.children())) == 0]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example[:2].to(model_device(model)))
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    mods = dict(model.named_modules())
    ran = set(order)
    skipped: list[tuple[str, str]] = []
    for n, m in mods.items():               # parameters Algorithm 1 will never reset, said out loud
        if not any(True for _ in m.parameters(recurse=False)):
            continue
        if not isinstance(m, nn.Conv2d | nn.Linear | nn.BatchNorm1d | nn.BatchNorm2d):
            skipped.append((n, f"unsupported layer type {type(m).__name__}"))
        elif n not in ran:
            skipped.append((n, f"{type(m).__name__} not called as a module in the forward pass "
                               "(used inside another layer's own code, e.g. attention)"))
    weighted = [i for i, n in enumerate(order) if isinstance(mods[n], nn.Conv2d | nn.Linear)]
    last = weighted[-1] if weighted else -1
    units: list[Unit] = []
    for i in weighted:
        name = order[i]
        mod = mods[name]
        if i == last:
            continue                       # the output layer holds the classes, never reset
        if isinstance(mod, nn.Conv2d) and mod.groups != 1:
            skipped.append((name, "grouped convolution"))
            continue
        width = mod.out_channels if isinstance(mod, nn.Conv2d) else mod.out_features
        act = next((order[j] for j in range(i + 1, len(order)) if isinstance(mods[order[j]], nn.ReLU)), None)
        if act is None:
            skipped.append((name, "no ReLU after it"))
            continue
        bn, own = None, name
        relu_at = next(j for j in range(i + 1, len(order)) if order[j] == act)
        for j in range(i + 1, len(order)):
            m = mods[order[j]]
            if isinstance(m, nn.Conv2d | nn.Linear):
                break
            if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d) and m.num_features == width:
                bn = order[j]
                own = bn if j < relu_at else name
                break
        units.append(Unit(name, "conv" if isinstance(mod, nn.Conv2d) else "dense", width, act, bn, own))
    return units, skipped


def select_units(units: list[Unit], which: str) -> list[Unit]:
    """'all', or 'second-half' (the paper's choice for deep ResNets: only the later half)."""
    if which == "all":
        return list(units)
    if which == "second-half":
        return list(units[len(units) // 2:])
    raise ValueError(f"unknown layer selection {which!r}")


MEASURE_POINTS = ("relu", "branch")


def measure_module(u: Unit, point: str) -> str:
    """Where a unit's activation is read. "relu": the first ReLU after the layer (after a residual
    add, for a ResNet block's second conv and its shortcut). "branch": the unit's own output
    (after its own batch norm, before any add), rectified: the quantity a reset sets to zero."""
    if point not in MEASURE_POINTS:
        raise ValueError(f"unknown measure point {point!r}")
    return u.act if point == "relu" else (u.own or u.name)


@torch.no_grad()
def mean_activations(model: nn.Module, units: list[Unit], x: torch.Tensor, batch_size: int = 500,
                     point: str = "relu") -> dict[str, torch.Tensor]:
    """Per unit: mean activation per channel/neuron over x (and over positions for convs), read
    where `point` says (`measure_module`)."""
    mods = dict(model.named_modules())
    where = {u.name: measure_module(u, point) for u in units}
    sums: dict[str, torch.Tensor] = {}

    def hook(name):
        def f(mod, inp, out):
            if point == "branch":
                out = out.clamp_min(0)
            v = out.sum(dim=(0, 2, 3)) / (out.shape[2] * out.shape[3]) if out.ndim == 4 else out.sum(0)
            sums[name] = sums.get(name, 0) + v
        return f

    hooks = [mods[a].register_forward_hook(hook(a)) for a in set(where.values())]
    was = model.training
    model.eval()
    try:
        dev = model_device(model)
        for i in range(0, len(x), batch_size):
            model(x[i:i + batch_size].to(dev))
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return {u.name: sums[where[u.name]].cpu() / len(x) for u in units}
