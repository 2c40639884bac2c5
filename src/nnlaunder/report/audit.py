"""The audit's report: audit.md, a self-contained audit.html, audit.json and the plots (one
Pareto plot of test accuracy against watermark accuracy per budget, the threshold drawn; the
recovered triggers of laundering's first cell per budget)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..checkpoint import atomic_write_bytes, atomic_write_json, safe_name
from ..plots import pareto_plot, trigger_grid
from ..watermarks.verify import format_p
from .build import html_page


def _triggers(ws: Path, cells: Sequence[dict[str, Any]], out: Path, images: list[Path]) -> list[str]:
    from safetensors import safe_open

    md, seen = [], set()
    for c in cells:
        b = str(c["config"]["budget"])
        f = ws / "triggers" / f"{c['cell_id']}-round01.safetensors"
        if c["config"]["attack"] != "launder" or b in seen or not f.is_file():
            continue
        seen.add(b)
        with safe_open(str(f), "pt") as st:
            t = {k: st.get_tensor(k) for k in st.keys()}   # noqa: SIM118 (safe_open has no __iter__)
            meta = st.metadata() or {}
        classes = json.loads(meta.get("classes", "null")) or [str(i) for i in range(len(t["masks"]))]
        png = trigger_grid(t["masks"], t["patterns"], t["l1"].tolist(), t["anomaly"].tolist(),
                           json.loads(meta.get("flagged", "[]")), classes, out / safe_name(f"triggers-{b}.png"),
                           example=t["clean"], title=f"Neural Cleanse, laundering round 1, budget {b}")
        images.append(png)
        md += [f"![recovered triggers, budget {b}]({png.name})", ""]
    return md


def write_audit_report(out: Path, ws: Path, title: str, cells: Sequence[dict[str, Any]],
                       rows: Sequence[dict[str, Any]], paragraph: str, facts: dict[str, Any]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    images: list[Path] = []
    md = [f"# {title}", "", paragraph, ""]
    md += [f"- {k}: {v}" for k, v in facts.items()] + [""]
    md += ["| attack | budget | clean images | runs | removed (95% interval) | hidden | kept | destroyed | test acc % "
           "after, mean ± sd | WM acc % after, median [range] | p-value (median) | WM % after restoration "
           "(median of the runs restored) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["interval"]
        rest = "-" if r["restored_wm_median"] is None else f"{r['restored_wm_median']:.2f}" + (
            f" ({r['restored_n']} of {r['n']})" if r.get("restored_n", r["n"]) < r["n"] else "")
        md.append(f"| {r['attack']} | {r['budget']} | {r['n_clean']} | {r['n']} | {r['removed']}/{r['n']} "
                  f"({100 * lo:.0f}-{100 * hi:.0f}%) | {r['hidden']} | {r['kept']} | {r.get('destroyed', 0)} | "
                  f"{r['test_mean']:.2f} ± {r['test_sd']:.2f} | {r['wm_median']:.2f} [{r['wm_min']:.2f}-"
                  f"{r['wm_max']:.2f}] | {format_p(r['p_median'])} | {rest} |")
    md += ["", "kept: after the attack the owner's verification still shows ownership (`nnlaunder verify`'s "
           "verdict: above the threshold with binomial p < 0.01, beyond the model's own base rate, on a model of "
           "the task); destroyed: it does not, and the model lost more than 3 points of test accuracy; hidden: it "
           "does not after the attack, it does again after the owner's restoration; removed: it does not, after "
           "either, on a usable model. The p-value column is the threshold test's.", ""]
    for b in dict.fromkeys(r["budget"] for r in rows):
        sub = [r for r in rows if r["budget"] == b]
        png = pareto_plot(sub, b, out / safe_name(f"pareto-{b}.png"),
                          f"{title}: budget {b} ({sub[0]['n_clean']} clean images)")
        images.append(png)
        md += [f"![test vs watermark accuracy, budget {b}]({png.name})", ""]
    md += _triggers(ws, cells, out, images)
    text = "\n".join(md) + "\n"
    atomic_write_bytes(out / "audit.md", text.encode())
    atomic_write_bytes(out / "audit.html", html_page(text, images, title).encode())
    atomic_write_json(out / "audit.json", {"title": title, "verdict": paragraph, "facts": facts, "rows": rows})
    return out
