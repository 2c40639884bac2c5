"""The decision rules of the benchmark scripts, on synthetic rows (no training)."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import cifar_decided as cd  # noqa: E402

from nnlaunder.data import Dataset  # noqa: E402
from nnlaunder.watermarks.schemes import Watermark  # noqa: E402


def _rows(name, arm, outcomes):
    return [{"row": name, "arm": arm, "seed": s, "outcome": o} for s, o in enumerate(outcomes)]


def test_the_cifar10_verdict_rule():
    """reproduced: an arm within the paper's method removes on more than half its seeds; costlier: only
    an arm beyond it; the oracle and the control never decide."""
    rows = _rows("r", "oracle", ["removed"] * 3) + _rows("r", "reinit-half-only", ["removed"] * 3)
    assert cd.decide(rows, "r") == ("not-reproduced", [])
    rows += _rows("r", "strong", ["removed", "kept", "destroyed"])            # 1 of 3: not more than half
    assert cd.decide(rows, "r")[0] == "not-reproduced"
    rows += _rows("r", "reinit-half", ["removed", "removed", "kept"])
    assert cd.decide(rows, "r") == ("costlier", ["reinit-half"])
    rows += _rows("r", "ct1-top3", ["removed", "removed", "removed"])
    assert cd.decide(rows, "r") == ("reproduced", ["ct1-top3"])


def test_the_oracle_gets_the_owners_true_trigger_images():
    clean = Dataset("toy", torch.rand(7, 1, 4, 4), torch.arange(7) % 2, ("a", "b"))
    stamp = lambda x: x.clamp(max=0.5)  # noqa: E731
    wm = Watermark("zhang-content", torch.zeros(3, 1, 4, 4), torch.zeros(3), torch.zeros(2, 1, 4, 4),
                   torch.zeros(2), 0, {}, stamp)
    (img,) = cd.oracle_images(wm, clean)
    assert torch.equal(img, stamp(clean.x))                    # the attacker's images with the owner's stamp
    trig = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 1, 4, 4)
    adi = Watermark("adi", trig, torch.zeros(3), trig, torch.zeros(3), None, {})
    (img,) = cd.oracle_images(adi, clean)
    assert len(img) == 7 and [float(v) for v in img[:, 0, 0, 0]] == [0, 1, 2, 0, 1, 2, 0]   # cycled, one each
