"""The package's shape: layers that import only downwards, no import circle, small functions, no
repeated blocks. Read from the source (AST), nothing is imported."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "nnlaunder"

# Lower layers never import higher ones. A module not listed takes its package's layer.
LAYERS = [
    {"nnlaunder.errors", "nnlaunder.config", "nnlaunder.device", "nnlaunder.clock", "nnlaunder.speed",
     "nnlaunder.progress", "nnlaunder.plots"},
    {"nnlaunder.data", "nnlaunder.models"},
    {"nnlaunder.checkpoint", "nnlaunder.train", "nnlaunder.recipes", "nnlaunder.external"},
    {"nnlaunder.watermarks"},
    {"nnlaunder.attacks", "nnlaunder.restore"},
    {"nnlaunder.experiments", "nnlaunder.report", "nnlaunder.report.build"},
    {"nnlaunder.byo", "nnlaunder.demo", "nnlaunder.api"},
    {"nnlaunder", "nnlaunder.cli_flags", "nnlaunder.cli"},     # the package's face: `import nnlaunder as nl`
]


def modules() -> dict[str, Path]:
    out = {}
    for p in SRC.rglob("*.py"):
        parts = list(p.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Every nnlaunder module each module imports, at the top or inside a function."""
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for a in node.names:
                    full = f"{target}.{a.name}"
                    if full in mods:
                        graph[m].add(full)
                    elif target in mods:
                        graph[m].add(target)
            elif isinstance(node, ast.Import):
                graph[m] |= {a.name for a in node.names if a.name in mods}
        graph[m].discard(m)
    return graph


def layer(m: str) -> int:
    probe = m
    while probe:
        for i, names in enumerate(LAYERS):
            if probe in names:
                return i
        probe = probe.rsplit(".", 1)[0] if "." in probe else ""
    raise AssertionError(f"{m} has no layer in LAYERS: add it")


def test_imports_go_downwards_only():
    graph = imports(modules())
    up = [f"{m} -> {t}" for m, ts in graph.items() for t in ts if layer(t) > layer(m)]
    assert not up, up


def test_no_import_circle():
    graph = imports(modules())
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            assert state.get(t) != 1, " -> ".join(path + [m, t])
            if t not in state:
                visit(t, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_functions_stay_small_and_the_cli_thin():
    """The cap is 80 lines; none comes within 5 of it (a function that long is split by its design, not
    by the count)."""
    long = []
    for p in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno >= 75:
                long.append(f"{p.relative_to(SRC)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long
    assert len((SRC / "cli.py").read_text().splitlines()) < 450


def test_no_block_of_six_lines_repeated():
    trivial = {"", ")", "]", "}", "):", "else:", "try:", '"""'}
    seen: dict[str, str] = {}
    repeated = []
    bench = SRC.parents[1] / "benchmarks"
    for p in sorted(SRC.rglob("*.py")) + sorted(bench.rglob("*.py")):     # the library and the benchmarks
        lines = [ln.strip() for ln in p.read_text().splitlines()]
        for i in range(len(lines) - 5):
            block = lines[i:i + 6]
            if any(ln in trivial or ln.startswith(("#", "from ", "import ")) for ln in block):
                continue
            key = "\n".join(block)
            where = f"{p.relative_to(SRC.parents[1])}:{i + 1}"
            if key in seen:
                repeated.append(f"{seen[key]} and {where}")
            seen.setdefault(key, where)
    assert not repeated, repeated


def test_nothing_cites_a_file_outside_the_repository():
    for p in SRC.rglob("*.py"):
        text = p.read_text()
        assert "facts.md" not in text and "shared/seeds" not in text and "shared/reference" not in text, p


def test_every_option_of_every_command_has_help():
    import argparse

    from nnlaunder.cli_flags import make_parser

    sub = next(a for a in make_parser()._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{name} {a.option_strings or a.dest}" for name, sp in sub.choices.items() for a in sp._actions
               if not a.help and not isinstance(a, argparse._HelpAction)]
    assert not missing, missing


def test_the_nc_epochs_help_names_each_presets_own_cap():
    import argparse

    from nnlaunder.attacks.neural_cleanse import NCConfig, nc_config
    from nnlaunder.cli_flags import make_parser

    sub = next(a for a in make_parser()._actions if isinstance(a, argparse._SubParsersAction))
    text = next(a.help for a in sub.choices["launder"]._actions if "--nc-epochs" in a.option_strings)
    assert f"{NCConfig().max_epochs} faithful" in text and f"{nc_config('fast').max_epochs} fast" in text


def test_no_script_or_result_names_a_machine_path():
    """Code, results, committed cells and docs name files relative to the repository, never by a path of the
    machine they were made on."""
    root = SRC.parents[1]
    for p in [*root.glob("benchmarks/**/*.py"), *SRC.rglob("*.py"), *root.glob("benchmarks/results/**/*.md"),
              *root.glob("benchmarks/results/**/*.json"), *root.glob("benchmarks/cells/*.jsonl"),
              *root.glob("docs/*.md"), root / "README.md"]:
        text = p.read_text()
        assert "/work/" not in text and "/home/" not in text and "/root/" not in text, p


ARCH_DOC = SRC.parents[1] / "docs" / "architecture.md"
_IO_ATTRS = {"read_text", "write_text", "read_bytes", "write_bytes", "mkdir", "unlink", "iterdir", "glob", "rglob",
             "touch", "rmdir"}
_IO_NAMES = {"open", "atomic_write_json", "atomic_write_bytes", "atomic_save_tensors", "save_model", "load_model",
             "safe_open", "save_file", "load_file", "read_meta", "load_state", "sha256_file"}
_IO_MODULES = {"shutil", "sqlite3", "subprocess", "tempfile", "gzip", "tarfile"}


def _short(m: str) -> str:
    """A module as the architecture page names it: `speed/plans`, `checkpoint`, `nnlaunder`."""
    return m.removeprefix("nnlaunder.").replace(".", "/") if m != "nnlaunder" else m


def _touches_files(p: Path) -> bool:
    for n in ast.walk(ast.parse(p.read_text())):
        if isinstance(n, ast.Call):
            f = n.func
            if isinstance(f, ast.Name) and f.id in _IO_NAMES:
                return True
            if isinstance(f, ast.Attribute) and (f.attr in _IO_ATTRS or (
                    isinstance(f.value, ast.Name) and f.value.id in _IO_MODULES)):
                return True
    return False


def _doc_section(start: str) -> str:
    text = ARCH_DOC.read_text()
    i = text.index(start)
    return text[i:text.index("\n- ", i + 1)]


def _named_in(section: str, m: str) -> bool:
    short = _short(m)
    pkg = short.split("/")[0]
    return f"`{short}`" in section or f"`{pkg}/`" in section


def test_every_module_is_on_the_architecture_page():
    text = ARCH_DOC.read_text()
    missing = []
    for m in modules():
        short = _short(m)
        leaf = short.rsplit("/", 1)[-1]
        if not any(f"`{n}`" in text for n in (short, leaf, f"{short}/")):
            missing.append(short)
    assert not missing, missing


def test_only_the_documented_modules_touch_files():
    section = _doc_section("The algorithms are tensor code")
    io = [m for m, p in modules().items() if _touches_files(p)]
    assert io, "the scan finds the I/O edges"
    undocumented = [_short(m) for m in io if not _named_in(section, m)]
    assert not undocumented, f"modules reading or writing files that docs/architecture.md does not list: {undocumented}"


def test_only_the_documented_modules_draw_bars():
    section = _doc_section("Progress bars are drawn")
    graph = imports(modules())
    drawing = [m for m, p in modules().items()
               if "tqdm" in p.read_text() or "nnlaunder.progress" in graph[m]]
    undocumented = [_short(m) for m in drawing if _short(m) != "progress" and not _named_in(section, m)]
    assert not undocumented, undocumented
