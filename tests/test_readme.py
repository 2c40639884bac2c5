"""Every `nnlaunder` command in the README parses as written (flags, choices, types)."""

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
