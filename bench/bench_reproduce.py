"""Wall time of the full Table 6 reproduction (8 rows x 3 splits) on the synthetic corpus.

    python bench/bench_reproduce.py [--data cache/synth] [--out results/bench_transfer] [--trailers 12000]

Generates the corpus first if `--data` holds none (timed separately), then runs
`reproduce` with the paper's protocol and prints the wall time and the table. Delete
`--out` to time from scratch: finished runs are skipped.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from trailers12k_feats.sources.synthetic import SynthConfig, make_corpus
from trailers12k_feats.training.reproduce import ReproduceConfig, reproduce
from trailers12k_feats.utils import setup_logging


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("cache/synth"))
    ap.add_argument("--out", type=Path, default=Path("results/bench_transfer"))
    ap.add_argument("--trailers", type=int, default=12000)
    args = ap.parse_args()
    setup_logging()
    logging.getLogger("trailers12k_feats.training.train").setLevel(logging.WARNING)
    if not (args.data / "mtgc.csv").exists():
        t0 = time.perf_counter()
        make_corpus(args.data, SynthConfig(num_trailers=args.trailers))
        print(f"synthetic corpus of {args.trailers} trailers: {time.perf_counter() - t0:.0f} s")
    t0 = time.perf_counter()
    table = reproduce(ReproduceConfig(metadata=args.data / "mtgc.csv", cache_dir=args.data, out_dir=args.out))
    wall = time.perf_counter() - t0
    print(table)
    print(f"\nreproduction (8 rows x 3 splits): {wall / 60:.1f} min wall on {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
