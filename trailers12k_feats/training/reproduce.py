"""Table 6: the 8 rows x 3 splits, resumable, with the paper's numbers beside ours.

Layout of the results directory::

    reproduce_config.json        training settings shared by every run (checked on resume)
    runs/<row>/split<k>/         one finished run directory each (see train.py)
    val.csv, tst.csv             one line per finished run: run, split, epoch, metrics, genres
    summary.csv, summary.md      mean and sample std (ddof 1) over splits, paper beside ours
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trailers12k_feats import GENRES_SHORT
from trailers12k_feats import cache as cache_mod
from trailers12k_feats.paper import STREAMS, TABLE6, Row, get_row
from trailers12k_feats.training.data import load_metadata
from trailers12k_feats.training.metrics import METRIC_KEYS
from trailers12k_feats.training.train import TrainConfig, load_streams, train_run
from trailers12k_feats.utils import (
    T12kError,
    atomic_path,
    config_dict,
    write_json,
    write_text,
)

log = logging.getLogger(__name__)

COLUMNS = ["run", "split", "epoch", *METRIC_KEYS, *GENRES_SHORT]


@dataclass(frozen=True)
class ReproduceConfig:
    """Which rows and splits to run, where the inputs are and where results go."""

    metadata: Path
    cache_dir: Path
    out_dir: Path = Path("results/transfer")
    rows: tuple[str, ...] = tuple(TABLE6)
    splits: tuple[int, ...] = (0, 1, 2)
    on_missing: str = "error"
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rows", tuple(get_row(r).name for r in self.rows))
        if not self.rows or not self.splits:
            raise T12kError("select at least one row and one split.")
        bad = [s for s in self.splits if s not in (0, 1, 2)]
        if bad:
            raise T12kError(f"splits must be among 0, 1, 2; got {bad}.")


def _run_dir(cfg: ReproduceConfig, row: str, split: int) -> Path:
    return cfg.out_dir / "runs" / row / f"split{split}"


def _check_inputs(cfg: ReproduceConfig, todo: list[tuple[str, int]]) -> None:
    """Every cache needed by an unfinished run exists, has the stream's dim and finite values."""
    meta = load_metadata(cfg.metadata)
    meta.check_splits(sorted({s for _, s in todo}))
    meta_ids = set(meta.ids)
    needed = sorted({s for row, _ in todo for s in TABLE6[row].streams})
    for stream in needed:
        path = cache_mod.stream_path(cfg.cache_dir, stream)
        attrs = cache_mod.validate(path)
        if attrs.feature_dim != STREAMS[stream].dim:
            raise T12kError(f"cache {path} has feature dim {attrs.feature_dim} but stream {stream} has "
                            f"dim {STREAMS[stream].dim}; point --cache-dir at the right caches.")
        ids = set(cache_mod.read_ids(path))
        if not ids & meta_ids:
            raise T12kError(f"no trailer id of cache {path} is in {cfg.metadata}; the cache belongs to another "
                            f"corpus.")
        if cfg.on_missing == "error" and not meta_ids <= ids:
            missing = sorted(meta_ids - ids)
            raise T12kError(f"{len(missing)} trailers of {cfg.metadata} are missing from cache {path} "
                            f"(e.g. {', '.join(missing[:3])}); pass --on-missing warn to drop them.")


def _check_settings(cfg: ReproduceConfig) -> None:
    """Refuse to mix runs made with different training settings in one results directory."""
    path = cfg.out_dir / "reproduce_config.json"
    settings = {k: v for k, v in config_dict(cfg.train).items() if k != "split"}
    if path.exists():
        old = json.loads(path.read_text())
        diff = sorted(k for k in settings.keys() | old.keys() if settings.get(k) != old.get(k))
        if diff:
            raise T12kError(f"{cfg.out_dir} holds runs made with other training settings ({', '.join(diff)}); "
                            f"choose another --out or delete it.")
    else:
        write_json(path, settings)


def collect(out_dir: Path) -> dict[str, list[dict]]:
    """Finished runs under `out_dir/runs` as rows of val.csv / tst.csv."""
    table: dict[str, list[dict]] = {"val": [], "test": []}
    order = {r: i for i, r in enumerate(TABLE6)}
    runs = sorted((out_dir / "runs").glob("*/split*/metrics.json"),
                  key=lambda p: (order.get(p.parent.parent.name, 99), p.parent.parent.name, p.parent.name))
    for p in runs:
        m = json.loads(p.read_text())
        for subset in table:
            table[subset].append({"run": p.parent.parent.name, "split": int(p.parent.name[5:]),
                                  "epoch": m["best_epoch"], **{k: m[subset][k] for k in COLUMNS[3:]}})
    return table


def summarise(lines: list[dict]) -> dict[str, dict[str, tuple[float, float, int]]]:
    """row -> metric -> (mean, sample std, number of splits)."""
    out: dict[str, dict[str, tuple[float, float, int]]] = {}
    for run in dict.fromkeys(line["run"] for line in lines):
        vals = [line for line in lines if line["run"] == run]
        out[run] = {}
        for k in COLUMNS[3:]:
            x = np.array([v[k] for v in vals], float)
            out[run][k] = (float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else float("nan"), len(x))
    return out


def _cell(mean: float, std: float) -> str:
    return f"{mean:5.2f}±{std:4.2f}" if np.isfinite(std) else f"{mean:5.2f}     "


def format_table(summary: dict[str, dict[str, tuple[float, float, int]]], title: str = "test") -> str:
    """A Markdown table of our mean ± std beside the paper's Table 6."""
    head = ["Row", "splits", *(f"{k} ours" for k in METRIC_KEYS), *(f"{k} paper" for k in METRIC_KEYS)]
    lines = [f"Table 6 ({title}, mean ± sample std over splits, x100)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in summary.items():
        row: Row | None = TABLE6.get(name)
        ours = [_cell(*s[k][:2]) for k in METRIC_KEYS]
        paper = [_cell(*row.paper[k]) if row else "" for k in METRIC_KEYS]
        lines.append("| " + " | ".join([row.label if row else name, str(s["uAP"][2]), *ours, *paper]) + " |")
    return "\n".join(lines)


def write_results(out_dir: Path) -> str:
    """Rewrite val.csv, tst.csv and the summaries from the finished runs; return the test table."""
    table = collect(out_dir)
    for subset, fname in (("val", "val.csv"), ("test", "tst.csv")):
        with atomic_path(out_dir / fname) as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            for line in table[subset]:
                w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in line.items()})
    with atomic_path(out_dir / "summary.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "subset", "metric", "mean", "std", "splits", "paper_mean", "paper_std"])
        for subset in ("val", "test"):
            for run, s in summarise(table[subset]).items():
                for k, (mean, std, n) in s.items():
                    paper = TABLE6[run].paper.get(k) if subset == "test" and run in TABLE6 else None
                    w.writerow([run, subset, k, f"{mean:.4f}", f"{std:.4f}", n, *(paper or ("", ""))])
    text = format_table(summarise(table["test"]))
    write_text(out_dir / "summary.md", text + "\n\n" + format_table(summarise(table["val"]), "val") + "\n")
    return text


def reproduce(cfg: ReproduceConfig, progress: bool = True) -> str:
    """Run every selected (row, split) not already finished; return the test table."""
    todo = [(r, s) for r in cfg.rows for s in cfg.splits if not (_run_dir(cfg, r, s) / "metrics.json").exists()]
    done = len(cfg.rows) * len(cfg.splits) - len(todo)
    if todo:
        _check_inputs(cfg, todo)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    _check_settings(cfg)
    if done:
        log.info("%d of %d runs already finished in %s; skipping them", done, done + len(todo), cfg.out_dir)
    meta = load_metadata(cfg.metadata) if todo else None
    for k, row_name in enumerate(dict.fromkeys(r for r, _ in todo)):
        row = TABLE6[row_name]
        roles = {role: cache_mod.stream_path(cfg.cache_dir, s) for role, s in (("image", row.image), ("video", row.video)) if s}
        sets, rows = load_streams(meta, roles, cfg.on_missing)
        for split in [s for r, s in todo if r == row_name]:
            train_cfg = dataclasses.replace(cfg.train, split=split)
            train_run(train_cfg, meta, sets, rows, _run_dir(cfg, row_name, split), progress=progress,
                      desc=f"{row_name} split{split}")
            write_results(cfg.out_dir)
        del sets
    return write_results(cfg.out_dir)
