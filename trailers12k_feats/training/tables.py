"""Results tables: finished runs as val.csv / tst.csv lines, their summary over splits, and the
comparison with the paper's Table 6, rendered as Markdown (summary.md, the CLI) or HTML (reports).
"""

from __future__ import annotations

import csv
import html
import json
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from trailers12k_feats import GENRES_SHORT
from trailers12k_feats.paper import TABLE6, row_order_key
from trailers12k_feats.training.metrics import METRIC_KEYS
from trailers12k_feats.utils import atomic_path, write_text

COLUMNS = ["run", "split", "epoch", *METRIC_KEYS, *GENRES_SHORT]
COMPARISON_HEAD = ["Row", "splits", *(f"{k} ours" for k in METRIC_KEYS), *(f"{k} paper" for k in METRIC_KEYS)]

# row -> metric -> (mean, sample std or NaN, number of splits)
Summary = dict[str, dict[str, tuple[float, float, int]]]


def collect(out_dir: Path) -> dict[str, list[dict]]:
    """Finished runs under `out_dir/runs` as rows of val.csv / tst.csv, in Table 6 order."""
    table: dict[str, list[dict]] = {"val": [], "test": []}
    runs = sorted((out_dir / "runs").glob("*/split*/metrics.json"),
                  key=lambda p: (*row_order_key(p.parent.parent.name), p.parent.name))
    for p in runs:
        m = json.loads(p.read_text())
        for subset in table:
            table[subset].append({"run": p.parent.parent.name, "split": int(p.parent.name[5:]),
                                  "epoch": m["best_epoch"], **{k: m[subset][k] for k in COLUMNS[3:]}})
    return table


def summarise(lines: list[dict]) -> Summary:
    """row -> metric -> (mean, sample std, number of splits)."""
    out: Summary = {}
    for run in dict.fromkeys(line["run"] for line in lines):
        vals = [line for line in lines if line["run"] == run]
        out[run] = {}
        for k in COLUMNS[3:]:
            x = np.array([v[k] for v in vals], float)
            out[run][k] = (float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else float("nan"), len(x))
    return out


def format_cell(mean: float, std: float, markdown: bool = True) -> str:
    """mean ± std (std left out when NaN): fixed width for Markdown, spaced for HTML."""
    if markdown:
        return f"{mean:5.2f}±{std:4.2f}" if np.isfinite(std) else f"{mean:5.2f}     "
    return f"{mean:.2f} ± {std:.2f}" if np.isfinite(std) else f"{mean:.2f}"


def comparison_rows(summary: Summary, cell: Callable[[float, float], str] = format_cell) -> Iterator[list[str]]:
    """One line of COMPARISON_HEAD per summarised row: label, splits, our cells, the paper's cells
    (empty for a run outside Table 6)."""
    for name, s in summary.items():
        row = TABLE6.get(name)
        ours = [cell(*s[k][:2]) for k in METRIC_KEYS]
        paper = [cell(*row.paper[k]) if row else "" for k in METRIC_KEYS]
        yield [row.label if row else name, str(s["uAP"][2]), *ours, *paper]


def protocol_note(protocol: str | None) -> str | None:
    """The line a table carries when its runs used another protocol than the paper's, else None."""
    if protocol is None or protocol == "authors":
        return None
    return (f"Protocol {protocol}: differs from the paper's (the authors' code, --protocol authors), so the paper's "
            f"numbers are not the same measurement.")


def format_table(summary: Summary, title: str = "test", protocol: str | None = None) -> str:
    """A Markdown table of our mean ± std beside the paper's Table 6; runs of a `protocol` other
    than the paper's ("authors") get a line saying so under the title."""
    note = protocol_note(protocol)
    lines = [f"Table 6 ({title}, mean ± sample std over splits, x100)", "", *([note, ""] if note else []),
             "| " + " | ".join(COMPARISON_HEAD) + " |", "|" + "---|" * len(COMPARISON_HEAD)]
    lines += ["| " + " | ".join(r) + " |" for r in comparison_rows(summary)]
    return "\n".join(lines)


def html_table(head: list[str], rows: list[list[str]]) -> str:
    """A plain HTML table; every cell is escaped."""
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>\n" for r in rows)
    return f"<table>\n<tr>{th}</tr>\n{trs}</table>"


def comparison_html(summary: Summary) -> str:
    """The comparison of `format_table` as an HTML table."""
    return html_table(COMPARISON_HEAD, list(comparison_rows(summary, lambda m, s: format_cell(m, s, False))))


def write_results(out_dir: Path, protocol: str | None = None) -> str:
    """Rewrite val.csv, tst.csv and the summaries from the finished runs; return the test table.
    `protocol` is the runs' training protocol, recorded in summary.csv and noted in the tables."""
    table = collect(out_dir)
    for subset, fname in (("val", "val.csv"), ("test", "tst.csv")):
        with atomic_path(out_dir / fname) as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            for line in table[subset]:
                w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in line.items()})
    with atomic_path(out_dir / "summary.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "subset", "metric", "mean", "std", "splits", "paper_mean", "paper_std", "protocol"])
        for subset in ("val", "test"):
            for run, s in summarise(table[subset]).items():
                for k, (mean, std, n) in s.items():
                    paper = TABLE6[run].paper.get(k) if subset == "test" and run in TABLE6 else None
                    w.writerow([run, subset, k, f"{mean:.4f}", f"{std:.4f}", n, *(paper or ("", "")), protocol or ""])
    text = format_table(summarise(table["test"]), protocol=protocol)
    write_text(out_dir / "summary.md",
               text + "\n\n" + format_table(summarise(table["val"]), "val", protocol) + "\n")
    return text
