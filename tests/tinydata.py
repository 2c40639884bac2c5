"""A tiny data folder in the canonical on-disk formats the readers take (IDX, CIFAR-10 python
batches, Adi et al.'s trigger-set layout), so that every command can run end to end in seconds
on any machine. Each class draws a bright blob at its own place, so one epoch learns something.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np


def _images(n: int, shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 10
    rng.shuffle(y)
    x = (rng.random((n, *shape)) * 60).astype(np.uint8)
    h, w = shape[-2:]
    for c in range(10):
        r, q = (c // 5) * (h // 2), (c % 5) * (w // 5)
        x[y == c, ..., r + 2:r + h // 2 - 2, q:q + w // 5] = 230
    return x, y.astype(np.int64)


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    path.write_bytes(gzip.compress(header + arr.astype(np.uint8).tobytes(), mtime=0))


def _write_mnist_like(folder: Path, n_train: int, n_test: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n, s in (("train", n_train, seed), ("t10k", n_test, seed + 1)):
        x, y = _images(n, (28, 28), s)
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", x)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", y)


def _write_cifar(folder: Path, n_per_batch: int, n_test: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for i, name in enumerate(names):
        x, y = _images(n_test if name == "test_batch" else n_per_batch, (3, 32, 32), seed + i)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": x.reshape(len(x), -1), b"labels": y.tolist()}, f, protocol=4)


def _write_adi(folder: Path, n: int, seed: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    (folder / "pics").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(folder / "pics" / f"{i + 1}.jpg")
    (folder / "labels-cifar.txt").write_text("\n".join(str(v) for v in rng.integers(0, 10, n)) + "\n")


def make_tiny_data(root: Path, seed: int = 0) -> Path:
    """Write MNIST / Fashion-MNIST (300 train, 100 test), CIFAR-10 (5 × 60 train, 100 test) and a
    20-image abstract trigger set under `root`; returns `root`."""
    root = Path(root)
    _write_mnist_like(root / "mnist", 300, 100, seed)
    _write_mnist_like(root / "fashion-mnist", 300, 100, seed + 10)
    _write_cifar(root / "cifar10" / "cifar-10-batches-py", 60, 100, seed + 20)
    _write_adi(root / "adi-trigger-set", 20, seed + 30)
    return root
