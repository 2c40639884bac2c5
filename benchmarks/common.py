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


def comma_list(s: str | None) -> list[str] | None:
    """"a, b" -> ["a", "b"]; None or "" -> None."""
    out = [x.strip() for x in (s or "").split(",") if x.strip()]
    return out or None


def owner_models(ds: str, rows, only: list[str] | None, tr, te, data_dir):
    """For each (name, extra) of `rows` (all, or the names in `only`) whose model exists under
    models/<ds>/: (name, extra, model, meta, model sha, the owner's watermark)."""
    from nnlaunder.checkpoint import load_model, model_digest
    from nnlaunder.watermarks.schemes import make_watermark

    for name, extra in rows:
        if only and name not in only:
            continue
        path = ROOT / "models" / ds / name
        if not path.with_suffix(".safetensors").is_file():
            print(f"{ds}/{name}: no model yet, skipped", flush=True)
            continue
        model, meta = load_model(path)
        wm = make_watermark(meta["scheme"], tr, te, data_dir, meta.get("scheme_params") or {})
        yield name, extra, model, meta, model_digest(path), wm


def add_common_flags(ap) -> None:
    """--seed, --models and --markdown-only, as the sweep scripts take them."""
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--models", default=None, help="comma list of owner models (default: all of the dataset)")
    ap.add_argument("--markdown-only", action="store_true", help="rewrite the Markdown and plots from the JSON")
