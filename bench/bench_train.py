"""Training throughput of the DIViTA head against this machine's matmul peak, in one run.

Times the package's own training code (`training.train.Trainer` on a `TrailerData` bank of
in-RAM features) and prints, for fp32 and bf16 autocast:
  * the matmul peak (best of several shapes, including the head's own),
  * the head's forward+backward GFLOP/s on one batch (`train.batch_logits` + BCE loss;
    FLOPs counted by torch's FlopCounterMode),
  * full training steps (`Trainer.train_epoch`: random-window gather from the in-RAM bank,
    fwd, bwd, AdamW) as examples/s and GFLOP/s,
and the ratio achieved / peak, with the CPU model and its AMX / AVX512-BF16 flags; three runs'
training epochs one at a time against the same runs trained as one group. Then
`--precision auto` (the default): what it resolves to on this machine as a first run here would
(`runtime.resolve_precision`, with a fresh probe cache), the probe's figures, fp32, bf16 and auto
training speed with the real Trainer timed in turn, and auto / max(fp32, bf16), which should be
>= 0.95 (exit status 1 if not).

Section "startup" breaks down the start of a `t12k train` run on a cache written for the purpose
(2,100 trailers, float32, about 1 GB): imports of the command's path in a fresh interpreter, the
HDF5 read (`cache.load`), the checks, the first training step, and the whole command for one
epoch. Section "probe" times the 8 x 3 linear probe (`training.probe.probe`, and `t12k probe` in
a fresh interpreter) on a synthetic corpus (`--corpus`, made with `--trailers` trailers if it is
not there; 12,000 trailers take about 8 GB), beside pooling every clip as the probe did before
caches stored pooled summaries.

    python bench/bench_train.py [--dim 1024] [--clips 600000] [--steps 20] [--seconds 5] [--threads N]
                                [--sections throughput,startup] [--corpus cache/synth] [--trailers 12000]
    python bench/bench_train.py --sections probe [--corpus cache/synth] [--trailers 12000] [--skip-clip-pooling]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from machine import cpu_summary
from torch.utils.flop_counter import FlopCounterMode

from trailers12k_feats import NUM_GENRES, cache
from trailers12k_feats.cache import CacheAttrs, FeatureSet
from trailers12k_feats.paper import STREAMS
from trailers12k_feats.pooling import pool_features
from trailers12k_feats.runtime import BF16_MARGIN, CACHE_ENV, PrecisionChoice
from trailers12k_feats.sources.synthetic import (
    SynthConfig,
    make_corpus,
    sample_labels,
    sample_splits,
)
from trailers12k_feats.training.data import (
    Metadata,
    TrailerData,
    align,
    load_metadata,
    write_metadata,
)
from trailers12k_feats.training.grouped import GroupTrainer
from trailers12k_feats.training.probe import ProbeConfig, probe
from trailers12k_feats.training.streams import check_caches
from trailers12k_feats.training.train import (
    PRECISIONS,
    TrainConfig,
    Trainer,
    _split_data,
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


# Sections "startup" and "probe": how long stage 2 takes before its first step, and the linear probe.

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("throughput", "startup", "probe")


def fresh_python(args: list[str], repeat: int = 1) -> tuple[float, str]:
    """Best wall time of `python ARGS` in a fresh interpreter at the repository root, and its stdout."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    best, out = float("inf"), ""
    for _ in range(repeat):
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, check=False)
        if r.returncode:
            raise SystemExit(f"python {' '.join(args)} failed:\n{r.stderr[-3000:]}")
        best, out = min(best, time.perf_counter() - t0), r.stdout
    return best, out


def import_seconds(modules: str, repeat: int = 3) -> float:
    """Best time to import `modules` (comma-separated) in a fresh interpreter."""
    code = f"import time; t0 = time.perf_counter(); import {modules}; print(time.perf_counter() - t0)"
    return min(float(fresh_python(["-c", code])[1]) for _ in range(repeat))


def best_of(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def write_bench_cache(folder: Path, trailers: int, dim: int, dtype: str, seed: int = 0) -> tuple[Path, Path]:
    """A cache of `trailers` trailers of random features (clip counts as the synthetic corpus's)
    written by `CacheWriter`, and an mtgc.csv for it; returns (cache, metadata)."""
    rng = np.random.default_rng(seed)
    cfg = SynthConfig(num_trailers=trailers)
    lengths = np.exp(rng.normal(np.log(cfg.clips_median), cfg.clips_sigma, trailers)).round().astype(int)
    lengths = lengths.clip(cfg.min_clips, cfg.max_clips)
    ids = [f"tt{i:07d}" for i in range(trailers)]
    path = folder / "bench.h5"
    with cache.CacheWriter(path, CacheAttrs(name="bench", backbone="random", feature_dim=dim), dtype=dtype) as w:
        for tid, n in zip(ids, lengths):
            w.add(tid, rng.standard_normal((n, dim), np.float32))
    write_metadata(folder / "mtgc.csv", ids, sample_labels(trailers, rng), sample_splits(trailers, cfg.split_fractions, rng))
    return path, folder / "mtgc.csv"


def read_raw(path: Path) -> None:
    """The whole file into one NumPy array with one read: the page cache's bandwidth."""
    with open(path, "rb") as f:
        f.readinto(memoryview(np.empty(path.stat().st_size, np.uint8)))


def warm(path: Path) -> None:
    """Read a file once so that timings see the page cache, as a second run does."""
    with open(path, "rb") as f:
        while f.read(1 << 26):
            pass


def startup(args: argparse.Namespace) -> None:
    """Where the start of `t12k train` goes, step by step, with the package's own functions."""
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        path, meta_path = write_bench_cache(folder, args.startup_trailers, args.startup_dim, args.startup_dtype)
        size = path.stat().st_size
        print(f"\nstart-up of `t12k train`: cache of {args.startup_trailers} trailers, dim {args.startup_dim}, "
              f"{args.startup_dtype}, {size / 2**30:.2f} GiB (written in {time.perf_counter() - t0:.0f} s); "
              f"page cache warm")
        warm(path)
        rows = {}
        rows["[imports of `t12k --help` alone (cli)]"] = import_seconds("cli")
        rows["imports: `t12k train` (cli, training.train)"] = import_seconds("cli, trailers12k_feats.training.train")
        rows["metadata and cache checks"] = best_of(lambda: (load_metadata(meta_path), check_caches([path])))
        fs = cache.load(path)
        rows["HDF5 read (cache.load, finite record trusted)"] = t_read = best_of(lambda: cache.load(path))
        t_raw = best_of(lambda: read_raw(path))
        offsets = fs.offsets.numpy()
        rows["[finiteness scan, caches without the record]"] = t_scan = best_of(
            lambda: cache._check_finite(path, fs.features, offsets, fs.ids))
        t_torch = best_of(lambda: torch.isfinite(fs.features).all(dim=1))
        meta = load_metadata(meta_path)
        present = align(meta, [fs])
        rows["align, split, Trainer"] = best_of(lambda: Trainer(TrainConfig(), _split_data(meta, {"image": fs},
                                                                                        present, 0)))
        data = _split_data(meta, {"image": fs}, present, 0)
        cfg = TrainConfig()
        one = {**data, "train": data["train"].subset(torch.arange(cfg.batch_size))}
        trainer = Trainer(cfg, one)
        rows["first training step"] = best_of(lambda: trainer.train_epoch(), repeat=1)
        t_cmd, _ = fresh_python(["-m", "cli", "train", "--image", str(path), "--metadata", str(meta_path),
                                 "--max-epochs", "1", "--out", str(folder / "run")])
        timed = sum(v for k, v in rows.items() if not k.startswith("["))
        for k, v in rows.items():
            share = "" if k.startswith("[") else f"{v / timed:6.1%}"
            print(f"  {k:50} {v:7.2f} s {share}")
        print(f"  {'sum of the start-up steps (bracketed ones aside)':50} {timed:7.2f} s")
        print(f"  {'whole `t12k train --max-epochs 1` (fresh process)':50} {t_cmd:7.2f} s "
              f"(one epoch of {len(data['train'])} trailers and the evaluation included)")
        print(f"read: {size / t_read / 2**30:.2f} GiB/s, the file read whole with one read() {size / t_raw / 2**30:.2f} "
              f"GiB/s ({t_raw / t_read:.0%}); finiteness scan: {t_scan:.2f} s with NumPy "
              f"vs {t_torch:.2f} s with torch.isfinite ({t_torch / t_scan:.1f}x); "
              f"read + scan {t_read + t_scan:.2f} s vs read alone {t_read:.2f} s")


def corpus_bytes(cfg: SynthConfig) -> float:
    """About how many bytes `make_corpus(cfg)` writes: clips (log-normal counts) x dims x dtype size."""
    clips = cfg.clips_median * np.exp(cfg.clips_sigma ** 2 / 2)  # mean of the log-normal
    itemsize = np.dtype(cfg.dtype).itemsize
    return cfg.num_trailers * clips * sum(STREAMS[s].dim for s in cfg.streams) * itemsize


def probe_speed(args: argparse.Namespace) -> None:
    """The 8 x 3 probe from stored pooled summaries, beside pooling every clip as it did before."""
    corpus = args.corpus
    if not (corpus / "mtgc.csv").exists():
        cfg = SynthConfig(num_trailers=args.trailers)
        need = corpus_bytes(cfg)
        corpus.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(corpus).free
        print(f"\nmaking a synthetic corpus of {args.trailers} trailers in {corpus}: about {need / 2**30:.1f} GiB "
              f"({free / 2**30:.0f} GiB free)")
        if free < 1.2 * need:
            raise SystemExit("not enough free disk; pass a smaller --trailers or another --corpus")
        t0 = time.perf_counter()
        make_corpus(corpus, cfg)
        print(f"corpus made in {time.perf_counter() - t0:.0f} s")
    meta = load_metadata(corpus / "mtgc.csv")
    caches = sorted(corpus.glob("*.h5"))
    size = sum(p.stat().st_size for p in caches)
    print(f"\nlinear probe, 8 rows x 3 splits: {corpus}, {len(meta)} trailers, {len(caches)} caches, "
          f"{size / 2**30:.2f} GiB")
    cfg = ProbeConfig(corpus / "mtgc.csv", corpus)
    t0 = time.perf_counter()
    probe(cfg, progress=False)  # adds the summaries to caches of an older version, once
    t_first = time.perf_counter() - t0
    cpu0 = time.process_time()
    t_probe = best_of(lambda: probe(cfg, progress=False))
    cpu = (time.process_time() - cpu0) / 3  # CPU seconds per probe, all threads: less sensitive to other jobs
    t_cmd, _ = fresh_python(["-m", "cli", "probe", "--data-dir", str(corpus)], repeat=2)
    print(f"  first probe (adds missing summaries, once)       {t_first:7.2f} s")
    print(f"  probe() from stored summaries                    {t_probe:7.2f} s  ({cpu:.2f} CPU s)")
    print(f"  `t12k probe` (fresh process, imports included)   {t_cmd:7.2f} s")
    if args.skip_clip_pooling:
        return
    t_pool = 0.0
    for p in caches:
        t0 = time.perf_counter()
        pool_features(cache.load(p), "mean")
        t_pool += time.perf_counter() - t0
    print(f"  pooling every clip (cache.load + pool_features, the probe's first step before) {t_pool:7.2f} s "
          f"= {t_pool / t_probe:.1f}x the whole probe now")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=1024, help="feature dim of the single-stream tsfm head")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--window", type=int, default=30)
    ap.add_argument("--clips", type=int, default=600_000, help="clips in the in-RAM feature bank")
    ap.add_argument("--steps", type=int, default=20, help="training steps per timed epoch")
    ap.add_argument("--seconds", type=float, default=5.0, help="timing per measurement")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--sections", default="throughput,startup",
                    help=f"comma-separated, of {', '.join(SECTIONS)} (probe may first make an 8 GB corpus)")
    ap.add_argument("--startup-trailers", type=int, default=2100, help="trailers of the start-up cache")
    ap.add_argument("--startup-dim", type=int, default=2048, help="feature dim of the start-up cache")
    ap.add_argument("--startup-dtype", default="float32", choices=cache.DTYPES)
    ap.add_argument("--tmp", type=Path, default=None, help="folder for the start-up cache [default: the system's]")
    ap.add_argument("--corpus", type=Path, default=Path("cache/synth"), help="synthetic corpus of the probe section")
    ap.add_argument("--trailers", type=int, default=SynthConfig.num_trailers,
                    help="trailers of the corpus when it has to be made")
    ap.add_argument("--skip-clip-pooling", action="store_true", help="probe: do not time pooling every clip")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sections = args.sections.split(",")
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; valid: {', '.join(SECTIONS)}")
    if "throughput" not in sections:
        print(cpu_summary())
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
        return run_io_sections(args, sections)
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
    choice, speed = auto_training(train, B, S)
    auto_ok = report_auto({r[0]: r[1] for r in results}, choice, speed)
    run_io_sections(args, sections)
    if not auto_ok:
        sys.exit(1)


def run_io_sections(args: argparse.Namespace, sections: list[str]) -> None:
    if "startup" in sections:
        startup(args)
    if "probe" in sections:
        probe_speed(args)


if __name__ == "__main__":
    main()
