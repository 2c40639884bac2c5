import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from nnlaunder.errors import UserError
from nnlaunder.experiments.config import expand, load_experiment, select_cells
from nnlaunder.experiments.store import Store, merge_workspace

from .synthetic import keeper_that_stops


def test_grid_expansion_and_dotted_keys():
    cells = expand({"dataset": "mnist", "rounds": 2,
                    "sweep": {"scheme": ["zhang-content", "zhang-noise"], "budget": [0.006, "1/class"],
                              "attack_params.dt": [0.5, 1.0]}})
    assert len(cells) == 8
    assert {c.scheme for c in cells} == {"zhang-content", "zhang-noise"}
    assert {c.attack_params["dt"] for c in cells} == {0.5, 1.0}
    assert cells[0].attack_config().rounds == 2
    assert {c.budget_spec().get("per_class") for c in cells} == {None, 1}
    assert len({c.cell_id() for c in cells}) == 8
    partial = expand({"attack_params": {"retrain": {"epochs": 3}}})[0].attack_config()
    assert partial.retrain.epochs == 3 and partial.retrain.lr == 1e-4     # the rest stays the variant's
    fast = expand({"attack_params": {"nc": {"preset": "fast", "max_epochs": 40}}})[0].attack_config()
    assert fast.nc.amp and fast.nc.steps_per_epoch == 8 and fast.nc.max_epochs == 40
    one = expand({"dataset": "mnist"})
    assert len(one) == 1 and one[0].cell_id() == expand({"dataset": "mnist"})[0].cell_id()


def test_each_block_runs_the_grid_under_each_group_of_settings():
    """[[each]]: one group of settings per owner model (architecture, scheme, threshold); the sweep runs
    under every group; a table in a group merges into the base's table of that name."""
    cells = expand({"dataset": "cifar10", "attack_params": {"dt": 0.5, "ct": 1.0},
                    "each": [{"scheme": "zhang-noise", "threshold": 0.05},
                             {"scheme": "adi", "arch": "resnet20", "scheme_params": {"mode": "pt"}, "threshold": 30.9,
                              "attack_params": {"ct": 2.0}}],
                    "sweep": {"seed": [0, 1], "budget": [0.006, 0.108]}})
    assert len(cells) == 8
    noise = [c for c in cells if c.scheme == "zhang-noise"]
    adi = [c for c in cells if c.scheme == "adi"]
    assert len(noise) == len(adi) == 4 and {c.threshold for c in noise} == {0.05}
    assert {c.arch_name for c in adi} == {"resnet20"} and {c.scheme_params["mode"] for c in adi} == {"pt"}
    assert {c.arch_name for c in noise} == {"cifar-cnn"}
    assert adi[0].attack_params == {"dt": 0.5, "ct": 2.0}           # merged, not replaced
    assert noise[0].attack_params == {"dt": 0.5, "ct": 1.0}


def test_a_sweep_over_tables_merges_each_into_the_files_table():
    """An ablation: variants that set several options together, each laid over the row's own settings."""
    cells = expand({"dataset": "mnist", "threshold": 1.0, "attack_params": {"dt": 0.5, "ct": 2.0},
                    "sweep": {"attack_params": [{"bn_stats": "reestimate"}, {"ct": 1.0, "add_masks": True}]}})
    assert [c.attack_params for c in cells] == [{"dt": 0.5, "ct": 2.0, "bn_stats": "reestimate"},
                                                {"dt": 0.5, "ct": 1.0, "add_masks": True}]
    assert [c.attack_config().bn_stats for c in cells] == ["reestimate", "keep"]


def test_only_selects_part_of_a_grid_and_names_its_mistakes():
    """`nnlaunder run --only KEY=V1,V2`: the cells with one of those values, every filter applied; an
    unknown key, a malformed filter or an empty selection is a one-line error."""
    cells = expand({"dataset": "mnist", "threshold": 1.0,
                    "sweep": {"attack": ["nad", "i-bau", "prune"], "seed": [0, 1], "budget": [0.006, 0.06]}})
    got = select_cells(cells, ["attack=nad,i-bau", "seed=1"])
    assert sorted((c.attack, c.seed) for c in got) == [("i-bau", 1)] * 2 + [("nad", 1)] * 2
    assert {c.budget for c in select_cells(cells, ["budget=0.06"])} == {0.06}
    groups = expand({"dataset": "mnist", "attack": "launder", "sweep": {"settings": [
        {"attack_params": {"ct": 1.0, "retrain": {"epochs": 5}}}, {"attack_params": {"bn_stats": "reinit"}}]}})
    assert [c.attack_params for c in select_cells(groups, ["attack_params.retrain.epochs=5"])] == [
        {"ct": 1.0, "retrain": {"epochs": 5}}]                       # a dotted key reads into a table
    assert len(select_cells(groups, ["attack_params.bn_stats=reinit,keep"])) == 1   # lacking the key: no match
    for bad, needle in ((["colour=red"], "unknown setting 'colour'"), (["attack"], "KEY=VALUE"),
                        (["attack_params.ct=9"], "no cell"), (["colour.x=1"], "unknown setting 'colour'"),
                        (["attack=launder"], "no cell")):
        with pytest.raises(UserError, match=needle):
            select_cells(cells, bad)


@pytest.mark.parametrize("raw,needle", [
    ({"each": {"scheme": "zhang-noise"}}, "each: expected one or more tables"),
    ({"each": []}, "each: expected one or more tables"),
    ({"each": [{"colour": 1}]}, "each[0]: unknown key 'colour'"),
    ({"each": [{"seed": 1}, {"seed": 1}]}, "identical"),
    ({"sweep": {"settings": [{"colour": 1}]}}, "sweep.settings[0]: unknown key 'colour'"),
    ({"sweep": {"settings": [1, 2]}}, "sweep.settings: expected one or more tables"),
    ({"restore_from": "owner"}, "restore_from: 'owner'"),
    ({"restore_if": "sometimes"}, "restore_if: 'sometimes'"),
    ({"restore_from": "rest", "restore_epochs": 1, "budget": 1.0}, "needs a budget below the whole set"),
    ({"restore_from": "rest", "restore_epochs": 1, "restore_fraction": 0.5}, "no restore_fraction"),
    ({"datset": "mnist"}, "unknown key(s) ['datset']"),
    ({"rounds": "three"}, "experiment.rounds: expected an integer"),
    ({"rounds": 0}, "rounds: must be >= 1"),
    ({"budget": 1.5}, "budget: expected a fraction"),
    ({"budget": "two per class"}, "budget"),
    ({"dataset": "imagenet"}, "unknown dataset"),
    ({"dataset": "mnist", "arch": "resnet20"}, "is for cifar10"),
    ({"scheme": "zhang-logo"}, "unknown scheme"),
    ({"scheme_params": {"sigma": 1}}, "unknown key(s) ['sigma']"),
    ({"owner": {"epochz": 1}}, "unknown training setting"),
    ({"owner": {"arch": None}}, "unknown training setting"),       # found by hypothesis
    ({"owner": {"epochs": "many"}}, "owner.epochs: expected an integer"),
    ({"attack": "magic"}, "unknown attack"),
    ({"attack_params": {"dt": "high"}}, "dt"),
    ({"attack_params": {"nc": {"lr": -1.0}}}, "Neural Cleanse"),
    ({"attack_params": {"bogus": 1}}, "unknown key(s) ['bogus']"),
    ({"attack_params": {"nc": {"preset": "turbo"}}}, "attack_params.nc.preset: unknown preset 'turbo'"),
    ({"attack": "prune", "rounds": 3}, "only laundering has rounds"),
    ({"sweep": {"budget": []}}, "non-empty list"),
    ({"sweep": {"colour": [1, 2]}}, "unknown key 'colour'"),
    ({"sweep": {"seed": [1, 1]}}, "identical"),
    ({"threshold_seeds": []}, "threshold_seeds"),
])
def test_config_errors_name_the_key(raw, needle):
    with pytest.raises(UserError) as e:
        expand(raw)
    assert needle in str(e.value)


def test_toml_file_errors(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("dataset = 'mnist'\nrounds = [")
    with pytest.raises(UserError, match="not valid TOML"):
        load_experiment(p)
    with pytest.raises(UserError, match="missing experiment file"):
        load_experiment(tmp_path / "none.toml")


def test_store_writes_a_cell_all_or_nothing(tmp_path):
    with Store(tmp_path / "r.sqlite") as s:
        s.record("a", "exp", {"x": 1}, [{"round": 0, "wm_acc": 99.0}, {"round": 1, "wm_acc": 0.1}], {"ok": 1}, 1.0)
        with pytest.raises(TypeError):
            s.record("b", "exp", {"x": 2}, [{"round": 0}, {"round": object.__new__(type)}], {}, 1.0)
        assert s.finished_ids() == {"a"}
        cells = s.cells()
        assert [r["wm_acc"] for r in cells[0]["rounds"]] == [99.0, 0.1]
        n = sqlite3.connect(tmp_path / "r.sqlite").execute("SELECT COUNT(*) FROM rounds").fetchone()[0]
        assert n == 2     # nothing of the failed cell "b"


EXPERIMENT = """
name = "kill-test"
dataset = "mnist"
scheme = "zhang-content"
threshold_seeds = [0]
attack = "prune"
[owner]
epochs = 1
[scheme_params]
n_verify = 500
[sweep]
budget = [0.002, 0.003, 0.004, 0.005]
"""


def test_sweep_killed_with_sigkill_resumes_to_the_same_store(tmp_path, data_dir):
    """Run a 4-cell grid, SIGKILL it right after its first finished cell, run it again."""
    exp = tmp_path / "exp.toml"
    exp.write_text(EXPERIMENT)
    ws = tmp_path / "ws"
    cmd = [sys.executable, "-m", "nnlaunder.cli", "run", str(exp), "--workspace", str(ws), "--quiet"]
    env = {**os.environ, "NNLAUNDER_DATA": str(data_dir)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    db = ws / "results.sqlite"
    deadline = time.time() + 240
    first = None
    while time.time() < deadline and proc.poll() is None:
        if db.is_file():
            try:
                rows = sqlite3.connect(db).execute("SELECT cell_id, config FROM cells").fetchall()
            except sqlite3.OperationalError:
                rows = []
            if rows:
                first = rows
                break
        time.sleep(0.05)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first, "the first cell never finished"
    with Store(db) as s:
        kept = {c["cell_id"]: c for c in s.cells()}
    assert 1 <= len(kept) < 4
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"{4 - len(kept)} cells run, {len(kept)} already" in r.stdout
    assert re.search(r"mnist/zhang-content prune @ \S+ seed \d+: test \S+%, WM \S+% \(threshold \S+%\) "
                     r"(kept|hidden|removed|destroyed)\n", r.stdout), r.stdout      # a line per cell, its outcome
    with Store(db) as s:
        cells = {c["cell_id"]: c for c in s.cells()}
    assert len(cells) == 4
    for cid, c in kept.items():                        # finished cells were not redone
        assert cells[cid]["finished"] == c["finished"] and cells[cid]["rounds"] == c["rounds"]
    for c in cells.values():
        assert [r["round"] for r in c["rounds"]] == [0, 1]
        assert json.loads(json.dumps(c["config"]))["attack"] == "prune"
    # a third run does nothing
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert "0 cells run, 4 already" in r.stdout


def _metrics(db) -> dict:
    with Store(db) as s:
        return {c["cell_id"]: [{k: v for k, v in r.items() if "seconds" not in k} for r in c["rounds"]]
                for c in s.cells()}


def test_sweep_killed_at_random_moments_ends_in_the_uninterrupted_store(tmp_path, data_dir):
    """SIGKILL a sweep three times at random (seeded) moments, resume it each time; the final store
    holds exactly the metrics of an uninterrupted run."""
    import random
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    exp = tmp_path / "exp.toml"
    exp.write_text(f'''name = "random-kill"
dataset = "mnist"
scheme = "zhang-content"
owner_path = "{repo / "models" / "mnist" / "zhang-content"}"
threshold = 0.33
attack = "prune"
[scheme_params]
n_verify = 300
[sweep]
budget = [0.002, 0.003, 0.004, 0.005, 0.006, 0.007]
''')
    env = {**os.environ, "NNLAUNDER_DATA": str(data_dir)}

    def cmd(ws):
        return [sys.executable, "-m", "nnlaunder.cli", "run", str(exp), "--workspace", str(ws), "--quiet"]

    ref = subprocess.run(cmd(tmp_path / "ref"), env=env, capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr
    rng = random.Random(1234)
    ws = tmp_path / "ws"
    for _ in range(3):
        proc = subprocess.Popen(cmd(ws), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.5, 8.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if (ws / "results.sqlite").is_file():      # whatever is stored is whole: every cell has its rounds
            for rounds in _metrics(ws / "results.sqlite").values():
                assert [r["round"] for r in rounds] == [0, 1]
    r = subprocess.run(cmd(ws), env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert _metrics(ws / "results.sqlite") == _metrics(tmp_path / "ref" / "results.sqlite")
    assert len(_metrics(ws / "results.sqlite")) == 6


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_executor_runs_a_grid_into_the_one_store(tmp_path, data_dir):
    """Start a local Ray head on 127.0.0.1, run a 3-cell grid through it, check the store."""
    pytest.importorskip("ray")
    from pathlib import Path

    from nnlaunder.experiments.runner import run_experiment

    repo = Path(__file__).resolve().parents[1]
    ray_bin = Path(sys.executable).with_name("ray")
    port = _free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    start = subprocess.run([str(ray_bin), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                            "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats"],
                           capture_output=True, text=True, env=env, timeout=120)
    assert start.returncode == 0, start.stderr[-2000:]
    try:
        cells = expand({"name": "ray-grid", "dataset": "mnist", "scheme": "zhang-content", "attack": "prune",
                        "owner_path": str(repo / "models" / "mnist" / "zhang-content"), "threshold": 0.33,
                        "scheme_params": {"n_verify": 500}, "sweep": {"budget": [0.002, 0.003, 0.004]}})
        out = run_experiment(cells, tmp_path / "ws", str(data_dir), progress=False, executor="ray",
                             address=f"127.0.0.1:{port}")
        assert out == {"cells": 3, "ran": 3, "skipped": 0}
        with Store(tmp_path / "ws" / "results.sqlite") as s:
            got = s.cells("ray-grid")
        assert sorted(c["config"]["budget"] for c in got) == [0.002, 0.003, 0.004]
        for c in got:
            assert [r["round"] for r in c["rounds"]] == [0, 1] and c["summary"]["threshold"] == 0.33
            assert c["rounds"][0]["wm_acc"] > 90          # the committed owner model carries its watermark
        again = run_experiment(cells, tmp_path / "ws", str(data_dir), progress=False, executor="ray",
                               address=f"127.0.0.1:{port}")
        assert again["skipped"] == 3
    finally:
        subprocess.run([str(ray_bin), "stop", "--force"], capture_output=True, env=env, timeout=120)


def test_ray_executor_errors(tmp_path, data_dir):
    from nnlaunder.experiments.runner import run_experiment

    cells = expand({"dataset": "mnist", "attack": "prune", "threshold": 1.0})
    with pytest.raises(UserError, match="--address"):
        run_experiment(cells, tmp_path, str(data_dir), progress=False, executor="ray")
    with pytest.raises(UserError, match="unknown executor"):
        run_experiment(cells, tmp_path, str(data_dir), progress=False, executor="dask")


def test_local_pool_executor_matches_in_process_run(tmp_path, data_dir, monkeypatch):
    """--jobs 2: cells run in worker processes; the store equals an in-process run's. With `--export`, the
    export is written once after each finished cell (not again at the end) and holds every cell."""
    from pathlib import Path

    from nnlaunder.device import code_commit, machine_name, today
    from nnlaunder.experiments import runner
    from nnlaunder.experiments.runner import run_experiment
    from nnlaunder.experiments.store import export_workspace, workspace_cells

    exports = []
    monkeypatch.setattr(runner, "export_workspace", lambda ws, out: exports.append(out) or export_workspace(ws, out))

    repo = Path(__file__).resolve().parents[1]
    spec = {"name": "pool-grid", "dataset": "mnist", "scheme": "zhang-content", "attack": "prune",
            "owner_path": str(repo / "models" / "mnist" / "zhang-content"), "threshold": 0.33,
            "scheme_params": {"n_verify": 500}, "sweep": {"budget": [0.002, 0.003]}}
    got = {}
    for name, jobs in (("serial", 1), ("pool", 2)):
        out = run_experiment(expand(spec), tmp_path / name, str(data_dir), progress=False, jobs=jobs,
                             export=tmp_path / f"{name}-cells")
        assert out == {"cells": 2, "ran": 2, "skipped": 0}
        assert exports.count(tmp_path / f"{name}-cells") == 2 and len(workspace_cells(tmp_path / f"{name}-cells")) == 2
        with Store(tmp_path / name / "results.sqlite") as s:
            got[name] = {c["config"]["budget"]: [(r["test_acc"], r["wm_acc"]) for r in c["rounds"]]
                         for c in s.cells("pool-grid")}
            for c in s.cells("pool-grid"):          # every cell names the code, machine and date it ran on
                assert c["summary"]["commit"] == code_commit() and c["summary"]["date"] == today()
                assert c["summary"]["status"] and c["summary"]["base_rate"] is not None    # the verdict's why
                assert c["summary"]["machine"].split(" (")[0] == machine_name().split(" (")[0]   # threads differ
    assert got["pool"] == got["serial"] and len(got["pool"]) == 2
    run_experiment(expand(spec), tmp_path / "serial", str(data_dir), progress=False, export=tmp_path / "again")
    assert exports[-1] == tmp_path / "again" and len(workspace_cells(tmp_path / "again")) == 2   # nothing to run


def test_same_config_and_seed_give_identical_metrics(tmp_path, data_dir):
    """Determinism: a laundering cell (Neural Cleanse, Algorithm 1, retraining) run twice from the same
    config and seed in two fresh workspaces stores the very same numbers."""
    from pathlib import Path

    from nnlaunder.experiments.runner import run_experiment

    repo = Path(__file__).resolve().parents[1]
    spec = {"name": "det", "dataset": "mnist", "scheme": "zhang-content", "attack": "launder",
            "owner_path": str(repo / "models" / "mnist" / "zhang-content"), "threshold": 0.33,
            "scheme_params": {"n_verify": 300}, "budget": "1/class", "rounds": 1,
            "attack_params": {"nc": {"max_epochs": 3}, "retrain": {"epochs": 2}}}
    got = []
    for name in ("a", "b"):
        run_experiment(expand(spec), tmp_path / name, str(data_dir), progress=False)
        with Store(tmp_path / name / "results.sqlite") as s:
            (cell,) = s.cells("det")
            got.append([{k: v for k, v in r.items() if "seconds" not in k} for r in cell["rounds"]])
    assert got[0] == got[1] and got[0] and "wm_acc" in got[0][0]
    # the runner kept round 1's recovered triggers; the report draws them (Figures 6 and 8)
    from nnlaunder.report.build import build_report

    assert (tmp_path / "a" / "triggers" / f"{cell['cell_id']}-round01.safetensors").is_file()
    rep = build_report(tmp_path / "a", tmp_path / "rep")
    assert (rep / "triggers-det-mnist-zhang-content-1perclass.png").stat().st_size > 5000
    assert (rep / "reconstruction-det-mnist-zhang-content.png").stat().st_size > 2000
    md = (rep / "index.md").read_text()
    assert "Recovered triggers" in md and (rep / "index.html").read_text().count("data:image/png") == 3


def test_cells_that_differ_after_trigger_recovery_recover_the_triggers_once(tmp_path, data_dir):
    """An ablation's variants share round 1's Neural Cleanse: the second cell takes the workspace's kept
    result and stores exactly what it stores when it runs Neural Cleanse itself in a fresh workspace."""
    from pathlib import Path

    from nnlaunder.experiments.runner import run_experiment

    repo = Path(__file__).resolve().parents[1]
    spec = {"name": "abl", "dataset": "mnist", "scheme": "zhang-content", "attack": "launder",
            "owner_path": str(repo / "models" / "mnist" / "zhang-content"), "threshold": 0.33,
            "scheme_params": {"n_verify": 300}, "budget": "1/class",
            "attack_params": {"nc": {"max_epochs": 3}, "retrain": {"epochs": 1}},
            "sweep": {"attack_params": [{"ct": 1.0}, {"ct": 2.0, "bn_stats": "reestimate"}]}}
    first, second = expand(spec)
    run_experiment([first, second], tmp_path / "both", str(data_dir), progress=False)
    run_experiment([second], tmp_path / "alone", str(data_dir), progress=False)
    got = {}
    for name in ("both", "alone"):
        with Store(tmp_path / name / "results.sqlite") as s:
            got[name] = {c["cell_id"]: c for c in s.cells("abl")}
    assert not got["both"][first.cell_id()]["summary"]["nc_reused"]
    shared, alone = got["both"][second.cell_id()], got["alone"][second.cell_id()]
    assert shared["summary"]["nc_reused"] and not alone["summary"]["nc_reused"]
    from nnlaunder.report.battery import work_seconds  # what the shared cell's attack costs run alone

    assert work_seconds(shared) == shared["summary"]["attack_seconds"] + shared["rounds"][1]["nc_seconds"]
    assert work_seconds(alone) == alone["summary"]["attack_seconds"]
    assert [{k: v for k, v in r.items() if "seconds" not in k} for r in shared["rounds"]] == \
        [{k: v for k, v in r.items() if "seconds" not in k} for r in alone["rounds"]]
    (kept,) = (tmp_path / "both" / "nc").glob("*.safetensors")
    from nnlaunder.data import Dataset, load
    from nnlaunder.experiments.nc_memo import load_nc

    tiny = load("mnist", str(data_dir), "test").subset(list(range(20)))
    assert load_nc(kept.parent, kept.stem, tiny) is not None
    cropped = Dataset("crop", tiny.x[:, :, :20, :20].contiguous(), tiny.y, tiny.classes)
    assert load_nc(kept.parent, kept.stem, cropped) is None      # another shape: not this set's result
    kept.write_bytes(b"not a safetensors file")                # a damaged memo is run again, never trusted
    assert load_nc(kept.parent, kept.stem, tiny) is None


def test_owner_path_with_other_scheme_parameters_is_refused(tmp_path, data_dir):
    """A committed owner model checked against the experiment's watermark: a different target class
    would verify the wrong thing, so it is an error naming the key (sizes like n_verify are fine)."""
    from pathlib import Path

    from nnlaunder.experiments.runner import run_experiment

    repo = Path(__file__).resolve().parents[1]
    cells = expand({"dataset": "mnist", "scheme": "zhang-content", "threshold": 0.33, "budget": "1/class",
                    "owner_path": str(repo / "models" / "mnist" / "zhang-content"),
                    "scheme_params": {"target": 3, "n_verify": 100}})
    with pytest.raises(UserError, match="owner_path: .* parameters"):
        run_experiment(cells, tmp_path / "ws", data_dir, progress=False)


def test_an_interrupted_multi_round_cell_resumes_after_its_last_finished_round(tmp_path, data_dir, monkeypatch):
    """A laundering cell stopped during round 2 keeps round 1 (ws/partial/); the rerun starts at round 2
    and stores what an uninterrupted run stores; the partial state is gone once the cell is stored."""
    from pathlib import Path

    from nnlaunder.attacks import pipeline
    from nnlaunder.experiments import runner

    repo = Path(__file__).resolve().parents[1]
    spec = {"name": "resume", "dataset": "mnist", "scheme": "zhang-content", "attack": "launder",
            "owner_path": str(repo / "models" / "mnist" / "zhang-content"), "threshold": 0.33,
            "scheme_params": {"n_verify": 300}, "budget": "1/class", "rounds": 2,
            "attack_params": {"early_stop": False, "nc": {"max_epochs": 3}, "retrain": {"epochs": 2}}}
    (cell,) = expand(spec)
    real = pipeline.launder
    calls = []

    def stopped_in_round_2(*args, **kw):
        def on_round(r, m, info):
            calls.append(r)
            if r == 2:
                raise KeyboardInterrupt
            return kw["on_round"](r, m, info)
        return real(*args, **{**kw, "on_round": on_round})

    monkeypatch.setattr(pipeline, "launder", stopped_in_round_2)
    with pytest.raises(KeyboardInterrupt):
        runner.run_experiment([cell], tmp_path / "ws", str(data_dir), progress=False)
    partial = tmp_path / "ws" / "partial" / f"{cell.cell_id()}.safetensors"
    assert calls == [1, 2] and partial.is_file()
    monkeypatch.setattr(pipeline, "launder", real)
    seen = []
    real_ev = runner.evaluator
    monkeypatch.setattr(runner, "evaluator",
                        lambda te, wm, *a: (lambda r, m: seen.append(r) or real_ev(te, wm, *a)(r, m)))
    runner.run_experiment([cell], tmp_path / "ws", str(data_dir), progress=False)
    assert seen == [0, 2] and not partial.exists()            # round 1 came from the partial state
    monkeypatch.setattr(runner, "evaluator", real_ev)
    runner.run_experiment([cell], tmp_path / "ref", str(data_dir), progress=False)
    assert _metrics(tmp_path / "ws" / "results.sqlite") == _metrics(tmp_path / "ref" / "results.sqlite")
    assert [r["round"] for r in next(iter(_metrics(tmp_path / "ws" / "results.sqlite").values()))] == [0, 1, 2]
    assert (tmp_path / "ws" / "triggers" / f"{cell.cell_id()}-round02.safetensors").is_file()


def test_a_cell_stopped_inside_neural_cleanse_continues_it(tmp_path, data_dir, monkeypatch):
    """A cell killed while its Neural Cleanse runs (nc-unlearn here) keeps the optimisation state in
    ws/partial/<cell>-nc/; carried to another workspace by `export` and `merge`, the rerun there continues
    it and stores what an uninterrupted run stores, and the state is gone once the cell is in the store. On
    another processor it continues too, and the cell says where its Neural Cleanse began."""
    from pathlib import Path

    from nnlaunder.attacks import records
    from nnlaunder.experiments import runner

    repo = Path(__file__).resolve().parents[1]
    spec = {"name": "nc-resume", "dataset": "mnist", "scheme": "zhang-content", "attack": "nc-unlearn",
            "owner_path": str(repo / "models" / "mnist" / "zhang-content"), "threshold": 0.33,
            "scheme_params": {"n_verify": 300}, "budget": "2/class",
            "attack_params": {"nc": {"max_epochs": 6, "early_stop": False}, "retrain": {"epochs": 1}}}
    (cell,) = expand(spec)
    saves = []
    monkeypatch.setattr(runner, "Keeper", keeper_that_stops(saves))
    with pytest.raises(KeyboardInterrupt):             # `--export`: written when the run stops, too
        runner.run_experiment([cell], tmp_path / "ws", str(data_dir), progress=False, export=tmp_path / "carried")
    kept = tmp_path / "ws" / "partial" / f"{cell.cell_id()}-nc"
    assert saves == [1, 2] and len(list(kept.glob("nc-*.safetensors"))) == 1
    assert merge_workspace(tmp_path / "carried", tmp_path / "there") == (0, 0, 1)
    runner.run_experiment([cell], tmp_path / "there", str(data_dir), progress=False)
    assert saves[2] == 3                                       # epochs 1-2 came from the carried state
    assert not (tmp_path / "there" / "partial" / f"{cell.cell_id()}-nc").exists()
    here = runner.machine_name()
    for mod in (runner, records):                              # carried to another processor: it continues there,
        monkeypatch.setattr(mod, "machine_name", lambda: "Other CPU")     # and the cell names both machines
    merge_workspace(tmp_path / "carried", tmp_path / "elsewhere")
    n = len(saves)
    runner.run_experiment([cell], tmp_path / "elsewhere", str(data_dir), progress=False)
    assert saves[n] == 3
    (other,) = Store(tmp_path / "elsewhere" / "results.sqlite", readonly=True).cells()
    assert other["summary"]["machine"] == f"Other CPU (its Neural Cleanse begun on {here})"
    monkeypatch.undo()
    runner.run_experiment([cell], tmp_path / "ref", str(data_dir), progress=False)
    assert _metrics(tmp_path / "there" / "results.sqlite") == _metrics(tmp_path / "ref" / "results.sqlite")


def test_ray_without_a_cluster_is_one_line(tmp_path):
    from nnlaunder.experiments import runner

    with pytest.raises(UserError, match="no Ray cluster answers at 127.0.0.1:9"):
        runner._run_on_ray([], tmp_path, str(tmp_path), "127.0.0.1:9", lambda c, r: None)
    with pytest.raises(UserError, match="HOST:PORT"):
        runner._run_on_ray([], tmp_path, str(tmp_path), "nowhere", lambda c, r: None)


def test_a_cells_seed_seeds_the_attacks_own_draws():
    """A cell's seed reaches Neural Cleanse's initialisation and the retraining order, as the Table 2 seeds
    protocol does, unless attack_params names a seed; seed 0 cells keep the ids (and configs) they had."""
    from nnlaunder.experiments.config import CellConfig

    cfg = CellConfig(attack="launder", attack_params={"nc": {"preset": "fast"}}, seed=3).attack_config()
    assert (cfg.seed, cfg.nc.seed, cfg.retrain.seed, cfg.nc.steps_per_epoch) == (3, 3, 3, 8)
    params = {"nc": {"seed": 9}, "retrain": {"epochs": 2}}
    cfg = CellConfig(attack="launder", attack_params=params, seed=3).attack_config()
    assert (cfg.seed, cfg.nc.seed, cfg.retrain.seed, cfg.retrain.epochs) == (3, 9, 3, 2)
    rtal = CellConfig(attack="rtal", seed=2).attack_config()
    assert rtal.seed == rtal.train.seed == 2
    unlearn = CellConfig(attack="nc-unlearn", attack_params={"retrain": {"epochs": 1, "batch_size": 32}},
                         seed=4).attack_config()
    assert unlearn.nc.seed == unlearn.retrain.seed == 4 and unlearn.retrain.epochs == 1
    assert CellConfig(threshold_seeds=(0, 1, 2)).cell_id() == "928921f2ccf53b81"   # the id such a cell always had
    assert CellConfig().threshold_seeds == (0, 1, 2, 3, 4)   # MNIST: other seeds, another cell
    assert CellConfig(dataset="cifar10").threshold_seeds == (0, 1, 2)
    assert CellConfig(seed=1).cell_id() != "2ba37e6b2caa86f6"    # one seeded in its subset only: run again


def test_owner_path_names_one_model_per_scheme():
    from nnlaunder.experiments.config import expand

    cells = expand({"dataset": "mnist", "owner_path": "models/{dataset}/{scheme}",
                    "sweep": {"scheme": ["zhang-content", "zhang-noise"]}})
    assert [c.owner_path for c in cells] == ["models/mnist/zhang-content", "models/mnist/zhang-noise"]


def test_settings_sweep_and_the_owners_restoration_on_what_the_attacker_left(tmp_path, data_dir):
    """`sweep.settings`: groups of settings (an attack with its budget and options) as one grid axis; with
    restore_from = "rest" the owner restores on the training images the attacker's set does not hold (Ngo
    et al.'s disjoint split); every cell records how far the attack moved the weights."""
    from pathlib import Path

    from nnlaunder.experiments.runner import run_experiment

    repo = Path(__file__).resolve().parents[1]
    spec = {"name": "persist", "dataset": "mnist", "scheme": "zhang-content", "threshold": 0.33,
            "owner_path": str(repo / "models" / "mnist" / "zhang-content"), "scheme_params": {"n_verify": 300},
            "budget": 0.9, "restore_epochs": 1, "restore_from": "rest", "restore_if": "always",
            "sweep": {"settings": [{"attack": "prune", "attack_params": {"fraction": 0.5}},
                                   {"attack": "weight-noise", "restore_epochs": 0},
                                   {"attack": "prune", "attack_params": {"fraction": 0.5}, "restore_if": "not-shown"}]}}
    cells = expand(spec)
    assert [(c.attack, c.restore_epochs) for c in cells] == [("prune", 1), ("weight-noise", 0), ("prune", 1)]
    run_experiment(cells, tmp_path, str(data_dir), progress=False)
    with Store(tmp_path / "results.sqlite") as s:
        got = {(c["config"]["attack"], c["config"]["restore_if"]): c["summary"] for c in s.cells("persist")}
    always, shown = got[("prune", "always")], got[("prune", "not-shown")]
    assert always["n_owner"] == 6000 and always["n_clean"] == 54000       # 60,000 split 90 / 10
    assert "n_owner" not in got[("weight-noise", "always")]
    # "not-shown" (the default) restores only where the attack left no ownership shown: the same attack, the
    # same outcome, and a restoration exactly where one could tell hidden from removed
    assert shown["outcome"] == always["outcome"] and ("n_owner" in shown) == (always["outcome"] != "kept")
    assert always["outcome"] == "kept" and "n_owner" not in shown          # pruning half the weights keeps it
    assert always["param_shift"] > got[("weight-noise", "always")]["param_shift"] > 0


def test_a_dry_run_says_which_cells_the_store_holds(tmp_path):
    """`nnlaunder run FILE --dry-run` lists every cell and marks those already in the workspace's store."""
    from nnlaunder.experiments.runner import cell_lines

    cells = expand({"name": "dry", "dataset": "mnist", "scheme": "zhang-content", "attack": "prune",
                    "sweep": {"seed": [0, 1, 2]}})
    assert cell_lines(cells, tmp_path / "nothing-yet")[-1] == "3 cells, 0 already in the store"
    with Store(tmp_path / "ws" / "results.sqlite") as s:
        s.record(cells[1].cell_id(), "dry", cells[1].as_dict(), [{"round": 0}], {}, 1.0)
    lines = cell_lines(cells, tmp_path / "ws")
    assert lines[1].endswith("seed 1  (in the store)") and not lines[0].endswith("(in the store)")
    assert lines[-1] == "3 cells, 1 already in the store"


def test_the_papers_experiments_name_the_published_thresholds():
    """Clean training differs between processors, so the paper's experiment files name the thresholds
    verdicts.json publishes: every rerun, on any machine, is judged against the same ones."""
    import json
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    published = {(t["dataset"], t["row"]): t["threshold"] for t in json.loads(
        (repo / "benchmarks" / "results" / "verdicts.json").read_text())["thresholds"] if t["default"]}
    for stem in ("table2-mnist", "table2-cifar10", "baselines-mnist", "baselines-cifar10", "attacks-mnist",
                 "attacks-cifar10", "attacks-cifar10-bf16", "attacks-cifar10-20pct", "persistence-mnist",
                 "persistence-cifar10"):
        for c in load_experiment(repo / "experiments" / "paper" / f"{stem}.toml"):
            row = c.scheme + (f"-{c.scheme_params['mode']}" if c.scheme == "adi" else "")
            assert c.threshold == published[(c.dataset, row)], (stem, c.dataset, row)


def test_nc_unlearning_takes_the_neural_cleanse_laundering_ran_on_the_same_set(tmp_path, data_dir):
    """Laundering keeps its first Neural Cleanse per (model, set, settings, seed); NC unlearning on the same
    model, set and seed runs that same Neural Cleanse, so it takes the kept one instead of running it again,
    and counts its seconds as its own work (as a laundering cell that reuses one does)."""
    from pathlib import Path

    from nnlaunder.experiments.runner import run_experiment
    from nnlaunder.report.battery import work_seconds

    repo = Path(__file__).resolve().parents[1]
    spec = {"name": "memo", "dataset": "mnist", "scheme": "zhang-content", "threshold": 0.49,
            "owner_path": str(repo / "models" / "mnist" / "zhang-content"), "scheme_params": {"n_verify": 300},
            "budget": "10/class", "attack_params": {"nc": {"max_epochs": 3, "early_stop": False}},
            "sweep": {"attack": ["launder", "nc-unlearn"]}}
    run_experiment(expand(spec), tmp_path, str(data_dir), progress=False)
    alone = {**spec, "name": "alone", "attack": "nc-unlearn", "seed": 1}
    alone.pop("sweep")
    run_experiment(expand(alone), tmp_path, str(data_dir), progress=False)   # another set: nothing to take
    with Store(tmp_path / "results.sqlite") as s:
        got = {c["config"]["attack"]: c for c in s.cells("memo")}
        own = s.cells("alone")[0]
    lc, uc = got["launder"], got["nc-unlearn"]
    assert not lc["summary"]["nc_reused"] and uc["summary"]["nc_reused"] and not own["summary"]["nc_reused"]
    assert uc["rounds"][1]["nc_seconds"] == lc["rounds"][1]["nc_seconds"]
    assert work_seconds(uc) == pytest.approx(uc["summary"]["attack_seconds"] + lc["rounds"][1]["nc_seconds"])
    assert len(list((tmp_path / "nc").glob("*.safetensors"))) == 2       # laundering's, and the lone one's
    # the kept Neural Cleanse is the one unlearning would have run: on its own, it ends the same
    fresh = {**spec, "attack": "nc-unlearn"}
    fresh.pop("sweep")
    run_experiment(expand(fresh), tmp_path / "fresh", str(data_dir), progress=False)
    with Store(tmp_path / "fresh" / "results.sqlite") as s:
        solo = s.cells("memo")[0]
    assert not solo["summary"]["nc_reused"]
    assert (solo["summary"]["test_acc"], solo["summary"]["wm_acc"]) == (uc["summary"]["test_acc"],
                                                                        uc["summary"]["wm_acc"])
