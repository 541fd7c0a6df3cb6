"""Two revisions of the package, step for step: a group's training steps at a base revision and in
the working tree, alternating in one process.

    python bench/bench_ab.py [--data cache/synth] [--base HEAD] [--rows i_swin] [--pairs 12]
                             [--steps 25] [--threads 1]

On a machine whose speed drifts by a fifth within the hour, two timings taken minutes apart
compare the machine as much as the code. Here each row's group, as `t12k reproduce` trains it
(the row's three splits, the precision `auto` picks), is built twice in one process: by the
package as it is in the working tree and by the package at `--base` (a git revision, extracted
with `git archive` and imported under another name). Blocks of `--steps` training steps
(GroupTrainer.step on each run's own windows) of the two then alternate, `--pairs` times, in
turn first: each pair's ratio compares the two over the same minute. Prints each version's
median step time and the pairs' ratios with their median (below 1: the working tree is faster).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import io
import logging
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from types import ModuleType

import torch
from machine import cpu_summary

PACKAGE = "trailers12k_feats"
BASE = "t12k_base"  # the name the base revision's package is imported under


def extract(rev: str, into: Path) -> str:
    """The package at git revision `rev`, as package BASE under `into`; its commit, abbreviated."""
    root = Path(__file__).resolve().parent.parent
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", rev], check=True,
                            capture_output=True, text=True).stdout.strip()
    tar = subprocess.run(["git", "-C", str(root), "archive", commit, PACKAGE], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        t.extractall(into, filter="data")
    (into / PACKAGE).rename(into / BASE)
    for f in (into / BASE).rglob("*.py"):  # its own imports name it
        f.write_text(f.read_text().replace(PACKAGE, BASE))
    return commit


def build(pkg: str, data: Path, row: str) -> tuple[object, list, int]:
    """Package `pkg`'s group of `row` and each run's windows for an epoch: (group, plans, batch)."""
    def mod(name: str) -> ModuleType:
        return importlib.import_module(f"{pkg}.{name}")

    train, rep = mod("training.train"), mod("training.reproduce")
    cfg = rep.ReproduceConfig(metadata=data / "mtgc.csv", cache_dir=data, out_dir=Path("unused"))
    precision = train.train_precision(cfg.train)
    meta = mod("training.data").load_metadata(cfg.metadata)
    sets, rows = train.load_streams(meta, mod("training.streams").resolve_streams(data, row=row))
    cfgs = [dataclasses.replace(cfg.train, split=s, precision=precision.precision) for s in cfg.splits]
    group = mod("training.grouped").GroupTrainer(cfgs, [train._split_data(meta, sets, rows, c.split) for c in cfgs],
                                                 [f"{row} split{c.split}" for c in cfgs])
    group.model.train()
    B, W = cfg.train.batch_size, cfg.train.window
    plans = []
    for r in group.runs:
        d = r.data["train"]
        rows_, firsts = d.epoch_windows(B, W, r.gen)
        plans.append((rows_, firsts, d.lengths[rows_] - firsts >= W))
    return group, plans, B


def steps(group, plans: list, B: int, n: int, start: int) -> None:
    """n training steps of every run of `group`, from batch `start` of each run's plan on."""
    batches = min(len(p[0]) for p in plans) // B
    js = list(range(len(plans)))
    for i in range(n):
        s = (start + i) % batches * B
        group.step(js, [p[0][s:s + B] for p in plans], [p[1][s:s + B] for p in plans],
                   all(bool(p[2][s:s + B].all()) for p in plans))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("cache/synth"))
    ap.add_argument("--base", default="HEAD", help="git revision to compare the working tree with")
    ap.add_argument("--rows", default="i_swin", help="comma-separated Table 6 rows")
    ap.add_argument("--pairs", type=int, default=12)
    ap.add_argument("--steps", type=int, default=25, help="training steps in each timed block")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.pairs < 1 or args.steps < 1:
        ap.error("--pairs and --steps must be at least 1")
    logging.basicConfig(level=logging.ERROR)
    for name in (PACKAGE, BASE):  # the runs' start lines and the protocol's notes, twice over
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            commit = extract(args.base, Path(tmp))
        except subprocess.CalledProcessError as e:
            sys.exit(f"bench_ab: cannot extract {PACKAGE} at revision {args.base!r} ({e.stderr.strip()}); "
                     "give --base a commit, branch or tag of this repository.")
        sys.path.insert(0, tmp)
        print(cpu_summary())
        print(f"torch {torch.__version__}, {args.threads} thread(s); base {args.base} ({commit}) against the "
              f"working tree; {args.pairs} pairs of {args.steps}-step blocks")
        for row in args.rows.split(","):
            versions = {"base": build(BASE, args.data, row), "tree": build(PACKAGE, args.data, row)}
            for v in versions.values():  # compiled graphs and caches warm before timing
                steps(*v, 8, 0)
            ms: dict[str, list[float]] = {"base": [], "tree": []}
            for p in range(args.pairs):
                for name in ("base", "tree") if p % 2 == 0 else ("tree", "base"):
                    t0 = time.perf_counter()
                    steps(*versions[name], args.steps, 8 + p * args.steps)
                    ms[name].append((time.perf_counter() - t0) / args.steps * 1e3)
            ratios = [t / b for b, t in zip(ms["base"], ms["tree"])]
            print(f"{row}: step {statistics.median(ms['base']):.1f} ms at base, "
                  f"{statistics.median(ms['tree']):.1f} ms in the working tree; tree / base per pair: "
                  f"{' '.join(f'{r:.3f}' for r in ratios)}; median {statistics.median(ratios):.3f}")
            del versions


if __name__ == "__main__":
    main()
