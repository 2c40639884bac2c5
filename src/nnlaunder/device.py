"""Where the tensor work runs.

Everything defaults to the CPU (the machine this project is built for). `NNLAUNDER_DEVICE`
(`cpu`, `cuda`, `cuda:N` or `auto`) or the CLI's `--device` moves models to an accelerator;
the library code then follows the model: `train`, `predict`, Neural Cleanse and Algorithm 1
move their inputs to the model's device and hand results back on the CPU, so data and trigger
sets stay CPU tensors everywhere else and files are written from CPU tensors.
"""

from __future__ import annotations

import copy
import datetime
import functools
import os
import platform
import subprocess
from pathlib import Path

import torch
from torch import nn

from .errors import UserError

_override: str | None = None


@functools.lru_cache(maxsize=8)
def amp_supported(device: torch.device) -> bool:
    """bfloat16 autocast pays off: CUDA with bf16, or a CPU whose oneDNN has native bf16."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def channels_last_runs(model: nn.Module, probe: torch.Tensor) -> bool:
    """Whether `model` takes channels-last images (a speed measure only: the same function). A forward
    that flattens with `.view(len(x), -1)`, common in published code, cannot; then every caller keeps
    the contiguous format. One forward pass without gradients on `probe` (two images suffice) through a
    channels-last copy in eval mode, so the model itself is left as it is."""
    if probe.ndim != 4:
        return False
    try:            # any failure (a model that cannot be copied, too) only means: no channels-last here
        trial = copy.deepcopy(model).eval().to(memory_format=torch.channels_last)
        with torch.no_grad():
            trial(probe.to(model_device(model)).contiguous(memory_format=torch.channels_last))
        return True
    except Exception:
        return False


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


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_name() -> str:
    """The device a result ran on: the GPU's name, else the CPU's model with the threads torch uses."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{cpu_name()} ({torch.get_num_threads() or os.cpu_count()} threads)"


def code_commit(root: Path | None = None, paths: tuple[str, ...] = ("src",)) -> str | None:
    """The git commit of the checkout at `root` (default: the one this package runs from), as a short
    hash with "-dirty" where `paths` (relative to it) differ from it: a result then came from code no
    commit holds. None outside a git checkout (an installed wheel)."""
    if root is None:
        pkg = Path(__file__).resolve().parent
        if pkg.parent.name != "src":
            return None
        root = pkg.parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", *paths], cwd=root, capture_output=True,
                               timeout=30).returncode == 1
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("-dirty" if dirty else "")


def today() -> str:
    return datetime.date.today().isoformat()


def cpu_flags() -> list[str]:
    """The CPU's vector and matrix extensions that decide what pays (Linux /proc/cpuinfo; empty elsewhere)."""
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "amx_int8")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in wanted if f in have]
    except OSError:
        pass
    return []


def cache_dir() -> Path | None:
    """The per-user cache of machine-specific choices (Neural Cleanse's plans, the native kernel's
    build): $NNLAUNDER_CACHE, else ~/.cache/nnlaunder; None where `NNLAUNDER_CACHE=off`."""
    v = os.environ.get("NNLAUNDER_CACHE", "")
    if v.lower() in ("off", "0", "none"):
        return None
    return Path(v) if v else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nnlaunder"
