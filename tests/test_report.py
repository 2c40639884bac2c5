import json
import shutil

from nnlaunder.cli import main
from nnlaunder.experiments.config import expand
from nnlaunder.experiments.store import Store
from nnlaunder.report.build import build_report


def _fill(ws):
    """A store with two laundering cells (rendering input for the report, not results)."""
    cells = expand({"name": "fig3", "dataset": "mnist", "rounds": 2, "sweep": {"budget": [0.006, "1/class"]}})
    with Store(ws / "results.sqlite") as s:
        for i, c in enumerate(cells):
            rounds = [{"round": r, "test_acc": 99.0 - r - i, "wm_acc": 99.0 / (1 + 10 * r), "threshold": 0.3}
                      for r in range(3)]
            s.record(c.cell_id(), c.name, c.as_dict(), rounds,
                     {"threshold": 0.3, "orig_test_acc": 99.0, "orig_wm_acc": 99.0, "test_acc": rounds[-1]["test_acc"],
                      "wm_acc": rounds[-1]["wm_acc"], "removed": False, "rounds_run": 2}, 1.0)
    (ws / "thresholds").mkdir()
    (ws / "thresholds" / "abc123.json").write_text(json.dumps({"threshold": 0.3, "curves": [[0.1, 0.3, 0.2]]}))


def test_report_folder(tmp_path, monkeypatch):
    ws = tmp_path / "ws"
    ws.mkdir()
    _fill(ws)
    monkeypatch.chdir(tmp_path)
    out = build_report(ws, tmp_path / "rep")
    md = (out / "index.md").read_text()
    assert "Workspace `ws`:" in md and str(tmp_path) not in md        # named as from here, not by a machine path
    assert "| fig3 | mnist | zhang-content | launder | 0.6% | 2 | 99.00 → 97.00 (98.34) |" in md
    assert "1/class" in md and "(1.5)" in md
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["clean-curves.png", "rounds-fig3-mnist-zhang-content.png"]
    assert main(["export", "--workspace", "ws", "--out", "cells"]) == 0      # the report reads an export too
    again = (build_report(tmp_path / "cells", tmp_path / "rep2") / "index.md").read_text()
    assert "| fig3 | mnist | zhang-content | launder | 0.6% | 2 | 99.00 → 97.00 (98.34) |" in again
    page = (out / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "<table>" in page and 'src="http' not in page


def test_report_cli_errors(tmp_path, capsys):
    assert main(["report", "--workspace", str(tmp_path / "none")]) == 2
    assert "no results store" in capsys.readouterr().err


def test_seeds_section_summarises_cells_that_differ_only_in_their_seed():
    from nnlaunder.report.build import seeds_section

    def cell(seed, test, wm, outcome):
        cfg = {"dataset": "mnist", "scheme": "zhang-content", "scheme_params": {}, "attack": "launder",
               "budget": 0.006, "rounds": 1, "seed": seed}
        return {"experiment": "t2", "config": cfg, "seconds": 9.0, "summary": {
            "orig_test_acc": 99.3, "test_acc": test, "orig_wm_acc": 99.4, "wm_acc": wm, "threshold": 0.49,
            "threshold_paper": 0.33, "outcome": outcome, "removed": False, "n_verify": 1000, "attack_seconds": 7.0}}

    lines = seeds_section([cell(0, 98.6, 0.1, "removed"), cell(1, 98.4, 0.2, "removed"),
                           cell(2, 95.0, 0.1, "destroyed")])
    row = [ln for ln in lines if ln.startswith("| t2 ")]
    assert len(row) == 1 and "| 3 | 2/3 [21-94%] |" in row[0] and "| 1/3 |" in row[0]
    assert "97.33 ± 2.02" in row[0] and "0.10 [0.10-0.20]" in row[0]
    # threshold with the paper's rule; the median p (1 hit of 1000 against 0.49%: p = 1 - P(0 hits)); the
    # paper's laundered test / WM for this row; the attack's seconds, not the cell's
    assert "| 0.49 (0.33) | 0.993 | 98.34 / 0.01 | 7 |" in row[0]
    assert seeds_section([cell(0, 98.6, 0.1, "removed")]) == []          # one seed: nothing to summarise
    # a cell given its threshold records no paper's-rule figure: the caller can give it, per watermark
    from nnlaunder.report.build import last_round_section

    given = [cell(s, 98.6, 0.1, "removed") for s in (0, 1)]
    for c in given:
        del c["summary"]["threshold_paper"]
        c["summary"]["rounds_run"] = 1
    assert "| 0.49 (0.30) |" in [ln for ln in seeds_section(given, {("mnist", "zhang-content"): 0.3})
                                  if ln.startswith("| t2 ")][0]
    assert "| 0.49 (0.30; 1.5) |" in last_round_section(given, {("mnist", "zhang-content"): 0.3})[-1]
    assert "| 0.49 (1.5) |" in last_round_section(given)[-1]


def test_over_seeds_is_the_one_summary_of_a_rate():
    """Every result table sums a configuration's seeds with `over_seeds`: the rate with its Wilson interval,
    destroyed, test mean ± sd, WM median [range]; a row without an outcome counts by its verdict."""
    import pytest

    from nnlaunder.report.battery import over_seeds

    s = over_seeds([{"outcome": "removed", "test_acc": 98.0, "wm_acc": 1.0},
                    {"outcome": "destroyed", "test_acc": 90.0, "wm_acc": 0.0},
                    {"removed": True, "test_acc": 97.0, "wm_acc": 3.0},
                    {"outcome": "kept", "test_acc": 99.0, "wm_acc": 99.0}])
    assert (s.n, s.removed, s.destroyed) == (4, 2, 1)
    assert s.rate() == "2/4 [15-85%]" and s.test() == "96.00 ± 4.08" and s.wm() == "2.00 [0.00-99.00]"
    assert over_seeds([{"outcome": "kept", "test_acc": 1, "wm_acc": 2}]).test_sd == 0.0
    with pytest.raises(ValueError):
        over_seeds([])


def test_report_of_chosen_experiments_writes_their_rows_and_sets_attacks_side_by_side(tmp_path, capsys):
    """--experiments keeps only those cells; --rows writes one flat row per cell (what it is, its summary,
    its provenance); several attacks on one model get a test-vs-watermark plot."""
    ws = tmp_path / "ws"
    ws.mkdir()
    _fill(ws)
    cells = expand({"name": "side", "dataset": "cifar10", "scheme": "adi", "scheme_params": {"mode": "pt"},
                    "sweep": {"attack": ["prune", "ftal"], "budget": [0.006, 0.108]}})
    with Store(ws / "results.sqlite") as s:
        for i, c in enumerate(cells):
            sm = {"threshold": 30.9, "orig_test_acc": 91.2, "orig_wm_acc": 100.0, "test_acc": 90.0 - i,
                  "wm_acc": 80.0 - 20 * i, "outcome": "kept" if i < 2 else "removed", "removed": i >= 2,
                  "rounds_run": 1, "machine": "cpu", "commit": "abc1234", "date": "2026-12-04"}
            s.record(c.cell_id(), c.name, c.as_dict(), [{"round": 0, "test_acc": 91.2, "wm_acc": 100.0}], sm, 2.0)
    rows = tmp_path / "out" / "side.json"
    assert main(["report", "--workspace", str(ws), "--out", str(tmp_path / "rep"), "--experiments", "side",
                 "--rows", str(rows)]) == 0
    got = json.loads(rows.read_text())
    assert len(got) == 4 and {r["experiment"] for r in got} == {"side"}
    assert {(r["attack"], r["budget"]) for r in got} == {("prune", 0.006), ("prune", 0.108), ("ftal", 0.006),
                                                         ("ftal", 0.108)}
    r = got[0]
    assert (r["dataset"], r["scheme"], r["mode"], r["name"], r["seed"]) == ("cifar10", "adi", "pt", "adi-pt", 0)
    assert r["commit"] == "abc1234" and r["seconds"] == 2.0 and r["config"]["scheme_params"] == {"mode": "pt"}
    md = (tmp_path / "rep" / "index.md").read_text()
    assert "## Every attack on each watermark" in md and "fig3" not in md
    assert "| cifar10/adi-pt | 4 | ftal @ 0.6% |" in md        # ftal removes (1/1) at both budgets
    assert "(88.25)" not in md and "30.90 (12)" in md       # laundering's paper figures only beside laundering
    assert "| kept | – |" in md                               # no restoration ran in these cells
    assert (tmp_path / "rep" / "attacks-cifar10-adi-pt.png").stat().st_size > 5000
    assert main(["report", "--workspace", str(ws), "--rows", str(tmp_path)]) == 2
    assert "is a folder; give the JSON file" in capsys.readouterr().err
    assert main(["report", "--workspace", str(ws), "--experiments", "nope"]) == 2
    assert "no finished cell of experiment(s) nope; it holds fig3, side" in capsys.readouterr().err


def test_battery_finds_the_cheapest_remover_under_its_fixed_rule():
    """A configuration (all settings but the seed) removes a watermark when most of its cells end removed;
    the cheapest has the fewest clean images, then the fewest attack seconds. The same attack and budget in
    two experiments are two configurations, each named by its experiment."""
    from nnlaunder.report.battery import cheapest_remover, configurations, gan_lines

    def cell(exp, attack, budget, seed, outcome, n_clean, secs):
        cfg = {"dataset": "cifar10", "scheme": "zhang-noise", "scheme_params": {}, "attack": attack,
               "budget": budget, "rounds": 1, "seed": seed}
        return {"experiment": exp, "config": cfg, "seconds": secs + 5,
                "summary": {"outcome": outcome, "n_clean": n_clean, "attack_seconds": secs, "wm_acc": 1.0 + seed}}

    cells = [cell("t2", "launder", 0.006, s, o, 300, 60) for s, o in enumerate(["removed", "removed", "kept"])]
    cells += [cell("base", "launder", 0.006, 0, "kept", 300, 50), cell("base", "nad", 0.006, 0, "removed", 300, 20),
              cell("base", "nad", 0.006, 1, "kept", 300, 20), cell("base", "prune", 0.108, 0, "removed", 5400, 1)]
    groups = configurations(cells)[("cifar10", "zhang-noise")]
    assert sorted(groups) == ["launder @ 0.6% (base)", "launder @ 0.6% (t2)", "nad @ 0.6%", "prune @ 10.8%"]
    label, cs = cheapest_remover(groups)
    assert label == "launder @ 0.6% (t2)" and len(cs) == 3     # nad: 1/2 is no majority; prune needs more images
    assert cheapest_remover({"nad @ 0.6%": groups["nad @ 0.6%"]}) is None
    faster = [cell("other", "i-bau", 0.006, s, "removed", 300, 30) for s in range(3)]
    assert cheapest_remover(configurations(cells + faster)[("cifar10", "zhang-noise")])[0] == "i-bau @ 0.6%"
    variants = [cell("abl", "launder", 0.006, 0, "kept", 300, 60) for _ in range(2)]
    for c, params in zip(variants, ({"dt": 0.5, "bn_stats": "reinit"}, {"dt": 0.5, "retrain": {"epochs": 5}}),
                         strict=True):
        c["config"]["attack_params"] = params
    assert sorted(configurations(variants)[("cifar10", "zhang-noise")]) == [
        "launder @ 0.6% [bn_stats=reinit]", "launder @ 0.6% [retrain.epochs=5]"]    # an ablation's variants
    gan = "\n".join(gan_lines(configurations(cells)))
    assert "| zhang-noise | 28.4 / – / – | 28.2 / – / – | 14.5 / – / – | 3.9 / – / 1.5 |" in gan   # nad: 1.0, 2.0
    at_20 = [cell("gan", "ftal", 0.2, s, "kept", 10000, 300) for s in range(3)]
    gan = "\n".join(gan_lines(configurations(cells + at_20)))
    assert "| zhang-noise | 28.4 / 2.0 / – | 28.2 / – / – |" in gan                     # their budget first


def test_merge_copies_the_cells_a_workspace_lacks(tmp_path, capsys):
    """`nnlaunder merge` brings cells run elsewhere into a workspace: the ones it lacks, whole, with their
    seconds and finish time; the ones it has stay as they are; a store merged twice changes nothing."""
    from nnlaunder.cli import main
    from nnlaunder.experiments.store import Store

    with Store(tmp_path / "here" / "results.sqlite") as s:
        s.record("a", "e", {"k": 1}, [{"round": 0}], {"wm_acc": 1.0}, 10.0)
    with Store(tmp_path / "gpu" / "results.sqlite") as s:
        s.record("a", "e", {"k": 1}, [{"round": 0}], {"wm_acc": 99.0}, 1.0)          # already here: not copied
        s.record("b", "e", {"k": 2}, [{"round": 0}, {"round": 1, "x": 2}], {"wm_acc": 5.0}, 2.5, finished=123.0)
    args = ["merge", str(tmp_path / "gpu"), "--workspace", str(tmp_path / "here")]
    assert main(args) == 0 and "merged 1 cell(s)" in capsys.readouterr().out
    with Store(tmp_path / "here" / "results.sqlite", readonly=True) as s:
        cells = {c["cell_id"]: c for c in s.cells()}
    assert cells["a"]["summary"] == {"wm_acc": 1.0} and cells["b"]["seconds"] == 2.5
    assert cells["b"]["finished"] == 123.0 and cells["b"]["rounds"][1] == {"round": 1, "x": 2}
    assert main(args) == 0 and "merged 0 cell(s)" in capsys.readouterr().out
    assert main(["merge", str(tmp_path / "nowhere"), "--workspace", str(tmp_path / "here")]) == 2
    assert main(["merge", str(tmp_path / "here"), "--workspace", str(tmp_path / "here")]) == 2
    assert "into itself" in capsys.readouterr().err


def test_an_export_is_the_store_as_text_and_merges_back_whole(tmp_path, capsys):
    """`nnlaunder export` writes a workspace's cells as one JSON line each, per experiment in cell-id order,
    with the state files of unfinished cells (and trigger files only when asked); `merge` of the export into
    an empty workspace gives back the same cells, to the bit, and that state; a damaged export is one line."""
    from nnlaunder.cli import main
    from nnlaunder.experiments.store import Store

    ws = tmp_path / "ws"
    with Store(ws / "results.sqlite") as s:
        s.record("b" * 16, "e2", {"k": 0.1 + 0.2}, [{"round": 0}, {"round": 1, "wm": 1 / 3}], {"w": [1, None]},
                 12.345678901234567, finished=1.7e9 + 0.123456)
        s.record("a" * 16, "e1", {"k": 1}, [{"round": 0}], {"wm_acc": 1.0}, 10.0)
        ref = sorted(s.cells(), key=lambda c: c["cell_id"])
    for f in ("triggers/" + "a" * 16 + "-round01.safetensors", "partial/" + "c" * 16 + "-nc/nc-x.safetensors",
              "partial/" + "c" * 16 + ".safetensors"):
        (ws / f).parent.mkdir(parents=True, exist_ok=True)
        (ws / f).write_bytes(f.encode())
    assert main(["export", "--workspace", str(ws), "--out", str(tmp_path / "x")]) == 0
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["e1.jsonl", "e2.jsonl", "partial"]
    assert len((tmp_path / "x" / "e2.jsonl").read_text().splitlines()) == 1
    assert main(["merge", str(tmp_path / "x"), "--workspace", str(tmp_path / "new")]) == 0
    assert "merged 2 cell(s)" in capsys.readouterr().out
    assert main(["report", "--workspace", str(tmp_path / "x"), "--out", str(tmp_path / "rep")]) == 2  # not runner cells
    assert "is not as the runner writes it" in capsys.readouterr().err
    with Store(tmp_path / "new" / "results.sqlite", readonly=True) as s:
        assert sorted(s.cells(), key=lambda c: c["cell_id"]) == ref
    carried = tmp_path / "new" / "partial" / ("c" * 16 + "-nc") / "nc-x.safetensors"
    assert carried.read_bytes().endswith(b"nc-x.safetensors")
    assert not (tmp_path / "new" / "triggers").exists()
    (ws / "triggers" / ("c" * 16 + "-round01.safetensors")).write_bytes(b"t")
    assert main(["export", "--workspace", str(ws), "--out", str(tmp_path / "x")]) == 0   # a running cell's rounds
    assert (tmp_path / "x" / "triggers" / ("c" * 16 + "-round01.safetensors")).is_file()
    shutil.rmtree(ws / "partial")                                   # cell c finished since: its state goes
    with Store(ws / "results.sqlite") as s:
        s.record("c" * 16, "e1", {"k": 2}, [{"round": 0}], {}, 1.0)
    assert main(["export", "--workspace", str(ws), "--out", str(tmp_path / "x")]) == 0
    assert not list((tmp_path / "x" / "partial").iterdir()) and not list((tmp_path / "x" / "triggers").iterdir())
    assert len((tmp_path / "x" / "e1.jsonl").read_text().splitlines()) == 2
    assert main(["export", "--workspace", str(ws), "--out", str(tmp_path / "t"), "--experiments", "e1",
                 "--triggers"]) == 0
    assert (tmp_path / "t" / "triggers").is_dir() and not (tmp_path / "t" / "e2.jsonl").exists()
    capsys.readouterr()
    assert main(["export", "--workspace", str(ws), "--out", str(tmp_path / "u"), "--experiments", "nope"]) == 2
    assert main(["export", "--workspace", str(ws), "--out", str(ws)]) == 2
    (tmp_path / "linked").mkdir()                     # an export whose partial/ is a link elsewhere: not followed
    (tmp_path / "elsewhere" / ("e" * 16)).mkdir(parents=True)
    (tmp_path / "elsewhere" / ("e" * 16) / "secret").write_text("x")
    (tmp_path / "linked" / "partial").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "linked" / "e1.jsonl").write_text((tmp_path / "t" / "e1.jsonl").read_text())
    assert main(["merge", str(tmp_path / "linked"), "--workspace", str(tmp_path / "new3")]) == 0
    assert not (tmp_path / "new3" / "partial").exists()
    (tmp_path / "x" / "e1.jsonl").write_text('{"cell_id": "d", "experiment": "e1"}\n')
    assert main(["merge", str(tmp_path / "x"), "--workspace", str(tmp_path / "new2")]) == 2
    (tmp_path / "x" / "e1.jsonl").write_text(json.dumps({**ref[0], "cell_id": "../../etc"}) + "\n")
    assert main(["merge", str(tmp_path / "x"), "--workspace", str(tmp_path / "new2")]) == 2
    (tmp_path / "x" / "e1.jsonl").write_text("[[[[\n")
    assert main(["merge", str(tmp_path / "x"), "--workspace", str(tmp_path / "new2")]) == 2
    err = capsys.readouterr().err
    assert "no finished cell of nope" in err and "not a cell export" in err and "Traceback" not in err
    assert "not a plain name" in err


def test_cells_of_one_budget_share_one_trigger_figure(tmp_path):
    """An ablation's variants and seeds at one budget are drawn once (their lowest seed with kept triggers),
    not once per cell into the same file (a page that inlined the figure 36 times)."""
    from nnlaunder.report.build import _one_cell_per_budget

    (tmp_path / "triggers").mkdir()
    cells = [{"cell_id": f"c{i}", "config": {"budget": b, "seed": s}}
             for i, (b, s) in enumerate([(0.006, 2), (0.006, 0), (0.006, 0), (0.108, 3), (0.108, 1)])]
    for cid in ("c0", "c2", "c3", "c4"):                              # c1 (seed 0) kept no triggers
        (tmp_path / "triggers" / f"{cid}-round01.safetensors").write_bytes(b"")
    got = [(c["cell_id"], f.name) for c, f in _one_cell_per_budget(tmp_path, cells)]
    assert got == [("c2", "c2-round01.safetensors"), ("c4", "c4-round01.safetensors")]


def _phase_cell(attack, params, outcome, restored=None, restore_if="always"):
    """A persistence cell as the runner records it (rendering input, not a result)."""
    sm = {"threshold": 0.5, "threshold_rule": "converged", "tolerance": 3.0, "machine": "cpu", "commit": "abc",
          "date": "2026-12-05", "orig_test_acc": 99.0, "orig_wm_acc": 99.5, "test_acc": 98.0, "wm_acc": 1.0,
          "owned": outcome == "kept", "status": "no proof", "outcome": outcome, "test_drop": 1.0,
          "param_shift": 2.0, "n_clean": 300, "attack_seconds": 5.0, "removed": outcome != "kept", "rounds_run": 1}
    if restored is not None:
        sm.update(restored_test_acc=98.5, restored_wm_acc=60.0, restored=restored, n_owner=700, restore_seconds=3.0)
    cfg = {"dataset": "mnist", "arch": "mnist-cnn", "scheme": "zhang-content", "scheme_params": {}, "budget": 0.3,
           "attack": attack, "attack_params": params, "owner_path": "models/mnist/zhang-content", "seed": 0,
           "rounds": 1, "restore_if": restore_if}
    return {"experiment": "persistence-mnist", "config": cfg, "summary": sm,
            "rounds": [{"round": 0, "owned": True, "status": "owned"}]}


def test_persistence_lays_cells_out_as_ngo_et_als_phases(tmp_path):
    """Each persistence cell is a phase (fine-tuning, mixed fine-tuning, laundering, any other attack) and, where
    the owner restored, a second one; the owner's model before any attack is the embedded phase, once. The report
    renders the layout only for cells whose restoration ran whatever the attack left."""
    from nnlaunder.report.persistence import PHASES, persistence_section, phase_rows

    cells = [_phase_cell("ftal", {}, "kept", restored=True), _phase_cell("ftal", {"mix_split": 0.3}, "kept"),
             _phase_cell("launder", {}, "hidden", restored=True)]
    by = {r["phase"]: r for r in phase_rows(cells)}
    assert sorted(by) == sorted(PHASES)
    assert by["embedded"]["owned"] and by["embedded"]["wm_acc"] == 99.5
    assert by["laundered"]["outcome"] == "hidden" and by["laundered-restored"]["owned"] is True
    assert by["restored"]["n_owner"] == 700 and "outcome" not in by["restored"]
    assert by["finetuned-mixed"]["command"] == "nnlaunder run experiments/paper/persistence-mnist.toml"
    assert by["laundered"]["seconds"] == 5.0 and by["restored"]["seconds"] == 3.0     # the attack's, the restoration's
    other = {r["phase"] for r in phase_rows([_phase_cell("nad", {}, "removed", restored=False)])}
    assert other == {"embedded", "nad", "nad-restored"}
    images: list = []
    md = persistence_section(cells, tmp_path, images)
    assert images == [tmp_path / "persistence-mnist.png"] and images[0].stat().st_size > 0
    assert "| mnist | zhang-content | laundered | 98.00 | 1.00 | 0.50 | no | hidden | 2.000 | 5 |" in md
    assert "| mnist | zhang-content | 98.50 / 98.50 | kept / kept | 60.00 | 1.00 → 60.00 | 0.50 | **hidden** |" in md
    battery_only = [_phase_cell("launder", {}, "hidden", restored=True, restore_if="not-shown")]
    assert persistence_section(battery_only, tmp_path, []) == []


def test_variants_name_their_departure_and_meet_the_control_on_the_same_seeds_and_machine(tmp_path, capsys):
    """An ablation: each cell of another experiment is named by how its attack settings depart from the
    control's on the same model, and compared with the control's cells on the seeds it ran, on the same machine."""
    from nnlaunder.report.variants import departure

    base = {"dataset": "cifar10", "scheme": "zhang-noise", "attack": "launder", "variant": "strong",
            "attack_params": {"ct": 2.0, "retrain": {"epochs": 20}}}
    assert departure(base, base) == ""
    assert departure({**base, "attack_params": {"ct": 2.0, "retrain": {"epochs": 5}, "add_masks": True}},
                     base) == "add_masks=true, retrain.epochs=5"
    assert departure({**base, "calibrate": True, "variant": "faithful"}, base) == 'calibrate=true, variant="faithful"'
    assert departure({**base, "budget": 0.2, "seed": 3, "name": "other"}, {**base, "budget": 0.006}) == "budget=0.2"
    assert departure({**base, "restore_if": "not-shown"}, base) == ""       # stored before the setting: its default

    ws = tmp_path / "ws"
    ws.mkdir()
    _fill(ws)
    ctl = expand({"name": "head", "dataset": "cifar10", "scheme": "zhang-noise", "attack_params": {"ct": 2.0},
                  "sweep": {"seed": [0, 1, 2]}})
    abl = expand({"name": "abl", "dataset": "cifar10", "scheme": "zhang-noise", "attack_params": {"ct": 2.0},
                  "sweep": {"seed": [0, 1], "settings": [{"attack_params": {"add_masks": True}},
                                                         {"attack_params": {"ct": 1.0}}]}})
    with Store(ws / "results.sqlite") as s:
        for c in ctl + abl:
            masks, seed = (c.attack_params or {}).get("add_masks"), c.seed
            removed = bool(masks) and seed == 0
            sm = {"threshold": 0.05, "orig_test_acc": 89.0, "orig_wm_acc": 100.0, "test_acc": 86.0 - seed,
                  "wm_acc": 0.0 if removed else 99.0 - 40 * ((c.attack_params or {}).get("ct") == 1.0),
                  "outcome": "removed" if removed else "kept", "removed": removed, "rounds_run": 1,
                  "machine": "other cpu" if (c.name, seed) == ("head", 1) else "cpu", "commit": "abc", "date": "d"}
            s.record(c.cell_id(), c.name, c.as_dict(), [{"round": 0, "test_acc": 89.0, "wm_acc": 100.0}], sm, 2.0)
    out = tmp_path / "rep"
    assert main(["report", "--workspace", str(ws), "--out", str(out), "--experiments", "head,abl",
                 "--control", "head"]) == 0
    md = (out / "index.md").read_text()
    assert "## Variants against head on the same seeds" in md
    # head's seed 1 ran on another machine: only seed 0 is a pair for the variants' seeds 0 and 1
    assert "| cifar10/zhang-noise | head | 0 | 0/1 [0-79%] | 86.00 ± 0.00 | 99.00 [99.00-99.00] |  | abc |" in md
    assert "|  | add_masks=true | 0,1 | 1/2 [9-91%] | 85.50 ± 0.71 | 49.50 [0.00-99.00] | 0/1, 86.00 | abc |" in md
    assert "|  | ct=1.0 | 0,1 | 0/2 [0-66%] |" in md
    assert "add_masks=true removes the watermark in 1/2 seeds against 0/1 for head on the same seeds" in md
    assert "![variants against head](variants.png)" in md and (out / "variants.png").stat().st_size > 5000
    assert main(["report", "--workspace", str(ws), "--out", str(out), "--control", "nope"]) == 2
    assert "--control 'nope': the report holds no cell of that experiment" in capsys.readouterr().err


def test_a_control_with_several_configurations_of_a_model_is_compared_through_its_first():
    """A control experiment that runs one model twice (two settings) compares the variants with its first
    configuration only, and a variant of another attack on the same model meets that attack's control."""
    from nnlaunder.report.variants import control_cells, label_cells

    def cell(exp, attack, seed, **ap):
        return {"experiment": exp, "config": {"dataset": "mnist", "scheme": "zhang-noise", "attack": attack,
                                              "seed": seed, "attack_params": ap}}

    ctl = [cell("c", "launder", 0, ct=2.0), cell("c", "launder", 1, ct=2.0), cell("c", "launder", 0, ct=1.0),
           cell("c", "prune", 0, rate=0.9)]
    kept = control_cells(ctl)
    assert [(c["config"]["attack"], c["config"]["seed"], c["config"]["attack_params"]) for c in kept] == [
        ("launder", 0, {"ct": 2.0}), ("launder", 1, {"ct": 2.0}), ("prune", 0, {"rate": 0.9})]
    labelled = label_cells([cell("v", "launder", 0, ct=1.0), cell("v", "prune", 0, rate=0.5),
                            cell("v", "nad", 0)], kept)
    assert [label for _, label in labelled] == ["ct=1.0", "rate=0.5"]      # nad: no control cell attacks so


def test_a_rebuilt_report_drops_only_the_plots_its_previous_page_showed(tmp_path):
    """Rebuilt with fewer experiments, the report deletes the plots its previous index.md showed and this one
    does not; a file of the folder that no report named stays."""
    ws = tmp_path / "ws"
    ws.mkdir()
    _fill(ws)
    out = tmp_path / "rep"
    build_report(ws, out)
    assert (out / "rounds-fig3-mnist-zhang-content.png").is_file()
    (out / "mine.png").write_bytes(b"a user's file")
    (out / "index.md").write_text((out / "index.md").read_text() + "\n![x](../outside.png) ![y](mine2.png)\n")
    (tmp_path / "outside.png").write_bytes(b"not the report's")
    (ws / "thresholds" / "abc123.json").unlink()
    shutil.rmtree(ws / "thresholds")
    build_report(ws, out)
    assert not (out / "clean-curves.png").exists()                # shown before, not now: deleted
    assert (out / "rounds-fig3-mnist-zhang-content.png").is_file()
    assert (out / "mine.png").read_bytes() == b"a user's file" and (tmp_path / "outside.png").is_file()
