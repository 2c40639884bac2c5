"""Every `nnlaunder` command in the README parses as written (flags, choices, types), and its Results table is
the engine's over the committed cells."""

import importlib.util
import shlex
from pathlib import Path

import pytest

from nnlaunder.cli_flags import make_parser

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[str]:
    """The README's `nnlaunder` commands as benchmarks/readme_walk.py runs them (one parser for both)."""
    spec = importlib.util.spec_from_file_location("readme_walk", README.parent / "benchmarks" / "readme_walk.py")
    walk = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(walk)
    return walk.readme_commands()


def test_the_readme_has_commands():
    assert len(readme_commands()) >= 15


@pytest.mark.parametrize("cmd", readme_commands())
def test_a_readme_command_parses(cmd):
    argv = shlex.split(cmd)[1:]
    make_parser().parse_args(argv)


def test_the_readme_results_table_is_the_engines_over_the_committed_cells():
    """Each row of the README's Results table (removed with its interval, destroyed, test accuracy mean ± sd,
    WM accuracy median [range], threshold) is what `report.battery.over_seeds` gives over the committed Table 2
    cells (benchmarks/cells; `nnlaunder run experiments/paper/table2-*.toml` then `nnlaunder report`)."""
    from nnlaunder.experiments.store import workspace_cells
    from nnlaunder.report.battery import over_seeds, scheme_name

    cells = [c for c in workspace_cells(README.parent / "benchmarks" / "cells")
             if c["experiment"] in ("table2-mnist", "table2-cifar10")]
    by: dict[tuple[str, str], list[dict]] = {}
    for c in cells:
        by.setdefault((c["config"]["dataset"], scheme_name(c["config"])), []).append(c["summary"])
    names = {"MNIST": "mnist", "CIFAR-10": "cifar10"}
    rows = [ln for ln in README.read_text().splitlines() if ln.startswith(("| MNIST ", "| CIFAR-10 "))]
    assert len(rows) == len(by) == 8
    for ln in rows:
        label, removed, test, wm, threshold = [c.strip() for c in ln.strip("|").split("|")]
        ds, wm_name = label.split()[:2]
        sms = by[(names[ds], wm_name)]
        s = over_seeds(sms)
        assert removed.replace("**", "").startswith(s.rate()), (label, removed, s.rate())
        assert (f"{s.destroyed}/{s.n} destroyed" in removed) == (s.destroyed > 0), (label, removed)
        assert test.startswith(s.test()) and wm.startswith(s.wm()), (label, test, wm, s)
        assert threshold == f"{sms[0]['threshold']:.2f}", (label, threshold)
