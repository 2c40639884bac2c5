"""The public API: `import nnlaunder as nl` names every function docs/api.md lists, and the
document's complete example runs as written."""

import dataclasses
import re
from pathlib import Path

import pytest

import nnlaunder as nl

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "api.md"


def test_every_listed_function_exists_and_is_documented():
    listed = set(re.findall(r"`nl\.(\w+)\(", DOC.read_text()))
    assert listed <= set(nl.__all__), listed - set(nl.__all__)
    for name in nl.__all__:
        fn = getattr(nl, name)
        assert callable(fn) and fn.__doc__, name


def test_the_cli_calls_the_api():
    """`nnlaunder train` and `embed` are the API's `train_clean` and `embed`; no command builds a model's
    metadata by hand."""
    cli = (ROOT / "src" / "nnlaunder" / "cli.py").read_text()
    assert "from .api import train_clean" in cli and "from .api import embed" in cli
    assert "model_meta(" not in cli and '{"arch": arch' not in cli


def test_docs_api_example_runs(data_dir, monkeypatch):
    code = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)[0]
    monkeypatch.chdir(ROOT)
    ns: dict = {}
    exec(compile(code, str(DOC), "exec"), ns)     # noqa: S102 (our own document's example)
    before, after, result = ns["before"], ns["after"], ns["result"]
    assert before.owned and before.wm_acc > 90
    assert after.test_acc > 97 and result.rounds and not after.owned


def test_attack_seeds_and_unknown_names():
    from nnlaunder.errors import UserError

    with pytest.raises(UserError):
        nl.attack("no-such-attack", None, None)


def test_cli_choices_are_the_library_constants():
    """A flag's choice list is the library's constant, so the two cannot drift apart."""
    from nnlaunder.attacks import laundering as L
    from nnlaunder.attacks.neural_cleanse import NC_PRESETS
    from nnlaunder.attacks.units import MEASURE_POINTS, POOLS
    from nnlaunder.cli_flags import make_parser
    from nnlaunder.train import AUGMENTS, OPTIMIZERS, SCHEDULES

    parser = make_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    launder = {a.dest: a.choices for a in sub.choices["launder"]._actions}
    want = {"bn_stats": L.BN_STATS, "reinit": L.REINIT, "stamping": L.STAMPING, "diff": L.DIFF_MODES,
            "triggers": L.TRIGGER_CHOICES, "layers": L.LAYER_CHOICES, "threshold_mode": L.THRESHOLD_MODES,
            "variant": tuple(L.VARIANTS), "nc_preset": tuple(NC_PRESETS), "measure": MEASURE_POINTS, "pool": POOLS}
    for dest, choices in want.items():
        assert tuple(launder[dest]) == tuple(choices), dest
    nested = {"nc", "retrain"}          # --nc-preset / --nc-epochs and --retrain-epochs / --retrain-lr
    assert {f.name for f in dataclasses.fields(L.LaunderConfig)} - nested <= set(launder), "a setting has no flag"
    train = {a.dest: a.choices for a in sub.choices["train"]._actions}
    assert tuple(train["optimizer"]) == OPTIMIZERS and tuple(train["schedule"]) == SCHEDULES
    assert tuple(train["augment"]) == AUGMENTS


def test_readme_python_example_runs(data_dir, monkeypatch):
    readme = ROOT / "README.md"
    assert len(readme.read_text().splitlines()) <= 120            # a newcomer reads it in five minutes
    code = re.findall(r"```python\n(.*?)```", readme.read_text(), re.S)[0]
    monkeypatch.chdir(ROOT)
    ns: dict = {}
    exec(compile(code, str(readme), "exec"), ns)     # noqa: S102 (our own document's example)
    assert not ns["result"].model.training and ns["res"].model is not None
