"""`nnlaunder report`: a folder with Markdown, a self-contained HTML page and PNG plots, built
from a workspace's results store (and its vanilla-threshold curves).

- Table 2 layout: per cell, the last round, with the paper's numbers beside ours where known;
- Figure 3/4 style: test (blue) and watermark (red) accuracy against rounds, one line style per
  budget, the vanilla threshold in black; one plot per (dataset, scheme);
- Figure 5 style: clean models' watermark accuracy over their training epochs;
- Figures 6/8 style: Neural Cleanse's recovered triggers, per cell (round 1), and the watermark beside
  its reconstruction for the watermark's label (schemes with one target class);
- Ngo et al.'s persistence layout (`persistence`): each attack's model and the owner's restoration of it;
- the ablation layout (`variants`, with a control experiment): each variant against the control on the same seeds.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from ..checkpoint import atomic_write_bytes, atomic_write_json, safe_name  # noqa: E402
from ..experiments.store import ran_on, workspace_cells  # noqa: E402
from ..plots import reconstructions, trigger_grid  # noqa: E402
from ..watermarks.verify import cell_p, format_p  # noqa: E402
from .battery import battery_section, budget_label, config_key, flat_rows, over_seeds, scheme_name, work_seconds  # noqa: E402
from .persistence import persistence_section  # noqa: E402
from .variants import variants_section  # noqa: E402

# Aiken et al. Table 2 ("Ours"): the owner's model before and after laundering, and the vanilla threshold.
PAPER = {
    ("mnist", "zhang-content"): dict(orig_test_acc=99.90, test_acc=98.34, orig_wm_acc=100, wm_acc=0.01, threshold=1.5),
    ("mnist", "zhang-noise"): dict(orig_test_acc=99.86, test_acc=97.45, orig_wm_acc=99.99, wm_acc=0.07, threshold=6.0),
    ("mnist", "zhang-unrelated"): dict(orig_test_acc=99.92, test_acc=98.33, orig_wm_acc=99.71, wm_acc=15,
                                       threshold=20),
    ("cifar10", "zhang-content"): dict(orig_test_acc=90.24, test_acc=87.65, orig_wm_acc=100, wm_acc=1.4, threshold=5),
    ("cifar10", "zhang-noise"): dict(orig_test_acc=89.01, test_acc=84.14, orig_wm_acc=100, wm_acc=0.5, threshold=4),
    ("cifar10", "zhang-unrelated"): dict(orig_test_acc=89.77, test_acc=85.34, orig_wm_acc=99.94, wm_acc=16,
                                         threshold=52),
    ("cifar10", "adi-pt"): dict(orig_test_acc=91.55, test_acc=88.25, orig_wm_acc=100, wm_acc=7.0, threshold=12),
    ("cifar10", "adi-fs"): dict(orig_test_acc=91.85, test_acc=84.73, orig_wm_acc=100, wm_acc=7.0, threshold=12),
}
# Its baseline columns: Zhang et al.'s 90% pruning then fine-tuning (attacker with 16.6% of MNIST's, 20% of
# CIFAR-10's training data) and Adi et al.'s RTAL: test / WM after.
PAPER_ATTACKS = {("mnist", "zhang-content", "prune-ft"): (97.03, 99.95),
                 ("mnist", "zhang-noise", "prune-ft"): (95.19, 99.55),
                 ("mnist", "zhang-unrelated", "prune-ft"): (93.55, 99.9),
                 ("cifar10", "zhang-content", "prune-ft"): (64.9, 99.47),
                 ("cifar10", "zhang-noise", "prune-ft"): (59.29, 65.13),
                 ("cifar10", "zhang-unrelated", "prune-ft"): (62.15, 10.93),
                 ("cifar10", "adi-pt", "rtal"): (90.0, 100.0), ("cifar10", "adi-fs", "rtal"): (90.0, 80.0)}
STYLES = ["-", "--", ":", "-."]
MARKERS = ["o", "^", "s", "x"]






def rounds_plot(cells: list[dict], title: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    budgets = sorted({json.dumps(c["config"]["budget"]) for c in cells},
                     key=lambda b: (isinstance(json.loads(b), str), -json.loads(b) if not b.startswith('"') else 0))
    for i, b in enumerate(budgets):
        same = [c for c in cells if json.dumps(c["config"]["budget"]) == b]
        for j, c in enumerate(same):                    # several seeds: one legend entry per budget
            rs = c["rounds"]
            x = [r["round"] for r in rs]
            lab = budget_label(c["config"]["budget"]) + (f" ({len(same)} seeds)" if len(same) > 1 else "")
            ax.plot(x, [r["test_acc"] for r in rs], color="tab:blue", ls=STYLES[i % 4], marker=MARKERS[i % 4], ms=4,
                    label=f"test, {lab}" if j == 0 else None)
            ax.plot(x, [r["wm_acc"] for r in rs], color="tab:red", ls=STYLES[i % 4], marker=MARKERS[i % 4], ms=4,
                    label=f"watermark, {lab}" if j == 0 else None)
    th = cells[0]["summary"]["threshold"]
    ax.axhline(th, color="black", lw=1.5, label=f"vanilla threshold {th:.2f}%")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("laundering round (0 = before)")
    ax.set_ylabel("accuracy %")
    ax.set_ylim(-2, 102)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=6, ncol=2, loc="center right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def clean_curves_plot(curves: dict[str, list[list[float]]], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for i, (name, per_seed) in enumerate(sorted(curves.items())):
        for s, curve in enumerate(per_seed):
            ax.plot(range(1, len(curve) + 1), curve, color=plt.get_cmap("tab10")(i), alpha=0.8,
                    label=name if s == 0 else None, marker=".")
    ax.set_xlabel("training epoch of a clean model")
    ax.set_ylabel("watermark accuracy %")
    ax.set_title("Clean models classifying trigger inputs as the watermark label (Figure 5 style)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


_NUMBERS = ("test_acc", "wm_acc", "threshold", "orig_test_acc", "orig_wm_acc", "rounds_run")
_OPTIONAL_NUMBERS = ("threshold_paper", "restored_test_acc", "restored_wm_acc", "restore_seconds", "attack_seconds",
                     "test_drop", "param_shift", "base_rate")


def _check_cell(c: dict, db: Path) -> None:
    """A cell of the store as the runner wrote it, or one line naming what a tampered one lacks."""
    from ..errors import UserError

    cfg, sm = c.get("config"), c.get("summary")
    bad = [k for k in _NUMBERS if not isinstance(sm, dict) or isinstance(sm.get(k), bool)
           or not isinstance(sm.get(k), int | float)]
    bad += [k for k in _OPTIONAL_NUMBERS if isinstance(sm, dict) and k in sm and sm[k] is not None
            and (isinstance(sm[k], bool) or not isinstance(sm[k], int | float))]
    if not isinstance(cfg, dict) or not all(isinstance(cfg.get(k), str) for k in ("dataset", "scheme", "attack")):
        bad.append("config")
    elif not isinstance(cfg.get("attack_params") or {}, dict) or not isinstance(cfg.get("scheme_params") or {}, dict):
        bad.append("config's params")
    if not isinstance(c.get("rounds"), list) or not c["rounds"] or not all(isinstance(r, dict) for r in c["rounds"]):
        bad.append("rounds")
    if bad:
        raise UserError(f"{db}: cell {str(c.get('cell_id'))[:40]} is not as the runner writes it ({bad[:3]} missing "
                        "or not numbers); the store was changed by hand")


def _paper(cfg: dict) -> tuple[float | None, float | None, float | None]:
    """The paper's test / WM after / threshold for this cell's attack on this watermark, where it has them."""
    key = (cfg["dataset"], scheme_name(cfg))
    threshold = PAPER[key]["threshold"] if key in PAPER else None
    if cfg["attack"] == "launder" and key in PAPER:
        return PAPER[key]["test_acc"], PAPER[key]["wm_acc"], threshold
    return (*PAPER_ATTACKS.get((*key, cfg["attack"]), (None, None)), threshold)


def _select(cells: list[dict], experiments: Sequence[str] | None, db: Path) -> list[dict]:
    from ..errors import UserError

    if not experiments:
        return cells
    have = sorted({c["experiment"] for c in cells})
    missing = [e for e in experiments if e not in have]
    if missing:
        raise UserError(f"{db} holds no finished cell of experiment(s) {', '.join(missing)}; it holds "
                        f"{', '.join(have)}")
    return [c for c in cells if c["experiment"] in experiments]


def build_report(workspace: str | Path, out: str | Path, experiments: Sequence[str] | None = None,
                 rows: str | Path | None = None, paper_rule: dict[tuple[str, str], float] | None = None,
                 control: str | None = None) -> Path:
    """The report of a workspace's store (only `experiments`, where given) in `out`; with `rows`, also
    one JSON row per cell there (`flat_rows`). `paper_rule`: the paper's-rule threshold per (dataset,
    watermark), shown beside the threshold of cells that were given theirs (and so recorded no other).
    `control`: an experiment of the report that every other one's cells are compared with (`variants`)."""
    ws, out = Path(workspace), Path(out)
    from ..errors import UserError

    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder; the report is a folder of files")
    if rows is not None and Path(rows).is_dir():
        raise UserError(f"--rows {rows} is a folder; give the JSON file to write")
    db = ws / "results.sqlite"
    cells = workspace_cells(ws)                 # a workspace's store, or the cells `nnlaunder export` wrote
    if not cells:
        raise UserError(f"{db} holds no finished cell yet; run an experiment to the end of at least one cell "
                        "(`nnlaunder run FILE --workspace ...`), then make the report")
    for c in cells:
        _check_cell(c, db)
    cells = _select(cells, experiments, db)
    if control is not None and not any(c["experiment"] == control for c in cells):
        raise UserError(f"--control {control!r}: the report holds no cell of that experiment; it holds "
                        f"{', '.join(sorted({c['experiment'] for c in cells}))}")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the report folder {str(out)[:200]}: {e.strerror or e}") from None
    here = ((ws.absolute(), Path.cwd().absolute()), (ws.resolve(), Path.cwd().resolve()))   # through a link too
    shown = next((a.relative_to(b) for a, b in here if a.is_relative_to(b)), ws)      # never by a machine path
    md = ["# nnlaunder report", "", f"Workspace `{shown}`: {len(cells)} finished cells. Ran on: {ran_on(cells)}.", "",
          *last_round_section(cells, paper_rule)]
    md += seeds_section(cells, paper_rule)
    images: list[Path] = []
    md += battery_section(cells, out, images)
    md += persistence_section(cells, out, images)
    md += variants_section(cells, control, out, images) if control else []
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for c in cells:
        if c["config"]["attack"] == "launder":
            groups[(c["experiment"], c["config"]["dataset"], scheme_name(c["config"]))].append(c)
    if groups:
        md += ["", "## Accuracy against laundering rounds (Figures 3/4 style)", ""]
    for (exp, ds, scheme), cs in sorted(groups.items()):
        png = rounds_plot(cs, f"{exp}: {ds} {scheme}", out / safe_name(f"rounds-{exp}-{ds}-{scheme}.png"))
        images.append(png)
        md += [f"![{ds} {scheme}]({png.name})", ""]
    curves: dict[str, list[list[float]]] = {}
    for f in sorted((ws / "thresholds").glob("*.json")):
        d = json.loads(f.read_text())
        curves[f"{f.stem[:6]} (threshold {d['threshold']:.2f}%)"] = d["curves"]
    if curves:
        png = clean_curves_plot(curves, out / "clean-curves.png")
        images.append(png)
        md += ["## Vanilla thresholds (Figure 5 style)", "", f"![clean curves]({png.name})", ""]
    md += trigger_section(ws, groups, out, images)
    text = "\n".join(md) + "\n"
    _drop_stale_plots(out, text)
    atomic_write_bytes(out / "index.md", text.encode())
    atomic_write_bytes(out / "index.html", html_page(text, images).encode())
    if rows is not None:
        atomic_write_json(Path(rows), flat_rows(cells))
    return out


_IMAGE = re.compile(r"!\[[^\]]*\]\(([^)/\\]+\.png)\)")


def _drop_stale_plots(out: Path, text: str) -> None:
    """Delete the plots the report in `out` showed before and this one does not: only files its previous
    index.md named, so a folder's other files are never touched."""
    old = out / "index.md"
    if not old.is_file():
        return
    try:
        before = set(_IMAGE.findall(old.read_text(errors="replace")))
    except OSError:
        return
    for name in before - set(_IMAGE.findall(text)):
        f = out / name
        if f.is_file() and not f.is_symlink():
            f.unlink()


def last_round_section(cells: list[dict], paper_rule: dict[tuple[str, str], float] | None = None) -> list[str]:
    """Table 2's layout: a row per cell, its last round, the paper's figures beside ours where it has them."""
    md = ["## Last round of every cell (Table 2 layout; the paper's figures in parentheses)", "",
          "The paper's figures: Aiken et al.'s Table 2, laundering and, for Zhang et al.'s pruning (prune-ft) and "
          "Adi et al.'s RTAL, its baseline columns (their attackers held 16.6% of MNIST's and 20% of CIFAR-10's "
          "training data). Beside the threshold: the paper's rule on the same clean models, where this store "
          "measured them, and the paper's vanilla threshold.", "",
          "| experiment | dataset | scheme | attack | budget | rounds | test acc % before → after (paper) "
          "| WM acc % before → after (paper) | threshold % (paper's rule; paper) | outcome | WM % after the owner's "
          "restoration |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in sorted(cells, key=lambda c: (c["experiment"], c["config"]["dataset"], scheme_name(c["config"]),
                                          json.dumps(c["config"]["budget"]))):
        cfg, sm = c["config"], c["summary"]
        p = _paper(cfg)
        pt = [f" ({v:g})" if v is not None else "" for v in p]
        rule = sm.get("threshold_paper", (paper_rule or {}).get((cfg["dataset"], scheme_name(cfg))))
        beside = ["" if rule is None else f"{rule:.2f}", "" if p[2] is None else f"{p[2]:g}"]
        pt[2] = f" ({'; '.join(b for b in beside if b)})" if any(beside) else ""
        md.append(f"| {c['experiment']} | {cfg['dataset']} | {scheme_name(cfg)} | {cfg['attack']} | "
                  f"{budget_label(cfg['budget'])} | {sm['rounds_run']} | {sm['orig_test_acc']:.2f} → "
                  f"{sm['test_acc']:.2f}{pt[0]} | {sm['orig_wm_acc']:.2f} → {sm['wm_acc']:.2f}{pt[1]} | "
                  f"{sm['threshold']:.2f}{pt[2]} | {sm.get('outcome') or ('removed' if sm['removed'] else 'kept')} | "
                  f"{'–' if sm.get('restored_wm_acc') is None else format(sm['restored_wm_acc'], '.2f')} |")
    return md


def seeds_section(cells: list[dict], paper_rule: dict[tuple[str, str], float] | None = None) -> list[str]:
    """Cells that differ only in their seed, summarised over seeds (the README's and Table 2's layout).
    Empty when no configuration ran on two seeds or more. `paper_rule`: the paper's-rule threshold per
    (dataset, watermark) for cells that were given their threshold (and so recorded no other)."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for c in cells:
        groups[config_key(c["config"])].append(c)
    rows = sorted(((cs[0]["experiment"], cs[0]["config"]["dataset"], scheme_name(cs[0]["config"])),
                   _seeds_row(cs, paper_rule or {})) for cs in groups.values() if len(cs) >= 2)
    if not rows:
        return []
    return ["", "## Over attacker seeds", "",
            "Cells that differ only in their seed: removed (95% Wilson interval), destroyed, test accuracy mean ± sd, "
            "WM accuracy median [range], the threshold (the paper's rule on the same clean models), the median "
            "p-value of the threshold test, the paper's laundered test / WM accuracy where it has them, and the "
            "attack's seconds per cell.", "",
            "| experiment | dataset | scheme | attack | budget | seeds | removed | destroyed | test acc % | WM acc % "
            "| threshold % (paper's rule) | p | paper test / WM % | s / cell |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"] + [r for _, r in rows]


def _seeds_row(cs: list[dict], paper_rule: dict[tuple[str, str], float]) -> str:
    """One configuration over its seeds (`over_seeds`), with its threshold, median p, the paper's figures and
    seconds per cell."""
    cfg, sms = cs[0]["config"], [c["summary"] for c in cs]
    s = over_seeds(sms)
    wm0 = statistics.median(sm["orig_wm_acc"] for sm in sms)
    paper = _paper(cfg)
    known = sms[0].get("threshold_paper", paper_rule.get((cfg["dataset"], scheme_name(cfg))))
    rule = "" if known is None else f" ({known:.2f})"
    ps = sorted((cell_p(sm) for sm in sms), key=lambda t: t[0])
    p_mid = format_p(*ps[(len(ps) - 1) // 2])          # the median (the lower one of an even count)
    secs = statistics.mean(work_seconds(c) for c in cs)
    return (f"| {cs[0]['experiment']} | {cfg['dataset']} | {scheme_name(cfg)} | {cfg['attack']} | "
            f"{budget_label(cfg['budget'])} | {s.n} | {s.rate()} | {s.destroyed}/{s.n} | "
            f"{statistics.mean(sm['orig_test_acc'] for sm in sms):.2f} → {s.test()} | {wm0:.2f} → {s.wm()} | "
            f"{sms[0]['threshold']:.2f}{rule} | {p_mid} | "
            f"{'–' if paper[0] is None else f'{paper[0]:g} / {paper[1]:g}'} | {secs:.0f} |")


def _one_cell_per_budget(ws: Path, cells: list[dict]) -> list[tuple[dict, Path]]:
    """Per budget, the lowest-seed cell whose round-1 triggers the runner kept, with that file: the cells of a
    budget share one figure, so it is drawn once (cells differing only after trigger recovery recover the same)."""
    def order(c: dict) -> tuple:
        seed = c["config"].get("seed")               # a store written by other code may lack it, or hold anything
        return json.dumps(c["config"].get("budget")), seed if type(seed) is int else math.inf, str(c["cell_id"])

    chosen: dict[str, tuple[dict, Path]] = {}
    for c in sorted(cells, key=order):
        f = ws / "triggers" / f"{c['cell_id']}-round01.safetensors"
        key = json.dumps(c["config"].get("budget"))
        if key not in chosen and f.is_file():
            chosen[key] = (c, f)
    return list(chosen.values())


def trigger_section(ws: Path, groups: dict[tuple, list[dict]], out: Path, images: list[Path]) -> list[str]:
    """Figures 6/8: the recovered triggers the runner kept (round 1), one figure per experiment, watermark and
    budget."""
    from safetensors import safe_open

    md: list[str] = []
    for (exp, ds, scheme), cs in sorted(groups.items()):
        recon = []
        for c, f in _one_cell_per_budget(ws, cs):
            with safe_open(str(f), "pt") as st:
                t = {k: st.get_tensor(k) for k in st.keys()}   # noqa: SIM118 (safe_open has no __iter__)
                meta = st.metadata() or {}
            flagged, target = json.loads(meta.get("flagged", "[]")), json.loads(meta.get("target", "null"))
            classes = json.loads(meta.get("classes", "null")) or [str(i) for i in range(len(t["masks"]))]
            lab = budget_label(c["config"]["budget"])
            safe = lab.replace("/", "per").replace("%", "pct")
            png = trigger_grid(t["masks"], t["patterns"], t["l1"].tolist(), t["anomaly"].tolist(), flagged, classes,
                               out / safe_name(f"triggers-{exp}-{ds}-{scheme}-{safe}.png"), example=t["clean"],
                               title=f"{exp}: {ds} {scheme}, budget {lab}, seed {c['config'].get('seed')}: "
                                     "Neural Cleanse round 1 "
                                     f"(flagged in red{'' if target is None else f'; watermark label {target}'})")
            if not md:
                md += ["## Recovered triggers (Figures 6 and 8 style)", "",
                       "Neural Cleanse's first round for each experiment, watermark and budget (its lowest-seed "
                       "cell): mask, pattern, mask·pattern and the trigger on a clean image; flagged classes (MAD > 2) "
                       "in red.",
                       ""]
            images.append(png)
            md += [f"![{exp} {scheme} {lab}]({png.name})", ""]
            if target is not None:
                recon.append({"label": f"budget {lab}", "watermark": t["watermark"], "mask": t["masks"][target],
                              "pattern": t["patterns"][target], "clean": t["clean"]})
        if recon:
            png = reconstructions(recon, out / safe_name(f"reconstruction-{exp}-{ds}-{scheme}.png"),
                                  title=f"{ds} {scheme}: watermark vs reconstruction")
            images.append(png)
            md += [f"![{exp} {scheme} reconstruction]({png.name})", ""]
    return md


def html_page(markdown: str, images: list[Path], title: str = "nnlaunder report") -> str:
    """A self-contained page: the tables as HTML, every PNG inlined as base64."""
    rows, body, items = [], [], []
    embedded = {p.name: base64.b64encode(p.read_bytes()).decode() for p in images}
    for line in markdown.splitlines():
        if line.startswith("- "):
            items.append(f"<li>{html.escape(line[2:])}</li>")
            continue
        if items:
            body.append("<ul>" + "".join(items) + "</ul>")
            items = []
        if line.startswith("|") and not set(line) <= set("|-"):
            cells = [html.escape(x.strip()) for x in line.strip("|").split("|")]
            tag = "th" if not rows else "td"
            rows.append("<tr>" + "".join(f"<{tag}>{x}</{tag}>" for x in cells) + "</tr>")
            continue
        if line.startswith("|"):
            continue
        if rows:
            body.append("<table>" + "".join(rows) + "</table>")
            rows = []
        if line.startswith("!["):
            name = line[line.index("(") + 1:-1]
            body.append(f'<p><img src="data:image/png;base64,{embedded[name]}" alt="{html.escape(name)}"></p>')
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line.lstrip('#').strip())}</h{level}>")
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    if rows:
        body.append("<table>" + "".join(rows) + "</table>")
    if items:
        body.append("<ul>" + "".join(items) + "</ul>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")
