"""`nnlaunder audit`: will this watermark still prove ownership after someone steals the model?

An audit is an ordinary experiment (`CellConfig`s in the workspace's store, resumable, local or
Ray executor): the watermark's own vanilla threshold (this scheme with these parameters, from clean
models the tool trains), then every attack of a profile at every attacker budget over several
seeds, and after each attack that leaves no ownership shown the owner's restoration on its own clean
data. Each cell ends in one
of four outcomes (`watermarks.verify.outcome`, decided by the runner with `nnlaunder verify`'s verdict:
threshold, binomial p, the model's base rate and task accuracy):
- kept: after the attack, the owner's verification still shows ownership;
- destroyed: it does not, and the model lost more than the tolerance (3 points) of test accuracy;
- hidden: it does not, the model is usable, and after the owner's restoration it shows ownership again;
- removed: it does not, after the attack or after the restoration, on a usable model.
A model whose outputs on the verification set are NaN or Inf is never called removed (kept).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..attacks.neural_cleanse import nc_params
from ..checkpoint import safe_name
from ..errors import UserError
from ..report.battery import over_seeds
from ..watermarks.verify import OUTCOMES, cell_p
from .config import CellConfig
from .store import ran_on


@dataclass(frozen=True)
class Profile:
    budgets: tuple[float | str, ...]
    attacks: tuple[str, ...]
    seeds: int
    rounds: int                    # laundering rounds
    nc_preset: str
    calibrate: bool                # laundering chooses its options on the attacker's data first
    threshold_seeds: tuple[int, ...] | None    # None: the dataset's (5 clean seeds on MNIST, 3 elsewhere)
    restore_epochs: int
    restore_fraction: float
    nc_epochs: int | None = None   # a cap on Neural Cleanse's epochs (None: the preset's)


PROFILES = {
    # MNIST within 15 minutes on 2 CPU cores: fast Neural Cleanse, two budgets, two seeds, one round of
    # laundering (Table 2's protocol: on MNIST at 0.6% a second round works on a class without a
    # watermark and costs accuracy), a short restoration on a tenth of the owner's data (a weaker
    # restoration than Ngo et al.'s 30 epochs). The attacks are the three that remove the most Table 2
    # watermarks over the whole battery (benchmarks/results/attacks.md): laundering, fine-pruning and
    # NC unlearning; RTAL, NAD, ANP, I-BAU and Dehydration removed none there and run in the full profile.
    "quick": Profile(budgets=(0.006, 0.06), attacks=("launder", "fine-prune", "nc-unlearn"), seeds=2,
                     rounds=1, nc_preset="fast", calibrate=False, threshold_seeds=None, restore_epochs=2,
                     restore_fraction=0.1),
    # For a GPU or a cluster: the paper's budgets, calibration, three rounds, Ngo et al.'s restoration, and
    # every removal attack of the registry (the strongest known ones included: NAD, ANP, I-BAU, Neural
    # Dehydration).
    "full": Profile(budgets=("1/class", 0.006, 0.06, 0.108),
                    attacks=("launder", "fine-prune", "rtal", "ftal", "nc-unlearn", "prune-ft", "nad", "anp", "i-bau",
                             "dehydration"), seeds=3, rounds=3,
                    nc_preset="faithful", calibrate=True, threshold_seeds=None, restore_epochs=30,
                    restore_fraction=1.0),
}


def _attack_params(attack: str, nc_preset: str, nc_epochs: int | None) -> dict[str, Any]:
    cap = {"max_epochs": nc_epochs} if nc_epochs else {}
    if attack == "launder":
        return {"nc": {"preset": nc_preset, **cap}}
    if attack == "nc-unlearn":
        return {"nc": nc_params(nc_preset, **cap)}
    return {}


def audit_cells(name: str, model: str | None, meta: dict[str, Any], scheme: str, params: dict[str, Any],
                profile: Profile, seeds: int | None = None, *, external: dict[str, Any] | None = None,
                threshold: float | None = None) -> list[CellConfig]:
    """The audit's grid: attack x budget x seed, every cell on the owner's model as given (a model of
    this project at `model`, or the user's own, `external`, with its `threshold`)."""
    n = profile.seeds if seeds is None else seeds
    if n < 1:
        raise UserError(f"--seeds must be >= 1, got {n}")
    cells = []
    for attack in profile.attacks:
        for budget in profile.budgets:
            for seed in range(n):
                cells.append(CellConfig(
                    name=name, dataset=meta["dataset"], arch=meta.get("arch"), scheme=scheme, scheme_params=params,
                    owner_path=model, threshold_seeds=profile.threshold_seeds, threshold=threshold,
                    external=external, attack=attack,
                    attack_params=_attack_params(attack, profile.nc_preset, profile.nc_epochs),
                    budget=budget, rounds=profile.rounds if attack == "launder" else 1, seed=seed,
                    calibrate=profile.calibrate and attack == "launder", restore_epochs=profile.restore_epochs,
                    restore_fraction=profile.restore_fraction).validate())
    return cells


def outcome(summary: dict[str, Any]) -> str:
    """The cell's outcome as the runner decided it (kept, hidden, removed, destroyed)."""
    if summary.get("outcome") in OUTCOMES:
        return str(summary["outcome"])
    raise UserError("this audit's store holds cells decided under the old rules (no outcome recorded); "
                    "run the audit in a new workspace")


def summarize(cells: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (attack, budget) over the seeds run, in the order the audit ran them."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for c in cells:
        groups.setdefault((c["config"]["attack"], str(c["config"]["budget"])), []).append(c)
    rows = []
    for (attack, budget), cs in groups.items():
        ss = [c["summary"] for c in cs]
        outs = [outcome(s) for s in ss]
        o = over_seeds(ss)
        # the runs the owner restored (those the attack left no ownership shown, unless restore_if = always)
        restored = [s["restored_wm_acc"] for s in ss if "restored_wm_acc" in s]
        rows.append({
            "attack": attack, "budget": budget, "n": o.n, "n_clean": ss[0]["n_clean"],
            "removed": o.removed, "hidden": outs.count("hidden"), "kept": outs.count("kept"),
            "destroyed": o.destroyed, "interval": o.wilson95,
            "orig_test_acc": ss[0]["orig_test_acc"], "orig_wm_acc": ss[0]["orig_wm_acc"],
            "test_mean": o.test_mean, "test_sd": o.test_sd, "wm_median": o.wm_median, "wm_min": o.wm_range[0],
            "wm_max": o.wm_range[1], "p_median": statistics.median(cell_p(s)[0] for s in ss),
            "restored_wm_median": statistics.median(restored) if restored else None, "restored_n": len(restored),
            "no_resets": sum(_reset_nothing(c) for c in cs),
            "threshold": ss[0]["threshold"], "points": [(s["test_acc"], s["wm_acc"]) for s in ss],
        })
    return rows


def _reset_nothing(cell: dict[str, Any]) -> bool:
    """A laundering cell whose Algorithm 1 reset no unit in any round: its rounds were retraining alone."""
    rounds = cell.get("rounds") or []
    return (cell["config"]["attack"] == "launder" and len(rounds) > 1
            and not any(v for r in rounds[1:] for v in (r.get("resets") or {}).values()))


def verdict_paragraph(rows: Sequence[dict[str, Any]], scheme: str) -> str:
    """The audit's answer in plain words: the cheapest attack that removes the watermark, and the
    ones that only hide it."""
    if not rows:
        return "No audit cell has finished yet."
    best = [r for r in rows if r["removed"] == r["n"]]
    hidden = [r for r in rows if r["hidden"]]
    parts = []
    if best:
        r = min(best, key=lambda r: (r["n_clean"], r["orig_test_acc"] - r["test_mean"]))
        parts.append(f"An attacker with {r['n_clean']} clean images removes this {scheme} watermark with {r['attack']} "
                     f"in {r['removed']}/{r['n']} runs at a cost of {r['orig_test_acc'] - r['test_mean']:.1f} points "
                     f"of test accuracy ({r['orig_test_acc']:.2f}% -> {r['test_mean']:.2f}%): the watermark does "
                     "not prove ownership against this attacker.")
    else:
        some = [r for r in rows if r["removed"]]
        if some:
            r = max(some, key=lambda r: r["removed"] / r["n"])
            parts.append(f"No attack removed this {scheme} watermark in every run; the most successful, "
                         f"{r['attack']} with {r['n_clean']} clean images, removed it in {r['removed']}/{r['n']}.")
        else:
            parts.append(f"No attack of this audit removed this {scheme} watermark: it kept proving ownership in "
                         f"every run ({sum(r['n'] for r in rows)} runs).")
    idle = [r for r in rows if r.get("no_resets")]
    if idle:
        n_idle, n_all = sum(r["no_resets"] for r in idle), sum(r["n"] for r in idle)
        parts.append(f"Laundering's Algorithm 1 reset no unit in {n_idle} of its {n_all} runs: those runs were "
                     "retraining alone (no unit's activation difference for the recovered triggers passed the "
                     "thresholds), so what they kept says little about laundering on this network.")
    if hidden:
        names = sorted({r["attack"] for r in hidden})
        n_hidden = sum(r["hidden"] for r in hidden)
        parts.append(f"{', '.join(names)} only hid it in {n_hidden} run{'s' if n_hidden != 1 else ''}: the owner's "
                     "restoration on its own clean data made it prove ownership again.")
    return " ".join(parts)


@dataclass(frozen=True)
class ExternalAudit:
    """The audit of a model this project did not train: the user's network and data, their trigger set
    (`spec.verify_npz`), and the vanilla threshold, given or measured on clean models the user gives."""
    spec: Any                                # experiments.external.ExternalModel
    threshold: float | None = None           # percent
    clean_weights: tuple[str, ...] = ()      # weights of clean models of the same factory

    def allowance(self) -> Any:
        """The factory this audit names was given by its caller (typed on the command line): it may run."""
        from ..external.models import CodeAllowance

        return CodeAllowance.typed(self.spec.factory, self.spec.allow_torch_load)


def external_threshold(ext: ExternalAudit) -> tuple[float, dict[str, Any]]:
    """The vanilla threshold for the user's trigger set: given, or the maximum accuracy on it of the
    clean models the user gives (the paper's definition over the models there are)."""
    import dataclasses

    from ..external.setup import load_external
    from ..train import accuracy

    if (ext.threshold is None) == (not ext.clean_weights):
        raise UserError("an audit of your own model needs its vanilla threshold: --threshold PERCENT, or "
                        "--clean-weights W[,W...] (clean models of the same factory) to measure it")
    if ext.threshold is not None:
        if not 0 <= ext.threshold <= 100:
            raise UserError(f"--threshold must be a percentage in [0, 100], got {ext.threshold}")
        return ext.threshold, {"threshold": "given"}
    accs = []
    for w in ext.clean_weights:
        setup = load_external(dataclasses.replace(ext.spec, weights=w), ext.allowance())
        assert setup.verify is not None
        accs.append(accuracy(setup.model, *setup.verify))
    return max(accs), {"clean models": list(ext.clean_weights), "their trigger accuracy": accs}


def run_audit(model: str | None, scheme: str | None, params: dict[str, Any], *, profile: str | Profile = "quick",
              seeds: int | None = None, workspace: str = "runs/audit", out: str | None = None,
              data_dir: str | None = None, executor: str = "local", address: str | None = None, jobs: int = 1,
              progress: bool = True, log: Any = print, external: ExternalAudit | None = None) -> dict[str, Any]:
    """Run (or continue) the audit of `model` (or of the user's own model, `external`) and write its
    report; returns the report's content."""
    from pathlib import Path

    from ..report.audit import write_audit_report
    from .runner import run_experiment
    from .store import Store

    if isinstance(profile, str) and profile not in PROFILES:
        raise UserError(f"unknown audit profile {profile!r}; choose from {', '.join(PROFILES)}")
    prof = PROFILES[profile] if isinstance(profile, str) else profile
    label = profile if isinstance(profile, str) else "custom"
    name, cells, scheme, params, where = _grid(model, scheme, params, prof, seeds, external)
    log(f"audit of {where} ({scheme}, {label} profile): {len(cells)} cells in {workspace}")
    run_experiment(cells, workspace, data_dir, progress=progress, executor=executor, address=address, jobs=jobs,
                   allow=external.allowance() if external is not None else None,
                   on_cell=lambda c, s: log(f"  {c.attack} @ {c.budget} seed {c.seed}: test {s['test_acc']:.2f}%, "
                                            f"WM {s['wm_acc']:.2f}% -> {outcome(s)}"))
    ids = {c.cell_id() for c in cells}
    with Store(Path(workspace) / "results.sqlite", readonly=True) as store:
        done = [c for c in store.cells(name) if c["cell_id"] in ids]
    rows = summarize(done)
    paragraph = verdict_paragraph(rows, scheme)
    facts = {"model": where, "scheme": scheme, "scheme parameters": json_safe(params),
             "threshold": f"{rows[0]['threshold']:.2f}% (converged rule: the largest 99% upper bound of the clean "
                          f"models' rate over their converged epochs, seeds {list(cells[0].threshold_seeds or ())})"
                          if rows else "-",
             "profile": f"{label}: budgets {list(prof.budgets)}, {seeds or prof.seeds} seeds, laundering "
                        f"{prof.rounds} round{'s' if prof.rounds != 1 else ''} with the {prof.nc_preset} Neural Cleanse"
                        f"{' and calibration' if prof.calibrate else ''}, restoration {prof.restore_epochs} epochs "
                        f"on {prof.restore_fraction:.0%} of the training set",
             "ran on": ran_on(done)}
    folder = Path(out) if out else Path(workspace) / "audit" / name
    if external is not None:
        facts["threshold"] = f"{cells[0].threshold:.2f}% ({_threshold_source(external)})"
    write_audit_report(folder, Path(workspace), f"Audit: {scheme} on {where}", done, rows, paragraph,
                       facts)
    log(paragraph)
    log(f"wrote {folder}/audit.md, audit.html, audit.json and the plots")
    return {"rows": rows, "verdict": paragraph, "folder": str(folder)}


def _grid(model: str | None, scheme: str | None, params: dict[str, Any], prof: Profile, seeds: int | None,
          external: ExternalAudit | None) -> tuple[str, list[CellConfig], str, dict[str, Any], str]:
    """(experiment name, cells, scheme, scheme parameters, what is audited)."""
    from pathlib import Path

    from ..checkpoint import load_model

    if external is not None:
        if model:
            raise UserError("give either a MODEL of this project or --model-factory with --weights, not both")
        if params or scheme:
            raise UserError("--scheme and --param describe a watermark of this project; for your own model the "
                            "trigger set is --verify-npz")
        external.spec.require("weights", "data", "test_data", "verify_npz")
        th, _ = external_threshold(external)
        where = str(external.spec.weights)
        name = safe_name(f"audit-{Path(where).stem}-byo", 100, "audit")
        cells = audit_cells(name, None, {"dataset": "external"}, "external", {}, prof, seeds,
                            external=external.spec.identity(), threshold=th)
        return name, cells, "trigger-set", {}, where
    if not model:
        raise UserError("audit needs a MODEL (a model of this project) or --model-factory with --weights, --data, "
                        "--test-data and --verify-npz")
    _, meta = load_model(model)
    scheme = scheme or meta.get("scheme")
    if not scheme:
        raise UserError(f"{model} records no watermark scheme; pass --scheme")
    if scheme == meta.get("scheme"):
        params = {**(meta.get("scheme_params") or {}), **params}
    name = safe_name(f"audit-{Path(model).stem}-{scheme}", 100, "audit")
    return name, audit_cells(name, str(model), meta, scheme, params, prof, seeds), scheme, params, str(model)


def _threshold_source(ext: ExternalAudit) -> str:
    if ext.threshold is not None:
        return "given with --threshold"
    return f"max trigger accuracy of the {len(ext.clean_weights)} clean model(s) given with --clean-weights"


def json_safe(params: dict[str, Any]) -> str:
    import json

    return json.dumps(params, sort_keys=True, default=str)


