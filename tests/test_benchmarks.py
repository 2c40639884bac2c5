"""The decision rules of the benchmark scripts, on synthetic rows (no training)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import cifar_decided as cd  # noqa: E402
import topup  # noqa: E402

from nnlaunder import data as D  # noqa: E402
from nnlaunder.data import Dataset  # noqa: E402
from nnlaunder.errors import UserError  # noqa: E402
from nnlaunder.watermarks.schemes import Watermark, make_watermark  # noqa: E402


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


def test_result_files_are_read_and_written_in_one_place(tmp_path, monkeypatch):
    """common.stored gives a file's contents, or the empty value before a run wrote it; common.write writes JSON
    for a .json name and Markdown lines as one text ending in a newline, leaving no temporary file behind."""
    import common

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    assert common.stored("x.json") == [] and common.stored("x.json", {"rows": []}) == {"rows": []}
    assert common.write("x.json", {"rows": [1.5]}) == tmp_path / "x.json"
    assert common.stored("x.json") == {"rows": [1.5]}
    common.write("x.md", ["# t", "", "| a |"])
    common.write("y.md", "as given")
    assert (tmp_path / "x.md").read_text() == "# t\n\n| a |\n" and (tmp_path / "y.md").read_text() == "as given"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json", "x.md", "y.md"]


def test_table2_names_every_ablation_variant_from_the_experiment_file():
    """Each settings group of table2-ablation-cifar10.toml is one named variant (and the headline cells are
    "strong"), so the ablation table reads the engine's cells without a label stored in them."""
    import table2

    from nnlaunder.experiments.config import load_experiment

    paper = Path(__file__).resolve().parents[1] / "experiments" / "paper"
    cells = [c.as_dict() for c in load_experiment(paper / "table2-ablation-cifar10.toml")]
    by_variant: dict[str, int] = {}
    for c in cells:
        by_variant[table2.variant(c)] = by_variant.get(table2.variant(c), 0) + 1
    assert by_variant == {v: len(cells) // len(table2.VARIANTS) for v in table2.VARIANTS}
    assert {table2.variant(c.as_dict()) for c in load_experiment(paper / "table2-cifar10.toml")} == {"strong"}
    assert table2.variant({"attack_params": {"bn_stats": "reestimate", "add_masks": True}}) == "+bn+masks"


def test_table2_rows_come_from_the_store_and_keep_what_it_lacks(tmp_path, monkeypatch):
    """A cell becomes a row with its variant and round 1's facts; a stored row for a (row, seed, variant)
    the store does not hold stays, one the store holds is replaced; the headline is the median-WM seed."""
    import json

    import table2

    def cell(seed, wm):
        cfg = {"dataset": "cifar10", "arch": None, "scheme": "zhang-noise", "scheme_params": {}, "attack": "launder",
               "budget": 0.006, "seed": seed, "rounds": 1, "owner_path": "models/cifar10/zhang-noise",
               "attack_params": {"dt": 0.5, "ct": 2.0, "nc": {"preset": "fast"}}}
        sm = {"test_acc": 85.0 + seed, "wm_acc": wm, "outcome": "kept", "threshold": 0.05, "machine": "cpu",
              "commit": "new", "date": "2026-12-05", "orig_test_acc": 89.0, "orig_wm_acc": 100.0, "n_clean": 300}
        return {"experiment": "table2-cifar10", "cell_id": f"c{seed}", "config": cfg, "summary": sm, "seconds": 60.0,
                "rounds": [{"round": 0}, {"round": 1, "flagged": [4], "used": [4], "resets": {"conv1": 3},
                                          "nc_seconds": 30.0}]}

    rows = table2.cell_rows([cell(s, wm) for s, wm in enumerate([100.0, 99.0, 98.0, 97.0])])
    assert rows[0]["arch"] == "cifar-cnn" and rows[0]["variant"] == "strong" and rows[0]["nc_preset"] == "fast"
    assert rows[0]["resets"] == {"conv1": 3} and rows[0]["flagged"] == [4] and "experiments/paper" in rows[0]["command"]
    old = {"dataset": "cifar10", "name": "zhang-noise", "variant": "strong", "nc_preset": "fast", "commit": "old",
           "seconds": 50.0}
    import common

    monkeypatch.setattr(common, "RESULTS", tmp_path)          # where every benchmark's result files are read
    (tmp_path / "seeds.json").write_text(json.dumps([{**old, "seed": 0}, {**old, "seed": 4, "wm_acc": 1.0,
                                                                           "test_acc": 80.0, "outcome": "destroyed"}]))
    seeds = table2.merged("seeds.json", rows)
    assert sorted((r["seed"], r["commit"]) for r in seeds) == [(0, "new"), (1, "new"), (2, "new"), (3, "new"),
                                                               (4, "old")]
    (head,) = [r for r in table2.headline(seeds) if r["name"] == "zhang-noise"]
    assert head["seed"] == 2 and head["seeds"]["n"] == 5 and head["seeds"]["destroyed"] == 1   # WM 98: the median


def test_the_ablation_sets_each_variant_beside_the_strong_attack_of_its_own_machine():
    """A variant run on one processor is compared with the strong attack's cells of the same seeds on that
    processor (kept in the ablation's file once the headline moved to another), never across processors."""
    import table2

    def row(variant, seed, machine, outcome, test):
        return {"dataset": "cifar10", "name": "zhang-noise", "variant": variant, "seed": seed, "machine": machine,
                "outcome": outcome, "test_acc": test, "wm_acc": 0.0 if outcome != "kept" else 100.0,
                "threshold": 0.05, "commit": machine[:4], "seconds": 1.0}

    headline = [row("strong", s, "Xeon (2 threads)", "destroyed" if s == 2 else "kept", 85.0) for s in range(5)]
    abl = [row("strong", s, "EPYC (2 threads)", "kept", 86.0) for s in range(5)] + \
        [row("+topk", 2, "EPYC (2 threads) (its Neural Cleanse begun on Xeon)", "removed", 86.5)]
    md = table2.ablation_markdown(headline, abl)
    assert "| cifar10/zhang-noise | strong | 2 | 0/1" in md and "| +topk | 2 | 1/1" in md and "| 0/1, 86.00 |" in md
    assert "+topk removes the watermark in 1/1 seeds against 0/1 for strong on the same seeds" in md


@pytest.fixture(scope="module")
def mnist(data_dir):
    return D.load("mnist", data_dir, "train"), D.load("mnist", data_dir, "test")


@pytest.mark.parametrize("scheme", ["zhang-content", "zhang-noise"])
def test_held_out_triggers_avoid_the_embedding_set(mnist, scheme):
    """benchmarks/topup.py chooses the top-up on stamped training images, never on the verification set."""
    tr, te = mnist
    wm = make_watermark(scheme, tr, te, params={"n_embed": 50})
    hx, hy = topup.held_out_triggers(wm, tr, 200, seed=3)
    assert hx.shape == (200, 1, 28, 28) and set(hy.tolist()) == {wm.target}
    # stamped exactly as the embedding set: re-stamping the embedding images' sources gives embed_x
    assert torch.equal(wm.stamp(tr.x[wm.embed_index]), wm.embed_x)
    # none is an embedding image, none comes from the target class, and the draw is seeded
    assert torch.cdist(hx.flatten(1), wm.embed_x.flatten(1)).min() > 0
    assert torch.equal(hx, topup.held_out_triggers(wm, tr, 200, seed=3)[0])
    # every one is a stamped non-target training image from outside the embedding set
    free = torch.ones(len(tr), dtype=torch.bool)
    free[wm.embed_index] = False
    free &= tr.y != wm.target
    pool = wm.stamp(tr.x[free]).flatten(1)
    for h in hx[:20].flatten(1):
        near = torch.nonzero((pool.sum(1) - h.sum()).abs() < 1e-3).flatten()
        assert any(torch.equal(pool[i], h) for i in near)
    with pytest.raises(UserError, match="n must be"):
        topup.held_out_triggers(wm, tr, len(tr), seed=0)


def test_held_out_triggers_need_a_stamp(mnist, has_fashion):
    tr, te = mnist
    wm = make_watermark("zhang-unrelated", tr, te)
    with pytest.raises(UserError, match="no stamping function"):
        topup.held_out_triggers(wm, tr, 10)


def test_the_committed_cells_are_cells_the_experiment_files_run():
    """benchmarks/cells holds the engine's finished cells as text: every one reads back, and every one is a cell
    its experiment file (experiments/paper/<name>.toml) would run today, so a changed file or cell id shows."""
    from nnlaunder.experiments.config import load_experiment
    from nnlaunder.experiments.store import workspace_cells

    root = Path(__file__).resolve().parents[1]
    cells = workspace_cells(root / "benchmarks" / "cells")
    assert cells
    for exp in {c["experiment"] for c in cells}:
        ids = {cell.cell_id() for cell in load_experiment(root / "experiments" / "paper" / f"{exp}.toml")}
        stale = [c["cell_id"] for c in cells if c["experiment"] == exp and c["cell_id"] not in ids]
        assert not stale, f"{exp}: {len(stale)} committed cell(s) its file no longer runs, e.g. {stale[0]}"


def test_byo_lists_one_row_per_planted_network():
    """byo.json keeps a row per network of examples/byo/ (a row from before the choice existed is table5's);
    byo.md lists each with its triggers and commands."""
    import byo

    def row(model, removed):
        r = {"budget": 0.006, "n_clean": 360, "orig_test_acc": 99.0, "test_acc": 98.5, "orig_wm_acc": 100.0,
             "wm_acc": 0.1 if removed else 99.0, "threshold": 0.08, "removed": removed, "flagged": [0],
             "resets": {"a": 2, "b": 3}, "seconds": 60.0, "command": f"python benchmarks/byo.py --model {model}",
             "launder_command": f"nnlaunder launder --model-factory {model}:{model}"}
        return {**r, "model": model, "triggers": f"t-{model}.png"} if model != "table5" else r

    md = byo.markdown([row("table5", True), row("rescnn", False)])
    lines = [ln for ln in md.splitlines() if ln.startswith(("| table5", "| rescnn"))]
    assert len(lines) == 2 and "| yes |" in lines[0] and "| **no** |" in lines[1] and "| 5 |" in lines[0]
    assert "triggers-byo-backdoor.png, t-rescnn.png" in md and "--model-factory rescnn:rescnn" in md
    assert set(byo.MODELS) == {"table5", "rescnn"}
