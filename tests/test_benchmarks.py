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


def test_perf_rows_belong_to_the_section_with_the_longest_prefix():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "perf"))
    import run

    assert run.section_of("nc_vs_pytorch_peer_resnet20") == "nc_peer"
    assert run.section_of("nc_fast_batched") == "nc"
    assert run.section_of("audit_cifar_warm") is None                   # cifar_audit.py's rows: never dropped


def test_the_audit_profile_splits_seconds_by_phase(tmp_path):
    """Phases from an audit's store: setup = cell - attack - restoration, laundering's NC and retraining
    from its rounds, the clean models from trajectories trained since the start."""
    import json

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "perf"))
    import cifar_audit

    from nnlaunder.experiments.store import Store

    traj = tmp_path / "cache" / "clean" / "cifar10-x-s0"
    traj.mkdir(parents=True)
    (traj / "metrics.json").write_text(json.dumps({"epochs": [{"seconds": 30.0}, {"seconds": 20.0}]}))
    with Store(tmp_path / "ws" / "results.sqlite") as store:
        store.record("a", "e", {"attack": "launder"}, [{"round": 0}, {"round": 1, "nc_seconds": 40.0,
                                                                       "retrain_seconds": 10.0}],
                     {"attack_seconds": 55.0, "restore_seconds": 5.0}, 170.0)
        store.record("b", "e", {"attack": "rtal"}, [{"round": 0}, {"round": 1}],
                     {"attack_seconds": 7.0, "restore_seconds": 3.0}, 12.0)
    ph = cifar_audit.phases(tmp_path / "ws", tmp_path / "cache", started=0.0)
    assert ph == {"clean models": 50.0, "setup": 62.0, "neural cleanse": 40.0, "algorithm 1 + evaluation": 5.0,
                  "retraining": 10.0, "other attacks": 7.0, "restoration": 8.0, "report and the rest": 0.0}


def _t2(seed, outcome, wm, drop, preset="fast", commit="abc1234"):
    return {"dataset": "cifar10", "name": "zhang-content", "scheme": "zhang-content", "seed": seed,
            "outcome": outcome, "wm_acc": wm, "test_acc": 88.0 - drop, "test_drop": drop, "threshold": 13.85,
            "nc_preset": preset, "commit": commit, "machine": "cpu", "used_triggers": [0], "status": "no proof"}


def test_what_changed_lists_the_seeds_whose_outcome_moved_in_the_re_run():
    """The one-commit re-run against the stored rows, seed by seed: counts on both sides, and each
    moved seed with its WM and test drop before and after."""
    import redecide

    previous = [_t2(0, "removed", 5.0, 2.9, "fast-bf16", "old1"), _t2(1, "removed", 6.0, 3.0, "fast-bf16", "old2"),
                _t2(1, "kept", 90.0, 1.0, "faithful", "old3")]                  # another preset: not compared
    rerun = [_t2(0, "removed", 4.0, 2.8), _t2(1, "destroyed", 5.0, 3.2)]
    table = "\n".join(redecide.rerun_section(previous, rerun))
    row = next(line for line in table.splitlines() if line.startswith("| cifar10/zhang-content"))
    assert "| 2 | removed 2 | destroyed 1, removed 1 |" in row                 # two stored commits
    assert "seed 1: removed -> destroyed" in row and "test drop 3.00 -> 3.20 points" in row
    assert "seed 0" not in row                                                  # unchanged seeds are not listed


def test_a_result_names_a_dirty_tree(tmp_path, monkeypatch):
    """commit() says "-dirty" where the code differs from the checked-out commit, and nothing else."""
    import subprocess

    import common

    def git(*a):
        subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "m.py").write_text("x = 1\n")
    (tmp_path / "notes.txt").write_text("a\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    monkeypatch.setattr(common, "ROOT", tmp_path)
    clean = common.commit()
    assert len(clean) >= 7 and not clean.endswith("-dirty")
    (tmp_path / "notes.txt").write_text("b\n")                     # not code: still clean
    assert common.commit() == clean
    (tmp_path / "src" / "m.py").write_text("x = 2\n")
    assert common.commit() == clean + "-dirty"


def test_persistence_lays_the_engines_cells_out_as_ngo_et_als_phases():
    """Each cell of persistence-*.toml is a phase (fine-tuning, mixed fine-tuning, laundering) and, where the
    owner restored, a second one; the owner's model before any attack is the embedded phase, once."""
    import persistence

    def cell(attack, params, outcome, restored=None):
        sm = {"threshold": 0.5, "threshold_rule": "converged", "tolerance": 3.0, "machine": "cpu", "commit": "abc",
              "date": "2026-12-05", "orig_test_acc": 99.0, "orig_wm_acc": 99.5, "test_acc": 98.0, "wm_acc": 1.0,
              "owned": outcome == "kept", "status": "no proof", "outcome": outcome, "test_drop": 1.0,
              "param_shift": 2.0, "n_clean": 300, "attack_seconds": 5.0}
        if restored is not None:
            sm.update(restored_test_acc=98.5, restored_wm_acc=60.0, restored=restored, n_owner=700, restore_seconds=3.0)
        cfg = {"dataset": "mnist", "arch": "mnist-cnn", "scheme": "zhang-content", "scheme_params": {},
               "attack": attack, "attack_params": params, "owner_path": "models/mnist/zhang-content"}
        return {"experiment": "persistence-mnist", "config": cfg, "summary": sm,
                "rounds": [{"round": 0, "owned": True, "status": "owned"}]}

    rows = persistence.phase_rows([cell("ftal", {}, "kept", restored=True), cell("ftal", {"mix_split": 0.3}, "kept"),
                                   cell("launder", {}, "hidden", restored=True)])
    by = {r["phase"]: r for r in rows}
    assert sorted(by) == sorted(persistence.PHASES) and len(rows) == 6
    assert by["embedded"]["owned"] and by["embedded"]["wm_acc"] == 99.5
    assert by["laundered"]["outcome"] == "hidden" and by["laundered-restored"]["owned"] is True
    assert by["restored"]["n_owner"] == 700 and "outcome" not in by["restored"]
    assert by["finetuned-mixed"]["command"] == "nnlaunder run experiments/paper/persistence-mnist.toml"
