"""Where the tensor work runs.

Everything defaults to the CPU (the machine this project is built for). `NNLAUNDER_DEVICE`
(`cpu`, `cuda`, `cuda:N` or `auto`) or the CLI's `--device` moves models to an accelerator;
the library code then follows the model: `train`, `predict`, Neural Cleanse and Algorithm 1
move their inputs to the model's device and hand results back on the CPU, so data and trigger
sets stay CPU tensors everywhere else and files are written from CPU tensors.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .errors import UserError

_override: str | None = None


def set_device(name: str | None) -> None:
    """Choose the device for models built from now on (None: back to $NNLAUNDER_DEVICE / cpu)."""
    global _override
    if name is not None:
        resolve(name)          # validate now, with a clear error
    _override = name


def resolve(name: str) -> torch.device:
    name = name.strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but this machine has no CUDA GPU; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"device {name!r} is not supported; use cpu, cuda, cuda:N or auto")
    return dev


def compute_device() -> torch.device:
    """The device new models are placed on."""
    return resolve(_override or os.environ.get("NNLAUNDER_DEVICE", "cpu"))


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def device_setting() -> str | None:
    """The explicit choice made with `set_device` (None: the environment decides)."""
    return _override


def deterministic(on: bool = True) -> None:
    """Torch's deterministic switches: the same config and seed give the same numbers run to run on
    one machine and device. Set by the CLI and the experiment runner; algorithms without a
    deterministic implementation warn instead of failing (none is used on the CPU path).
    Bit-identity holds per machine and thread count, not across CPU and GPU kernels."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # cuBLAS needs it for determinism
    torch.use_deterministic_algorithms(on, warn_only=True)
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = not on


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed blocks for reuse instead of handing them back to the kernel.

    PyTorch's CPU allocator takes every activation and gradient from malloc and frees it after the
    step. With glibc's defaults, blocks of a few MB are mapped fresh or trimmed away, and the next
    step page-faults them in again: 1190 faults per Neural Cleanse step on the Table 5 MNIST model,
    7.8 ms -> 5.9 ms per step once they are kept (docs/methods.md). Blocks up to 32 MB are then served
    from the heap and the heap is not trimmed, so the process keeps its peak heap for its lifetime.

    Process-wide, so it is called by the entry points (the CLI, the benchmark scripts), never on
    import. Returns False where it does nothing: not glibc, or NNLAUNDER_MALLOC=default.
    """
    if os.environ.get("NNLAUNDER_MALLOC", "").strip().lower() == "default":
        return False
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024) == 1
        return bool(libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1 and ok)
    except (OSError, AttributeError):
        return False
