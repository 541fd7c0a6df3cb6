"""Training throughput of the DIViTA head against this machine's matmul peak, in one run.

Times the package's own training code (`training.train.Trainer` on a `TrailerData` bank of
in-RAM features) and prints, for fp32 and bf16 autocast:
  * the matmul peak (best of several shapes, including the head's own),
  * the head's forward+backward GFLOP/s on one batch (`train.batch_logits` + BCE loss;
    FLOPs counted by torch's FlopCounterMode),
  * full training steps (`Trainer.train_epoch`: random-window gather from the in-RAM bank,
    fwd, bwd, AdamW) as examples/s and GFLOP/s,
and the ratio achieved / peak, with the CPU model and its AMX / AVX512-BF16 flags; then
three runs' training epochs one at a time against the same runs trained as one group.

    python bench/bench_train.py [--dim 1024] [--clips 600000] [--steps 20] [--seconds 5] [--threads N]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from machine import cpu_summary
from torch.utils.flop_counter import FlopCounterMode

from trailers12k_feats import NUM_GENRES
from trailers12k_feats.cache import CacheAttrs, FeatureSet
from trailers12k_feats.training.data import Metadata, TrailerData
from trailers12k_feats.training.grouped import GroupTrainer
from trailers12k_feats.training.train import (
    PRECISIONS,
    TrainConfig,
    Trainer,
    batch_logits,
)

SHAPES = [(2048, 2048, 2048), (4096, 1024, 1024), (960, 1024, 128), (960, 128, 768), (960, 768, 128)]


def timeit(fn, min_seconds: float = 1.0, warmup: int = 3) -> float:
    """Seconds per call: warm up, then repeat for at least `min_seconds`."""
    for _ in range(warmup):
        fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_seconds:
        fn()
        n += 1
    return (time.perf_counter() - t0) / n


def matmul_peak(dtype: torch.dtype) -> tuple[float, tuple[int, int, int]]:
    best, where = 0.0, SHAPES[0]
    for m, k, n in SHAPES:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        gflops = 2 * m * k * n / timeit(lambda a=a, b=b: a @ b, 0.5) / 1e9
        if gflops > best:
            best, where = gflops, (m, k, n)
    return best, where


def feature_bank(clips: int, dim: int, gen: torch.Generator) -> tuple[Metadata, FeatureSet]:
    """A float16 feature set of ~`clips` clips (10-109 per trailer) held in RAM, as `cache.load`
    returns one, and metadata with random genres for its trailers."""
    lengths = torch.randint(10, 110, (max(1, clips // 60),), generator=gen)  # clips per trailer
    n = len(lengths)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(lengths, 0)])  # (n + 1,)
    total = int(offsets[-1])
    features = torch.randn(total, dim, generator=gen, dtype=torch.float16)  # (N, F)
    ids = [f"tt{i:07d}" for i in range(n)]
    attrs = CacheAttrs(name="bench", backbone="random", feature_dim=dim)
    fs = FeatureSet(path=Path("<in memory>"), attrs=attrs, ids=ids, features=features, offsets=offsets,
                    clip_start=np.full(total, np.nan, np.float32), clip_end=np.full(total, np.nan, np.float32),
                    shot=np.full(total, -1, np.int32))
    labels = (torch.rand(n, NUM_GENRES, generator=gen) < 0.25).numpy().astype(np.uint8)  # (n, 10)
    labels[np.arange(n), np.arange(n) % NUM_GENRES] = 1
    meta = Metadata(path=Path("<in memory>"), ids=ids, labels=labels, splits=np.zeros((n, 3), np.int8))
    return meta, fs


def single_vs_grouped(train: TrailerData, args: argparse.Namespace, runs: int = 3) -> None:
    """Training epochs of `runs` runs (seeds 0, 1, ...) one at a time (`Trainer.train_epoch` each)
    against the same runs as one group (`GroupTrainer.train_epoch`), alternated, best of three."""
    print(f"\n{runs} runs of the same head, one at a time vs one group (grouped.py), train examples/s:")
    for name in ("fp32", "bf16"):
        cfgs = [TrainConfig(window=args.window, batch_size=args.batch, precision=name, seed=s) for s in range(runs)]
        singles = [Trainer(c, {"train": train}) for c in cfgs]
        group = GroupTrainer(cfgs, [{"train": train}] * runs, [f"seed{s}" for s in range(runs)])
        alone, together = math.inf, math.inf
        for _ in range(3):
            t0 = time.perf_counter()
            for t in singles:
                t.train_epoch()
            t1 = time.perf_counter()
            group.train_epoch(1)
            alone, together = min(alone, t1 - t0), min(together, time.perf_counter() - t1)
        n = runs * len(train)
        print(f"{name:5} one at a time {n / alone:8.0f}   grouped {n / together:8.0f}   {alone / together:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=1024, help="feature dim of the single-stream tsfm head")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--window", type=int, default=30)
    ap.add_argument("--clips", type=int, default=600_000, help="clips in the in-RAM feature bank")
    ap.add_argument("--steps", type=int, default=20, help="training steps per timed epoch")
    ap.add_argument("--seconds", type=float, default=5.0, help="timing per measurement")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    B, S, D = args.batch, args.window, args.dim
    print(cpu_summary())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; head tsfm dim {D}, batch {B}x{S} clips")

    meta, fs = feature_bank(args.clips, D, gen)
    # The trailers one timed epoch trains on, spread over the whole bank (random rows, as in training).
    rows = torch.randperm(len(meta), generator=gen)[:args.steps * B].sort().values.numpy()
    train = TrailerData.from_metadata(meta, {"image": fs}, rows)
    print(f"feature bank: {len(fs)} trailers, {fs.features.shape[0]} clips, "
          f"{fs.features.numel() * 2 / 2**30:.2f} GiB float16; {len(train)} trailers per timed epoch "
          f"({-(-len(train) // B)} steps)")

    results = []
    for name in ("fp32", "bf16"):
        dtype = PRECISIONS[name]
        peak, shape = matmul_peak(dtype)
        trainer = Trainer(TrainConfig(window=S, batch_size=B, precision=name), {"train": train})
        trainer.model.train()
        batch = train.random_windows(torch.arange(B), S, gen)  # one fixed batch for the head alone

        def fwd_bwd(batch=batch, trainer=trainer, dtype=dtype):
            logits = batch_logits(trainer.model, batch, trainer.device, dtype)
            F.binary_cross_entropy_with_logits(logits, batch.y).backward()

        with FlopCounterMode(display=False) as fc:
            fwd_bwd()
        flops = fc.get_total_flops()  # per step of B windows
        trainer.model.zero_grad(set_to_none=True)
        t_fb = timeit(fwd_bwd, args.seconds)
        t_epoch = timeit(trainer.train_epoch, args.seconds, warmup=1)
        steps = -(-len(train) // B)
        results.append((name, peak, shape, flops / t_fb / 1e9, len(train) / t_epoch, flops * steps / t_epoch / 1e9))

    print(f"\n{'':5} {'matmul peak':>12} {'(shape m,k,n)':>18} {'head fwd+bwd':>13} {'ratio':>6} "
          f"{'train ex/s':>11} {'step GFLOP/s':>13} {'ratio':>6}")
    for name, peak, shape, fb, exs, st in results:
        print(f"{name:5} {peak:9.0f} GF/s {shape!s:>18} {fb:8.0f} GF/s {fb / peak:6.1%} {exs:11.0f} "
              f"{st:8.0f} GF/s {st / peak:6.1%}")
    print(f"\nbf16 / fp32 training speed: {results[1][4] / results[0][4]:.2f}x; "
          f"head FLOPs per step (fwd+bwd): {flops / 1e9:.2f} GFLOP")
    single_vs_grouped(train, args)


if __name__ == "__main__":
    main()
