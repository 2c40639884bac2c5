"""PNG plots (matplotlib, Agg backend). Inputs are plain tensors and numbers; outputs are files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def _img(t: torch.Tensor):
    t = t.detach().float().clamp(0, 1)
    return t[0].numpy() if t.shape[0] == 1 else t.permute(1, 2, 0).numpy()


def trigger_grid(masks: torch.Tensor, patterns: torch.Tensor, l1: Sequence[float], anomaly: Sequence[float],
                 flagged: Sequence[int], class_names: Sequence[str], path: Path, title: str = "",
                 example: torch.Tensor | None = None) -> Path:
    """Neural Cleanse's recovered triggers per class (Figures 6/8 style): mask, pattern, mask·pattern
    and (with `example`) the trigger stamped on a clean image. Flagged classes are titled in red."""
    k = len(masks)
    rows = 4 if example is not None else 3
    fig, axes = plt.subplots(rows, k, figsize=(1.5 * k, 1.6 * rows + 0.6), squeeze=False)
    for i in range(k):
        m, p = masks[i], patterns[i]
        panels = [(_img(m), "gray"), (_img(p), None if p.shape[0] == 3 else "gray"),
                  (_img(m * p), None if p.shape[0] == 3 else "gray")]
        if example is not None:
            panels.append((_img((1 - m) * example + m * p), None if p.shape[0] == 3 else "gray"))
        for r, (im, cmap) in enumerate(panels):
            ax = axes[r][i]
            ax.imshow(im, cmap=cmap, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        color = "red" if i in flagged else "black"
        axes[0][i].set_title(f"{class_names[i]}\nL1 {l1[i]:.1f}  a {anomaly[i]:.2f}", fontsize=7, color=color)
    for r, label in enumerate(["mask", "pattern", "mask·pattern", "stamped"][:rows]):
        axes[r][0].set_ylabel(label, fontsize=8)
    smallest = min(range(k), key=lambda i: l1[i])
    fig.text(0.5, 0.005, "L1: the recovered mask's size (smaller = an easier shortcut to that class). a: MAD anomaly "
             "index of the L1 norms; a class is flagged (red) when its mask is an outlier below the median "
             "(a above the MAD threshold, 2 by default). "
             f"Smallest mask: {class_names[smallest]}.", ha="center", va="bottom", fontsize=7, wrap=True)
    fig.subplots_adjust(bottom=0.08)
    return _save(fig, path, title)


def reconstructions(rows: Sequence[dict], path: Path, title: str = "") -> Path:
    """Figure 6 style, one row per cell: (a) the owner's watermark input, (b) Neural Cleanse's
    reconstruction for the watermark's label (mask·pattern), (c) that reconstruction stamped on a
    clean image. Each row: {"label", "watermark", "mask", "pattern", "clean"} (tensors C,H,W)."""
    fig, axes = plt.subplots(len(rows), 3, figsize=(5.4, 1.9 * len(rows) + 0.4), squeeze=False)
    for i, r in enumerate(rows):
        m, p = r["mask"], r["pattern"]
        gray = p.shape[0] == 1
        panels = [r["watermark"], m * p, (1 - m) * r["clean"] + m * p]
        for j, (im, head) in enumerate(zip(panels, ("(a) watermark", "(b) reconstruction", "(c) applied"),
                                           strict=True)):
            ax = axes[i][j]
            ax.imshow(_img(im), cmap="gray" if gray else None, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(head, fontsize=8)
        axes[i][0].set_ylabel(r["label"], fontsize=7)
    return _save(fig, path, title)


def _save(fig, path: Path, title: str = "") -> Path:
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")      # a legend outside the axes is kept whole
    plt.close(fig)
    return path


def before_after(rows: Sequence[dict], threshold: float, path: Path, title: str = "") -> Path:
    """Test and watermark accuracy per stage on linear axes from 0, the vanilla threshold drawn and
    each stage's verdict written under its watermark bar (rows carry "owned", "status" and "p_text")."""
    names = [r["stage"] for r in rows]
    x = list(range(len(rows)))
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.6))
    bars = axes[0].bar(x, [r["test_acc"] for r in rows], color="tab:blue")
    axes[0].bar_label(bars, fmt="%.2f", fontsize=8)
    axes[0].set_ylim(0, 109)
    axes[0].set_title("test accuracy %", fontsize=9)
    owned = [bool(r.get("owned")) for r in rows]
    bars = axes[1].bar(x, [r["wm_acc"] for r in rows], color=["tab:red" if o else "tab:gray" for o in owned])
    axes[1].bar_label(bars, fmt="%.2f", fontsize=8)
    axes[1].axhline(threshold, color="black", lw=1.2, ls="--")
    axes[1].set_ylim(0, 109)
    axes[1].set_title(f"watermark accuracy % (dashed: threshold {threshold:.2f}%;\nred: ownership shown)",
                      fontsize=9)
    for ax in axes:
        ax.set_xticks(x)
        ax.set_xticklabels(names, fontsize=8)
    for i, r in enumerate(rows):
        word = "OWNED" if owned[i] else r.get("status", "no proof")
        p = r.get("p_text")                       # the caller's rendering: never "0"
        axes[1].text(i, -0.16, f"{word}" + (f"\np {p}" if p is not None else ""), ha="center", va="top",
                     fontsize=7, transform=axes[1].get_xaxis_transform(), color="tab:red" if owned[i] else "black")
    fig.subplots_adjust(bottom=0.28)
    return _save(fig, path, title)


def landscape(alphas, betas, loss, acc, coords, path: Path, title: str = "") -> Path:
    """Loss (filled contours) and accuracy (lines) over a PCA plane, with the checkpoint trajectory."""
    fig, ax = plt.subplots(figsize=(5.6, 4.6))
    a, b = alphas.numpy(), betas.numpy()
    cs = ax.contourf(a, b, loss.T.numpy(), levels=20, cmap="viridis")
    fig.colorbar(cs, ax=ax, label="loss")
    cl = ax.contour(a, b, acc.T.numpy(), levels=[25, 50, 75, 90, 99], colors="white", linewidths=0.7)
    ax.clabel(cl, fmt="%g%%", fontsize=7)
    c = coords.numpy()
    ax.plot(c[:, 0], c[:, 1], "-o", color="red", ms=3, lw=1, label="trajectory")
    ax.plot(c[0, 0], c[0, 1], "s", color="orange", ms=7, label="first checkpoint")
    ax.plot(c[-1, 0], c[-1, 1], "*", color="red", ms=11, label="last checkpoint")
    ax.set_xlabel("PCA direction 1")
    ax.set_ylabel("PCA direction 2")
    ax.legend(fontsize=7, loc="upper right")
    return _save(fig, path, title)


def threshold_provenance(curves: dict[str, list[list[float]]], thresholds: dict[str, float], path: Path,
                         title: str = "", default: dict[str, float] | None = None, rule: str = "",
                         seeds: list[int] | None = None) -> Path:
    """One panel per scheme: a clean model's watermark accuracy over its training epochs, one line
    per seed, with the vanilla threshold (the maximum over epochs and seeds) marked where it occurs;
    `default` adds each scheme's threshold under the default `rule` as a solid line."""
    names = sorted(curves)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.0), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        best = (-1.0, 0, 0)
        for s, curve in enumerate(curves[name]):
            ax.plot(range(1, len(curve) + 1), curve, marker=".", lw=1, label=f"seed {s if seeds is None else seeds[s]}")
            for e, v in enumerate(curve, 1):
                if v > best[0]:
                    best = (v, e, s)
        th = thresholds.get(name, best[0])
        ax.axhline(th, color="black", lw=1, ls="--")
        if default is not None:
            ax.axhline(default[name], color="tab:blue", lw=1.5, label=f"{rule} rule {default[name]:.2f}%")
        ax.plot([best[1]], [best[0]], marker="*", ms=12, color="red", zorder=5)
        ax.annotate(f"{'paper rule' if default is not None else 'threshold'} {th:.2f}%\n(seed "
                    f"{best[2] if seeds is None else seeds[best[2]]}, epoch {best[1]})", (best[1], best[0]),
                    textcoords="offset points", xytext=(6, -24), fontsize=7)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("clean model's training epoch", fontsize=8)
        ax.set_ylim(bottom=0, top=max(best[0] * 1.35, 1.2 * (default or {}).get(name, 0.0), 1.0))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("watermark accuracy of a clean model %", fontsize=8)
    axes[0][0].legend(fontsize=6)
    return _save(fig, path, title)


def threshold_figure(doc: dict, path: Path) -> Path:
    """What `nnlaunder threshold` measured (`experiments.clean.measure_thresholds`' result) as a figure: each
    clean seed's watermark accuracy over its epochs, the paper's rule (the maximum, starred, dashed) and the
    default rule's threshold (solid)."""
    curves = {name: [[100.0 * h / doc["n_verify"][name] for h in hits] for hits in doc["hits"][name]]
              for name in doc["thresholds"]}
    paper = {name: doc["rules"][name]["paper"]["threshold"] for name in doc["thresholds"]}
    return threshold_provenance(curves, paper, path, f"{doc['dataset']} {doc['arch']}: clean models' watermark "
                                f"accuracy over {len(doc['seeds'])} seeds", default=doc["thresholds"],
                                rule=doc["rule"], seeds=list(doc["seeds"]))


ATTACK_MARKERS = {"launder": "o", "rtal": "s", "ftal": "D", "fine-prune": "^", "nc-unlearn": "v", "prune-ft": "x",
           "prune": "+", "ftll": "<", "rtll": ">", "weight-noise": "*", "nad": "P", "anp": "h", "i-bau": "p",
           "dehydration": "X"}


def pareto_plot(rows: Sequence[dict[str, Any]], budget: str, path: Path, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(8.4, max(4.2, 0.16 * len(rows) + 1.2)))   # room for every legend entry
    names = sorted({r["attack"].split(" @ ")[0] for r in rows})      # "attack @ budget ...": one colour per
    budgets = list(dict.fromkeys(_budget(r["attack"]) for r in rows))   # attack, filled at the first budget
    for r in rows:
        xs, ys = zip(*r["points"], strict=True)
        name, budget = r["attack"].partition(" @ ")[0], _budget(r["attack"])
        colour = plt.get_cmap("tab20")(names.index(name) % 20)
        marker = ATTACK_MARKERS.get(name, "o")
        hollow = budgets.index(budget) > 0 and marker not in ("+", "x")    # a line marker has no face
        ax.scatter(ys, xs, marker=marker, s=36, facecolors="none" if hollow else colour,
                   edgecolors=colour if hollow else None, label=f"{r['attack']} ({r['removed']}/{r['n']} removed)")
    first = rows[0]
    ax.axvline(first["threshold"], color="k", lw=1, ls="--", label=f"threshold {first['threshold']:.2f}%")
    ax.scatter([first["orig_wm_acc"]], [first["orig_test_acc"]], marker="*", s=140, color="gold", edgecolor="k",
               label="the owner's model", zorder=3)
    ax.set_xlabel("watermark accuracy after the attack (%)   [left of the line: no ownership proof]")
    ax.set_ylabel("test accuracy after the attack (%)")
    ax.set_xlim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))   # outside: it never hides a point
    fig.tight_layout()
    return _save(fig, path, title)


def _budget(label: str) -> str:
    """"launder @ 0.6% (table2-mnist)" -> "0.6%"."""
    return label.partition(" @ ")[2].split(" ")[0]
