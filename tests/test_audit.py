"""`nnlaunder audit`: its cell grid, outcomes and verdict wording, the threshold for custom scheme
parameters, an end-to-end audit on tiny data that resumes after a kill, and the report in a browser."""

from __future__ import annotations

import html
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from nnlaunder.cli import main
from nnlaunder.device import code_commit, machine_name, today
from nnlaunder.errors import UserError
from nnlaunder.experiments import runner
from nnlaunder.experiments.audit import PROFILES, Profile, audit_cells, outcome, run_audit, summarize, verdict_paragraph

TINY = Profile(budgets=("3/class",), attacks=("launder", "rtal"), seeds=2, rounds=2, nc_preset="fast",
               calibrate=False, threshold_seeds=(0,), restore_epochs=1, restore_fraction=0.5, nc_epochs=3)


def test_the_grid_is_attacks_by_budgets_by_seeds():
    meta = {"dataset": "mnist", "arch": "mnist-cnn"}
    cells = audit_cells("a", "models/mnist/zhang-content", meta, "zhang-content", {}, PROFILES["quick"])
    q = PROFILES["quick"]
    assert len(cells) == len(q.attacks) * len(q.budgets) * q.seeds
    assert len({c.cell_id() for c in cells}) == len(cells)
    assert {c.rounds for c in cells if c.attack == "launder"} == {q.rounds}
    assert {c.rounds for c in cells if c.attack != "launder"} == {1}
    full = audit_cells("a", "models/mnist/zhang-content", meta, "zhang-content", {}, PROFILES["full"], seeds=1)
    assert all(c.calibrate == (c.attack == "launder") for c in full) and {c.seed for c in full} == {0}
    assert all(c.restore_epochs == 30 for c in full)
    assert {"nad", "anp", "i-bau", "dehydration"} <= {c.attack for c in full}     # the whole battery


def _cell(attack, removed, restored, test=98.0, wm=1.0, n_clean=60):
    kept = not removed
    s = {"removed": removed and not restored, "test_acc": test, "wm_acc": wm, "n_clean": n_clean,
         "orig_test_acc": 99.0, "orig_wm_acc": 99.5, "threshold": 2.0, "n_verify": 1000,
         "restored_wm_acc": 50.0 if restored else 0.5,
         "outcome": "kept" if kept else "destroyed" if 99.0 - test > 3 else "hidden" if restored else "removed"}
    return {"config": {"attack": attack, "budget": 0.006}, "summary": s}


def test_outcomes_and_the_verdict_in_plain_words():
    # the audit reads the outcome the runner decided (watermarks.verify.outcome, tested in test_verdicts.py);
    # a store from before outcomes were recorded is refused, not re-guessed
    assert outcome({"outcome": "destroyed"}) == "destroyed"
    with pytest.raises(UserError, match="old rules"):
        outcome({"wm_acc": 1.0, "removed": True})
    destroyed = summarize([_cell("prune", True, False, test=10.3)])
    assert destroyed[0]["destroyed"] == 1 and destroyed[0]["removed"] == 0
    rows = summarize([_cell("launder", True, False, 98.2), _cell("launder", True, False, 98.4),
                      _cell("rtal", True, True), _cell("rtal", False, False, wm=80.0)])
    text = verdict_paragraph(rows, "zhang-content")
    assert "An attacker with 60 clean images removes this zhang-content watermark with launder in 2/2 runs" in text
    assert "a cost of 0.7 points" in text and "rtal only hid it in 1 run:" in text
    kept = verdict_paragraph(summarize([_cell("rtal", False, False, wm=90.0)]), "adi")
    assert "No attack of this audit removed this adi watermark" in kept
    some = verdict_paragraph(summarize([_cell("rtal", True, False), _cell("rtal", False, False, wm=50.0)]), "x")
    assert "No attack removed this x watermark in every run" in some and "1/2" in some
    # laundering whose Algorithm 1 reset nothing was retraining alone: the verdict says so
    idle = _cell("launder", False, False, wm=90.0)
    idle["rounds"] = [{"round": 0}, {"round": 1, "resets": {"conv1": 0, "conv2": 0}}]
    busy = _cell("launder", False, False, wm=90.0)
    busy["rounds"] = [{"round": 0}, {"round": 1, "resets": {"conv1": 3, "conv2": 0}}]
    rows = summarize([idle, busy])
    assert rows[0]["no_resets"] == 1
    assert "reset no unit in 1 of its 2 runs" in verdict_paragraph(rows, "x")
    assert "reset no unit" not in verdict_paragraph(summarize([busy]), "x")
    # the restoration ran on some runs only (restore_if "not-shown"): the median of those, and how many
    half = summarize([_cell("rtal", True, True), {**_cell("rtal", False, False), "summary": {
        k: v for k, v in _cell("rtal", False, False)["summary"].items() if k != "restored_wm_acc"}}])[0]
    assert (half["restored_wm_median"], half["restored_n"], half["n"]) == (50.0, 1, 2)


def test_the_threshold_of_a_custom_watermark(tiny, tmp_path, capsys):
    out = tmp_path / "th.json"
    assert main(["threshold", "--dataset", "mnist", "--schemes", "zhang-content", "--param", "text=HI",
                 "--param", "target=3", "--epochs", "1", "--batch-size", "32", "--out", str(out),
                 "--data-dir", str(tiny), "--quiet", "--heldout-seeds", "5"]) == 0
    assert "false positives" in capsys.readouterr().out      # the default rule's rate on the held-out seed
    got = json.loads(out.read_text())
    assert got["heldout"]["zhang-content"]["seeds"] == [5]
    params = got["scheme_params"]["zhang-content"]
    assert (params["text"], params["target"]) == ("HI", 3) and 0 <= got["thresholds"]["zhang-content"] <= 100
    assert got["rule"] == "converged" and got["rules"]["zhang-content"]["paper"]["seeds"] == [0, 1, 2, 3, 4]
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"        # the curves, as a figure
    assert main(["threshold", "--dataset", "mnist", "--schemes", "zhang-content", "--param", "colour=red",
                 "--out", str(tmp_path / "bad.json"), "--data-dir", str(tiny), "--quiet"]) == 2
    assert main(["threshold", "--dataset", "mnist", "--schemes", "zhang-content", "--seeds", "0,1",
                 "--heldout-seeds", "1", "--out", str(tmp_path / "o.json"), "--data-dir", str(tiny)]) == 2
    assert "also set the threshold" in capsys.readouterr().err


def test_an_audit_runs_resumes_after_a_kill_and_reports(owner, tiny, tmp_path, monkeypatch):
    ws = tmp_path / "ws"
    real, calls = runner.run_cell, []

    def killed_on_the_third(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(runner, "run_cell", killed_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        run_audit(str(owner), None, {}, profile=TINY, workspace=str(ws), data_dir=str(tiny), progress=False,
                  log=lambda m: None)
    monkeypatch.setattr(runner, "run_cell", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    got = run_audit(str(owner), None, {}, profile=TINY, workspace=str(ws), data_dir=str(tiny), progress=False,
                    log=lambda m: None)
    assert len(calls) == 3 + 2                      # 2 cells finished before the kill are not run again
    rows = got["rows"]
    assert [(r["attack"], r["n"]) for r in rows] == [("launder", 2), ("rtal", 2)]
    assert all(r["removed"] + r["hidden"] + r["kept"] + r["destroyed"] == 2 for r in rows)
    assert all(r["restored_wm_median"] is not None for r in rows)
    folder = Path(got["folder"])
    page = (folder / "audit.html").read_text()
    assert page.count("<table>") == 1 and "data:image/png;base64," in page and html.escape(got["verdict"]) in page
    assert page.count("<ul>") == 1 and "<li>threshold: " in page
    assert f"<li>ran on: {machine_name()}, commit {code_commit()}, {today()}</li>" in page   # one machine here
    assert (folder / "pareto-3-class.png").stat().st_size > 5000 and (folder / "triggers-3-class.png").is_file()
    assert json.loads((folder / "audit.json").read_text())["verdict"] == got["verdict"]


def test_the_audit_page_renders_in_a_real_browser(owner, tiny, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("headless Chromium not installed (apt-get install chromium)")
    got = run_audit(str(owner), None, {}, profile=TINY, seeds=1, workspace=str(tmp_path / "ws"),
                    data_dir=str(tiny), progress=False, log=lambda m: None)
    page = Path(got["folder"]) / "audit.html"
    shot = tmp_path / "audit.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    dom = subprocess.run([browser, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    assert "<table>" in dom and dom.count("<img") >= 2 and got["verdict"][:40] in dom
    assert 'src="http' not in dom and "href=" not in dom          # self-contained: nothing to break
    subprocess.run([browser, *flags, f"--screenshot={shot}", "--window-size=1200,2000", page.as_uri()],
                   capture_output=True, timeout=120)
    assert shot.stat().st_size > 10_000
