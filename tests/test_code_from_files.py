"""A file never runs code on its own: an experiment file's `[external]` factory is imported only when
the command line allows it (`--allow-factory` / `--allow-code`), and `allow_torch_load` in a file needs
`--allow-torch-load`. Each payload would create a marker file; the marker never appears."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from nnlaunder.cli import main
from nnlaunder.errors import UserError
from nnlaunder.experiments.config import CellConfig, load_experiment
from nnlaunder.experiments.runner import run_experiment
from nnlaunder.external.models import NO_CODE, CodeAllowance, load_factory


def _byo_files(d: Path) -> dict[str, str]:
    x = np.random.default_rng(0).integers(0, 255, (20, 12, 12), dtype=np.uint8)
    y = np.arange(20) % 4
    for name in ("clean", "test", "verify"):
        np.savez(d / f"{name}.npz", x=x, y=y)
    from tests.test_byo import make_net

    save_file(make_net().state_dict(), str(d / "net.safetensors"))
    return {"weights": str(d / "net.safetensors"), "data": str(d / "clean.npz"), "test_data": str(d / "test.npz"),
            "verify_npz": str(d / "verify.npz")}


PAYLOADS = [
    ("os:system", lambda m: {"command": f"touch {m}"}),
    ("subprocess:run", lambda m: {"args": ["touch", str(m)]}),
    ("builtins:exec", lambda m: {"source": f"open({str(m)!r}, 'w').close()"}),
    ("pathlib:Path.touch", None),   # not even a valid factory name: refused as such
]


def _experiment(tmp_path: Path, factory: str, kwargs: dict | None, extra: str = "") -> Path:
    files = _byo_files(tmp_path)
    body = "\n".join(f'{k} = {json.dumps(v)}' for k, v in files.items())
    kw = json.dumps(json.dumps(kwargs or {}))
    f = tmp_path / "exp.toml"
    f.write_text(f'name = "evil"\nthreshold = 10.0\nattack = "rtal"\n[external]\nfactory = "{factory}"\n'
                 f"kwargs = {kw}\n{body}\n{extra}")
    return f


@pytest.mark.parametrize("factory, kwargs", PAYLOADS)
@pytest.mark.parametrize("dry", [True, False])
def test_an_experiment_file_naming_code_is_refused_and_nothing_runs(tmp_path, capsys, factory, kwargs, dry):
    marker = tmp_path / "MARKER"
    f = _experiment(tmp_path, factory, kwargs(marker) if kwargs else None)
    argv = ["run", str(f), "--workspace", str(tmp_path / "ws"), "--quiet"] + (["--dry-run"] if dry else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    if kwargs:   # the refusal says what the file asks to import
        mod, fn = factory.split(":")
        assert f"asks to import {mod!r} and call {fn!r}" in err and f"--allow-factory {factory}" in err
    else:
        assert "package.module:function" in err
    assert not marker.exists()


def test_another_factory_allowed_does_not_allow_the_file_s(tmp_path, capsys):
    marker = tmp_path / "MARKER"
    f = _experiment(tmp_path, "os:system", {"command": f"touch {marker}"})
    assert main(["run", str(f), "--workspace", str(tmp_path / "ws"), "--quiet",
                 "--allow-factory", "tests.test_byo:make_net"]) == 2
    assert "os:system" in capsys.readouterr().err and not marker.exists()


def test_allow_torch_load_in_a_file_needs_the_command_line(tmp_path, capsys):
    f = _experiment(tmp_path, "tests.test_byo:make_net", None, "allow_torch_load = true\n")
    ws = str(tmp_path / "ws")
    assert main(["run", str(f), "--workspace", ws, "--dry-run", "--allow-factory", "tests.test_byo:make_net"]) == 2
    assert "--allow-torch-load" in capsys.readouterr().err
    assert main(["run", str(f), "--workspace", ws, "--dry-run", "--allow-factory", "tests.test_byo:make_net",
                 "--allow-torch-load"]) == 0


@pytest.mark.parametrize("flags", [["--allow-factory", "tests.test_byo:make_net"], ["--allow-code"]])
def test_the_command_line_can_allow_the_file_s_factory(tmp_path, capsys, flags):
    f = _experiment(tmp_path, "tests.test_byo:make_net", None)
    assert main(["run", str(f), "--workspace", str(tmp_path / "ws"), "--dry-run", *flags]) == 0
    assert "1 cells" in capsys.readouterr().out


def test_the_runner_refuses_cells_that_name_code_too(tmp_path):
    """The Python API has the same gate: cells built by hand, with nothing allowed, import nothing."""
    marker = tmp_path / "MARKER"
    f = _experiment(tmp_path, "os:system", {"command": f"touch {marker}"})
    with pytest.raises(UserError, match="os:system"):
        load_experiment(f)
    cells = load_experiment(f, CodeAllowance(any_factory=True))
    assert isinstance(cells[0], CellConfig)
    with pytest.raises(UserError, match="asks to import 'os' and call 'system'"):
        run_experiment(cells, tmp_path / "ws", None, progress=False)
    assert not marker.exists()
    with pytest.raises(UserError, match="asks to import"):
        load_factory("os:system", {"command": f"touch {marker}"}, allow=NO_CODE)
    assert not marker.exists()


def _exits(code: int) -> torch.nn.Module:
    raise SystemExit(code)


def _raises() -> torch.nn.Module:
    raise ValueError("boom")


@pytest.mark.parametrize("fn, needle", [("_exits", "sys.exit"), ("_raises", "ValueError: boom")])
def test_a_factory_that_exits_or_raises_is_one_line(fn, needle):
    spec = f"tests.test_code_from_files:{fn}"
    kwargs = {"code": 0} if fn == "_exits" else {}
    with pytest.raises(UserError, match=needle):
        load_factory(spec, kwargs, allow=CodeAllowance.typed(spec))


@pytest.mark.parametrize("spec", [":", "a:", ":b", "os.:system", "os:sys tem", "1os:f", "a" * 400 + ":f"])
def test_malformed_factory_names_are_one_line(tmp_path, capsys, spec):
    files = _byo_files(tmp_path)
    argv = ["launder", "--model-factory", spec, "--weights", files["weights"], "--data", files["data"],
            "--out", str(tmp_path / "o"), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "package.module:function" in err and err.count("\n") == 1
