"""Does bf16 autocast change the results? One Table 6 row, 3 splits: bf16 vs fp32, and bf16 with
another seed as the yardstick of run-to-run noise.

    python bench/bench_precision.py [--data cache/synth] [--row ik_swin] [--out results/precision]

Each setting is a resumable `reproduce` into its own folder; the table prints test metrics
per setting (mean ± sample std over splits), and the mean paired difference to bf16 seed 0.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from trailers12k_feats.training.metrics import METRIC_KEYS
from trailers12k_feats.training.reproduce import ReproduceConfig, reproduce
from trailers12k_feats.training.tables import collect
from trailers12k_feats.training.train import TrainConfig
from trailers12k_feats.utils import setup_logging

SETTINGS = {"bf16 seed 0": TrainConfig(precision="bf16"), "fp32 seed 0": TrainConfig(precision="fp32"),
            "bf16 seed 1": TrainConfig(precision="bf16", seed=1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("cache/synth"))
    ap.add_argument("--row", default="ik_swin")
    ap.add_argument("--out", type=Path, default=Path("results/precision"))
    ap.add_argument("--splits", default="0,1,2", help="comma-separated splits")
    args = ap.parse_args()
    setup_logging()
    logging.getLogger("trailers12k_feats.training.train").setLevel(logging.WARNING)
    lines = {}
    for name, train in SETTINGS.items():
        out = args.out / name.replace(" ", "_")
        cfg = ReproduceConfig(metadata=args.data / "mtgc.csv", cache_dir=args.data, out_dir=out, rows=(args.row,),
                              splits=tuple(int(k) for k in args.splits.split(",")),
                              train=train)
        reproduce(cfg, progress=False)
        lines[name] = [r for r in collect(out)["test"] if r["run"] == args.row and r["split"] in cfg.splits]
    ref = lines["bf16 seed 0"]
    print(f"\n{args.row}, test, splits {args.splits} (x100)\n")
    print("| setting | " + " | ".join(METRIC_KEYS) + " | mean paired diff vs bf16 seed 0 (uAP, mAP) |")
    print("|---|" + "---|" * (len(METRIC_KEYS) + 1))
    for name, rows in lines.items():
        cells = [f"{np.mean([r[k] for r in rows]):.2f}" + (f"±{np.std([r[k] for r in rows], ddof=1):.2f}" if len(rows) > 1 else "")
                 for k in METRIC_KEYS]
        diff = [np.mean([a[k] - b[k] for a, b in zip(rows, ref)]) for k in ("uAP", "mAP")]
        print(f"| {name} | " + " | ".join(cells) + f" | {diff[0]:+.2f}, {diff[1]:+.2f} |")


if __name__ == "__main__":
    main()
