"""Model rewrites that compute the same function faster: the one place that reorders a network's
modules (the trainer's and Neural Cleanse's ReLU / max-pool swap)."""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from . import native
from .kernels import FusedConvPool, conv_pool_ok


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks)


def swap_relu_pool(mods: list[nn.Module]) -> list[nn.Module]:
    """The same modules with each ReLU immediately followed by a MaxPool2d moved after the pool
    (a ReLU with hooks, or a pool that returns indices, stays where it is)."""
    out: list[nn.Module] = []
    i = 0
    while i < len(mods):
        a = mods[i]
        b = mods[i + 1] if i + 1 < len(mods) else None
        if type(a) is nn.ReLU and type(b) is nn.MaxPool2d and not b.return_indices and not _hooked(a):
            out += [b, a]
            i += 2
        else:
            out.append(a)
            i += 1
    return out


def relu_after_pool(model: nn.Module) -> nn.Module:
    """The same network with each ReLU -> MaxPool2d pair of an nn.Sequential run as MaxPool2d -> ReLU,
    sharing the model's modules (so its parameters, buffers and train/eval state).

    max and ReLU are both monotone, so relu(maxpool(x)) == maxpool(relu(x)) exactly, gradients
    included (a window of non-positive values gives zero gradient either way); the ReLU then
    touches 4x fewer values. A ReLU with hooks is left in place (its output would
    change); models that are not nn.Sequential are returned as they are.
    """
    if type(model) is not nn.Sequential:
        return model
    out = [relu_after_pool(m) for m in swap_relu_pool(list(model))]
    return nn.Sequential(*out) if any(a is not b for a, b in zip(out, model, strict=True)) else model



def rewrite_for_speed(model: nn.Module) -> nn.Module:
    """A copy of `model` computing the same function faster on a CPU: in every nn.Sequential, a
    ReLU immediately followed by a MaxPool2d is moved after the pool (max and ReLU commute: both
    are monotone, so relu(maxpool(x)) == maxpool(relu(x)) and the ReLU touches 4x fewer values),
    and parameters are channels-last. The original model is not touched."""
    fast = copy.deepcopy(model)
    for seq in fast.modules():
        if isinstance(seq, nn.Sequential):
            for key, mod in zip(list(seq._modules), swap_relu_pool(list(seq)), strict=True):
                seq._modules[key] = mod
    return fast.to(memory_format=torch.channels_last)


def fold_batchnorm(model: nn.Module, probe: torch.Tensor) -> nn.Module:
    """A copy of an eval-mode `model` in which every batch norm that directly follows a conv is folded
    into the conv's weights and bias (the same affine function, one pass over memory instead of two;
    torch.fx's `fuse`). Used where the weights are frozen (Neural Cleanse). The model is returned as
    it is when it has no batch norm, is training, has hooks (a traced copy would drop them), cannot be
    traced, or the folded copy's output on `probe` differs beyond rounding."""
    mods = list(model.modules())
    if model.training or not any(isinstance(m, nn.BatchNorm2d) for m in mods) or any(_hooked(m) for m in mods):
        return model
    with warnings.catch_warnings():             # the import touches deprecated torch.jit names
        warnings.simplefilter("ignore", DeprecationWarning)
        from torch.fx.experimental.optimization import fuse

    try:
        folded = fuse(model)        # works on a deep copy
        with torch.no_grad():
            a, b = model(probe), folded(probe)
    except Exception:               # untraceable control flow, unusual modules: keep the model
        return model
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    ok = (n_bn < sum(isinstance(m, nn.BatchNorm2d) for m in mods) and a.shape == b.shape
          and torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-4 * float(a.abs().max()) + 1e-6))
    return folded if ok else model


def fuse_conv_pool(model: nn.Module) -> nn.Module:
    """A copy of `model` in which, inside every nn.Sequential, each conv -> 2x2 max-pool (-> ReLU) run,
    or conv -> ReLU -> 2x2 max-pool (the same function: both are monotone), that the native kernel
    takes (`kernels.conv_pool_ok`) is one `kernels.FusedConvPool` (the others become nn.Identity, so
    indices keep their meaning). Modules with hooks are left as they are. Returns the model itself when
    the kernel is not available (`native.status()`) or nothing matches."""
    if native.conv_pool() is None or not conv_pool_runs(model):
        return model
    fused = copy.deepcopy(model)
    for seq in [s for s in fused.modules() if isinstance(s, nn.Sequential)]:
        keys = list(seq._modules)
        for start, length, relu in _runs(seq):
            seq._modules[keys[start]] = FusedConvPool(seq[start], relu)
            for j in range(start + 1, start + length):
                seq._modules[keys[j]] = nn.Identity()
    return fused


def conv_pool_runs(model: nn.Module) -> int:
    """How many conv -> max-pool (-> ReLU) runs of `model` the fused kernel would take."""
    return sum(len(_runs(s)) for s in model.modules() if isinstance(s, nn.Sequential))


def _plain(m: nn.Module | None) -> bool:
    return m is not None and not _hooked(m)


def _runs(seq: nn.Sequential) -> list[tuple[int, int, bool]]:
    """(start, length, ReLU included) of each fusable run in `seq`."""
    mods, found, i = list(seq), [], 0
    while i < len(mods):
        a, b, c = (mods[j] if j < len(mods) else None for j in (i, i + 1, i + 2))
        if type(a) is nn.Conv2d and _plain(a) and _plain(b):
            if conv_pool_ok(a, b):                                             # conv, pool[, ReLU]
                relu = type(c) is nn.ReLU and _plain(c)
                found.append((i, 3 if relu else 2, relu))
                i += 3 if relu else 2
                continue
            if type(b) is nn.ReLU and _plain(c) and conv_pool_ok(a, c):         # conv, ReLU, pool
                found.append((i, 3, True))
                i += 3
                continue
        i += 1
    return found
