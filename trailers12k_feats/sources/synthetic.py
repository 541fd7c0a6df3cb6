"""A Trailers12k-shaped synthetic corpus: metadata with 3 splits and one cache per Table 6 stream.

The generative model, per trailer:

* Genres from correlated latent Gaussians thresholded at realistic priors (action with
  adventure and sci-fi, crime with thriller, comedy with romance, ...), at least one genre.
* Clip counts from a log-normal (median ~50; some trailers shorter than one 30-clip window).
* Two latent views per clip, "appearance" and "motion" (``latent_dim`` each). Each holds
  trailer-level nuisance (style), clip-level nuisance, and genre evidence of two kinds:
  *persistent* evidence (a genre direction present in every clip, visible to averaging) and
  *sparse* evidence (a genre direction pushed up in a few clips and down by a matching
  amount in the rest: it cancels in a plain average, so only a per-clip nonlinearity
  before pooling finds it).
  A per-trailer clarity factor makes some trailers ambiguous, so no head reaches 100 AP.
* Each stream mixes the views through fixed random matrices with its own gains and noise:
  image (``i_``) streams see appearance well and motion poorly, video (``k_``) streams the
  reverse, ``ik_swin`` both. Genres lean on one view or the other, so fusing an image and
  a video stream helps, and noisier streams are weaker.
"""

from __future__ import annotations

import collections
import logging
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from trailers12k_feats import GENRES, NUM_GENRES
from trailers12k_feats.cache import CacheAttrs, CacheWriter
from trailers12k_feats.paper import STREAMS
from trailers12k_feats.runtime import usable_cores
from trailers12k_feats.training.data import write_metadata
from trailers12k_feats.utils import T12kError, config_dict, write_json

log = logging.getLogger(__name__)

# Approximate genre shares of Trailers12k-like movie catalogues (order of GENRES).
PRIORS = (0.30, 0.20, 0.35, 0.20, 0.50, 0.12, 0.15, 0.20, 0.12, 0.30)
# Latent correlations between genres (pairs not listed are independent).
CORRELATIONS = {
    ("action", "adventure"): 0.5, ("action", "sci-fi"): 0.4, ("action", "thriller"): 0.3,
    ("action", "crime"): 0.2, ("adventure", "fantasy"): 0.5, ("adventure", "sci-fi"): 0.3,
    ("crime", "thriller"): 0.5, ("crime", "drama"): 0.2, ("horror", "thriller"): 0.4,
    ("comedy", "romance"): 0.4, ("drama", "romance"): 0.4, ("comedy", "horror"): -0.3,
    ("comedy", "drama"): -0.2, ("comedy", "thriller"): -0.3, ("fantasy", "horror"): 0.1,
}
# How poorly each stream sees the (appearance, motion) views: latent noise added to each
# view before mixing (per trailer and per clip), so pooling cannot average it away.
STREAM_VIEWS = {
    "i_shufflenet": (0.6, 2.0),
    "k_shufflenet": (2.0, 1.6),
    "i_resnet": (0.7, 2.0),
    "k_r2plus1d": (2.0, 0.5),
    "i_swin": (0.5, 1.5),
    "ik_swin": (0.6, 0.7),
}


@dataclass(frozen=True)
class SynthConfig:
    """Settings of the synthetic corpus (defaults give the 12,000-trailer benchmark corpus)."""

    num_trailers: int = 12000
    seed: int = 0
    streams: tuple[str, ...] = tuple(STREAMS)
    clips_median: float = 50.0
    clips_sigma: float = 0.45  # log-normal spread of clip counts
    min_clips: int = 4
    max_clips: int = 240
    latent_dim: int = 48
    persistent: float = 3.5  # strength of genre evidence present in every clip
    sparse: float = 16.0  # strength of genre evidence concentrated in a few clips
    sparse_fraction: float = 0.15  # share of a positive trailer's clips carrying sparse evidence
    clarity: tuple[float, float] = (0.1, 1.2)  # per-trailer evidence multiplier, uniform range
    style: float = 0.5  # trailer-level nuisance
    feature_noise: float = 0.5  # isotropic per-clip noise of every feature dim
    split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)
    dtype: str = "float16"

    def __post_init__(self) -> None:
        if self.num_trailers < 30:
            raise T12kError(f"num_trailers must be at least 30 so every split has train/val/test "
                            f"trailers, got {self.num_trailers}.")
        unknown = [s for s in self.streams if s not in STREAMS]
        if unknown or not self.streams:
            raise T12kError(f"unknown synthetic streams {unknown}; valid streams: {', '.join(STREAMS)}.")
        if not 1 <= self.min_clips <= self.max_clips:
            raise T12kError(f"need 1 <= min_clips <= max_clips, got {self.min_clips} and {self.max_clips}.")
        if abs(sum(self.split_fractions) - 1) > 1e-6 or min(self.split_fractions) <= 0:
            raise T12kError(f"split_fractions must be three positive numbers summing to 1, got {self.split_fractions}.")


def sample_labels(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 10) multi-hot genres with the priors and correlations above, at least one each."""
    corr = np.eye(NUM_GENRES)
    for (a, b), r in CORRELATIONS.items():
        i, j = GENRES.index(a), GENRES.index(b)
        corr[i, j] = corr[j, i] = r
    L = np.linalg.cholesky(corr)
    z = rng.standard_normal((n, NUM_GENRES)) @ L.T  # (n, 10) correlated
    from statistics import NormalDist
    thr = np.array([NormalDist().inv_cdf(1 - p) for p in PRIORS])
    y = (z > thr).astype(np.uint8)
    none = y.sum(1) == 0
    y[none, np.argmax(z[none] - thr, axis=1)] = 1  # the genre closest to its threshold
    return y


def sample_splits(n: int, fractions: tuple[float, float, float], rng: np.random.Generator) -> np.ndarray:
    """(n, 3) split columns: 0 train, 1 val, 2 test, an independent shuffle per split."""
    splits = np.empty((n, 3), np.int8)
    n_val, n_test = round(n * fractions[1]), round(n * fractions[2])
    for k in range(3):
        perm = rng.permutation(n)
        col = np.zeros(n, np.int8)
        col[perm[:n_val]] = 1
        col[perm[n_val:n_val + n_test]] = 2
        splits[:, k] = col
    return splits


class _Generator:
    """Fixed random structure of the corpus (directions, mixing matrices)."""

    def __init__(self, cfg: SynthConfig, rng: np.random.Generator) -> None:
        K = cfg.latent_dim
        self.cfg = cfg
        unit = lambda *s: (lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True))(rng.standard_normal(s))
        # Genre directions per view: persistent and sparse kinds (10, K) each.
        self.persist = unit(2, NUM_GENRES, K)
        self.sparse = unit(2, NUM_GENRES, K)
        # How much of each genre's evidence lives in appearance vs motion (sums to 1 per genre),
        # and how much is persistent vs sparse.
        app = rng.uniform(0.15, 0.85, NUM_GENRES)
        self.view_share = np.stack([app, 1 - app])  # (2, 10)
        self.persist_share = rng.uniform(0.3, 0.9, NUM_GENRES)  # (10,)
        self.mix = {}
        for s in cfg.streams:
            F = STREAMS[s].dim
            W = rng.standard_normal((2 * K, F)) / np.sqrt(2 * K)  # (2K, F)
            scale = np.exp(rng.normal(0.0, 0.5, F))  # per-dimension scale, as real features vary
            view_noise = np.repeat(np.asarray(STREAM_VIEWS[s], float), K)  # (2K,)
            self.mix[s] = (W * scale, view_noise, cfg.feature_noise * scale,
                           rng.normal(0.0, 0.5, F) * scale)  # (2K, F), (2K,), (F,), (F,) offset

    def trailer_latents(self, y: np.ndarray, C: int, rng: np.random.Generator) -> np.ndarray:
        """(C, 2K) appearance+motion latents of one trailer with genres `y`."""
        cfg, K = self.cfg, self.cfg.latent_dim
        clarity = rng.uniform(*cfg.clarity)
        z = cfg.style * rng.standard_normal((1, 2, K)) + rng.standard_normal((C, 2, K))  # (C, 2, K)
        pos = np.flatnonzero(y)
        for v in range(2):
            w = clarity * self.view_share[v, pos]  # (P,)
            per = cfg.persistent * (w * self.persist_share[pos]) @ self.persist[v, pos]  # (K,)
            z[:, v] += per * (1 + 0.3 * rng.standard_normal((C, 1)))
            hit = (rng.random((C, len(pos))) < cfg.sparse_fraction).astype(float)  # (C, P) clips carrying it
            hit -= hit.mean(0)  # zero-mean over the trailer: invisible to averaging, visible clip by clip
            amp = cfg.sparse * hit * (w * (1 - self.persist_share[pos]))  # (C, P)
            z[:, v] += amp @ self.sparse[v, pos]  # (C, K)
        return z.reshape(C, 2 * K)

    def stream_features(self, s: str, z: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        W, view_noise, noise, offset = self.mix[s]
        z = z + view_noise * (rng.standard_normal((1, z.shape[1])) + rng.standard_normal(z.shape))  # (C, 2K)
        x = z @ W + offset  # (C, F)
        x += rng.standard_normal(x.shape, np.float32) * noise
        return x.astype(np.float32)


class _Trailers:
    """Each trailer's clip times, shots and per-stream features (as the caches store them), from
    its own random stream: the same whichever process makes it and in whatever order."""

    def __init__(self, cfg: SynthConfig, gen: _Generator, labels: np.ndarray, lengths: np.ndarray) -> None:
        self.cfg, self.gen, self.labels, self.lengths = cfg, gen, labels, lengths

    def __call__(self, span: tuple[int, int]) -> list[tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]]:
        out = []
        for i in range(*span):
            trng = np.random.default_rng((self.cfg.seed, i))  # per-trailer stream: order-independent
            C = int(self.lengths[i])
            z = self.gen.trailer_latents(self.labels[i], C, trng)
            t0 = np.arange(C, dtype=np.float32) * 1.0  # fpc 24 at 24 fps: one second per clip
            shot = np.cumsum(trng.random(C) < 0.3).astype(np.int32)
            # Converted here (half the bytes to send back); CacheWriter converts nothing twice.
            feats = {s: self.gen.stream_features(s, z, trng).astype(self.cfg.dtype) for s in self.cfg.streams}
            out.append((feats, t0, shot))
        return out


_worker_trailers: _Trailers | None = None
BLAS_THREADS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _init_worker(trailers: _Trailers) -> None:
    global _worker_trailers
    _worker_trailers = trailers


def _make_span(span: tuple[int, int]) -> list:
    return _worker_trailers(span)


def _spans(n: int, trailers: _Trailers, workers: int, chunk: int = 32) -> Iterator[list]:
    """Each `chunk` trailers' (features, times, shots), in trailer order, made by `workers`
    processes (in this one for 1), at most 4 chunks a worker ahead of the caller."""
    spans = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    if workers <= 1:
        yield from map(trailers, spans)
        return
    # One BLAS thread a worker: the matmuls are small, and threads of many workers fighting over
    # the cores (BLAS threads spin while they wait) make it many times slower.
    saved = {k: os.environ.get(k) for k in BLAS_THREADS}
    os.environ.update(dict.fromkeys(BLAS_THREADS, "1"))  # read by the spawned workers as they start
    try:
        pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, (trailers,))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    with pool:
        pending: collections.deque = collections.deque()
        for span in spans:
            pending.append(pool.apply_async(_make_span, (span,)))
            if len(pending) >= 4 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def make_corpus(out_dir: str | os.PathLike, cfg: SynthConfig = SynthConfig(), progress: bool = True,
                workers: int = 1) -> Path:
    """Write `mtgc.csv`, one `<stream>.h5` cache per stream and `synth_config.json` to `out_dir`.
    `workers` processes make the features, 0 for one per usable core (the corpus is the same for
    any number)."""
    if workers < 0:
        raise T12kError(f"workers must be 0 (one per usable core) or more, got {workers}.")
    workers = workers or usable_cores()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    n = cfg.num_trailers
    ids = [f"tt{x:07d}" for x in rng.choice(9_000_000, n, replace=False) + 100_000]
    labels = sample_labels(n, rng)
    splits = sample_splits(n, cfg.split_fractions, rng)
    lengths = np.exp(rng.normal(np.log(cfg.clips_median), cfg.clips_sigma, n)).round().astype(int)
    lengths = lengths.clip(cfg.min_clips, cfg.max_clips)
    trailers = _Trailers(cfg, _Generator(cfg, rng), labels, lengths)
    writers = {}
    try:
        for s in cfg.streams:
            st = STREAMS[s]
            attrs = CacheAttrs(name=s, backbone=st.backbone, feature_dim=st.dim, weights="synthetic",
                               pretraining=st.pretraining, kind=st.kind, fps=24.0, fpc=24, segmentation="shots",
                               source="synthetic", config=config_dict(cfg))
            writers[s] = CacheWriter(out / f"{s}.h5", attrs, dtype=cfg.dtype)
        with tqdm(total=n, desc="synth", unit="trailer", disable=not progress, mininterval=1.0) as bar:
            i = 0
            for chunk in _spans(n, trailers, min(workers, -(-n // 32))):
                for feats, t0, shot in chunk:
                    for s, w in writers.items():
                        w.add(ids[i], feats[s], t0, t0 + 1.0, shot)
                    i += 1
                bar.update(len(chunk))
        for w in writers.values():
            w.close()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    write_metadata(out / "mtgc.csv", ids, labels, splits)
    write_json(out / "synth_config.json", config_dict(cfg))
    log.info("synthetic corpus: %d trailers, streams %s -> %s", n, ", ".join(cfg.streams), out)
    return out
