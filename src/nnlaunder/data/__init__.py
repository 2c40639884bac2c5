"""Datasets as in-memory tensors: pixels float32 in [0, 1], NCHW, labels int64.

One registry (`DATASETS`) that the CLI and configs share. Readers live in `readers.py`; this
module turns their arrays into `Dataset`s and draws seeded, stratified subsets.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .readers import read_cifar_batch, read_idx, read_image_rgb

SPLITS = ("train", "test")
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class Dataset:
    """Images `x` (N,C,H,W) float32 in [0,1] and labels `y` (N,) int64."""

    name: str
    x: torch.Tensor
    y: torch.Tensor
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.x.ndim != 4 or self.y.ndim != 1 or len(self.x) != len(self.y):
            raise ValueError(f"Dataset {self.name}: x {tuple(self.x.shape)} / y {tuple(self.y.shape)}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])  # type: ignore[return-value]

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx: torch.Tensor | np.ndarray, name: str | None = None) -> Dataset:
        idx = torch.as_tensor(idx, dtype=torch.long)
        return Dataset(name or self.name, self.x[idx], self.y[idx], self.classes)


def to_float(images: np.ndarray) -> torch.Tensor:
    """uint8 (N,C,H,W) or (N,H,W) -> float32 (N,C,H,W) in [0, 1]."""
    t = torch.from_numpy(np.require(images, requirements=["C", "W"]))
    if t.ndim == 3:
        t = t.unsqueeze(1)
    return t.to(torch.float32).div_(255.0)


def default_data_dir() -> Path:
    """$NNLAUNDER_DATA, else ../shared/data where it exists, else the per-user cache
    ($XDG_CACHE_HOME/nnlaunder/data, by default ~/.cache/nnlaunder/data)."""
    env = os.environ.get("NNLAUNDER_DATA")
    if env:
        return Path(env).expanduser()
    shared = Path("..") / "shared" / "data"
    if shared.is_dir():
        return shared.resolve()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "nnlaunder" / "data"


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """The data folder: the argument, else `default_data_dir()`. A folder named by the argument or
    by $NNLAUNDER_DATA must exist; the default cache may not exist yet (`nnlaunder data fetch`
    creates it, and a missing dataset's error names that command)."""
    if data_dir not in (None, ""):
        path = Path(data_dir).expanduser()  # type: ignore[arg-type]
    else:
        path = default_data_dir()
        if not os.environ.get("NNLAUNDER_DATA"):
            return path
    if not path.is_dir():
        raise UserError(f"data folder {path} does not exist (`nnlaunder data fetch --data-dir {path}` creates it)")
    return path


# --------------------------------------------------------------------------------------------
# Readers per dataset
MNIST_CLASSES = tuple(str(i) for i in range(10))
FASHION_CLASSES = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                   "sneaker", "bag", "ankle boot")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")


def _idx_pair(folder: Path, split: str, hint: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    x = read_idx(folder / f"{prefix}-images-idx3-ubyte.gz", hint)
    y = read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", hint)
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y) or len(y) == 0:
        raise UserError(f"{folder}: {prefix} images {x.shape} and labels {y.shape} do not match")
    if x.dtype != np.uint8 or y.dtype != np.uint8:
        raise UserError(f"{folder}: {prefix} images and labels must be unsigned bytes (IDX type 0x08), got "
                        f"{x.dtype} / {y.dtype}")
    if int(y.max()) > 9:
        raise UserError(f"{folder}: {prefix} labels go up to {int(y.max())}; this dataset has 10 classes (0-9)")
    return x, y.astype(np.int64)


def load_mnist(data_dir: Path, split: str) -> Dataset:
    hint = "run `nnlaunder data fetch mnist` (or put MNIST's four IDX files in <data-dir>/mnist/)"
    x, y = _idx_pair(Path(data_dir) / "mnist", split, hint)
    return Dataset("mnist", to_float(x), torch.from_numpy(y), MNIST_CLASSES)


def fashion_mnist_dir(data_dir: Path) -> Path:
    """<data-dir>/fashion-mnist where it holds files (a failed fetch may leave it empty), else Debian's copy."""
    local = Path(data_dir) / "fashion-mnist"
    return local if local.is_dir() and any(local.glob("*-ubyte.gz")) else FASHION_MNIST_SYSTEM_DIR


def load_fashion_mnist(data_dir: Path, split: str) -> Dataset:
    hint = ("run `nnlaunder data fetch fashion-mnist`, or `apt-get install dataset-fashion-mnist` (puts the IDX "
            f"files in {FASHION_MNIST_SYSTEM_DIR})")
    x, y = _idx_pair(fashion_mnist_dir(data_dir), split, hint)
    return Dataset("fashion-mnist", to_float(x), torch.from_numpy(y), FASHION_CLASSES)


CIFAR_HINT = ("run `nnlaunder data fetch cifar10` (or unpack cifar-10-python.tar.gz of "
              "https://www.cs.toronto.edu/~kriz/cifar.html into <data-dir>/cifar10/)")


def load_cifar10(data_dir: Path, split: str) -> Dataset:
    folder = Path(data_dir) / "cifar10" / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    parts = [read_cifar_batch(folder / n, CIFAR_HINT) for n in names]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    return Dataset("cifar10", to_float(x), torch.from_numpy(y), CIFAR10_CLASSES)


DATASETS: dict[str, Callable[[Path, str], Dataset]] = {
    "mnist": load_mnist,
    "fashion-mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
}

SHAPES = {"mnist": (1, 28, 28), "fashion-mnist": (1, 28, 28), "cifar10": (3, 32, 32)}
MIN_TRAIN_PER_CLASS = {"mnist": 5421, "fashion-mnist": 6000, "cifar10": 5000}   # the smallest class's images
NUM_CLASSES = {"mnist": len(MNIST_CLASSES), "fashion-mnist": len(FASHION_CLASSES), "cifar10": len(CIFAR10_CLASSES)}

_CACHE: dict[tuple[str, str, str], Dataset] = {}


def load(name: str, data_dir: str | os.PathLike | None, split: str = "train") -> Dataset:
    """Load a registered dataset split (cached in memory for the life of the process)."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    root = resolve_data_dir(data_dir)
    key = (name, str(root), split)
    if key not in _CACHE:
        _CACHE[key] = DATASETS[name](root, split)
    return _CACHE[key]


MAX_TRIGGERS = 10_000
_DECIMAL = re.compile(r"[+]?\d{1,20}(\.\d{1,40})?([eE][+-]?\d{1,3})?")


def load_adi_trigger_set(data_dir: str | os.PathLike | None, size: int = 32) -> Dataset:
    """Adi et al.'s 100 abstract images (pics/1.jpg..100.jpg) and labels-cifar.txt."""
    folder = resolve_data_dir(data_dir) / "adi-trigger-set"
    hint = "run `nnlaunder data fetch adi-trigger-set` (Adi et al.'s data/trigger_set/ of adiyoss/WatermarkNN)"
    labels_path = folder / "labels-cifar.txt"
    if not labels_path.is_file():
        raise UserError(f"missing trigger labels {labels_path}; {hint}")
    if labels_path.stat().st_size > 1 << 20:
        raise UserError(f"{labels_path}: {labels_path.stat().st_size} bytes; a trigger set's labels fit in far less")
    try:
        words = labels_path.read_text(encoding="utf-8").split()
    except UnicodeDecodeError as e:
        raise UserError(f"{labels_path}: not UTF-8 text ({e})") from None
    if len(words) > MAX_TRIGGERS:
        raise UserError(f"{labels_path}: {len(words)} labels; at most {MAX_TRIGGERS} trigger images are read")
    values = [float(w) if _DECIMAL.fullmatch(w) else math.nan for w in words]   # the file writes 6.000e+00
    bad = next((w for w, v in zip(words, values, strict=True) if not (v.is_integer() and 0 <= v <= 9)), None)
    if bad is not None or not words:    # "inf", "1e400", "1.5", "-1", "nan": not a class index
        raise UserError(f"{labels_path}: labels must be class indices 0-9, one per line; got {bad!r:.40}")
    labels = [int(v) for v in values]
    images = np.stack([read_image_rgb(folder / "pics" / f"{i + 1}.jpg", size)
                       for i in range(len(labels))])
    return Dataset("adi-trigger-set", to_float(images), torch.tensor(labels, dtype=torch.long),
                   CIFAR10_CLASSES)


# --------------------------------------------------------------------------------------------
# Subsets
def stratified_indices(y: torch.Tensor, *, fraction: float | None = None,
                       per_class: int | None = None, seed: int = 0) -> torch.Tensor:
    """Seeded stratified sample of indices: by `fraction` of all (classes in proportion,
    largest-remainder rounding) or `per_class` images per class. Sorted indices."""
    if (fraction is None) == (per_class is None):
        raise UserError("give exactly one of fraction or per_class")
    y = torch.as_tensor(y)
    classes, counts = torch.unique(y, return_counts=True)
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise UserError(f"fraction must be in (0, 1], got {fraction}")
        total = round(fraction * len(y))
        exact = counts.double() * total / len(y)
        want = exact.floor().long()
        order = torch.argsort(exact - want.double(), descending=True, stable=True)
        want[order[: total - int(want.sum())]] += 1
    else:
        if per_class < 1:
            raise UserError(f"per_class must be >= 1, got {per_class}")
        want = torch.full_like(counts, per_class)
    if bool((want > counts).any()):
        raise UserError(f"asked for {want.tolist()} images per class but only {counts.tolist()} exist")
    g = torch.Generator().manual_seed(seed)
    picked = []
    for c, n in zip(classes.tolist(), want.tolist(), strict=True):
        members = torch.nonzero(y == c).flatten()
        picked.append(members[torch.randperm(len(members), generator=g)[:n]])
    return torch.sort(torch.cat(picked)).values


def disjoint_split(ds: Dataset, fraction: float, seed: int = 0) -> tuple[Dataset, Dataset]:
    """(a stratified, seeded `fraction` of `ds`, the rest of it): two disjoint parts that cover `ds`
    (the persistence threat's fine-tuning split and the owner's own data)."""
    if not 0 < fraction < 1:
        raise UserError(f"a split must be a fraction in (0, 1), got {fraction}")
    idx = stratified_indices(ds.y, fraction=fraction, seed=seed)
    rest = torch.ones(len(ds), dtype=torch.bool)
    rest[idx] = False
    return ds.subset(idx, f"{ds.name}[split]"), ds.subset(torch.nonzero(rest).flatten(), f"{ds.name}[rest]")


_PER_CLASS = re.compile(r"^\s*(\d+)\s*/\s*class\s*$")


@dataclass(frozen=True)
class Budget:
    """How much clean labelled data the attacker holds: a `fraction` of the training set in (0, 1], or
    `per_class` images of each class. One spelling everywhere: 0.006, or "5/class"."""
    fraction: float | None = None
    per_class: int | None = None

    def __post_init__(self) -> None:
        if (self.fraction is None) == (self.per_class is None):
            raise UserError("a budget is a fraction of the training set or N images per class, exactly one")
        if self.fraction is not None and not (isinstance(self.fraction, int | float) and 0 < self.fraction <= 1):
            raise UserError(f"budget: expected a fraction in (0, 1] or 'N/class', got {self.fraction!r}")
        if self.per_class is not None and not (isinstance(self.per_class, int) and self.per_class >= 1):
            raise UserError(f"budget: expected N >= 1 images per class, got {self.per_class!r}")

    @classmethod
    def parse(cls, value: float | int | str, dataset: str | None = None) -> Budget:
        """0.006, "0.006" or "5/class"; with `dataset`, a per-class budget must fit its smallest class."""
        if isinstance(value, str):
            m = _PER_CLASS.match(value)
            if m:
                most = MIN_TRAIN_PER_CLASS.get(dataset or "")
                if most is not None and int(m.group(1)) > most:
                    raise UserError(f"budget: {value!r} asks for more images per class than {dataset}'s smallest "
                                    f"class holds ({most})")
                return cls(per_class=int(m.group(1)))
            try:
                value = float(value)
            except ValueError:
                raise UserError(f"budget: expected a fraction in (0, 1] or 'N/class', got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise UserError(f"budget: expected a fraction in (0, 1] or 'N/class', got {value!r}")
        return cls(fraction=float(value))

    def kwargs(self) -> dict[str, float | int]:
        """{"fraction": f} or {"per_class": n}, as `stratified_subset` takes them."""
        return {"fraction": self.fraction} if self.fraction is not None else {"per_class": int(self.per_class or 0)}

    def __str__(self) -> str:
        return f"{self.per_class}/class" if self.per_class is not None else f"{self.fraction:g}"


def stratified_subset(ds: Dataset, *, fraction: float | None = None, per_class: int | None = None,
                      seed: int = 0) -> Dataset:
    idx = stratified_indices(ds.y, fraction=fraction, per_class=per_class, seed=seed)
    return ds.subset(idx, f"{ds.name}[{len(idx)}]")
