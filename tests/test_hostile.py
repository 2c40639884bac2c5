"""Hostile and broken inputs: a verdict is never given over outputs that are not real predictions,
and broken files end in one line, never a traceback or a silently wrong number."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nnlaunder.cli import main

from .tinydata import make_tiny_data


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_data(tmp_path_factory.mktemp("tinydata"))


@pytest.fixture(scope="module")
def owner(tiny, tmp_path_factory) -> Path:
    """A zhang-content MNIST model on the tiny data (one epoch)."""
    out = tmp_path_factory.mktemp("owner") / "wm"
    assert main(["embed", "--dataset", "mnist", "--scheme", "zhang-content", "--epochs", "1", "--batch-size", "32",
                 "--out", str(out), "--data-dir", str(tiny), "--quiet"]) == 0
    return out


def _variant(owner: Path, tmp_path: Path, name: str, change) -> Path:
    """A copy of the owner model with `change(state)` applied to its weights."""
    state = load_file(str(owner.with_suffix(".safetensors")))
    change(state)
    dst = tmp_path / name
    save_file(state, str(dst.with_suffix(".safetensors")))
    dst.with_suffix(".json").write_text(owner.with_suffix(".json").read_text())
    return dst


def _run(args, tiny, capsys):
    code = main([*args, "--data-dir", str(tiny), "--quiet"])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def _zero_std(state):            # finite weights, NaN/Inf outputs at run time
    state["0.std"] = torch.zeros_like(state["0.std"])


def _huge(state):                # finite weights whose logits overflow to Inf
    k = next(k for k in state if k.endswith("weight") and state[k].ndim == 4)
    state[k] = torch.full_like(state[k], 3e38)


@pytest.mark.parametrize("change", [_zero_std, _huge])
def test_non_finite_outputs_give_no_verdict(owner, tiny, tmp_path, capsys, change):
    state = load_file(str(owner.with_suffix(".safetensors")))
    if "0.std" not in state:
        pytest.skip("the model's normalisation buffer has another name")
    broken = _variant(owner, tmp_path, "broken", change)
    for extra in ([], ["--json"]):
        code, out, err = _run(["verify", str(broken), "--threshold", "0", *extra], tiny, capsys)
        assert code == 3 and "inconclusive" in err and "NaN or Inf" in err
        assert "OWNERSHIP SHOWN" not in out and '"owned": true' not in out


def test_complex_weights_are_refused(owner, tiny, tmp_path, capsys):
    def to_complex(state):
        k = next(k for k in state if k.endswith("weight"))
        state[k] = state[k].to(torch.complex64)
    code, _, err = _run(["verify", str(_variant(owner, tmp_path, "cplx", to_complex)), "--threshold", "1"], tiny,
                        capsys)
    assert code == 2 and "wrong kind of dtype" in err and len(err.strip().splitlines()) == 1


def test_nan_predictions_are_never_hits():
    from nnlaunder.train import accuracy, predict_checked

    class NaNNet(torch.nn.Module):
        def forward(self, x):
            out = torch.zeros(len(x), 10)
            out[::2] = float("nan")                # argmax of a NaN row is class 0
            return out
    x, y = torch.zeros(6, 1, 4, 4), torch.zeros(6, dtype=torch.long)
    pred, bad = predict_checked(NaNNet(), x)
    assert bad == 3 and pred.tolist() == [-1, 0, -1, 0, -1, 0]
    assert accuracy(NaNNet(), x, y) == pytest.approx(50.0)


def test_evaluator_never_calls_nan_outputs_removed(owner, tiny, tmp_path):
    from nnlaunder import data as D
    from nnlaunder.checkpoint import load_model
    from nnlaunder.experiments.evaluate import evaluator
    from nnlaunder.watermarks.schemes import make_watermark

    broken, _ = load_model(_variant(owner, tmp_path, "nan", _zero_std))
    tr, te = D.load("mnist", tiny, "train"), D.load("mnist", tiny, "test")
    metrics = evaluator(te, make_watermark("zhang-content", tr, te, tiny))(1, broken)
    assert metrics["wm_nonfinite"] == 90 and metrics["wm_acc"] == 0.0


def test_tampered_resume_state_is_refused(owner, tiny, tmp_path, capsys):
    args = ["launder", str(owner), "--per-class", "3", "--nc-preset", "fast", "--nc-epochs", "1", "--rounds", "2",
            "--retrain-epochs", "1", "--out", str(tmp_path / "l")]
    import nnlaunder.attacks.laundering as L

    real = L.launder

    def interrupted(*a, **kw):
        def on_round(r, m, info):
            if r == 2:
                raise KeyboardInterrupt
            return kw["on_round"](r, m, info)
        return real(*a, **{**kw, "on_round": on_round})
    L.launder = interrupted
    try:
        code, _, _ = _run(args, tiny, capsys)
    finally:
        L.launder = real
    state_file = tmp_path / "l" / "partial.safetensors"
    assert code == 130 and state_file.is_file()
    from safetensors import safe_open

    with safe_open(str(state_file), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    k = next(k for k in tensors if k.startswith("model.") and tensors[k].is_floating_point())
    tensors[k] = torch.full_like(tensors[k], float("nan"))
    save_file(tensors, str(state_file), metadata=meta)
    code, out, err = _run([*args, "--resume"], tiny, capsys)
    assert code == 2 and "NaN/Inf" in err and "round 2" not in out
    json.loads(meta["launder_state"])          # the metadata itself was left intact
