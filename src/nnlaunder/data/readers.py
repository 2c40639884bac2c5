"""Readers for the canonical dataset files. Every reader returns uint8/int64 numpy arrays.

Errors name the file and say how to get it. The CIFAR-10 python batches are pickles; they are
read with a restricted unpickler that only admits the numpy array reconstruction they contain,
so a tampered batch cannot run code.
"""

from __future__ import annotations

import gzip
import io
import math
import pickle
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np

from ..errors import UserError

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _open_maybe_gz(path: Path) -> bytes:
    candidates = [path, path.with_name(path.name + ".gz")] if path.suffix != ".gz" else [
        path, path.with_suffix("")]
    for p in candidates:
        if p.is_file():
            raw = p.read_bytes()
            if raw[:2] == b"\x1f\x8b":
                try:
                    return gzip.decompress(raw)
                except (OSError, EOFError, zlib.error) as e:
                    raise UserError(f"{p}: corrupt gzip file ({e}); fetch it again") from e
            return raw
    raise FileNotFoundError(path)


def read_idx(path: Path, hint: str = "") -> np.ndarray:
    """Read an IDX file (optionally gzipped), e.g. MNIST's train-images-idx3-ubyte.gz."""
    path = Path(path)
    try:
        raw = _open_maybe_gz(path)
    except FileNotFoundError:
        raise UserError(f"missing dataset file {path}{'; ' + hint if hint else ''}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise UserError(f"{path}: not an IDX file (bad magic number); fetch it again")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = math.prod(shape) * dtype.itemsize          # Python ints: a huge header cannot wrap around
    if len(raw) - header != expected:
        raise UserError(f"{path}: IDX body has {len(raw) - header} bytes, header says {expected}; "
                        "the file is truncated or corrupt")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


class _CifarUnpickler(pickle.Unpickler):
    """Admit only what a CIFAR-10 python batch contains: numpy arrays and builtins."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("builtins", "list"), ("builtins", "dict"),
    }

    def find_class(self, module: str, name: str):  # noqa: D401
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset file")


MAX_CIFAR_BATCH_BYTES = 256 << 20     # a batch is 31 MB; the test batch file read whole


def read_cifar_batch(path: Path, hint: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 python batch -> (N,3,32,32) uint8 images, (N,) int64 labels."""
    path = Path(path)
    hint = hint or ("download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html "
                    "and unpack it into <data-dir>/cifar10/")
    if not path.is_file():
        raise UserError(f"missing dataset file {path}; {hint}")
    if path.stat().st_size > MAX_CIFAR_BATCH_BYTES:
        raise UserError(f"{path}: {path.stat().st_size} bytes, more than a CIFAR-10 batch holds; {hint}")
    try:
        d = _CifarUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
        data, labels = d[b"data"], d[b"labels"]
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise ValueError(f"'data' must be a uint8 array of shape (N, 3072), got "
                             f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}")
        if not isinstance(labels, list | np.ndarray) or not all(type(v) is int or isinstance(v, np.integer)
                                                                  for v in labels):
            raise ValueError("'labels' must be a list of integers")
        x = data.reshape(-1, 3, 32, 32)
        y = np.asarray(labels, dtype=np.int64)
    except (pickle.UnpicklingError, KeyError, ValueError, EOFError, TypeError, AttributeError, OverflowError,
            IndexError, SystemError, MemoryError, RecursionError) as e:   # malformed below the unpickler's checks
        raise UserError(f"{path}: corrupt or unexpected CIFAR-10 batch ({type(e).__name__}: {str(e)[:120]}); "
                        f"{hint}") from None
    if len(x) != len(y) or len(y) == 0 or y.min() < 0 or y.max() > 9:
        raise UserError(f"{path}: images and labels disagree or labels out of range; {hint}")
    return x, y


def read_image_rgb(path: Path, size: int) -> np.ndarray:
    """Read an image file, convert to RGB, resize to size×size (bilinear) -> (3,H,W) uint8."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if path.exists() and not path.is_file():
        raise UserError(f"{path}: not a regular file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im = im.convert("RGB").resize((size, size), Image.BILINEAR)
                return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()
    except FileNotFoundError:
        raise UserError(f"missing image {path}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UserError(f"{path}: refused, its pixel count is over Pillow's decompression-bomb limit ({e})") from e
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable image ({e})") from e
