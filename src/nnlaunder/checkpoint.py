"""Model files: weights as safetensors beside a JSON of metadata. I/O lives here only.

`save_model("runs/x/model", model, meta)` writes `model.safetensors` and `model.json`, each to
a temporary name first and then renamed, so an interrupted write never leaves half a file.
Weights are only ever read from safetensors: nothing in a model file can run code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import UserError
from .models import build


def _umask_mode() -> int:
    """The mode a plain `open()` would give a new file (0666 less the umask); mkstemp's is 0600."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _umask_mode())
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
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def tensor_bytes(x: torch.Tensor) -> bytes:
    """The raw bytes of a tensor of any dtype and shape (0-d included), in row-major order."""
    if x.is_quantized:
        x = x.int_repr()
    flat = x.detach().cpu().contiguous().reshape(-1)   # 0-d -> 1 element: `view` needs a dimension
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of a model's parameters and buffers (names, shapes, dtypes and bytes)."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        x = v.detach().cpu()
        h.update(f"{k}{tuple(x.shape)}{x.dtype}".encode())
        h.update(tensor_bytes(x))
    return h.hexdigest()


TORCH_SUFFIXES = (".pt", ".pth")


def stem(path: str | os.PathLike) -> Path:
    """'runs/a/model', 'runs/a/model.safetensors' or 'runs/a/model.json' -> Path('runs/a/model')."""
    p = Path(path)
    return p.with_suffix("") if p.suffix in (".safetensors", ".json", *TORCH_SUFFIXES) else p


def safe_name(name: str, limit: int = 200, default: str = "unnamed") -> str:
    """A file name that stays inside its folder whatever it was made from: anything but letters, digits,
    '.', '_' and '-' becomes '-', no leading or trailing '.' or '-', at most `limit` characters."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")[:limit] or default


def model_meta(arch: str, dataset: str, num_classes: int, *, seed: int, config: Any = None, scheme: str | None = None,
               scheme_params: dict[str, Any] | None = None, **more: Any) -> dict[str, Any]:
    """The metadata saved beside a model's weights, one shape everywhere: architecture, task, watermark,
    seed and training config (a dataclass or a dict); `more` adds fields (metrics, history, base...)."""
    cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config
    return {"arch": arch, "num_classes": num_classes, "dataset": dataset, "scheme": scheme,
            "scheme_params": scheme_params, "seed": seed, "config": cfg, **more}


def derived_meta(meta: dict[str, Any], **more: Any) -> dict[str, Any]:
    """The metadata of a model made from the model `meta` describes (laundered, fine-tuned, restored): its
    architecture, task and watermark, and `more`."""
    return {**{k: meta.get(k) for k in ("arch", "num_classes", "dataset", "scheme", "scheme_params")}, **more}


def save_model(path: str | os.PathLike, model: nn.Module, meta: dict[str, Any]) -> Path:
    """Write <stem>.safetensors and <stem>.json; `meta` must hold at least `arch`, `num_classes`."""
    for key in ("arch", "num_classes"):
        if key not in meta:
            raise ValueError(f"model metadata needs {key!r}")
    s = stem(path)
    atomic_save_tensors(s.with_suffix(".safetensors"), model.state_dict(), {"format": "pt"})
    atomic_write_json(s.with_suffix(".json"), meta)
    return s.with_suffix(".safetensors")


def model_digest(path: str | os.PathLike) -> str:
    """First 16 hex digits of the SHA-256 of <stem>.safetensors: which weights a result came from."""
    h = hashlib.sha256()
    with open(stem(path).with_suffix(".safetensors"), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


MAX_META_BYTES = 1 << 20


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    p = stem(path).with_suffix(".json")
    if not p.is_file():
        raise UserError(f"missing model metadata {p} (a model is <name>.safetensors + <name>.json)")
    if p.stat().st_size > MAX_META_BYTES:
        raise UserError(f"{p}: {p.stat().st_size} bytes; model metadata may hold at most {MAX_META_BYTES}")
    try:
        meta = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:     # ValueError: also 5000-digit integers
        raise UserError(f"{p}: not valid UTF-8 JSON ({str(e).splitlines()[0][:200]})") from e
    if not isinstance(meta, dict) or "arch" not in meta or "num_classes" not in meta:
        raise UserError(f"{p}: metadata must name 'arch' and 'num_classes'")
    checks = [("arch", isinstance(meta["arch"], str), "a string"),
              ("num_classes", type(meta["num_classes"]) is int and 2 <= meta["num_classes"] <= 100_000,
               "an integer in [2, 100000]"),
              ("dataset", meta.get("dataset") is None or isinstance(meta.get("dataset"), str), "a string"),
              ("scheme", meta.get("scheme") is None or isinstance(meta.get("scheme"), str), "a string or null"),
              ("scheme_params", meta.get("scheme_params") is None or isinstance(meta.get("scheme_params"), dict),
               "a table or null")]
    for field_, ok, want in checks:
        if not ok:
            raise UserError(f"{p}: field {field_!r} must be {want}, got {meta.get(field_)!r:.80}")
    return meta


def load_state(path: str | os.PathLike, allow_torch_load: bool = False) -> dict[str, torch.Tensor]:
    """Read weights. Safetensors always; a PyTorch `.pt`/`.pth` state_dict only with
    `allow_torch_load=True`, and then through `torch.load(weights_only=True)`, whose unpickler
    rebuilds tensors and plain containers and refuses everything else (no code runs)."""
    p = Path(path)
    if p.suffix not in TORCH_SUFFIXES:
        p = stem(p).with_suffix(".safetensors")
        if not p.is_file():
            alt = [stem(p).with_suffix(s) for s in TORCH_SUFFIXES if stem(p).with_suffix(s).is_file()]
            hint = (f"; found {alt[0].name}: pass it with --allow-torch-load to read it as a weights-only state_dict"
                    if alt else "")
            raise UserError(f"missing weights file {p}{hint}")
        try:
            return load_file(str(p))
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{p}: not a readable safetensors file ({e}); only safetensors weights are "
                            "accepted (or a .pt/.pth state_dict with --allow-torch-load)") from e
    if not allow_torch_load:
        raise UserError(f"{p}: PyTorch pickle files can run code when loaded and are refused; convert it to "
                        "safetensors, or pass --allow-torch-load to read it with torch.load(weights_only=True)")
    if not p.is_file():
        raise UserError(f"missing weights file {p}")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:                     # UnpicklingError for refused globals, others for broken files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{p}: refused by the weights-only loader ({first})") from e
    if isinstance(obj, dict):      # a training checkpoint that wraps the state_dict, as published code saves it
        obj = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), obj)
    if not isinstance(obj, dict) or not obj or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise UserError(f"{p}: expected a state_dict (a mapping of names to tensors)")
    return dict(obj)


# Where training scripts keep the weights inside a checkpoint dict, in the order looked for.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "state")


def dtype_kind(t: torch.Tensor) -> str:
    if t.is_complex():
        return "complex"
    if t.is_floating_point():
        return "float"
    return "bool" if t.dtype == torch.bool else "int"


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> nn.Module:
    """Load `state` into `model`, with one clear error when names or shapes do not fit. Names saved from
    a model wrapped in `nn.DataParallel` (every one starting `module.`) are read without that prefix."""
    own = model.state_dict()
    if state and all(k.startswith("module.") for k in state) and not any(k.startswith("module.") for k in own):
        state = {k[len("module."):]: v for k, v in state.items()}
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
    kinds = [k for k in state if dtype_kind(state[k]) != dtype_kind(own[k])]
    if kinds:
        raise UserError(f"{source}: tensors of the wrong kind of dtype "
                        f"{[(k, str(state[k].dtype), str(own[k].dtype)) for k in kinds[:3]]} (name, got, expected)")
    bad = [k for k, v in state.items() if dtype_kind(v) != "int" and not torch.isfinite(v).all()]
    if bad:
        raise UserError(f"{source}: NaN or Inf in {bad[:3]}")
    model.load_state_dict(state)
    return model


def load_model(path: str | os.PathLike, allow_torch_load: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """Build the architecture named in <stem>.json and load <stem>.safetensors into it (or the
    given `.pt`/`.pth` state_dict, only with `allow_torch_load`; see `load_state`)."""
    meta = read_meta(path)
    model = build(meta["arch"], int(meta["num_classes"]))
    src = Path(path) if Path(path).suffix in TORCH_SUFFIXES else stem(path).with_suffix(".safetensors")
    load_into(model, load_state(path, allow_torch_load), str(src))
    model.eval()
    return model, meta
