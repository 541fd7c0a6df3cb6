"""Training throughput of the DIViTA head against this machine's matmul peak, in one run.

Times the package's own training code (`training.train.Trainer` on a `TrailerData` bank of
in-RAM features) and prints, for fp32 and bf16 autocast:
  * the matmul peak (best of several shapes, including the head's own),
  * the head's forward+backward GFLOP/s on one batch (`train.batch_logits` + BCE loss;
    FLOPs counted by torch's FlopCounterMode),
  * full training steps (`Trainer.train_epoch`: random-window gather from the in-RAM bank,
    fwd, bwd, AdamW) as examples/s and GFLOP/s,
and the ratio achieved / peak, with the CPU model and its AMX / AVX512-BF16 flags. Then
`--precision auto` (the default): what it resolves to on this machine as a first run here would
(`runtime.resolve_precision`, with a fresh probe cache), the probe's figures, fp32, bf16 and auto
training speed with the real Trainer timed in turn, and auto / max(fp32, bf16), which should be
>= 0.95 (exit status 1 if not).

    python bench/bench_train.py [--dim 1024] [--clips 600000] [--steps 20] [--seconds 5] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from machine import cpu_summary
from torch.utils.flop_counter import FlopCounterMode

from trailers12k_feats import NUM_GENRES
from trailers12k_feats.cache import CacheAttrs, FeatureSet
from trailers12k_feats.runtime import BF16_MARGIN, CACHE_ENV, PrecisionChoice
from trailers12k_feats.training.data import Metadata, TrailerData
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


def auto_training(train: TrailerData, batch: int, window: int, rounds: int = 8) -> tuple[PrecisionChoice, dict]:
    """`--precision auto` resolved by the real Trainer as on a machine's first run (its probe cache
    in a temporary folder), and training examples/s of fp32, bf16 and auto Trainers: one epoch
    of each in turn, `rounds` times, so other work on the machine hits all three alike, and
    the fastest epoch of each, the one least disturbed by it."""
    old = os.environ.get(CACHE_ENV)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ[CACHE_ENV] = tmp
        try:
            auto = Trainer(TrainConfig(window=window, batch_size=batch), {"train": train})  # precision: auto
        finally:
            if old is None:
                del os.environ[CACHE_ENV]
            else:
                os.environ[CACHE_ENV] = old
    trainers = {name: Trainer(TrainConfig(window=window, batch_size=batch, precision=name), {"train": train})
                for name in ("fp32", "bf16")} | {"auto": auto}
    times: dict[str, list[float]] = {name: [] for name in trainers}
    for r in range(rounds + 1):  # the first round warms up
        for name, trainer in trainers.items():
            t0 = time.perf_counter()
            trainer.train_epoch()
            if r:
                times[name].append(time.perf_counter() - t0)
    return auto.precision, {name: len(train) / min(t) for name, t in times.items()}


def report_auto(peaks: dict[str, float], choice: PrecisionChoice, speed: dict[str, float]) -> bool:
    """Print the matmul peaks, the probe auto used and auto's training examples/s (`speed`) against
    the faster of fp32 and bf16; True when auto reaches 0.95 of it."""
    probe = choice.probe or {}
    best = max(("fp32", "bf16"), key=speed.get)
    ratio = speed["auto"] / speed[best]
    print(f"\nmatmul peak bf16 / fp32: {peaks['bf16'] / peaks['fp32']:.2f}x ({peaks['bf16']:.0f} vs "
          f"{peaks['fp32']:.0f} GFLOP/s)")
    if probe:
        print(f"auto's probe (autocast F.linear at the head's shapes, {probe['seconds']:.2f} s): bf16 "
              f"{probe['bf16']:.0f} GFLOP/s, fp32 {probe['fp32']:.0f} GFLOP/s, bf16 / fp32 "
              f"{probe['bf16'] / probe['fp32']:.2f}x (bf16 needs {BF16_MARGIN:.2f}x)")
    print(f"auto -> {choice.precision}: {choice.reason}")
    print(f"training ex/s, epochs in turn (fastest of each): fp32 {speed['fp32']:.0f}, bf16 {speed['bf16']:.0f}, "
          f"auto {speed['auto']:.0f}; auto / max(fp32, bf16) = {ratio:.2f} "
          f"({'ok' if ratio >= 0.95 else 'BELOW 0.95'}, faster: {best})")
    return ratio >= 0.95


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

    choice, speed = auto_training(train, B, S)
    if not report_auto({r[0]: r[1] for r in results}, choice, speed):
        sys.exit(1)


if __name__ == "__main__":
    main()
