"""Generic layer discovery for Algorithm 1: every hidden Conv2d / Linear with its activation.

One forward pass with hooks records which leaf module ran when, on which tensor, giving which tensor.
For each Conv2d / Linear except the output layer:
- its norm: a per-channel norm of its width (batch, group or instance norm; for a dense layer, a layer
  norm over its features) that takes its output (conv-BN, then the activation: the unit's own output
  is the norm's) or its activation's (conv-ReLU-BN, Table 7); a reset zeroes the norm's weight and bias
  for the unit too, so the unit's output is 0 after the norm as well;
- its activation: the activation module that takes the unit's own output (through pooling or
  dropout); else, where the output goes into code no module sees (a residual add), the first
  activation module after it that takes a tensor no module made, of its width, with no layer between
  that works on data made after the unit ran (a ResNet block's closing ReLU); else none: an activation
  applied as a function (`F.relu(self.bn(self.conv(x)))`), where the unit is read at its own output,
  rectified (`act` None). Activation modules: ReLU and the activations that map 0 to 0 (ReLU6,
  LeakyReLU, PReLU, ELU, CELU, SELU, GELU, SiLU, Mish, Hardswish), so a reset unit (weights and bias
  zero) gives nothing downstream, as it would through a ReLU. An activation module called more than once
  per forward (one ReLU shared by a block) is not read (its hook would mix the calls): such a unit too is
  read at its own output, rectified.
This covers conv-ReLU (Table 5), conv-ReLU-BN (Table 7), conv-BN-(add)-ReLU (ResNet), conv-GN-act, functional
activations and the dense layers of transformer blocks without a table per architecture. A conv's units are its
channels (axis 1); a dense layer's are its features, the last axis, also where it runs on tokens (N, T, D).
Layers it cannot handle (grouped convolutions, a layer whose output goes straight into another layer with no
activation) are returned in `skipped` with a reason, never mis-reset.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..device import model_device

ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish,
               nn.Hardswish)
_PASS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d, nn.Dropout, nn.Dropout2d,
         nn.Identity)                      # keep each channel a channel: an activation after them is the unit's
_WEIGHTED = (nn.Conv2d, nn.Linear)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.LayerNorm)


def norm_width(m: nn.Module) -> int | None:
    """The channels a per-channel norm works on (None: not such a norm; a layer norm over more than one axis)."""
    if isinstance(m, nn.GroupNorm):
        return m.num_channels
    if isinstance(m, nn.LayerNorm):
        return m.normalized_shape[0] if len(m.normalized_shape) == 1 else None
    return m.num_features if isinstance(m, _NORMS) else None


def feature_axis(kind: str, ndim: int) -> int:
    """The axis that holds a unit's values in an `ndim`-dimensional output read for it: a dense unit's features
    are the last axis (also on a transformer's (N, T, D) tokens), a conv unit's channels axis 1."""
    return ndim - 1 if kind == "dense" else 1


@dataclass(frozen=True)
class Unit:
    name: str                 # the Conv2d / Linear module's name
    kind: str                 # "conv" or "dense"
    width: int                # output channels / features
    act: str | None           # the activation module whose output is the unit's activation; None: the
    #                           activation is a function (or a shared module): read `own`, rectified
    bn: str | None            # name of the batch norm to reset with it, if any
    own: str = ""             # the module whose output is this unit's own output: its batch norm when
    #                           that runs before the activation (conv-BN-ReLU, a ResNet branch), else the layer

    def tap(self) -> tuple[str, bool]:
        """(module, rectify): where the unit's activation is read."""
        return (self.act, False) if self.act else (self.own or self.name, True)


@dataclass
class _Call:
    name: str
    inp: torch.Tensor | None
    out: torch.Tensor | None

    def width(self, kind: str) -> int | None:
        """Channels (a conv unit's axis 1) or features (a dense unit's last axis) of the output."""
        if self.out is None or self.out.ndim < 2:
            return None
        return int(self.out.shape[feature_axis(kind, self.out.ndim)])


def _trace(model: nn.Module, example: torch.Tensor) -> list[_Call]:
    """Every leaf module call of one forward pass, in order, with the tensors it took and gave."""
    names = {m: n for n, m in model.named_modules()}
    calls: list[_Call] = []

    def hook(mod, inputs, out):
        inp = next((a for a in inputs if isinstance(a, torch.Tensor)), None)
        calls.append(_Call(names[mod], inp, out if isinstance(out, torch.Tensor) else None))

    hooks = [m.register_forward_hook(hook) for m in model.modules() if len(list(m.children())) == 0]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example[:2].to(model_device(model)))
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return calls


class _Flow:
    """Who took and made which tensor in a trace (tensors are compared by identity; the trace keeps them)."""

    def __init__(self, calls: list[_Call], mods: dict[str, nn.Module]):
        self.calls, self.mods = calls, mods
        self.first_seen: dict[int, int] = {}
        for k, c in enumerate(calls):
            for t in (c.inp, c.out):
                if t is not None:
                    self.first_seen.setdefault(id(t), k)

    def mod(self, k: int) -> nn.Module:
        return self.mods[self.calls[k].name]

    def consumer(self, k: int) -> int | None:
        """The first call after k that takes call k's output, through pooling / dropout (None: code no
        module sees takes it)."""
        t = self.calls[k].out
        for j in range(k + 1, len(self.calls)):
            if t is not None and self.calls[j].inp is t:
                if isinstance(self.mod(j), _PASS):
                    t = self.calls[j].out
                    continue
                return j
        return None

    def next_norm(self, k: int, width: int, kind: str) -> int | None:
        """The first norm of `width` (one that fits a `kind` unit) called after k and before the next weighted layer."""
        for j in range(k + 1, len(self.calls)):
            m = self.mod(j)
            if isinstance(m, _WEIGHTED):
                return None
            if norm_width(m) == width and _norm_fits(m, kind):
                return j
        return None

    def after_residual(self, own: int, width: int, kind: str) -> int | None:
        """The first activation call after `own` that takes a tensor no module made, of `width`, with no
        weighted layer between that works on data first seen after `own` ran."""
        made = {id(c.out) for c in self.calls[:own + 1] if c.out is not None}
        for j in range(own + 1, len(self.calls)):
            c = self.calls[j]
            if isinstance(self.mod(j), _WEIGHTED) and c.inp is not None and self.first_seen[id(c.inp)] > own:
                return None
            if isinstance(self.mod(j), ACTIVATIONS) and c.inp is not None and c.width(kind) == width \
                    and id(c.inp) not in made and self.first_seen[id(c.inp)] > own:
                return j
            if c.out is not None:
                made.add(id(c.out))
        return None


def discover_units(model: nn.Module, example: torch.Tensor) -> tuple[list[Unit], list[tuple[str, str]]]:
    """(units in forward order, [(name, why skipped)]). `example` is one input batch (N,C,H,W)."""
    calls = _trace(model, example)
    mods = dict(model.named_modules())
    ran = {c.name for c in calls}
    skipped: list[tuple[str, str]] = []
    for n, m in mods.items():               # parameters Algorithm 1 will never reset, said out loud
        if not any(True for _ in m.parameters(recurse=False)):
            continue
        if not isinstance(m, (*_WEIGHTED, *_NORMS)):
            own = ", ".join(k for k, _ in m.named_parameters(recurse=False))
            skipped.append((n or "(the model)",
                            f"parameters ({own}) of a {type(m).__name__}, not a Conv2d/Linear/norm"))
        elif n not in ran:
            skipped.append((n, f"{type(m).__name__} not called as a module in the forward pass "
                               "(used inside another layer's own code, e.g. attention)"))
    flow = _Flow(calls, mods)
    weighted = [i for i, c in enumerate(calls) if isinstance(mods[c.name], _WEIGHTED)]
    calls_of = {c.name: sum(d.name == c.name for d in calls) for c in calls}
    units: list[Unit] = []
    seen: set[str] = set()
    for i in weighted[:-1]:                 # the output layer holds the classes, never reset
        name, mod = calls[i].name, mods[calls[i].name]
        if name in seen:
            continue                        # a layer called twice is one unit, found at its first call
        seen.add(name)
        if isinstance(mod, nn.Conv2d) and mod.groups != 1:
            skipped.append((name, "grouped convolution"))
            continue
        found = _unit(flow, i, mod, calls_of)
        if isinstance(found, str):
            skipped.append((name, found))
        else:
            units.append(found)
    return units, skipped


def _unit(flow: _Flow, i: int, mod: nn.Module, calls_of: dict[str, int]) -> Unit | str:
    """The unit of weighted call i, or why it has none."""
    width = mod.out_channels if isinstance(mod, nn.Conv2d) else mod.out_features
    kind = "conv" if isinstance(mod, nn.Conv2d) else "dense"
    own, bn = i, None
    c = flow.consumer(i)
    if c is not None and norm_width(flow.mod(c)) == width and _norm_fits(flow.mod(c), kind):
        own, bn = c, c                      # conv-BN, then the activation
        c = flow.consumer(c)
    if c is not None and not isinstance(flow.mod(c), ACTIVATIONS):
        return f"no activation after it: its output goes straight into {type(flow.mod(c)).__name__}"
    act = c if c is not None else flow.after_residual(own, width, kind)
    if bn is None and act is not None:      # conv-ReLU-BN (Table 7): the norm takes the activation's output
        after = flow.consumer(act)
        if after is not None and norm_width(flow.mod(after)) == width and _norm_fits(flow.mod(after), kind):
            bn = after
    elif bn is None:                        # conv-F.relu-BN: the first norm of its width before the next layer
        bn = flow.next_norm(i, width, kind)
    calls = flow.calls
    act_name = calls[act].name if act is not None and calls_of[calls[act].name] == 1 else None
    return Unit(calls[i].name, kind, width, act_name, calls[bn].name if bn is not None else None, calls[own].name)


def _norm_fits(norm: nn.Module, kind: str) -> bool:
    """A layer norm normalises a dense layer's features; on a conv's (N, C, H, W) it would mix positions."""
    return kind == "dense" or not isinstance(norm, nn.LayerNorm)


def select_units(units: list[Unit], which: str) -> list[Unit]:
    """'all', or 'second-half' (the paper's choice for deep ResNets: only the later half)."""
    if which == "all":
        return list(units)
    if which == "second-half":
        return list(units[len(units) // 2:])
    raise ValueError(f"unknown layer selection {which!r}")


MEASURE_POINTS = ("relu", "branch")
POOLS = ("mean", "max")     # a conv channel over positions: its mean (Algorithm 1), or its largest value


def measure_module(u: Unit, point: str) -> tuple[str, bool]:
    """(module, rectify): where a unit's activation is read. "relu": its activation module (after a
    residual add, for a ResNet block's second conv and its shortcut), or its own output rectified where the
    activation is a function. "branch": the unit's own output (after its own batch norm, before any add),
    rectified: the quantity a reset sets to zero."""
    if point not in MEASURE_POINTS:
        raise ValueError(f"unknown measure point {point!r}")
    return u.tap() if point == "relu" else (u.own or u.name, True)


@torch.no_grad()
def mean_activations(model: nn.Module, units: list[Unit], x: torch.Tensor, batch_size: int = 500,
                     point: str = "relu", pool: str = "mean") -> dict[str, torch.Tensor]:
    """Per unit: mean activation per channel/neuron over x, read where `point` says (`measure_module`); a conv
    channel is first pooled over positions per image, by its mean (`pool` "mean") or its largest value ("max":
    a trigger that covers a few positions moves the channel's peak, where the mean over all positions dilutes
    it by the trigger's share of the image)."""
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    mods = dict(model.named_modules())
    where = {u.name: measure_module(u, point) for u in units}
    kind = {where[u.name]: u.kind for u in units}
    sums: dict[tuple[str, bool], torch.Tensor] = {}

    def hook(name):
        def f(mod, inp, out):
            for rectify in (False, True):
                if (name, rectify) in wanted:
                    o = out.clamp_min(0) if rectify else out
                    if feature_axis(kind[(name, rectify)], o.ndim) != 1:   # tokens (N, T, D): pooled over T
                        o = o.movedim(-1, 1).flatten(2).unsqueeze(3)
                    if o.ndim != 4:
                        v = o.sum(0)
                    elif pool == "max":
                        v = o.amax(dim=(2, 3)).sum(0)
                    else:
                        v = o.sum(dim=(0, 2, 3)) / (o.shape[2] * o.shape[3])
                    sums[(name, rectify)] = sums.get((name, rectify), 0) + v
        return f

    wanted = set(where.values())
    hooks = [mods[a].register_forward_hook(hook(a)) for a in {m for m, _ in wanted}]
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
