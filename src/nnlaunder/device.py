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
    """With NNLAUNDER_MALLOC=keep, ask glibc's malloc to keep freed blocks for reuse instead of
    handing them back to the kernel. Off by default: a measured attempt that was not kept.

    PyTorch's CPU allocator takes every activation and gradient from malloc and frees it after the
    step; freed blocks of a few MB can go back to the kernel and page-fault in again on the next step.
    In a loop of bare Neural Cleanse steps on the Table 5 MNIST model (64 images) keeping them removed
    1190 page faults per step (7.8 -> 5.9 ms), but a whole faithful Neural Cleanse run measured 1.00x
    (benchmarks/results/perf.md, section malloc): glibc's own adaptive threshold already keeps most of
    them. When on, blocks up to 32 MB are served from the heap and the heap is never trimmed.

    Process-wide, so the entry points (the CLI, the benchmark scripts) call it, never an import.
    Returns whether it changed anything (False unless asked, and off glibc Linux).
    """
    mode = os.environ.get("NNLAUNDER_MALLOC", "").strip().lower()
    if mode not in ("", "default", "keep"):
        import sys
        print(f"nnlaunder: NNLAUNDER_MALLOC={mode!r} is not 'keep' or 'default'; using glibc's defaults",
              file=sys.stderr)
    if mode != "keep":
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
