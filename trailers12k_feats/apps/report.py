"""`t12k report`: PNG plots and an HTML page for a run directory or a results folder.

A run directory is what `t12k train` writes (config.json, history.csv, predictions.csv,
metrics.json, best.pt); a results folder is what `t12k reproduce` writes (runs/<row>/split<k>/
plus tables). Loading and plotting are separate (:func:`load`, :func:`figures`), so a
notebook draws exactly the report's figures. PR curves need the labels, which come from the
metadata file recorded in each run's config.json (or `metadata=` when it has moved).
"""

from __future__ import annotations

import csv
import html
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from trailers12k_feats import GENRES, GENRES_SHORT, __version__
from trailers12k_feats.paper import TABLE6, row_order_key
from trailers12k_feats.training.data import Metadata, load_metadata
from trailers12k_feats.training.metrics import METRIC_KEYS
from trailers12k_feats.training.tables import (
    COLUMNS,
    collect,
    comparison_html,
    format_cell,
    html_table,
    protocol_note,
    summarise,
)
from trailers12k_feats.utils import T12kError, atomic_path, check_writable

if TYPE_CHECKING:  # matplotlib is imported by `figures`, so loading runs without it
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

__all__ = ["Run", "Results", "load", "load_run", "load_results", "figures", "write_report"]

RUN_FILES = ("config.json", "history.csv", "predictions.csv", "metrics.json")
SUBSETS = ("val", "test")


@dataclass
class Run:
    """One finished training run, read back from its directory."""

    path: Path
    label: str  # e.g. "Swin-3D split0"
    row: str | None  # the Table 6 row whose streams it used, if any
    split: int
    config: dict
    history: list[dict[str, float]]
    metrics: dict  # metrics.json: best_epoch, epochs, seconds, val, test
    ids: dict[str, list[str]]  # subset -> trailer ids of predictions.csv
    probs: dict[str, np.ndarray]  # subset -> (n, 10) probabilities
    labels: dict[str, np.ndarray]  # subset -> (n, 10) 0/1 genres, from the metadata

    def line(self, subset: str = "test") -> dict:
        """This run as a line of val.csv / tst.csv (see tables.COLUMNS)."""
        m = self.metrics[subset]
        return {"run": self.row or self.label, "split": self.split, "epoch": self.metrics["best_epoch"],
                **{k: m[k] for k in COLUMNS[3:]}}


@dataclass
class Results:
    """A `t12k reproduce` results folder: its finished runs and their test summary."""

    path: Path
    runs: list[Run]
    summary: dict[str, dict[str, tuple[float, float, int]]]  # row -> metric -> (mean, std, splits)


def _damaged(path: Path, e: Exception) -> T12kError:
    return T12kError(f"{path} cannot be read ({e}); the run is damaged, rerun it or remove it.")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise _damaged(path, e) from None


def _read_history(path: Path) -> list[dict[str, float]]:
    try:
        with open(path, newline="") as f:
            rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]
    except (OSError, ValueError, TypeError) as e:
        raise _damaged(path, e) from None
    need = {"epoch", "train_loss", "val_loss", "val_uAP"}
    if not rows or not need <= rows[0].keys():
        raise T12kError(f"{path} has no epochs or lacks columns {', '.join(sorted(need))}; "
                        f"the run is damaged or from another tool, rerun it.")
    return rows


def _read_predictions(path: Path) -> tuple[dict[str, list[str]], dict[str, np.ndarray]]:
    ids: dict[str, list[str]] = {s: [] for s in SUBSETS}
    probs: dict[str, list[list[float]]] = {s: [] for s in SUBSETS}
    try:
        with open(path, newline="") as f:
            reader = csv.reader(f)
            if tuple(next(reader, ())) != ("subset", "mid", *GENRES):
                raise ValueError(f"the header must be subset,mid,{','.join(GENRES)}")
            for r in reader:
                ids[r[0]].append(r[1])
                probs[r[0]].append([float(v) for v in r[2:]])
    except (OSError, ValueError, KeyError, IndexError) as e:
        raise _damaged(path, e) from None
    return ids, {s: np.asarray(p, np.float64).reshape(-1, len(GENRES)) for s, p in probs.items()}


def _labels(meta: Metadata, ids: list[str], where: Path) -> np.ndarray:
    index = {t: i for i, t in enumerate(meta.ids)}
    missing = [t for t in ids if t not in index]
    if missing:
        raise T12kError(f"{len(missing)} trailers of {where} (e.g. {missing[0]}) are not in {meta.path}; "
                        f"pass the run's own metadata with --metadata.")
    return meta.labels[[index[t] for t in ids]].astype(np.float64)


def _row_of(config: dict) -> str | None:
    streams = config.get("streams", {})
    if any(s.get("weights") == "random" for s in streams.values()):
        return None  # features of a random-weight backbone are no Table 6 row, whatever their name
    image, video = (streams.get(k, {}).get("name") for k in ("image", "video"))
    return next((r.name for r in TABLE6.values() if (r.image, r.video) == (image, video)), None)


def load_run(path: str | os.PathLike, metadata: str | os.PathLike | None = None,
             _metas: dict[Path, Metadata] | None = None) -> Run:
    """Read a run directory; labels come from `metadata` or the file named in config.json."""
    path = Path(path)
    missing = [f for f in RUN_FILES if not (path / f).is_file()]
    if missing:
        raise T12kError(f"run directory {path} lacks {', '.join(missing)}; it is not a finished run of "
                        f"`t12k train` or `t12k reproduce`.")
    config = _read_json(path / "config.json")
    metrics = _read_json(path / "metrics.json")
    if not all(isinstance(metrics.get(s), dict) and "uAP" in metrics[s] for s in SUBSETS) \
            or "best_epoch" not in metrics:
        raise _damaged(path / "metrics.json", ValueError("no val/test metrics or best_epoch"))
    ids, probs = _read_predictions(path / "predictions.csv")
    meta_path = Path(metadata or config.get("metadata", ""))
    if not meta_path.is_file():
        raise T12kError(f"the labels for the PR curves of {path} come from {meta_path} (recorded in its "
                        f"config.json), which does not exist; pass --metadata with the mtgc.csv the run used.")
    metas = {} if _metas is None else _metas
    if meta_path not in metas:
        metas[meta_path] = load_metadata(meta_path)
    labels = {s: _labels(metas[meta_path], ids[s], path / "predictions.csv") for s in SUBSETS}
    row = _row_of(config)
    split = int(config.get("config", {}).get("split", 0))
    label = f"{TABLE6[row].label if row else path.name} split{split}"
    return Run(path, label, row, split, config, _read_history(path / "history.csv"), metrics, ids, probs, labels)


def load_results(path: str | os.PathLike, metadata: str | os.PathLike | None = None) -> Results:
    """Read every finished run of a `t12k reproduce` results folder."""
    path = Path(path)
    dirs = [p.parent for p in (path / "runs").glob("*/split*/metrics.json")]
    if not dirs:
        raise T12kError(f"results folder {path} has no finished run under runs/<row>/split<k>/; "
                        f"run `t12k reproduce --out {path}` first.")
    dirs.sort(key=lambda p: (*row_order_key(p.parent.name), p.name))
    metas: dict[Path, Metadata] = {}
    runs = [load_run(d, metadata, metas) for d in dirs]
    summary = summarise(collect(path)["test"])
    return Results(path, runs, summary)


def load(path: str | os.PathLike, metadata: str | os.PathLike | None = None) -> Run | Results:
    """A run directory or a results folder, whichever `path` is."""
    path = Path(path)
    if not path.is_dir():
        raise T12kError(f"{path} does not exist or is not a folder; pass a run directory (`t12k train --out`) "
                        f"or a results folder (`t12k reproduce --out`).")
    if any((path / f).exists() for f in RUN_FILES):
        return load_run(path, metadata)
    if (path / "runs").is_dir():
        return load_results(path, metadata)
    raise T12kError(f"{path} is neither a run directory ({', '.join(RUN_FILES)}) nor a results folder "
                    f"(runs/<row>/split<k>/); point `t12k report` at the output of `t12k train` or "
                    f"`t12k reproduce`.")


def _by_row(runs: list[Run]) -> dict[str, list[Run]]:
    out: dict[str, list[Run]] = {}
    for r in runs:
        out.setdefault(r.row or r.path.parent.name, []).append(r)
    return out


def figures(obj: Run | Results) -> dict[str, Figure]:
    """The report's figures by file stem, in page order."""
    from trailers12k_feats.apps import plots

    if isinstance(obj, Run):
        summary = summarise([obj.line("test")])
        figs = {}
        if obj.row:
            figs["table6"] = plots.table6_chart(summary, title=f"Table 6, test: {obj.label} vs paper")
        figs["genre_ap"] = plots.genre_ap_bars(summary, title=f"Per-genre AP, test, {obj.label}")
        figs["pr_curves"] = plots.pr_curves({s: (obj.labels[s], obj.probs[s]) for s in SUBSETS},
                                            title=f"Precision-recall curves, {obj.label}")
        figs["training"] = plots.training_curves({obj.label: obj.history}, {obj.label: obj.metrics["best_epoch"]},
                                                 title=f"Training, {obj.label}")
        return figs
    figs = {"table6": plots.table6_chart(obj.summary), "genre_ap": plots.genre_ap_bars(obj.summary)}
    for row, runs in _by_row(obj.runs).items():
        name = TABLE6[row].label if row in TABLE6 else row
        figs[f"pr_{row}"] = plots.pr_curves({f"split{r.split}": (r.labels["test"], r.probs["test"]) for r in runs},
                                            title=f"Precision-recall curves, test, {name}")
    for row, runs in _by_row(obj.runs).items():
        name = TABLE6[row].label if row in TABLE6 else row
        figs[f"training_{row}"] = plots.training_curves({f"split{r.split}": r.history for r in runs},
                                                        {f"split{r.split}": r.metrics["best_epoch"] for r in runs},
                                                        title=f"Training, {name}")
    return figs


def _metrics_html(obj: Run | Results) -> str:
    if isinstance(obj, Run):
        m = obj.metrics
        head = ["subset", *METRIC_KEYS, *GENRES_SHORT]
        rows = [[s, *(f"{m[s][k]:.2f}" for k in (*METRIC_KEYS, *GENRES_SHORT))] for s in SUBSETS]
        if obj.row:
            rows.append(["paper (test)", *(format_cell(*TABLE6[obj.row].paper[k], markdown=False)
                                           for k in METRIC_KEYS),
                         *[""] * len(GENRES_SHORT)])
        streams = ", ".join(f"{r}: {s.get('name')}" for r, s in obj.config.get("streams", {}).items())
        cfg = obj.config.get("config", {})
        note = (f"Streams {streams}; temporal {cfg.get('temporal')}, fusion {cfg.get('fusion')}, split "
                f"{obj.split}; protocol {_protocol(obj)}; best epoch {m['best_epoch']} of {m['epochs']}; "
                f"{m.get('seconds', '?')} s.")
        return f"<p>{html.escape(note)}</p>\n" + html_table(head, rows)
    protocols = ", ".join(sorted({_protocol(r) for r in obj.runs}))
    note = " ".join(filter(None, [f"Test set, mean ± sample std over splits, x100; protocol {protocols}.",
                                  protocol_note(protocols)]))
    return f"<p>{html.escape(note)}</p>\n" + comparison_html(obj.summary)


def _protocol(run: Run) -> str:
    """The run's training protocol; runs made before protocols were recorded ran `masked`."""
    return run.config.get("config", {}).get("protocol", "masked")


CAPTIONS = {
    "table6": "Ours beside the paper's Table 6 (the paper's numbers are on the real Trailers12k features).",
    "genre_ap": "Per-genre AP on test. The paper publishes no per-genre values; its row mAP is the dashed line.",
    "pr_curves": "Per-genre precision-recall curves on val and test; AP is the trapezoid area, as in the paper.",
    "training": "Training and validation loss and validation uAP per epoch; dots mark the checkpointed epoch.",
    "pr": "Per-genre precision-recall curves on test, one line per split.",
    "training_": "Loss and validation uAP per epoch, one colour per split.",
}


def _caption(stem: str) -> str:
    if stem in CAPTIONS:
        return CAPTIONS[stem]
    return CAPTIONS["pr"] if stem.startswith("pr_") else CAPTIONS["training_"]


def _page(obj: Run | Results, stems: list[str]) -> str:
    kind = "run" if isinstance(obj, Run) else "results"
    title = f"t12k report: {obj.label if isinstance(obj, Run) else obj.path.name}"
    imgs = "\n".join(f'<figure><img src="{html.escape(s)}.png" alt="{html.escape(s)}">'
                     f"<figcaption>{html.escape(_caption(s))}</figcaption></figure>" for s in stems)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1400px}}table{{border-collapse:collapse;font-size:90%}}
td,th{{border:1px solid #ccc;padding:3px 6px;text-align:right}}img{{max-width:100%}}
figure{{margin:2em 0}}figcaption{{color:#555}}</style></head>
<body><h1>{html.escape(title)}</h1>
<p>{html.escape(f"{kind} {obj.path.resolve()}; trailers12k_feats {__version__}.")}</p>
<h2>Metrics</h2>
{_metrics_html(obj)}
<h2>Figures</h2>
{imgs}
</body></html>
"""


def _check_out(out: Path, src: Path) -> None:
    """Refuse an output folder that would replace the input or anything but an earlier report."""
    o, s = out.resolve(), src.resolve()
    if o == s or o in s.parents:
        raise T12kError(f"report folder {out} would replace {src}; choose another --out.")
    if out.exists() and (not out.is_dir() or any(p.suffix not in (".png", ".html") for p in out.iterdir())):
        raise T12kError(f"{out} exists and is not an earlier report; choose another --out or delete it.")


def write_report(path: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                 metadata: str | os.PathLike | None = None, dpi: int = 110) -> Path:
    """Write PNGs and index.html for a run directory or results folder; return index.html's path.

    The folder (default `<path>/report`) is built under a temporary name and renamed when
    complete, replacing an earlier report, so a failure never leaves a half report.
    """
    path = Path(path)
    out = Path(out_dir) if out_dir is not None else path / "report"
    _check_out(out, path)
    obj = load(path, metadata)
    check_writable(out, "report folder", replace=True)
    figs = figures(obj)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        for stem, fig in figs.items():
            fig.savefig(tmp / f"{stem}.png", dpi=dpi)
        (tmp / "index.html").write_text(_page(obj, list(figs)))
    log.info("report of %s: %d figures in %s", path, len(figs), out)
    return out / "index.html"

