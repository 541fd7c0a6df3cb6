"""Where an epoch of a Table 6 row goes: training and the validation pass, timed apart.

    python bench/bench_epoch.py [--data cache/synth] [--rows i_swin,i_resnet] [--epochs 2] [--threads 1]
                                [--eval-block-mb 16,128] [--gathers both] [--chains fused]

For each row, builds the group `t12k reproduce` trains (the row's three splits, authors'
protocol, the precision `auto` picks) on the corpus in `--data` (make one with `t12k synth`
or bench_reproduce.py), then times `--epochs` epochs of GroupTrainer.train_epoch and of
GroupTrainer.evaluate("val"), and the validation pass again with evaluation blocks of each
`--eval-block-mb` (protocols.EVAL_BLOCK_BYTES; 16 is the default), with the page faults each
took. `--gathers`: where the group gathers its clips from, `float` (the features, converted to
float32 and centred at each step), `centred` (a copy centred once, in bf16: the default
in bf16 on the CPU) or `both`, timed one after the other, with their ratio. `--chains`: the
group's elementwise chains compiled (`fused`, training/fused.py: the default in bf16 on the
CPU), run as eager code (`eager`), or `both`, with their ratio.
`--threads 1` is what each row gets when reproduce trains one row per core.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import logging
import resource
import time
from pathlib import Path

import torch
from machine import cpu_summary

from trailers12k_feats.training import protocols
from trailers12k_feats.training.data import load_metadata
from trailers12k_feats.training.grouped import GroupTrainer
from trailers12k_feats.training.reproduce import ReproduceConfig
from trailers12k_feats.training.streams import resolve_streams
from trailers12k_feats.training.train import _split_data, load_streams, train_precision
from trailers12k_feats.utils import setup_logging


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("cache/synth"))
    ap.add_argument("--rows", default="i_swin,i_resnet", help="comma-separated Table 6 rows")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-block-mb", default="16,128", help="evaluation block sizes to compare, in MB")
    ap.add_argument("--gathers", choices=("both", "float", "centred"), default="both",
                    help="gather clips from the features as float32, from a centred copy, or time both")
    ap.add_argument("--chains", choices=("both", "fused", "eager"), default="fused",
                    help="elementwise chains compiled, eager, or time both")
    args = ap.parse_args()
    setup_logging()
    logging.getLogger("trailers12k_feats").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    cfg = ReproduceConfig(metadata=args.data / "mtgc.csv", cache_dir=args.data, out_dir=Path("unused"))
    precision = train_precision(cfg.train)
    print(cpu_summary())
    print(f"torch {torch.__version__}, {args.threads} thread(s), precision {precision.precision}, "
          f"protocol {cfg.protocol}")
    meta = load_metadata(cfg.metadata)
    for row in args.rows.split(","):
        sets, rows = load_streams(meta, resolve_streams(args.data, row=row))
        cfgs = [dataclasses.replace(cfg.train, split=s, precision=precision.precision) for s in cfg.splits]
        modes = {"both": (False, True), "float": (False,), "centred": (True,)}[args.gathers]
        if precision.precision != "bf16" and True in modes:
            print(f"{row}: centred gathers are for bf16; precision is {precision.precision}, so float gathers only")
            modes = (False,)
        chains = {"both": (False, True), "eager": (False,), "fused": (True,)}[args.chains]
        times = {}
        for centred, fused in itertools.product(modes, chains):
            t0 = time.perf_counter()
            group = GroupTrainer(cfgs, [_split_data(meta, sets, rows, c.split) for c in cfgs],
                                 [f"{row} split{c.split}" for c in cfgs], centred=centred, fused=fused)
            print(f"{row}: group built in {time.perf_counter() - t0:.1f} s "
                  f"({'the centred copy included' if centred else 'no copy'}"
                  f"{', its chains compiled' if group.fused else ''})")
            times[centred, group.fused] = time_group(group, row, args)
            del group
        for fused in chains:
            if (False, fused) in times and (True, fused) in times:
                (tf, vf), (tc, vc) = times[False, fused], times[True, fused]
                print(f"{row}: centred / float gathers ({'fused' if fused else 'eager'} chains): "
                      f"training {tf / tc:.2f}x, validation {vf / vc:.2f}x faster")
        for centred in modes:
            if (centred, False) in times and (centred, True) in times:
                (te, ve), (tc, vc) = times[centred, False], times[centred, True]
                print(f"{row}: fused / eager chains ({'centred' if centred else 'float'} gathers): "
                      f"training {te / tc:.2f}x, validation {ve / vc:.2f}x faster")
        print()


def time_group(group: GroupTrainer, row: str, args: argparse.Namespace) -> tuple[float, float]:
    """Time `args.epochs` epochs of `group` and its validation pass by block size; the last
    epoch's (training, validation) seconds."""
    what = (f"{'centred' if group.offsets is not None else 'float'} gathers, "
            f"{'fused' if group.fused else 'eager'} chains")
    dims = "+".join(str(d) for d in group.runs[0].data["train"].dims().values())
    for epoch in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        group.train_epoch(epoch)
        t1 = time.perf_counter()
        group.evaluate("val")
        t2 = time.perf_counter()
        print(f"{row} ({dims} dims, {len(group.runs)} runs, {what}) epoch {epoch}: "
              f"train {t1 - t0:.2f} s, validation {t2 - t1:.2f} s")
    default = protocols.EVAL_BLOCK_BYTES
    for mb in (int(m) for m in args.eval_block_mb.split(",") if m):
        protocols.EVAL_BLOCK_BYTES = mb << 20
        f0, t3 = faults(), time.perf_counter()
        group.evaluate("val")
        print(f"{row} ({what}): validation with {mb} MB evaluation blocks "
              f"{time.perf_counter() - t3:.2f} s, {faults() - f0} page faults")
    protocols.EVAL_BLOCK_BYTES = default
    return t1 - t0, t2 - t1


if __name__ == "__main__":
    main()
