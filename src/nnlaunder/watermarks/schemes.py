"""Watermark schemes: how trigger inputs are made. One registry (`SCHEMES`).

Every scheme returns a `Watermark`: an embedding set (trigger inputs + watermark labels that
the owner mixes into training) and a separate verification set drawn from data never used in
training (the test split, or for `zhang-unrelated` the other domain's test split). The one
exception is `adi`, whose 100 abstract images are both: that is Adi et al.'s protocol (the
trigger set is the owner's secret key), and only 100 exist.

Pixel values stay in [0, 1]; stamping happens in pixel space.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .. import data as D
from ..config import from_dict
from ..errors import UserError
from .font import text_mask


@dataclass(frozen=True)
class Watermark:
    scheme: str
    embed_x: torch.Tensor      # (M,C,H,W) in [0,1], mixed into the owner's training data
    embed_y: torch.Tensor      # (M,) watermark labels
    verify_x: torch.Tensor     # (V,C,H,W) held-out trigger inputs
    verify_y: torch.Tensor     # (V,) watermark labels
    target: int | None         # the single target class, or None (adi: random labels)
    params: dict[str, Any]
    # Zhang et al.'s content and noise schemes only: the pure function that turns clean images
    # into trigger inputs, and which training images the embedding set was made from.
    stamp: Callable[[torch.Tensor], torch.Tensor] | None = dataclasses.field(default=None, repr=False)
    embed_index: torch.Tensor | None = dataclasses.field(default=None, repr=False)
    # The verification inputs without their trigger (content and noise: the same test images unstamped),
    # for the verdict's paired test of the trigger's effect beyond the model's base rate.
    control_x: torch.Tensor | None = dataclasses.field(default=None, repr=False)


# --------------------------------------------------------------------------------------------
# Parameters (typed; unknown keys are errors)
@dataclass(frozen=True)
class ContentParams:
    target: int = 0                 # MNIST "0", CIFAR-10 "airplane"
    text: str = "TEST"
    position: tuple[int, int] | None = None   # (row, col) of the text's top-left; None: bottom centre
    scale: int = 1
    color: tuple[float, ...] = (1.0,)         # one value (grey) or one per channel
    n_embed: int | None = None                # None: 1% of the training set
    n_verify: int | None = None               # None: every non-target test image
    seed: int = 0


@dataclass(frozen=True)
class NoiseParams:
    target: int = 0
    std: float = 0.4
    n_embed: int | None = None
    n_verify: int | None = None
    seed: int = 0


@dataclass(frozen=True)
class UnrelatedParams:
    target: int = 0
    source: str | None = None       # None: fashion-mnist for 1-channel models, mnist for 3-channel
    source_class: int | None = None  # None: 0 ("t-shirt/top") for fashion-mnist, 1 for mnist
    n_embed: int | None = None      # None: every training image of the source class, at most 10% of the task's
    n_verify: int | None = None
    seed: int = 0


@dataclass(frozen=True)
class AdiParams:
    mode: str = "fs"                # "fs": from scratch; "pt": fine-tune a clean pre-trained model
    k: int = 2                      # trigger images appended to every batch (Adi et al.'s code)


# --------------------------------------------------------------------------------------------
# Pure stamping functions
def stamp_content(x: torch.Tensor, mask: torch.Tensor, color: torch.Tensor, row: int, col: int
                  ) -> torch.Tensor:
    """Paint `mask` (h,w in {0,1}) in `color` (C,) onto x (N,C,H,W) at (row, col)."""
    h, w = mask.shape
    out = x.clone()
    region = out[:, :, row:row + h, col:col + w]
    m = mask.view(1, 1, h, w)
    out[:, :, row:row + h, col:col + w] = region * (1 - m) + color.view(1, -1, 1, 1) * m
    return out


def add_noise(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x + noise (C,H,W), clipped to [0, 1]."""
    return (x + noise.unsqueeze(0)).clamp_(0.0, 1.0)


def noise_pattern(shape: tuple[int, int, int], std: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * std


def to_shape(x: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """Fit images (N,C,H,W) to (C,H,W): centre zero-pad or bilinear resize; grey<->RGB."""
    c, h, w = shape
    if x.shape[1] != c:
        x = x.mean(1, keepdim=True) if c == 1 else x.expand(-1, c, -1, -1)
    hh, ww = x.shape[2:]
    if (hh, ww) != (h, w):
        if hh <= h and ww <= w and (h - hh) % 2 == 0 and (w - ww) % 2 == 0:
            ph, pw = (h - hh) // 2, (w - ww) // 2
            x = F.pad(x, (pw, pw, ph, ph))
        else:
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    return x.contiguous()


# --------------------------------------------------------------------------------------------
def _check_target(target: int, ds: D.Dataset) -> None:
    if not 0 <= target < ds.num_classes:
        raise UserError(f"target class {target} is out of range for {ds.name} (0-{ds.num_classes - 1})")


def _pick(n_avail: int, n: int | None, default: int, seed: int, what: str) -> torch.Tensor:
    n = default if n is None else n
    if n < 1:
        raise UserError(f"{what} must be >= 1, got {n}")
    if n > n_avail:
        raise UserError(f"{what} = {n} but only {n_avail} source images exist")
    g = torch.Generator().manual_seed(seed)
    return torch.sort(torch.randperm(n_avail, generator=g)[:n]).values


def _sources(train: D.Dataset, test: D.Dataset, target: int, p: Any
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Non-target training images to stamp for embedding; non-target test images to verify;
    the embedding images' indices in the training set."""
    tr = torch.nonzero(train.y != target).flatten()
    te = torch.nonzero(test.y != target).flatten()
    ei = tr[_pick(len(tr), p.n_embed, round(0.01 * len(train)), p.seed, "n_embed")]
    vi = te[_pick(len(te), p.n_verify, len(te), p.seed + 1, "n_verify")]
    return train.x[ei], test.x[vi], ei


def zhang_content(train: D.Dataset, test: D.Dataset, data_dir: Path | None, p: ContentParams) -> Watermark:
    _check_target(p.target, train)
    check_params("zhang-content", p, train.shape, train.num_classes)
    c, h, w = train.shape
    mask, (row, col) = text_mask(p.text, p.scale), _text_place(p, train.shape)
    color = torch.tensor(p.color, dtype=torch.float32).expand(c).clone()
    ex, vx, ei = _sources(train, test, p.target, p)

    def stamp(x: torch.Tensor) -> torch.Tensor:
        return stamp_content(x, mask, color, row, col)

    return Watermark("zhang-content", stamp(ex), torch.full((len(ex),), p.target), stamp(vx),
                     torch.full((len(vx),), p.target), p.target,
                     {**dataclasses.asdict(p), "position": [row, col]}, stamp, ei, vx)


def zhang_noise(train: D.Dataset, test: D.Dataset, data_dir: Path | None, p: NoiseParams) -> Watermark:
    _check_target(p.target, train)
    check_params("zhang-noise", p, train.shape, train.num_classes)
    noise = noise_pattern(train.shape, p.std, p.seed)
    ex, vx, ei = _sources(train, test, p.target, p)

    def stamp(x: torch.Tensor) -> torch.Tensor:
        return add_noise(x, noise)

    return Watermark("zhang-noise", stamp(ex), torch.full((len(ex),), p.target), stamp(vx),
                     torch.full((len(vx),), p.target), p.target, dataclasses.asdict(p), stamp, ei, vx)


def zhang_unrelated(train: D.Dataset, test: D.Dataset, data_dir: Path | None, p: UnrelatedParams
                    ) -> Watermark:
    """Images of one class of another domain, all labelled `target`.

    Departure from the paper: its MNIST model used EMNIST's letter "m", which is not available
    offline; we use Fashion-MNIST (default class 0, "t-shirt/top"). CIFAR-10 uses MNIST "1"
    as in the paper, zero-padded to 32×32 and copied to 3 channels.
    """
    _check_target(p.target, train)
    source = p.source or ("fashion-mnist" if train.shape[0] == 1 else "mnist")
    if source == train.name:
        raise UserError(f"the unrelated source must be another dataset than {train.name}")
    cls = p.source_class if p.source_class is not None else (0 if source == "fashion-mnist" else 1)
    src_tr, src_te = D.load(source, data_dir, "train"), D.load(source, data_dir, "test")
    if not 0 <= cls < src_tr.num_classes:
        raise UserError(f"source_class {cls} is out of range for {source}")
    tr = torch.nonzero(src_tr.y == cls).flatten()
    te = torch.nonzero(src_te.y == cls).flatten()
    ex = src_tr.x[tr[_pick(len(tr), p.n_embed, min(len(tr), round(0.1 * len(train))), p.seed, "n_embed")]]
    vx = src_te.x[te[_pick(len(te), p.n_verify, len(te), p.seed + 1, "n_verify")]]
    ex, vx = to_shape(ex, train.shape), to_shape(vx, train.shape)
    return Watermark("zhang-unrelated", ex, torch.full((len(ex),), p.target), vx,
                     torch.full((len(vx),), p.target), p.target,
                     {**dataclasses.asdict(p), "source": source, "source_class": cls})


def adi(train: D.Dataset, test: D.Dataset, data_dir: Path | None, p: AdiParams) -> Watermark:
    """Adi et al.'s 100 abstract images with their (random) labels; embedding = verification."""
    if p.mode not in ("fs", "pt"):
        raise UserError(f"adi mode must be 'fs' (from scratch) or 'pt' (pre-trained), got {p.mode!r}")
    if p.k < 1:
        raise UserError(f"adi k must be >= 1, got {p.k}")
    ts = D.load_adi_trigger_set(data_dir, size=train.shape[2])
    x = to_shape(ts.x, train.shape)
    if int(ts.y.max()) >= train.num_classes:
        raise UserError(f"the trigger labels go up to {int(ts.y.max())} but {train.name} has "
                        f"{train.num_classes} classes")
    return Watermark("adi", x, ts.y.clone(), x, ts.y.clone(), None, dataclasses.asdict(p))


MAX_SEED = 2**63 - 1
MAX_SCALE = 16


def _text_place(p: ContentParams, shape: tuple[int, int, int]) -> tuple[int, int]:
    """The text's top-left (row, col): as given, else bottom centre."""
    mh, mw = text_mask(p.text, p.scale).shape
    _, h, w = shape
    return tuple(p.position) if p.position is not None else (h - mh - 2, (w - mw) // 2)  # type: ignore[return-value]


def check_params(name: str, params: Any, shape: tuple[int, int, int], num_classes: int) -> None:
    """What the scheme's builder would refuse, checked without any data (an experiment's dry run): seeds
    and counts in range, the text drawable and inside the image, a positive finite noise level."""
    for f in ("seed", "n_embed", "n_verify", "k"):
        v = getattr(params, f, None)
        if v is not None and not (0 if f == "seed" else 1) <= v <= MAX_SEED:
            raise UserError(f"{f}: must be in [{0 if f == 'seed' else 1}, 2^63), got {v}")
    target = getattr(params, "target", None)
    if target is not None and not 0 <= target < num_classes:
        raise UserError(f"target: {target} is not a class (0-{num_classes - 1})")
    if isinstance(params, ContentParams):
        if not 1 <= params.scale <= MAX_SCALE:
            raise UserError(f"scale: must be in [1, {MAX_SCALE}], got {params.scale}")
        mh, mw = text_mask(params.text, params.scale).shape
        c, h, w = shape
        row, col = _text_place(params, shape)
        if row < 0 or col < 0 or row + mh > h or col + mw > w:
            raise UserError(f"text {params.text!r} ({mh}×{mw} px) at {(row, col)} does not fit a {h}×{w} image")
        if len(params.color) not in (1, c) or not all(0 <= v <= 1 for v in params.color):
            raise UserError(f"color must be 1 or {c} values in [0, 1], got {params.color}")
    if isinstance(params, NoiseParams) and not (math.isfinite(params.std) and 0 < params.std <= 10):
        raise UserError(f"std: the noise level must be in (0, 10], got {params.std}")


@dataclass(frozen=True)
class SchemeSpec:
    make: Callable[..., Watermark]
    params: type
    summary: str


SCHEMES: dict[str, SchemeSpec] = {
    "zhang-content": SchemeSpec(zhang_content, ContentParams, 'text "TEST" drawn on other classes -> target'),
    "zhang-noise": SchemeSpec(zhang_noise, NoiseParams, "one fixed Gaussian noise pattern added -> target"),
    "zhang-unrelated": SchemeSpec(zhang_unrelated, UnrelatedParams, "another domain's images -> target"),
    "adi": SchemeSpec(adi, AdiParams, "Adi et al.'s 100 abstract images with random labels (fs / pt)"),
}


def scheme_spec(name: str) -> SchemeSpec:
    if name not in SCHEMES:
        raise UserError(f"unknown scheme {name!r}; choose from {', '.join(SCHEMES)}")
    return SCHEMES[name]


def make_watermark(name: str, train: D.Dataset, test: D.Dataset, data_dir: Path | str | None = None,
                   params: dict[str, Any] | None = None) -> Watermark:
    """Build scheme `name`'s embedding and verification sets for the task (train, test)."""
    s = scheme_spec(name)
    p = from_dict(s.params, params or {}, f"{name} parameters")
    return s.make(train, test, data_dir, p)
