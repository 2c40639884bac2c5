"""What every benchmark script shares: the machine and commit a row names, and the rate interval."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import torch

from nnlaunder.device import cpu_name
from nnlaunder.watermarks.verify import wilson

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

__all__ = ["ROOT", "RESULTS", "machine", "commit", "wilson"]


def machine() -> str:
    """The device a row ran on: the GPU's name, else the CPU's model with the threads torch uses."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{cpu_name()} ({torch.get_num_threads() or os.cpu_count()} threads)"


def commit() -> str:
    """The checked-out commit (short hash)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
