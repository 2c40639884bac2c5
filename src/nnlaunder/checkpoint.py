"""Model files: weights as safetensors beside a JSON of metadata. I/O lives here only.

`save_model("runs/x/model", model, meta)` writes `model.safetensors` and `model.json`, each to
a temporary name first and then renamed, so an interrupted write never leaves half a file.
Weights are only ever read from safetensors: nothing in a model file can run code.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import UserError
from .models import build


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
                        ) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def stem(path: str | os.PathLike) -> Path:
    """'runs/a/model', 'runs/a/model.safetensors' or 'runs/a/model.json' -> Path('runs/a/model')."""
    p = Path(path)
    return p.with_suffix("") if p.suffix in (".safetensors", ".json") else p


def save_model(path: str | os.PathLike, model: nn.Module, meta: dict[str, Any]) -> Path:
    """Write <stem>.safetensors and <stem>.json; `meta` must hold at least `arch`, `num_classes`."""
    for key in ("arch", "num_classes"):
        if key not in meta:
            raise ValueError(f"model metadata needs {key!r}")
    s = stem(path)
    atomic_save_tensors(s.with_suffix(".safetensors"), model.state_dict(), {"format": "pt"})
    atomic_write_json(s.with_suffix(".json"), meta)
    return s.with_suffix(".safetensors")


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    p = stem(path).with_suffix(".json")
    if not p.is_file():
        raise UserError(f"missing model metadata {p} (a model is <name>.safetensors + <name>.json)")
    try:
        meta = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{p}: not valid JSON ({e})") from e
    if not isinstance(meta, dict) or "arch" not in meta or "num_classes" not in meta:
        raise UserError(f"{p}: metadata must name 'arch' and 'num_classes'")
    return meta


def load_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    p = Path(path)
    if p.suffix != ".safetensors":
        p = stem(p).with_suffix(".safetensors")
    if not p.is_file():
        raise UserError(f"missing weights file {p}")
    try:
        return load_file(str(p))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{p}: not a readable safetensors file ({e}); only safetensors weights are "
                        "accepted") from e


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> nn.Module:
    """Load `state` into `model`, with one clear error when names or shapes do not fit."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}")
        if extra:
            parts.append(f"unexpected {extra[:3]}")
        if wrong:
            parts.append(f"shape mismatch {[(k, tuple(state[k].shape), tuple(own[k].shape)) for k in wrong[:3]]}")
        raise UserError(f"{source}: tensors do not fit the architecture ({'; '.join(parts)})")
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise UserError(f"{source}: NaN or Inf in {bad[:3]}")
    model.load_state_dict(state)
    return model


def load_model(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """Build the architecture named in <stem>.json and load <stem>.safetensors into it."""
    meta = read_meta(path)
    model = build(meta["arch"], int(meta["num_classes"]))
    load_into(model, load_state(path), str(stem(path).with_suffix(".safetensors")))
    model.eval()
    return model, meta
