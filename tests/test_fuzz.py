"""Property tests: every generated config or command line ends in success or a one-line error."""

import io
from contextlib import redirect_stderr, redirect_stdout

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nnlaunder.cli import main
from nnlaunder.errors import UserError
from nnlaunder.experiments.config import CellConfig, expand

KEYS = [f.name for f in CellConfig.__dataclass_fields__.values()] + [
    "sweep", "bogus", "attack_params.dt", "scale", "text", "std", "target", "betas", "batch_size", "nc", "factory",
    "retrain_epochs", "n_embed"]
# the hostile-input classes: huge, negative and non-finite numbers, integers past 2^64, odd strings
scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([2**64 + 1, 2**63, -2**63 - 1, 10**30, 10**9, -1, 0, 1e400, -0.0, 1e-320]),
                    st.sampled_from(["", "A" * 36, "os:system", "1000000/class", "inf", "../x"]),
                    st.text(max_size=8), st.sampled_from(["mnist", "cifar10", "zhang-noise", "adi", "launder",
                                                          "prune", "1/class", "0/class", "strong", "resnet20"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                        st.dictionaries(st.sampled_from(KEYS), inner, max_size=3)),
                      max_leaves=6)
configs = st.dictionaries(st.sampled_from(KEYS), values, max_size=6)


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(configs)
def test_config_loader_never_crashes(raw):
    try:
        cells = expand(raw)
    except UserError as e:
        assert str(e) and "\n" not in str(e)
    else:
        assert cells and all(c.cell_id() for c in cells)


words = st.sampled_from(["train", "embed", "verify", "threshold", "launder", "run", "demo", "--dataset", "mnist",
                         "cifar10", "--arch", "resnet20", "--scheme", "zhang-noise", "--epochs", "-1", "x", "--lr",
                         "nan", "--param", "std=0", "--budget", "0", "--rounds", "0", "--threshold", "200",
                         "--out", "--seeds", "a,b", "--dry-run", "--threads", "0", "5/class", "none.toml",
                         "--alpha", "0.9999999", "--calibrate", "--calibrate-grid", "[[[[", "--model-factory", ":",
                         "os:system", "--model-kwargs", "9" * 5000, "--allow-code", "--allow-factory", "audit",
                         "--workspace", "/dev/null", "report", "data", "check", "all", "18446744073709551617"])


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(words, min_size=1, max_size=7))
def test_cli_arguments_never_crash(tmp_path_factory, argv):
    # Only argument lists that fail fast are run: anything that would start a real training is
    # cut off by giving it a non-existent data folder.
    import os

    saved = os.environ.get("NNLAUNDER_DATA")
    os.environ["NNLAUNDER_DATA"] = str(tmp_path_factory.getbasetemp() / "no-data-here")
    err = io.StringIO()
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.getbasetemp())
    try:
        with redirect_stdout(io.StringIO()), redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as e:     # argparse
                code = e.code
    finally:
        os.chdir(cwd)
        if saved is None:
            os.environ.pop("NNLAUNDER_DATA", None)
        else:
            os.environ["NNLAUNDER_DATA"] = saved
    text = err.getvalue()
    assert "Traceback" not in text
    if code not in (0, None):
        assert code == 2 and len([ln for ln in text.strip().splitlines() if ln]) == 1, (argv, text)
