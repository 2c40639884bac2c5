"""Speed attempts measured by `run.py` and not kept in the library (their rows in perf.md say why):
glibc malloc keeping freed memory, and flushing denormal floats to zero while training."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def flushed_denormals(on: bool) -> Iterator[None]:
    """Treat denormal floats as zero on the CPU inside the block (when `on`)."""
    changed = on and torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if changed:
            torch.set_flush_denormal(False)


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> bool:
    """With NNLAUNDER_MALLOC=keep, ask glibc's malloc to keep freed blocks for reuse instead of
    handing them back to the kernel. Off by default: a measured attempt that was not kept.

    PyTorch's CPU allocator takes every activation and gradient from malloc and frees it after the
    step; freed blocks of a few MB can go back to the kernel and page-fault in again on the next step.
    In a loop of bare Neural Cleanse steps on the Table 5 MNIST model (64 images) keeping them removed
    1190 page faults per step (7.8 -> 5.9 ms), but a whole faithful Neural Cleanse run measured 1.00x
    (perf.md, section malloc): glibc's own adaptive threshold already keeps most of
    them. When on, blocks up to 32 MB are served from the heap and the heap is never trimmed.

    Process-wide, so the benchmark's entry point calls it, never an import.
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
