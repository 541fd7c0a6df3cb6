"""A grid of training settings for `t12k reproduce`: comma lists make one results folder per setting.

`t12k reproduce --temporal tsfm,gru --lr 1e-4,3e-4 --seeds 0,1,2` trains the selected rows x
splits for each of the 2 x 2 x 3 settings. Each setting is an ordinary reproduce results folder
(runs/<row>/split<k>, val.csv, tst.csv, summary.*; resumed and checked as one), named by the
values that vary, under --out: ``<out>/temporal-gru_lr-0.0003_seed-1/``. `grid.csv` and
`grid.md` under --out put every setting's test means side by side. Without a list (one value
per field) nothing changes: the results folder is --out itself.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import logging
from dataclasses import dataclass
from pathlib import Path

from trailers12k_feats.engines import EngineConfig
from trailers12k_feats.training.metrics import METRIC_KEYS
from trailers12k_feats.training.reproduce import ReproduceConfig
from trailers12k_feats.training.tables import collect, summarise
from trailers12k_feats.training.train import TrainConfig
from trailers12k_feats.utils import T12kError, atomic_path, write_text

log = logging.getLogger(__name__)

# TrainConfig fields a grid may vary (those `t12k reproduce` takes as comma lists).
GRID_FIELDS = ("temporal", "fusion", "max_epochs", "batch_size", "lr", "seed")


@dataclass(frozen=True)
class Grid:
    """Values per TrainConfig field, in the order given; a setting takes one value of each."""

    axes: tuple[tuple[str, tuple], ...] = ()

    def __post_init__(self) -> None:
        names = [n for n, _ in self.axes]
        bad = [n for n in names if n not in GRID_FIELDS]
        if bad:
            raise T12kError(f"a grid cannot vary {', '.join(bad)}; it varies {', '.join(GRID_FIELDS)}.")
        if len(set(names)) != len(names):
            raise T12kError(f"a grid field is given twice: {', '.join(names)}.")
        for name, values in self.axes:
            if not values or len(set(values)) != len(values):
                raise T12kError(f"--{name.replace('_', '-')} needs distinct values, got {', '.join(map(str, values))}.")

    @classmethod
    def parse(cls, **lists: str | None) -> Grid:
        """Comma lists per field ("1e-4,3e-4"), each value of the field's type; None: left out."""
        types = {f.name: type(f.default) for f in dataclasses.fields(TrainConfig)}
        axes = []
        for name, text in lists.items():
            if text is None:
                continue
            kind = types.get(name, str)
            try:
                values = tuple(kind(x.strip()) for x in str(text).split(",") if x.strip())
            except ValueError:
                raise T12kError(f"--{name.replace('_', '-')} takes comma-separated {kind.__name__} values such as "
                                f"{_example(kind)}, got {text!r}.") from None
            axes.append((name, values))
        return cls(tuple(axes))

    def first(self) -> dict:
        """The first value of each field: the first setting, which a base config is checked with."""
        return {name: values[0] for name, values in self.axes}

    def where(self, out_dir: Path) -> str:
        """Where `reproduce_grid` leaves the results of this grid under `out_dir`, as a sentence."""
        folder = f"{out_dir}/<setting>/" if self.varied else str(out_dir)
        return (f"results in {folder} (val.csv, tst.csv, summary.csv, summary.md)"
                + (f", compared in {out_dir}/grid.md" if self.varied else ""))

    @property
    def varied(self) -> tuple[str, ...]:
        """The fields with more than one value: they name the settings' folders."""
        return tuple(n for n, v in self.axes if len(v) > 1)

    def settings(self) -> list[dict]:
        """Every combination, the last field varying fastest."""
        return [dict(zip([n for n, _ in self.axes], combo)) for combo in itertools.product(*(v for _, v in self.axes))]

    def name(self, setting: dict) -> str:
        """The folder of a setting: its varied values, e.g. temporal-gru_lr-0.0003 ("" without any)."""
        return "_".join(f"{n}-{setting[n]:g}" if isinstance(setting[n], float) else f"{n}-{setting[n]}"
                        for n in self.varied)


def _example(kind: type) -> str:
    return {int: "0,1,2", float: "1e-4,3e-4"}.get(kind, "tsfm,gru")


def grid_configs(cfg: ReproduceConfig, grid: Grid) -> list[tuple[str, ReproduceConfig]]:
    """(setting name, its ReproduceConfig) for every setting; without a varied field one config, --out."""
    out = []
    for setting in grid.settings():
        name = grid.name(setting)
        out.append((name, dataclasses.replace(cfg, out_dir=cfg.out_dir / name if name else cfg.out_dir,
                                              train=dataclasses.replace(cfg.train, **setting))))
    return out


def reproduce_grid(cfg: ReproduceConfig, grid: Grid, engine: EngineConfig | None = None,
                   progress: bool = True) -> str:
    """Reproduce every setting of `grid` (locally or as Ray tasks, per `engine`); finished runs are skipped.
    Returns the test table of a single setting, or the grid's comparison of several."""
    from trailers12k_feats.training import reproduce as rep  # looked up now, so tests can stand in for it

    configs = grid_configs(cfg, grid)
    if engine is not None and engine.ray:
        from trailers12k_feats.training.ray_runs import reproduce_ray

        tables = reproduce_ray([c for _, c in configs], engine, progress=progress)
    else:
        tables = [rep.reproduce(c, progress=progress) for _, c in configs]
    if len(configs) == 1:
        return tables[0]
    return write_grid(cfg.out_dir, [(name, c.out_dir) for name, c in configs])


GRID_COLUMNS = ["setting", "run", "splits", *METRIC_KEYS]


def write_grid(out_dir: Path, settings: list[tuple[str, Path]]) -> str:
    """grid.csv and grid.md: each setting's test mean per row (x100); returns the Markdown table."""
    lines = []
    for name, folder in settings:
        for run, s in summarise(collect(folder)["test"]).items():
            lines.append([name, run, str(s["uAP"][2]), *(f"{s[k][0]:.2f}" for k in METRIC_KEYS)])
    with atomic_path(out_dir / "grid.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(GRID_COLUMNS)
        w.writerows(lines)
    text = "\n".join([f"Grid ({len(settings)} settings, test, mean over splits, x100)", "",
                      "| " + " | ".join(GRID_COLUMNS) + " |", "|" + "---|" * len(GRID_COLUMNS),
                      *("| " + " | ".join(line) + " |" for line in lines)])
    write_text(out_dir / "grid.md", text + "\n")
    return text
