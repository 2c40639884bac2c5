"""Ship the datasets to a remote accelerator machine whose file transfer is size-limited.

    python benchmarks/remote/ship_data.py pack  --data-dir ../shared/data --out .remote --part-mb 52
    python benchmarks/remote/ship_data.py unpack --src .remote/part1 --data-dir /tmp/data   # on the remote

`pack` splits the data folder into parts of at most --part-mb MB each. CIFAR-10 batches travel
as lossless mosaics with their labels: WebP (17 MB instead of 31 MB each; the default) or PNG
(22 MB); `unpack` rebuilds the
canonical python batches and checks the pixel bytes against the SHA-256 taken here, so the
remote trains on byte-identical data. Other files (MNIST / Fashion-MNIST IDX, Adi's JPEGs)
travel as they are. Dev tooling only: the library never needs it.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import pickle
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR = "cifar10/cifar-10-batches-py"
BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def _mosaic(x: np.ndarray) -> np.ndarray:           # (10000, 3072) -> (3200, 3200, 3)
    return x.reshape(100, 100, 3, 32, 32).transpose(0, 3, 1, 4, 2).reshape(3200, 3200, 3)


def _unmosaic(m: np.ndarray) -> np.ndarray:
    return m.reshape(100, 32, 100, 32, 3).transpose(0, 2, 4, 1, 3).reshape(10000, 3072)


def pack(data_dir: Path, out: Path, part_mb: float, fashion: bool = False, fmt: str = "webp",
         only: list[str] | None = None) -> None:
    from nnlaunder.data.readers import _CifarUnpickler

    items: list[list[tuple[str, bytes]]] = []           # groups of (relative name, payload) kept together
    for b in BATCHES if only is None else [b for b in BATCHES if b in only]:
        d = _CifarUnpickler(io.BytesIO((data_dir / CIFAR / b).read_bytes()), encoding="bytes").load()
        x = np.ascontiguousarray(d[b"data"], dtype=np.uint8)
        buf = io.BytesIO()
        if fmt == "webp":
            Image.fromarray(_mosaic(x)).save(buf, "WEBP", lossless=True, quality=100, method=4)
        else:
            Image.fromarray(_mosaic(x)).save(buf, "PNG", optimize=True)
        meta = {"labels": [int(v) for v in d[b"labels"]], "sha256": hashlib.sha256(x.tobytes()).hexdigest()}
        items.append([(f"cifar/{b}.{fmt}", buf.getvalue()), (f"cifar/{b}.json", json.dumps(meta).encode())])
        print(f"packed {b}: {len(buf.getvalue()) / 1e6:.1f} MB", flush=True)
    for sub in ("mnist", "adi-trigger-set") + (("fashion-mnist",) if fashion else ()) if only is None else ():
        src = data_dir / sub
        if sub == "fashion-mnist" and not src.is_dir():
            src = Path("/usr/share/datasets/fashion-mnist")
        for f in sorted(p for p in src.rglob("*") if p.is_file()):
            items.append([(f"files/{sub}/{f.relative_to(src)}", f.read_bytes())])
    # first-fit decreasing into parts
    parts: list[list[tuple[str, bytes]]] = []
    sizes: list[int] = []
    limit = int(part_mb * 1e6)
    def size(group: list[tuple[str, bytes]]) -> int:
        return sum(len(p) for _, p in group)

    for group in sorted(items, key=lambda g: -size(g)):
        for i, s in enumerate(sizes):
            if s + size(group) <= limit:
                parts[i].extend(group)
                sizes[i] += size(group)
                break
        else:
            parts.append(list(group))
            sizes.append(size(group))
    shutil.rmtree(out, ignore_errors=True)
    for i, part in enumerate(parts, 1):
        for name, payload in part:
            p = out / f"part{i}" / name
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(payload)
        print(f"part{i}: {sizes[i - 1] / 1e6:.1f} MB, {len(part)} files")


def unpack(src: Path, data_dir: Path) -> None:
    for f in sorted((src / "files").rglob("*")) if (src / "files").is_dir() else []:
        if f.is_file():
            dst = data_dir / f.relative_to(src / "files")
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dst)
    cifar = src / "cifar"
    for png in sorted([*cifar.glob("*.png"), *cifar.glob("*.webp")]) if cifar.is_dir() else []:
        meta = json.loads(png.with_suffix(".json").read_text())
        x = np.ascontiguousarray(_unmosaic(np.asarray(Image.open(png).convert("RGB"))))
        if hashlib.sha256(x.tobytes()).hexdigest() != meta["sha256"]:
            sys.exit(f"{png}: pixels differ from the original batch")
        dst = data_dir / CIFAR / png.stem
        dst.parent.mkdir(parents=True, exist_ok=True)
        with open(dst, "wb") as fh:
            pickle.dump({b"data": x, b"labels": meta["labels"]}, fh, protocol=4)
        print(f"unpacked {png.stem} (sha256 ok)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=("pack", "unpack"))
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--out", default=".remote")
    ap.add_argument("--src")
    ap.add_argument("--part-mb", type=float, default=52)
    ap.add_argument("--fashion", action="store_true", help="also ship Fashion-MNIST")
    ap.add_argument("--format", choices=("webp", "png"), default="webp", help="CIFAR-10 mosaic format")
    ap.add_argument("--only", default=None, help="comma list of CIFAR-10 batches to pack (and nothing else)")
    a = ap.parse_args()
    if a.only and not set(a.only.split(",")) <= set(BATCHES):
        ap.error(f"--only names batches among {', '.join(BATCHES)}")
    if a.action == "pack":
        pack(Path(a.data_dir), Path(a.out), a.part_mb, a.fashion, a.format,
             a.only.split(",") if a.only else None)
    else:
        unpack(Path(a.src), Path(a.data_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
