"""Every `nnlaunder` command in the README parses as written (flags, choices, types)."""

import re
import shlex
from pathlib import Path

import pytest

from nnlaunder.cli_flags import make_parser

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[str]:
    blocks = re.findall(r"```(?:bash)?\n(.*?)```", README.read_text(), flags=re.S)
    text = "\n".join(blocks).replace("\\\n", " ")
    cmds = []
    for line in text.splitlines():
        line = line.split("  #")[0].split(" # ")[0].strip()
        if line.startswith("nnlaunder "):
            cmds.append(line)
    return cmds


def test_the_readme_has_commands():
    assert len(readme_commands()) >= 15


@pytest.mark.parametrize("cmd", readme_commands())
def test_a_readme_command_parses(cmd):
    argv = shlex.split(cmd)[1:]
    argv = [a for a in argv if a != "[--mixed]"]          # an optional flag shown in brackets
    make_parser().parse_args(argv)
