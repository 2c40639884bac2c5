"""Experiment files (TOML): typed, validated on load, expanded into a grid of cells.

```toml
name = "fig3-mnist"
dataset = "mnist"
scheme = "zhang-content"
rounds = 10
budget = 0.006                 # fraction of the training set, or "1/class"
[owner]                        # overrides of the architecture's training recipe
epochs = 6
[attack_params]                # laundering settings (see LaunderConfig)
dt = 0.5
[sweep]                        # lists expand into a grid (dotted keys reach into tables)
scheme = ["zhang-content", "zhang-noise", "zhang-unrelated"]
budget = [0.108, 0.06, 0.006, "1/class"]
```
Unknown keys, wrong types and impossible values are errors naming the key, raised when the file is
loaded, before anything runs: every cell is fully built once at load time.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import data as D
from ..attacks.registry import configure
from ..config import from_dict
from ..errors import UserError
from ..external.models import NO_CODE, CodeAllowance
from ..models import DEFAULT_ARCH, check_fits
from ..recipes import owner_config
from ..train import TrainConfig
from ..watermarks.schemes import MAX_SEED, check_params, scheme_spec
from ..watermarks.verify import default_threshold_seeds

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
MAX_FILE_BYTES = 1 << 20
MAX_CELLS = 10_000              # a sweep larger than this is refused before it is expanded
RESTORE_IF = ("not-shown", "always")


@dataclass(frozen=True)
class CellConfig:
    """One cell of an experiment: one owner model, one attack at one budget, N rounds."""

    name: str = "experiment"
    dataset: str = "mnist"
    arch: str | None = None
    scheme: str = "zhang-content"
    scheme_params: dict[str, Any] = field(default_factory=dict)
    owner: dict[str, Any] = field(default_factory=dict)     # TrainConfig overrides
    owner_seed: int = 0
    owner_path: str | None = None        # use this trained owner model (e.g. models/cifar10/zhang-content)
    threshold_seeds: tuple[int, ...] | None = None     # None: the dataset's (watermarks.verify.DEFAULT_THRESHOLD_SEEDS)
    threshold: float | None = None       # a known vanilla threshold (percent): no clean models are trained
    threshold_rule: str = "converged"    # watermarks.verify.THRESHOLD_RULES (the paper's is "paper")
    tolerance: float = 3.0               # points of test accuracy a removal may cost (more: "destroyed")
    attack: str = "launder"
    variant: str = "strong"
    attack_params: dict[str, Any] = field(default_factory=dict)
    budget: float | str = 0.006
    rounds: int = 1
    seed: int = 0
    calibrate: bool = False              # laundering: choose its options by k-fold over the attacker's set first
    restore_epochs: int = 0              # > 0: the owner then retrains the attacked model on its own clean data
    restore_fraction: float = 1.0        # ... on this stratified fraction of the training set
    restore_from: str = "sample"         # "sample": that fraction; "rest": the training images the attacker's set
    #                                      does not hold (Ngo et al.: the owner's data beside a disjoint split)
    restore_if: str = "not-shown"        # "not-shown": restore only where the attack left no ownership shown (what
    #                                      tells hidden from removed; a kept watermark stays kept); "always": after
    #                                      every attack (persistence: how far a faded watermark comes back)
    external: dict[str, Any] | None = None   # a model this project did not train (`ExternalModel.identity()`):
    #                                          the user's network, data (attacker's pool and the owner's
    #                                          restoration set), test set and trigger set; needs `threshold`

    def __post_init__(self) -> None:
        if self.threshold_seeds is None:         # resolved now, so a cell's id names the seeds it uses
            object.__setattr__(self, "threshold_seeds", default_threshold_seeds(self.dataset))

    # ---- derived, validated pieces
    @property
    def arch_name(self) -> str:
        return self.arch or DEFAULT_ARCH[self.dataset]

    def owner_train(self) -> TrainConfig:
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(self.owner) - fields)
        if unknown:
            raise UserError(f"owner: unknown training setting(s) {unknown}; allowed: {sorted(fields)}")
        base = dataclasses.asdict(owner_config(self.arch_name))
        return from_dict(TrainConfig, {**base, **self.owner, "seed": self.owner_seed}, "owner")

    def budget_spec(self) -> dict[str, Any]:
        """{"fraction": f} or {"per_class": n}."""
        return D.Budget.parse(self.budget, self.dataset).kwargs()

    def attack_config(self) -> Any:
        return configure(self.attack, self.attack_params, self.variant, self.rounds, self.seed)

    def validate(self) -> CellConfig:
        if not _NAME.fullmatch(self.name):
            raise UserError(f"name: {self.name!r} must be 1-100 letters, digits, '.', '_' or '-', starting with a "
                            "letter or digit (it names files in the report folder)")
        if self.external is not None:
            return self._validate_external()
        if self.dataset not in D.DATASETS:
            raise UserError(f"dataset: unknown dataset {self.dataset!r}; choose from {', '.join(D.DATASETS)}")
        check_fits(self.arch_name, self.dataset)
        spec = scheme_spec(self.scheme)
        params = from_dict(spec.params, self.scheme_params, "scheme_params")
        n_classes = D.NUM_CLASSES[self.dataset]
        for f in ("target", "source_class"):
            v = getattr(params, f, None)
            if v is not None and not 0 <= v < n_classes:
                raise UserError(f"scheme_params.{f}: {v} is not a class of {self.dataset} (0-{n_classes - 1})")
        try:
            check_params(self.scheme, params, D.SHAPES[self.dataset], n_classes)
        except UserError as e:
            raise UserError(f"scheme_params: {e}") from None
        if self.owner_path is not None and not Path(self.owner_path).with_suffix(".safetensors").is_file():
            raise UserError(f"owner_path: no model at {self.owner_path} (.safetensors and .json)")
        self.owner_train()
        if self.threshold is not None and not 0 <= self.threshold <= 100:
            raise UserError(f"threshold: must be a percentage in [0, 100], got {self.threshold}")
        if not self.threshold_seeds:
            raise UserError("threshold_seeds: at least one clean seed is needed for the vanilla threshold")
        self._check_run_settings()
        return self

    def _validate_external(self) -> CellConfig:
        """A cell on the user's own model: no registered dataset, architecture or scheme; the threshold
        is given (the tool cannot train clean models of an architecture it does not know)."""
        from ..external.setup import from_identity

        spec = from_identity(self.external)
        spec.require("weights", "data", "test_data", "verify_npz")
        if self.threshold is None or not 0 <= self.threshold <= 100:
            raise UserError("threshold: a cell on your own model needs the vanilla threshold in [0, 100] percent")
        self._check_run_settings()
        return self

    def _check_run_settings(self) -> None:
        from ..watermarks.verify import THRESHOLD_RULES

        for f in ("seed", "owner_seed"):
            v = getattr(self, f)
            if not 0 <= v <= MAX_SEED:
                raise UserError(f"{f}: must be in [0, 2^63), got {v}")
        if any(not 0 <= s <= MAX_SEED for s in self.threshold_seeds):
            raise UserError(f"threshold_seeds: each must be in [0, 2^63), got {list(self.threshold_seeds)}")
        if self.threshold_rule not in THRESHOLD_RULES:
            raise UserError(f"threshold_rule: {self.threshold_rule!r}; choose from {', '.join(THRESHOLD_RULES)}")
        if not 0 <= self.tolerance <= 100:
            raise UserError(f"tolerance: points of test accuracy in [0, 100], got {self.tolerance}")
        if self.rounds < 1:
            raise UserError(f"rounds: must be >= 1, got {self.rounds}")
        self.budget_spec()
        if self.calibrate and self.attack != "launder":
            raise UserError(f"calibrate: only laundering calibrates; {self.attack} has nothing to choose")
        if self.restore_epochs < 0 or not 0 < self.restore_fraction <= 1:
            raise UserError("restore_epochs must be >= 0 and restore_fraction in (0, 1]")
        if self.restore_from not in ("sample", "rest"):
            raise UserError(f"restore_from: {self.restore_from!r}; choose from sample, rest")
        if self.restore_if not in RESTORE_IF:
            raise UserError(f"restore_if: {self.restore_if!r}; choose from {', '.join(RESTORE_IF)}")
        if self.restore_from == "rest" and self.restore_epochs and (
                self.restore_fraction != 1.0 or self.budget_spec() == {"fraction": 1.0}):
            raise UserError("restore_from = \"rest\" restores on what the attacker's set leaves of the training set: "
                            "it needs a budget below the whole set, and no restore_fraction")
        try:
            self.attack_config()
        except TypeError as e:
            raise UserError(f"attack_params: {e}") from e

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def cell_id(self) -> str:
        d = self.as_dict()
        for k, v in _LATER_FIELDS.items():      # at their defaults they leave earlier cells' ids as they were
            if d[k] == v:
                del d[k]
        if d["seed"] != 0:
            # A cell's seed also seeds its attack's own draws (Neural Cleanse's initialisation, the
            # retraining order); stores made before that held seed != 0 cells seeded in their subset
            # only, so those ids change and such cells run again. Seed 0 cells were and are all zeros.
            d["seeds_attack"] = True
        return digest(d)


# At its default "not-shown", `restore_if` keeps the ids of cells that restored after every attack: their results
# hold everything a "not-shown" cell computes (a kept watermark's restoration decides nothing).
_LATER_FIELDS = {"calibrate": False, "restore_epochs": 0, "restore_fraction": 1.0, "external": None,
                 "threshold_rule": "converged", "tolerance": 3.0, "restore_from": "sample", "restore_if": "not-shown"}


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    cur = d
    for p in parts[:-1]:
        nxt = cur.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise UserError(f"sweep.{key}: {p!r} is not a table")
        cur = nxt
    cur[parts[-1]] = value


def _each(each: Any, where: str = "each") -> list[dict[str, Any]]:
    """`[[each]]` (and `sweep.settings`): a list of tables, each a group of settings the grid runs under in
    turn (one owner model with its architecture and threshold, say), where `[sweep]` multiplies every
    combination."""
    if not isinstance(each, list) or not each or not all(isinstance(e, dict) for e in each):
        raise UserError(f"{where}: expected one or more tables" + (" ([[each]] blocks)" if where == "each" else ""))
    names = {f.name for f in dataclasses.fields(CellConfig)}
    for i, e in enumerate(each):
        for k in e:
            if k not in names:
                raise UserError(f"{where}[{i}]: unknown key {k!r}")
    return each


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on `base`: a table merges key by key into the same table, anything else replaces."""
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merged(base[k], copy.deepcopy(v))
        else:
            base[k] = copy.deepcopy(v)
    return base


def expand(raw: dict[str, Any]) -> list[CellConfig]:
    """Validate an experiment (a dict as read from TOML) and expand its `sweep` into cells."""
    if not isinstance(raw, dict):
        raise UserError("an experiment file must be a table of settings")
    base = {k: v for k, v in raw.items() if k not in ("sweep", "each")}
    each = _each(raw.get("each", [{}]))
    sweep = raw.get("sweep", {})
    if not isinstance(sweep, dict):
        raise UserError("sweep: expected a table of lists")
    for k, v in sweep.items():
        if not isinstance(v, list) or not v:
            raise UserError(f"sweep.{k}: expected a non-empty list, got {v!r}")
        top = k.split(".")[0]
        if k == "settings":
            _each(v, "sweep.settings")
        elif top not in {f.name for f in dataclasses.fields(CellConfig)}:
            raise UserError(f"sweep.{k}: unknown key {top!r}")
    keys = list(sweep)
    size = len(each) * math.prod(len(v) for v in sweep.values())
    if size > MAX_CELLS:
        raise UserError(f"sweep: the grid has {size} cells, more than the {MAX_CELLS} one experiment file may hold; "
                        "split it into several files")
    cells = []
    for over, combo in itertools.product(each, itertools.product(*(sweep[k] for k in keys))):
        d = _merged(copy.deepcopy(base), over)
        for k, v in zip(keys, combo, strict=True):
            if k == "settings":
                _merged(d, v)          # settings that go together, laid over the cell's, as an [[each]] group
            elif isinstance(v, dict) and isinstance(d.get(k), dict):
                _merged(d[k], v)       # a table value merges into the file's table, as an [[each]] table does
            else:
                _set_dotted(d, k, v)
        if isinstance(d.get("owner_path"), str):       # "models/mnist/{scheme}": one owner model per scheme
            d["owner_path"] = d["owner_path"].replace("{scheme}", str(d.get("scheme", "zhang-content"))).replace(
                "{dataset}", str(d.get("dataset", "mnist")))
        cells.append(from_dict(CellConfig, d, "experiment").validate())
    ids = [c.cell_id() for c in cells]
    if len(set(ids)) != len(ids):
        raise UserError("sweep: two cells of the grid are identical (a value is repeated)")
    return cells


def select_cells(cells: list[CellConfig], only: list[str]) -> list[CellConfig]:
    """The cells whose settings match every `KEY=V1,V2` of `only` (a setting, its value as the file writes it:
    `attack=nad,i-bau`, `seed=0`, `budget=0.006`; a dotted key reads into a table, `attack_params.ct=1.0`, and
    a cell whose table lacks the key does not match); part of a grid, run or reported alone."""
    names = [f.name for f in dataclasses.fields(CellConfig)]
    for spec in only:
        key, eq, values = spec.partition("=")
        path = key.strip().split(".")
        if not eq or not values.strip():
            raise UserError(f"--only {spec!r}: expected KEY=VALUE[,VALUE...], e.g. attack=nad,i-bau")
        if path[0] not in names:
            raise UserError(f"--only {spec!r}: unknown setting {path[0]!r}; choose from {', '.join(names)}")
        wanted = {v.strip() for v in values.split(",")}
        cells = [c for c in cells if _as_written(_lookup(getattr(c, path[0]), path[1:])) in wanted]
    if not cells:
        raise UserError(f"--only {' '.join(only)}: no cell of the experiment matches")
    return cells


_MISSING = object()


def _lookup(v: Any, path: list[str]) -> Any:
    """`v`'s value at the dotted `path` into its tables (_MISSING where a table lacks a key)."""
    for k in path:
        if not isinstance(v, dict) or k not in v:
            return _MISSING
        v = v[k]
    return v


def _as_written(v: Any) -> str:
    """A setting's value as a TOML file or a command line writes it (0.006, true, 3, "nad" as nad)."""
    if v is _MISSING:
        return "\0missing"                 # matches no value a command line can write
    if isinstance(v, bool):
        return str(v).lower()
    return v if isinstance(v, str) else json.dumps(v, default=str)


def load_experiment(path: str | Path, allow: CodeAllowance = NO_CODE) -> list[CellConfig]:
    """The cells of an experiment file, fully validated. A file that names code (an `[external]`
    factory, or `allow_torch_load`) is refused, before anything is imported, unless `allow` (what the
    command line allows) lists it."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"missing experiment file {p}")
    if p.stat().st_size > MAX_FILE_BYTES:
        raise UserError(f"{p}: {p.stat().st_size} bytes; an experiment file may hold at most {MAX_FILE_BYTES}")
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{p}: not valid TOML ({e})") from e
    except RecursionError:
        raise UserError(f"{p}: not valid TOML (nested too deeply)") from None
    try:
        cells = expand(raw)
        for cell in cells:
            if cell.external is not None:
                from ..external.setup import from_identity

                from_identity(cell.external).check_allowed(allow, "[external]")
    except UserError as e:
        raise UserError(f"{p}: {e}") from e
    return cells
