"""Data from outside the registry: an image folder (one sub-folder per class) or an `.npz`.

    ds = read_external("my_images/")        # my_images/<class>/*.png|jpg|jpeg
    ds = read_external("set.npz")           # x: (N,H,W[,C]) uint8 or float in [0,1]; y: (N,) ints

Both give a `Dataset` like the registered ones: x float32 (N,C,H,W) in [0, 1], y int64.
"""

from __future__ import annotations

import os
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import Dataset
from ..errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


MAX_CLASSES = 100_000
MAX_ARRAY_BYTES = 16 << 30      # an array bigger than this in an .npz is refused before it is allocated
NPZ_DTYPES = "uifb"             # unsigned, signed, float (up to 64-bit), bool: anything else is refused


def check_npz(p: Path) -> None:
    """Refuse, from the headers alone, an .npz that is not a zip of .npy arrays, or whose arrays are of a
    kind the readers do not take (objects, complex, float128, strings) or too big to allocate."""
    if not p.is_file():
        raise UserError(f"{p}: not a regular file")
    if not zipfile.is_zipfile(p):
        raise UserError(f"{p}: not an .npz (a zip of .npy arrays; a single .npy saved under an .npz name?)")
    try:
        with zipfile.ZipFile(p) as z:
            for info in z.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with z.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                        np.lib.format.read_array_header_2_0
                    shape, _, dtype = read(f, max_header_size=10_000)
                name = info.filename[:-4]
                if dtype.kind not in NPZ_DTYPES or dtype.itemsize > 8 or dtype.hasobject:
                    raise UserError(f"{p}: array {name!r} has dtype {dtype}; give uint8 or float32/64 images and "
                                    "integer labels (never pickled objects)")
                size = int(np.prod(shape, dtype=object)) * dtype.itemsize
                if size > MAX_ARRAY_BYTES:
                    raise UserError(f"{p}: array {name!r} declares shape {shape} ({size / 2**30:.3g} GiB); at most "
                                    f"{MAX_ARRAY_BYTES >> 30} GiB is read")
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, SyntaxError, TypeError, NotImplementedError,
            RuntimeError) as e:       # unsupported compression, an encrypted member
        raise UserError(f"{p}: not a readable .npz ({type(e).__name__}: {str(e)[:120]})") from e


def _pixels(im: Any, f: Path) -> np.ndarray:
    """An image's 8-bit pixels: grey or RGB as stored, 16-bit grey scaled to 8 bits (converting it to RGB
    would clip every value above 255 to white), any other mode converted to RGB."""
    if im.mode in ("L", "RGB"):
        return np.asarray(im.copy())
    if im.mode.startswith("I;16"):
        return (np.asarray(im).astype(np.float64) / 257.0).round().astype(np.uint8)
    if im.mode in ("I", "F"):
        raise UserError(f"{f}: {im.mode} (32-bit) pixels have no fixed range; save the images as 8- or 16-bit")
    return np.asarray(im.convert("RGB"))


def read_image_folder(folder: str | os.PathLike) -> Dataset:
    from PIL import Image, UnidentifiedImageError

    root = Path(folder)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise UserError(f"{root}: an image folder needs one sub-folder per class (e.g. {root}/cat/1.png)")
    files: list[tuple[Path, int]] = []
    for k, c in enumerate(classes):
        found = sorted(f for f in (root / c).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        if not found:
            raise UserError(f"{root / c}: no PNG/JPEG images in this class folder")
        files += [(f, k) for f in found]
    images = []
    for f, _ in files:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(f) as im:
                    images.append(_pixels(im, f))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise UserError(f"{f}: refused, its pixel count is over Pillow's decompression-bomb limit ({e})") from e
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise UserError(f"{f}: not a readable image ({e})") from e
    gray = all(a.ndim == 2 for a in images)
    if not gray:      # a mixed folder: grey images become three equal channels
        images = [np.repeat(a[:, :, None], 3, axis=2) if a.ndim == 2 else a for a in images]
    shapes = {a.shape for a in images}
    if len(shapes) != 1:
        raise UserError(f"{root}: images differ in size {sorted(shapes)[:3]}; resize them to one size first")
    x = np.stack(images)
    y = np.array([k for _, k in files], dtype=np.int64)
    return _dataset(root.name, x, y, tuple(classes), str(root))


def read_npz(path: str | os.PathLike) -> Dataset:
    p = Path(path)
    check_npz(p)
    try:
        with np.load(p, allow_pickle=False) as z:
            if "x" not in z or "y" not in z:
                raise UserError(f"{p}: an .npz needs arrays 'x' (images) and 'y' (labels), has {sorted(z.files)}")
            x, y = _native(z["x"]), _native(z["y"])
            classes = tuple(str(c) for c in z["classes"]) if "classes" in z else None
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, NotImplementedError, RuntimeError) as e:
        raise UserError(f"{p}: not a readable .npz without pickled objects ({e})") from e
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise UserError(f"{p}: 'y' must be a 1-D integer array, got {y.dtype} {y.shape}")
    if y.size and y.min() < 0:
        raise UserError(f"{p}: labels must be >= 0")
    n = int(y.max()) + 1 if y.size else 0
    if n > MAX_CLASSES:
        raise UserError(f"{p}: labels go up to {n - 1}; at most {MAX_CLASSES} classes are supported")
    if classes is not None and len(classes) < n:
        raise UserError(f"{p}: 'classes' names {len(classes)} classes but labels go up to {n - 1}")
    return _dataset(p.stem, x, y.astype(np.int64), classes or tuple(str(i) for i in range(n)), str(p))


def _native(a: np.ndarray) -> np.ndarray:
    """The array in this machine's byte order (an .npz written big-endian reads the same)."""
    return a.astype(a.dtype.newbyteorder("=")) if a.dtype.byteorder not in ("=", "|") else a


def read_external(path: str | os.PathLike) -> Dataset:
    """An image folder or an .npz, chosen by what the path is."""
    p = Path(path)
    if p.is_dir():
        return read_image_folder(p)
    if p.suffix == ".npz" and p.is_file():
        return read_npz(p)
    if not p.exists():
        raise UserError(f"{p} does not exist")
    raise UserError(f"{p}: data must be an image folder (one sub-folder per class) or an .npz file")


def _dataset(name: str, x: np.ndarray, y: np.ndarray, classes: tuple[str, ...], where: str) -> Dataset:
    if x.ndim == 3:
        x = x[:, :, :, None]
    if x.ndim != 4 or x.shape[3] not in (1, 3):
        raise UserError(f"{where}: images must be (N,H,W) or (N,H,W,C) with C 1 or 3, got {x.shape}")
    if len(x) != len(y):
        raise UserError(f"{where}: {len(x)} images but {len(y)} labels")
    if len(x) == 0:
        raise UserError(f"{where}: no images")
    if x.dtype == np.uint8:
        t = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(torch.float32).div_(255.0)
    elif np.issubdtype(x.dtype, np.floating):
        if not np.isfinite(x).all():
            raise UserError(f"{where}: images contain NaN or Inf")
        if x.min() < 0 or x.max() > 1:
            raise UserError(f"{where}: float images must be in [0, 1] (got {x.min():.3g}..{x.max():.3g}); "
                            "give uint8 pixels or scale them")
        t = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(torch.float32)
    else:
        raise UserError(f"{where}: images must be uint8 or float, got {x.dtype}")
    return Dataset(name, t, torch.from_numpy(y), classes)
