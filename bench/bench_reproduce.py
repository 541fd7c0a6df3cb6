"""Wall time of the full Table 6 reproduction (8 rows x 3 splits) on the synthetic corpus.

    python bench/bench_reproduce.py [--data cache/synth] [--out results/bench_transfer] [--trailers 12000]
                                    [--no-group | --compare] [--rows R1,R2] [--splits 0,1,2] [--max-epochs N]
                                    [--device cuda] [--jobs N] [--json FILE]

Generates the corpus first if `--data` holds none (timed separately), then runs
`reproduce` with the paper's protocol and prints the wall time and the table. By default the
splits of a row train as one group (grouped.py); `--no-group` trains one run at a time, and
`--compare` runs both, one after the other into `--out`/single and `--out`/grouped, and
prints the two wall times and their ratio. `--rows`, `--splits` and `--max-epochs` time a
part of it (the default is all of it). `--device cuda` trains on a GPU, `--jobs` sets the
processes that train rows at once (reproduce's default: as many as the cores and RAM allow).
Delete `--out` to time from scratch: finished runs are skipped. `--json FILE` writes the
figures. Beside the wall time it prints the CPU time of the processes (user and system, the
workers' included), divided by the usable cores: the least wall time in which those cores could
do the same work, were it shared out perfectly.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import resource
import time
from pathlib import Path

import torch
from machine import cpu_summary

from trailers12k_feats.paper import TABLE6
from trailers12k_feats.runtime import usable_cores
from trailers12k_feats.sources.synthetic import SynthConfig, make_corpus
from trailers12k_feats.training.data import SPLITS
from trailers12k_feats.training.reproduce import (
    ReproduceConfig,
    jobs_for,
    reproduce,
    units,
)
from trailers12k_feats.training.train import TrainConfig, train_precision
from trailers12k_feats.utils import setup_logging


def cpu_seconds() -> float:
    """User and system CPU seconds of this process and of its children that have ended
    (reproduce's workers, once it returns)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(cfg: ReproduceConfig) -> tuple[float, str, float]:
    """(wall seconds, table, CPU seconds) of reproduce(cfg)."""
    t0, c0 = time.perf_counter(), cpu_seconds()
    table = reproduce(cfg)
    return time.perf_counter() - t0, table, cpu_seconds() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("cache/synth"))
    ap.add_argument("--out", type=Path, default=Path("results/bench_transfer"))
    ap.add_argument("--trailers", type=int, default=12000)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--no-group", action="store_true", help="train one run at a time")
    mode.add_argument("--compare", action="store_true", help="time one run at a time, then grouped")
    ap.add_argument("--rows", default=",".join(TABLE6), help="comma-separated Table 6 rows")
    ap.add_argument("--splits", default=",".join(map(str, SPLITS)))
    ap.add_argument("--max-epochs", type=int, default=None, help="epoch limit (default: the protocol's)")
    ap.add_argument("--device", default=TrainConfig.device, help="cpu or cuda[:N]")
    ap.add_argument("--jobs", type=int, default=ReproduceConfig.jobs, help="processes (0: reproduce's default)")
    ap.add_argument("--json", type=Path, help="write the figures to this file")
    args = ap.parse_args()
    setup_logging()
    logging.getLogger("trailers12k_feats.training.train").setLevel(logging.WARNING)
    corpus_s = None
    if not (args.data / "mtgc.csv").exists():
        t0 = time.perf_counter()
        make_corpus(args.data, SynthConfig(num_trailers=args.trailers), workers=0)
        corpus_s = time.perf_counter() - t0
        print(f"synthetic corpus of {args.trailers} trailers: {corpus_s:.0f} s")
    rows = tuple(r.strip() for r in args.rows.split(",") if r.strip())
    splits = tuple(int(s) for s in args.splits.split(","))
    train = TrainConfig(device=args.device, **({} if args.max_epochs is None else {"max_epochs": args.max_epochs}))
    cfg = ReproduceConfig(metadata=args.data / "mtgc.csv", cache_dir=args.data, out_dir=args.out, rows=rows,
                          splits=splits, train=train, jobs=args.jobs)
    what = f"{len(rows)} rows x {len(splits)} splits"
    if args.max_epochs:
        what += f", at most {args.max_epochs} epochs"
    print(cpu_summary())
    gpu = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else None
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {gpu or 'cpu'}, precision "
          f"{cfg.train.precision}; {what}")
    if args.compare:
        single, _, _ = timed(dataclasses.replace(cfg, out_dir=args.out / "single", group=False))
        grouped, table, _ = timed(dataclasses.replace(cfg, out_dir=args.out / "grouped", group=True))
        print(table)
        print(f"\nreproduction ({what}): one run at a time {single / 60:.1f} min, grouped {grouped / 60:.1f} min "
              f"wall: {single / grouped:.2f}x")
        return
    cfg = dataclasses.replace(cfg, group=not args.no_group)
    jobs = jobs_for(cfg, units(cfg, [(r, s) for r in rows for s in splits]), train_precision(cfg.train).precision)
    wall, table, cpu = timed(cfg)
    cores = usable_cores()
    print(table)
    epochs = sum(json.loads(p.read_text())["epochs"] for p in args.out.glob("runs/*/split*/metrics.json"))
    print(f"\nreproduction ({what}, {'one run at a time' if args.no_group else 'grouped'}, {jobs} processes): "
          f"{wall / 60:.1f} min wall ({wall:.0f} s), {epochs} epochs in all")
    print(f"CPU time {cpu:.0f} s; over {cores} usable cores {cpu / cores / 60:.1f} min: the least wall time for this "
          f"work on this machine, were it shared out perfectly")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_summary(), "device": gpu or "cpu", "rows": len(rows),
                                         "splits": len(splits), "max_epochs": args.max_epochs, "jobs": jobs,
                                         "group": not args.no_group, "precision": cfg.train.precision,
                                         "corpus_s": corpus_s and round(corpus_s, 1), "epochs": epochs,
                                         "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
                                         "cores": cores}, indent=2) + "\n")


if __name__ == "__main__":
    main()
