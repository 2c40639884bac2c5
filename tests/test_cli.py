import json
import subprocess
import sys

import pytest

from nnlaunder.cli import main

from .synthetic import launder_interrupted_at


def run(args, capsys):
    code = main(args)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.mark.parametrize("args,needle", [
    (["embed", "--dataset", "mnist", "--scheme", "zhang-logo", "--out", "x"], "invalid choice"),
    (["train", "--dataset", "mnist", "--arch", "cifar-cnn", "--out", "x"], "is for cifar10, not 'mnist'"),
    (["train", "--dataset", "mnist", "--epochs", "-1", "--out", "x"], "expected an integer >= 1"),
    (["train", "--dataset", "mnist", "--lr", "fast", "--out", "x"], "expected a number"),
    (["verify", "no/such/model"], "missing model metadata"),
    (["threshold", "--dataset", "mnist", "--schemes", "zhang-foo", "--out", "t.json"], "unknown scheme"),
    (["embed", "--dataset", "mnist", "--scheme", "zhang-noise", "--param", "sigma=1", "--out", "x"],
     "unknown key"),
    (["embed", "--dataset", "mnist", "--scheme", "adi", "--param", "mode=pt", "--out", "x"], "--base MODEL"),
])
def test_user_mistakes_are_one_line_exit_2(args, needle, capsys, data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    try:
        code, out, err = run(args, capsys)
    except SystemExit as e:          # argparse's own errors
        code, err = e.code, capsys.readouterr().err
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err


def test_missing_data_dir_is_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("NNLAUNDER_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)                  # no ../shared/data from here: the empty user cache is used
    code, _, err = run(["train", "--dataset", "mnist", "--out", str(tmp_path / "m")], capsys)
    assert code == 2 and "nnlaunder data fetch mnist" in err and len(err.strip().splitlines()) == 1


def test_unwritable_output(capsys, data_dir, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    code, _, err = run(["train", "--dataset", "mnist", "--epochs", "1", "--out", str(ro / "sub" / "m")], capsys)
    ro.chmod(0o700)
    if code == 0:
        pytest.skip("running as a user who can write anywhere (root)")
    assert code == 2 and "output folder" in err


def test_embed_verify_end_to_end(capsys, data_dir, tmp_path):
    """One short embedding on real MNIST, then verify via the CLI (about 20 s on 2 cores)."""
    out = tmp_path / "wm"
    code, o, _ = run(["embed", "--dataset", "mnist", "--scheme", "zhang-content", "--epochs", "1",
                      "--param", "n_verify=2000", "--out", str(out), "--quiet"], capsys)
    assert code == 0 and out.with_suffix(".safetensors").is_file()
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["scheme"] == "zhang-content" and meta["metrics"]["test_acc"] > 95
    code, o, _ = run(["verify", str(out), "--threshold", "1.5", "--json"], capsys)
    v = json.loads(o)
    assert code == 0 and v["n"] == 2000 and v["wm_acc"] == pytest.approx(meta["metrics"]["wm_acc"])
    assert v["owned"] == (v["wm_acc"] > 1.5 and v["p_value"] < 0.01)
    code, o, err = run(["verify", str(out)], capsys)
    assert code == 2 and "--threshold" in err
    # launder it (Neural Cleanse capped at 3 epochs to stay fast) and read the report
    ldir = tmp_path / "laundered"
    code, o, err = run(["launder", str(out), "--out", str(ldir), "--budget", "0.002", "--nc-epochs", "3",
                        "--nc-preset", "fast", "--rounds", "2", "--verify-scheme", "zhang-content",
                        "--param", "n_verify=2000",
                        "--threshold", "1.5", "--quiet"], capsys)
    assert code == 0, err
    report = json.loads((ldir / "report.json").read_text())
    assert report["n_clean"] == 120 and 1 <= len(report["rounds"]) <= 2
    assert report["config"]["nc"]["steps_per_epoch"] == 8 and report["config"]["nc"]["max_epochs"] == 3
    first = report["rounds"][0]
    assert set(first["metrics"]) == {"test_acc", "wm_acc"} and len(first["anomaly"]) == 10
    assert (ldir / "triggers.png").stat().st_size > 1000 and (ldir / "laundered.safetensors").is_file()
    assert "round 1:" in o and not (ldir / "partial.safetensors").exists()
    # interrupted during round 2, then --resume: round 1 is kept, the report equals the unbroken run's
    cut = tmp_path / "cut"
    args = ["launder", str(out), "--out", str(cut), "--budget", "0.002", "--nc-epochs", "3", "--nc-preset", "fast",
            "--rounds", "2", "--verify-scheme", "zhang-content", "--param", "n_verify=2000", "--threshold", "1.5",
            "--quiet"]
    with launder_interrupted_at(2):
        code, _, err = run(args, capsys)
    assert code == 130 and "--resume" in err and (cut / "partial.safetensors").is_file()
    code, _, err = run([*args, "--resume", "--retrain-epochs", "1"], capsys)
    assert code == 2 and "other laundering settings" in err
    code, o, err = run([*args, "--resume"], capsys)
    assert code == 0 and "resuming after round 1" in o and "round 1:" not in o, err
    again = json.loads((cut / "report.json").read_text())["rounds"]
    assert [r["metrics"] for r in again] == [r["metrics"] for r in report["rounds"]]
    assert not (cut / "partial.safetensors").exists()
    code, _, err = run(["launder", str(out), "--out", str(ldir), "--budget", "1.5"], capsys)
    assert code == 2 and "--budget" in err
    # the persistence commands: fine-tune on 1% (mixed), then restore on another 1% of owner data
    fdir, rdir = tmp_path / "ft", tmp_path / "rs"
    code, o, err = run(["finetune", str(out), "--out", str(fdir), "--split", "0.01", "--epochs", "2", "--mixed",
                        "--quiet"], capsys)
    assert code == 0, err
    hist = json.loads((fdir / "history.json").read_text())
    assert hist["phase"] == "finetuned-mixed" and hist["n_split"] == 600 and len(hist["history"]) == 2
    assert hist["history"][-1]["param_shift"] == pytest.approx(hist["param_shift"]["total"])
    assert (fdir / "epoch-002.safetensors").is_file() and "wm_acc" in hist["history"][0]
    code, o, err = run(["restore", str(fdir / "model"), "--out", str(rdir), "--split", "0.99", "--epochs", "1",
                        "--quiet"], capsys)
    assert code == 0, err
    assert json.loads((rdir / "history.json").read_text())["n_owner"] == 600
    code, _, err = run(["restore", str(fdir / "model"), "--out", str(rdir), "--split", "1.0"], capsys)
    assert code == 2 and "--split" in err
    code, _, err = run(["landscape", str(tmp_path / "laundered"), "--out", str(tmp_path / "land.png")], capsys)
    assert code == 2 and "at least 3" in err
    code, _, err = run(["finetune", str(out), "--out", str(fdir), "--split", "0.01", "--epochs", "3", "--quiet"],
                       capsys)
    code, o, err = run(["landscape", str(fdir), "--grid", "5", "--images", "200", "--out",
                        str(tmp_path / "land.png")], capsys)
    assert code == 0, err
    land = json.loads((tmp_path / "land.json").read_text())
    # the trajectory: epoch 0 (the starting model) + 3 epochs
    assert len(land["loss"]) == 5 and len(land["coords"]) == 4 and (tmp_path / "land.png").stat().st_size > 5000


def test_console_entry_point_exit_code(tmp_path):
    r = subprocess.run([sys.executable, "-m", "nnlaunder.cli", "verify", str(tmp_path / "none")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


@pytest.mark.parametrize("cmd", [["train", "--dataset", "mnist"],
                                 ["embed", "--dataset", "mnist", "--scheme", "zhang-content"]])
def test_zero_training_epochs_are_refused(cmd, capsys, tmp_path):
    """An untrained model saved as if it were one (8.64% test accuracy) is a silently wrong result."""
    with pytest.raises(SystemExit) as e:
        main([*cmd, "--epochs", "0", "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--epochs: expected an integer >= 1, got 0" in err
    assert not (tmp_path / "m.safetensors").exists()


def test_the_tools_warnings_print_as_one_line(capsys):
    """A warning of the tool's own (e.g. laundering's round that reset nothing) reads like its errors."""
    import warnings

    from nnlaunder.errors import one_line_warnings

    with one_line_warnings():
        warnings.warn("round 1: Algorithm 1 reset no unit", stacklevel=1)
    err = capsys.readouterr().err
    assert err == "nnlaunder: warning: round 1: Algorithm 1 reset no unit\n"
