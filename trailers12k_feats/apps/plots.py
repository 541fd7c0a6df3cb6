"""Figures of runs and results: PR curves, per-genre AP, training curves, Table 6.

Every function takes plain data and returns a matplotlib ``Figure`` built without pyplot:
the report writer saves it headless (no backend is selected or changed), and a notebook
shows the very same figure inline.

The paper publishes only uAP/mAP/wAP/sAP per Table 6 row, no per-genre values; per-genre
plots therefore show the paper's row-level mAP as a reference line, never invented bars.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import precision_recall_curve

from trailers12k_feats import GENRES, GENRES_SHORT
from trailers12k_feats.paper import TABLE6
from trailers12k_feats.training.metrics import METRIC_KEYS, pr_auc

# summarise() output: row -> metric -> (mean, sample std or NaN, number of splits).
Summary = Mapping[str, Mapping[str, tuple[float, float, int]]]

OURS, PAPER = "tab:blue", "tab:gray"


def _label(row: str) -> str:
    return TABLE6[row].label if row in TABLE6 else row


def _std(x: float) -> float:
    return x if np.isfinite(x) else 0.0


def pr_curves(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], genres: Sequence[str] = GENRES,
              title: str = "Precision-recall curves") -> Figure:
    """Per-genre precision-recall curves plus the micro-averaged one, one panel each.

    `curves` maps a line label (e.g. "test", "split1") to (y_true, y_prob), both (n, genres).
    Each legend entry gives that line's AP: the trapezoid area x100, as in the paper.
    """
    k = len(genres)
    ncols = 4
    nrows = -(-(k + 1) // ncols)
    fig = Figure(figsize=(3.2 * ncols, 2.9 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False).ravel()
    colors = [f"C{i}" for i in range(10)]
    panels = [(g, j) for j, g in enumerate(genres)] + [("all genres (micro)", None)]
    for ax, (name, j) in zip(axes, panels):
        for (label, (y, p)), color in zip(curves.items(), colors * 10):
            yy = np.asarray(y).ravel() if j is None else np.asarray(y)[:, j]
            pp = np.asarray(p).ravel() if j is None else np.asarray(p)[:, j]
            if yy.sum() == 0:  # no positive trailer: no curve (AP counts 0 in the metrics)
                ax.plot([], [], color=color, label=f"{label}: no positives")
                continue
            prec, rec, _ = precision_recall_curve(yy, pp)
            ax.plot(rec, prec, color=color, lw=1.2, label=f"{label}: AP {100 * pr_auc(yy, pp):.1f}")
        # Chance level of the first curve set: the positive rate.
        y0 = np.asarray(next(iter(curves.values()))[0])
        base = y0.mean() if j is None else y0[:, j].mean()
        ax.axhline(base, color="k", ls=":", lw=0.8, label=f"chance {base:.2f}")
        ax.set_title(name, fontsize=10)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    for ax in axes[len(panels):]:
        ax.set_axis_off()
    for ax in axes[::ncols]:
        ax.set_ylabel("precision")
    for ax in axes[-ncols:]:
        ax.set_xlabel("recall")
    fig.suptitle(title)
    return fig


def genre_ap_bars(summary: Summary, genres: Sequence[str] = GENRES_SHORT, title: str = "Per-genre AP, test") -> Figure:
    """Per-genre AP bars (mean ± std over splits), one panel per row of `summary`.

    Lines: our mAP (the mean of the bars) and, for Table 6 rows, the paper's mAP; the
    paper gives no per-genre values, so it has no bars.
    """
    rows = list(summary)
    ncols = 1 if len(rows) == 1 else 2
    nrows = -(-len(rows) // ncols)
    fig = Figure(figsize=(7 * ncols, 3.0 * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True).ravel()
    x = np.arange(len(genres))
    for ax, row in zip(axes, rows):
        s = summary[row]
        mean = np.array([s[g][0] for g in genres])
        std = np.array([_std(s[g][1]) for g in genres])
        n = s[genres[0]][2]
        ax.bar(x, mean, yerr=std if n > 1 else None, color=OURS, capsize=2, label="ours, per genre")
        ax.axhline(s["mAP"][0], color=OURS, lw=1.2, label=f"ours mAP {s['mAP'][0]:.1f}")
        if row in TABLE6:
            m = TABLE6[row].paper["mAP"][0]
            ax.axhline(m, color="tab:red", ls="--", lw=1.2, label=f"paper mAP {m:.1f} (no per-genre values)")
        ax.set_xticks(x, genres)
        ax.set_ylim(0, 100)
        ax.set_title(f"{_label(row)} ({n} split{'s' if n > 1 else ''})", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    for ax in axes[len(rows):]:
        ax.set_axis_off()
    for ax in axes[::ncols]:
        ax.set_ylabel("AP (x100)")
    fig.suptitle(title + (", error bars: sample std over splits" if any(
        summary[r]["uAP"][2] > 1 for r in rows) else ""))
    return fig


def training_curves(histories: Mapping[str, Sequence[Mapping[str, float]]],
                    best_epochs: Mapping[str, int] | None = None, title: str = "Training") -> Figure:
    """Loss (train solid, val dashed) and validation uAP per epoch, one colour per run.

    `histories` maps a run label to its history.csv rows (epoch, train_loss, val_loss,
    val_uAP, ...); a dot marks each run's best (checkpointed) epoch.
    """
    best_epochs = best_epochs or {}
    fig = Figure(figsize=(12, 4), layout="constrained")
    ax_loss, ax_uap = fig.subplots(1, 2)
    for i, (label, h) in enumerate(histories.items()):
        c = f"C{i % 10}"
        ep = np.array([r["epoch"] for r in h])
        ax_loss.plot(ep, [r["train_loss"] for r in h], color=c, lw=1.2, label=f"{label} train")
        val = np.array([r["val_loss"] for r in h])
        ax_loss.plot(ep, val, color=c, lw=1.2, ls="--", label=f"{label} val")
        uap = np.array([r["val_uAP"] for r in h])
        ax_uap.plot(ep, uap, color=c, lw=1.2, label=label)
        b = best_epochs.get(label)
        if b is not None and b in ep:
            k = int(np.flatnonzero(ep == b)[0])
            ax_loss.plot(b, val[k], "o", color=c, ms=5)
            ax_uap.plot(b, uap[k], "o", color=c, ms=5)
    ax_loss.set(xlabel="epoch", ylabel="BCE loss", title="loss (dot: best val loss, the checkpoint)")
    ax_uap.set(xlabel="epoch", ylabel="val uAP (x100)", title="validation uAP")
    for ax in (ax_loss, ax_uap):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncols=2 if len(histories) > 3 else 1)
    fig.suptitle(title)
    return fig


def table6_chart(summary: Summary, metrics: Sequence[str] = METRIC_KEYS,
                 title: str = "Table 6, test: ours vs paper") -> Figure:
    """Ours beside the paper's Table 6 per row, one panel per metric; error bars = std over splits.

    Rows of `summary` that are not Table 6 rows get our bar only.
    """
    rows = list(summary)
    fig = Figure(figsize=(max(8.0, 4 + 1.3 * len(rows)), 7.5), layout="constrained")
    axes = fig.subplots(2, 2, sharex=True).ravel()
    x = np.arange(len(rows))
    w = 0.4
    for ax, m in zip(axes, metrics):
        ours = np.array([summary[r][m][0] for r in rows])
        ours_sd = np.array([_std(summary[r][m][1]) for r in rows])
        paper = np.array([TABLE6[r].paper[m][0] if r in TABLE6 else np.nan for r in rows])
        paper_sd = np.array([TABLE6[r].paper[m][1] if r in TABLE6 else 0.0 for r in rows])
        ax.bar(x - w / 2, ours, w, yerr=ours_sd, color=OURS, capsize=2, label="ours")
        ax.bar(x + w / 2, np.nan_to_num(paper), w, yerr=paper_sd, color=PAPER, capsize=2, label="paper")
        for xi, v in zip(x, ours):
            ax.text(xi - w / 2, 2, f"{v:.1f}", ha="center", va="bottom", fontsize=7, rotation=90, color="w")
        ax.set_title(m, fontsize=10)
        ax.set_ylim(0, 100)
        ax.set_ylabel(f"{m} (x100)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    for ax in axes[2:]:
        ax.set_xticks(x, [_label(r) for r in rows], rotation=30, ha="right")
    n = max(summary[r]["uAP"][2] for r in rows)
    fig.suptitle(title + (", mean ± sample std over splits" if n > 1 else ""))
    return fig
