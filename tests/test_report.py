import json

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


def test_report_folder(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    _fill(ws)
    out = build_report(ws, tmp_path / "rep")
    md = (out / "index.md").read_text()
    assert "| fig3 | mnist | zhang-content | launder | 0.6% | 2 | 99.00 → 97.00 (98.34) |" in md
    assert "1/class" in md and "(1.5)" in md
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["clean-curves.png", "rounds-fig3-mnist-zhang-content.png"]
    page = (out / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "<table>" in page and 'src="http' not in page


def test_report_cli_errors(tmp_path, capsys):
    assert main(["report", "--workspace", str(tmp_path / "none")]) == 2
    assert "no results store" in capsys.readouterr().err
