"""The per-architecture choice rule of the Table 2 headline rows (choices rest on attacker signals only),
and benchmarks/table2.py's reader of calibration lines from a log."""

import importlib.util
import sys
from pathlib import Path

import pytest

from nnlaunder.errors import UserError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import joint_choice, most_aggressive_within  # noqa: E402

_path = Path(__file__).resolve().parents[1] / "benchmarks" / "table2.py"
_spec = importlib.util.spec_from_file_location("table2_bench", _path)
table2 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(table2)


def _cal(name, dt, ct, ep, acc):
    return {"dataset": "cifar10", "arch": "resnet20", "name": name, "stage": "calibration",
            "dt": dt, "ct": ct, "epochs": ep, "attacker_acc": acc}


def test_choose_takes_the_most_aggressive_within_one_point():
    acc = {(0.5, 1.0, 5): 90.0, (0.5, 2.0, 5): 92.5, (2.0, 2.0, 5): 92.6, (0.5, 2.0, 20): 91.7}
    assert most_aggressive_within(acc) == (0.5, 2.0, 5)
    # fewer epochs break a tie on thresholds; lower thresholds win over epochs
    assert most_aggressive_within({(0.5, 1.0, 20): 80.0, (0.5, 1.0, 5): 80.0, (1.0, 1.0, 5): 80.5}) == (0.5, 1.0, 5)


def test_joint_choice_averages_models_calibrated_apart():
    # Alone, model a picks CT 1.0 and model b CT 2.0; averaged, CT 1.0 falls more than a point behind.
    v = [_cal("a", 0.5, 1.0, 5, 93.2), _cal("a", 0.5, 2.0, 5, 94.0),
         _cal("b", 0.5, 1.0, 5, 90.2), _cal("b", 0.5, 2.0, 5, 92.5),
         _cal("b", 2.0, 2.0, 20, 99.0),                      # b only: not a joint candidate
         {**_cal("c", 0.5, 1.0, 5, 10.0), "arch": "cifar-cnn"}]
    assert most_aggressive_within({(0.5, 1.0, 5): 93.2, (0.5, 2.0, 5): 94.0}) == (0.5, 1.0, 5)
    choice, names = joint_choice(v, "cifar10", "resnet20")
    assert choice == (0.5, 2.0, 5) and names == ["a", "b"]
    with pytest.raises(UserError, match="no calibration records"):
        joint_choice(v, "mnist", "resnet20")


def test_calibration_lines_are_read_from_a_log():
    log = ("  adi-pt: 5400 clean images\n"
           "    calibration resnet20 dt 0.5 ct 1.0 epochs 5: attacker held-out acc 93.24%, residual trigger "
           "flips 1.13%\n"
           "    calibration resnet20 dt 2.0 ct 2.0 epochs 20: attacker held-out acc 93.15%, residual trigger "
           "flips 0.51%\n    chosen for resnet20: dt 0.5, ct 1.0 (relative), 5 retraining epochs\n")
    rows = table2.calibration_from_log(log, "cifar10", "adi-pt", "adi", "x.log")
    assert [(r["dt"], r["ct"], r["epochs"], r["attacker_acc"], r["residual_flip"]) for r in rows] == [
        (0.5, 1.0, 5, 93.24, 1.13), (2.0, 2.0, 20, 93.15, 0.51)]
    assert all(r["wm_acc"] is None and r["from_log"] == "x.log" for r in rows)
