"""Sound verdicts: threshold rules on synthetic curves, the base-rate and task checks, outcomes with
utility, the clean-model cache, and degenerate models that must never be declared owned."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nnlaunder.cli import main
from nnlaunder.errors import UserError
from nnlaunder.watermarks.verify import (
    CleanPoint,
    binomial_sf,
    check_alpha,
    converged,
    format_p,
    outcome,
    threshold_rule,
    upper_bound,
    verdict,
)

REPO = Path(__file__).resolve().parents[1]


def _curve(seed: int, rates: list[int], tests: list[float], n: int = 1000) -> list[CleanPoint]:
    return [CleanPoint(seed, e + 1, r, n, t, tests[-1]) for e, (r, t) in enumerate(zip(rates, tests, strict=True))]


# a warm-up spike at epoch 2 (test 80%), converged epochs from 4 on (within 1 point of 90%)
SPIKY = _curve(0, [5, 400, 30, 2, 0, 1], [60, 80, 85, 89.2, 89.9, 90.0]) + \
    _curve(1, [0, 10, 3, 0, 0, 0], [61, 79, 86, 89.5, 90.3, 90.1])


def test_the_paper_rule_takes_the_spike_the_default_rule_does_not():
    assert threshold_rule("paper", SPIKY).threshold == pytest.approx(40.0)
    conv = converged(SPIKY)
    assert sorted((p.seed, p.epoch) for p in conv) == [(0, 4), (0, 5), (0, 6), (1, 4), (1, 5), (1, 6)]
    th = threshold_rule("converged", SPIKY, alpha=0.01)
    # the largest converged rate is 2/1000; its 99% upper bound lies above it, far below the spike
    assert 0.2 < th.threshold < 1.0 and th.threshold == pytest.approx(100 * upper_bound(2, 1000, 0.01))
    assert (th.seeds, th.epochs, th.rule) == ((0, 1), 6, "converged")
    assert threshold_rule("converged-max", SPIKY).threshold == pytest.approx(0.2)
    nf = threshold_rule("normal-fit", SPIKY).threshold
    assert 0.05 < nf < 0.4


def test_a_null_rate_seen_as_zero_is_bounded_from_above():
    zeros = _curve(0, [0, 0, 0], [89.5, 90, 90], n=900) + _curve(1, [0, 0, 0], [89.7, 90.1, 90.2], n=900)
    th = threshold_rule("converged", zeros).threshold
    assert th == pytest.approx(100 * (1 - 0.01 ** (1 / 900)), rel=1e-3)     # Clopper-Pearson at k = 0
    assert threshold_rule("converged-max", zeros).threshold == 0.0
    assert not verdict(1, 900, th).owned and not verdict(3, 900, th).owned


def test_the_upper_bound_is_clopper_pearson():
    # P(X <= k | n, upper) == alpha at the bound
    for k, n in ((0, 50), (3, 100), (40, 90), (99, 100)):
        u = upper_bound(k, n, 0.05)
        assert 1 - binomial_sf(k + 1, n, u) == pytest.approx(0.05, abs=1e-6)
    assert upper_bound(10, 10, 0.05) == 1.0


def test_rules_refuse_what_they_cannot_use():
    with pytest.raises(UserError, match="unknown threshold rule"):
        threshold_rule("median", SPIKY)
    far = [CleanPoint(0, 1, 5, 100, 50.0, 90.0)]
    with pytest.raises(UserError, match="within 1.0 points"):
        threshold_rule("converged", far)
    assert threshold_rule("paper", far).threshold == 5.0


@pytest.mark.parametrize("alpha", [0, -0.1, 0.5, 0.9999999, math.nan, True])
def test_alpha_must_be_a_level_of_evidence(alpha):
    with pytest.raises(UserError, match="alpha"):
        check_alpha(alpha)


def test_p_values_never_print_as_zero():
    assert binomial_sf(9000, 9000, 0.01) == 0.0
    v = verdict(9000, 9000, 1.0)
    assert v.p_value == 0.0 and v.p_log10 < -300
    assert format_p(v.p_value, v.p_log10).startswith("< 1e-")
    assert format_p(0.0) == "< 1e-300" and format_p(0.0123) == "0.0123" and format_p(math.nan) == "-"
    assert "p 0 " not in v.summary()


@pytest.mark.parametrize("shown, drop, restored, tol, want", [
    (True, 50.0, None, 3.0, "kept"),          # ownership still shown: kept, whatever it cost
    (False, 1.0, None, 3.0, "removed"),
    (False, 1.0, False, 3.0, "removed"),
    (False, 1.0, True, 3.0, "hidden"),
    (False, 3.0, None, 3.0, "removed"),       # the tolerance itself is allowed
    (False, 3.01, None, 3.0, "destroyed"),
    (False, 80.0, True, 3.0, "destroyed"),    # a 10%-accuracy model is destroyed, never removed
    (False, 4.0, None, 5.0, "removed"),       # WRT's 5 points
])
def test_outcomes(shown, drop, restored, tol, want):
    assert outcome(shown, drop, restored, tol) == want


# ---------------------------------------------------------------------------------------------------
# The clean-model cache
def test_a_second_threshold_on_the_same_architecture_trains_nothing(tiny, tmp_path, monkeypatch):
    from nnlaunder import data as D
    from nnlaunder import train as T
    from nnlaunder.experiments import clean
    from nnlaunder.recipes import owner_config
    from nnlaunder.watermarks.schemes import make_watermark

    tr, te = D.load("mnist", str(tiny), "train"), D.load("mnist", str(tiny), "test")
    cfg = owner_config("mnist-cnn", epochs=2, batch_size=32)
    calls = []
    real = T.train
    monkeypatch.setattr(T, "train", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = clean.measure_thresholds("mnist", "mnist-cnn", cfg, [0, 1], {"zhang-content": make_watermark(
        "zhang-content", tr, te, str(tiny))}, tr, te, root=tmp_path)
    assert len(calls) == 2
    assert set(first["rules"]["zhang-content"]) == {"paper", "converged", "converged-max", "normal-fit"}
    # another watermark (custom text, place and target) on the same architecture: evaluation only
    wm = make_watermark("zhang-content", tr, te, str(tiny), {"text": "HI", "target": 3, "position": [2, 2]})
    second = clean.measure_thresholds("mnist", "mnist-cnn", cfg, [0, 1], {"hi": wm}, tr, te, root=tmp_path)
    assert len(calls) == 2 and second["seeds"] == [0, 1]
    assert second["test_acc"] == first["test_acc"]
    # another recipe is another trajectory
    clean.clean_trajectory("mnist", "mnist-cnn", owner_config("mnist-cnn", epochs=1, batch_size=32), 0, tr, te,
                           root=tmp_path)
    assert len(calls) == 3


def test_heldout_seeds_measure_each_rules_false_positive_rate_as_verify_decides(tiny, tmp_path):
    """`heldout`: clean seeds that set no threshold; per rule, the share of their converged epochs that `verify`
    (threshold test, base-rate and task checks) would call owned. A seed cannot be both."""
    from nnlaunder import data as D
    from nnlaunder.checkpoint import load_model
    from nnlaunder.experiments import clean
    from nnlaunder.recipes import owner_config
    from nnlaunder.watermarks.schemes import make_watermark
    from nnlaunder.watermarks.verify import verify

    tr, te = D.load("mnist", str(tiny), "train"), D.load("mnist", str(tiny), "test")
    cfg = owner_config("mnist-cnn", epochs=3, batch_size=32)
    wm = make_watermark("zhang-content", tr, te, str(tiny))
    doc = clean.measure_thresholds("mnist", "mnist-cnn", cfg, [0], {"c": wm}, tr, te, root=tmp_path, heldout=[1])
    held = doc["heldout"]["c"]
    assert held["seeds"] == [1] and set(held["by_threshold"]) == set(doc["rules"]["c"])
    traj = clean.clean_trajectory("mnist", "mnist-cnn", cfg, 1, tr, te, root=tmp_path)
    epochs = [p.epoch for p in converged(clean.wm_points(traj, wm))]
    assert held["epochs"] == len(epochs) >= 1
    for rule, got in held["by_threshold"].items():
        th = doc["rules"]["c"][rule]["threshold"]
        owned = [verify(load_model(traj.folder / f"epoch-{e:03d}")[0], wm, th, test=(te.x, te.y),
                        num_classes=10).owned for e in epochs]
        assert got["threshold"] == th and got["false_positives"] == sum(owned)
        assert got["fpr_pct"] == pytest.approx(100 * sum(owned) / len(owned))
    # a threshold of 0% on a model that hits the target class now and then: the verdict's own tests decide
    low = clean.heldout_rates([traj], wm, {"zero": 0.0, "all": 100.0}, te, 10)["by_threshold"]
    assert low["all"]["false_positives"] == 0 and low["zero"]["interval_pct"][1] <= 100
    with pytest.raises(UserError, match="held-out seeds \\[0\\]"):
        clean.measure_thresholds("mnist", "mnist-cnn", cfg, [0], {"c": wm}, tr, te, root=tmp_path, heldout=[0])


def test_a_broken_cache_entry_is_trained_again(tiny, tmp_path):
    from nnlaunder import data as D
    from nnlaunder.experiments import clean
    from nnlaunder.recipes import owner_config

    tr, te = D.load("mnist", str(tiny), "train"), D.load("mnist", str(tiny), "test")
    cfg = owner_config("mnist-cnn", epochs=1, batch_size=32)
    t = clean.clean_trajectory("mnist", "mnist-cnn", cfg, 0, tr, te, root=tmp_path)
    (t.folder / "metrics.json").write_text('{"epochs": [{"epoch": "x"}]}')
    again = clean.clean_trajectory("mnist", "mnist-cnn", cfg, 0, tr, te, root=tmp_path)
    assert again.test_accs == t.test_accs     # resumed from its saved state: the same model, nothing lost
    assert json.loads((t.folder / "metrics.json").read_text())["epochs"][0]["epoch"] == 1


# ---------------------------------------------------------------------------------------------------
# Degenerate models: no ownership verdict, on MNIST and CIFAR-10 models
def _last_linear(state: dict[str, torch.Tensor]) -> tuple[str, str]:
    w = [k for k, v in state.items() if k.endswith("weight") and v.ndim == 2 and v.shape[0] == 10]
    assert len(w) == 1, w                 # the classifier: the one dense layer with 10 outputs
    return w[0], w[0][: -len("weight")] + "bias"


def _all_zero(state):
    for k, v in state.items():
        if v.is_floating_point() and not k.endswith(("mean", "std", "running_var")):
            state[k] = torch.zeros_like(v)


def _last_zero(state):
    w, b = _last_linear(state)
    state[w] = torch.zeros_like(state[w])
    state[b] = torch.zeros_like(state[b])


def _huge_bias(state):
    _, b = _last_linear(state)
    state[b] = state[b].clone()
    state[b][0] = 1e30


def _constant(state):            # an equivalent constant-class model: the target wins by a wide margin
    w, b = _last_linear(state)
    state[w] = torch.zeros_like(state[w])
    state[b] = torch.full_like(state[b], -5.0)
    state[b][0] = 5.0


@pytest.mark.parametrize("model", ["mnist/zhang-content", "mnist/zhang-noise", "cifar10/zhang-content",
                                   "cifar10/zhang-unrelated"])
def test_degenerate_models_are_never_declared_owned(data_dir, model):
    """The committed owner models, and four degenerate variants of each: the verdict `nnlaunder verify` gives
    (the same function) on a stratified tenth of the test set (its verification set follows from it)."""
    from nnlaunder import data as D
    from nnlaunder.checkpoint import load_model
    from nnlaunder.watermarks.schemes import make_watermark
    from nnlaunder.watermarks.verify import verify

    src = REPO / "models" / model
    _, meta = load_model(src)
    tr = D.load(meta["dataset"], str(data_dir), "train")
    te = D.stratified_subset(D.load(meta["dataset"], str(data_dir), "test"), fraction=0.1, seed=0)
    wm = make_watermark(meta["scheme"], tr, te, str(data_dir), meta.get("scheme_params") or {})
    kinds = {"zero": _all_zero, "last-zero": _last_zero, "huge-bias": _huge_bias, "constant": _constant}
    verdicts = {}
    for name, change in [("as-is", None), *kinds.items()]:
        m, _ = load_model(src)
        if change is not None:
            state = {k: v.clone() for k, v in m.state_dict().items()}
            change(state)
            m.load_state_dict(state)
        verdicts[name] = verify(m, wm, 1.0, 0.01, test=(te.x, te.y), num_classes=tr.num_classes)
    assert verdicts["as-is"].owned and verdicts["as-is"].status == "owned"
    for name in kinds:
        v = verdicts[name]
        assert v.wm_acc > 90, (name, v)                    # every one "hits" the target ...
        assert not v.owned and v.status == "no evidence", (name, v)   # ... and shows no watermark


def test_a_degenerate_model_prints_why(data_dir, tmp_path, capsys):
    src = REPO / "models" / "mnist" / "zhang-content"
    state = load_file(str(src.with_suffix(".safetensors")))
    _constant(state)
    save_file(state, str(tmp_path / "c.safetensors"))
    (tmp_path / "c.json").write_text(src.with_suffix(".json").read_text())
    assert main(["verify", str(tmp_path / "c"), "--threshold", "1.0", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "no evidence" in out and "not above chance" in out and "OWNERSHIP SHOWN" not in out


def test_verify_refuses_a_threshold_file_of_another_dataset(data_dir, capsys):
    code = main(["verify", str(REPO / "models" / "cifar10" / "clean-cifar-cnn-s0"), "--scheme", "zhang-content",
                 "--threshold-file", str(REPO / "benchmarks" / "results" / "thresholds-mnist.json"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "measured for dataset 'mnist'" in err and err.count("\n") == 1
