"""Each trailer's clips pooled into one vector: the input of the linear probe and of embedding plots.

A cache written by this version stores the pooled summaries (the mean and the max of each
trailer's clips, :data:`cache.POOLED`), so reading them touches no clip. For an older cache
:func:`load_pooled` computes them once, in one pass over its clips, and stores them in the
file (:func:`cache.store_pooled`, which replaces the file atomically); a cache it cannot write
is pooled again on each use. :func:`pool_features` pools a feature set already in RAM.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trailers12k_feats import cache as cache_mod
from trailers12k_feats.cache import FeatureSet
from trailers12k_feats.utils import T12kError

log = logging.getLogger(__name__)

POOLS = ("mean", "meanmax")  # mean of the clips, or mean and max concatenated


def reductions(pool: str) -> tuple[str, ...]:
    """The stored summaries (keys of :data:`cache.POOLED`) that pooling `pool` concatenates."""
    if pool not in POOLS:
        raise T12kError(f"unknown pooling {pool!r}; valid: {', '.join(POOLS)}.")
    return ("mean", "max") if pool == "meanmax" else ("mean",)


@dataclass
class PooledSet:
    """The pooled vectors of every trailer of one cache, in file order."""

    path: Path
    ids: list[str]
    features: np.ndarray  # (n, F) for mean, (n, 2F) for meanmax; float32

    def __post_init__(self) -> None:
        self.index = {tid: i for i, tid in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)


def pool_features(fs: FeatureSet, pool: str = "mean", chunk: int = 1 << 18) -> np.ndarray:
    """(n, F) mean or (n, 2F) mean+max of each trailer's clips of a feature set in RAM."""
    lengths = fs.lengths
    reds = reductions(pool)
    out = np.empty((len(fs), fs.feature_dim * len(reds)), np.float32)
    # Whole trailers per chunk of clips, so a float32 copy never holds the whole cache.
    t0 = 0
    while t0 < len(fs):
        t1 = int(np.searchsorted(fs.offsets.numpy(), int(fs.offsets[t0]) + chunk, side="right")) - 1
        t1 = max(t1, t0 + 1)
        pooled = cache_mod.pool_clips(fs.features[fs.offsets[t0]:fs.offsets[t1]], lengths[t0:t1], reds)
        out[t0:t1] = np.concatenate([pooled[r] for r in reds], 1)  # (t1 - t0, F * len(reds))
        t0 = t1
    return out


def compute_pooled(path: str | os.PathLike, max_rows: int = 1 << 16) -> tuple[list[str], dict[str, np.ndarray]]:
    """(ids, {"mean", "max": (n, F) float32}) of a cache, computed in one pass over its clips
    (blocks of about `max_rows` clips; every value is checked finite on the way)."""
    ids: list[str] = []
    parts: list[dict[str, np.ndarray]] = []
    for block_ids, lengths, clips in cache_mod.iter_blocks(path, max_rows):
        ids += block_ids
        parts.append(cache_mod.pool_clips(clips, lengths))
    F = cache_mod.read_attrs(path).feature_dim
    return ids, {r: np.concatenate([p[r] for p in parts]) if parts else np.empty((0, F), np.float32)
                 for r in cache_mod.POOLED}


def load_pooled(path: str | os.PathLike, pool: str = "mean") -> PooledSet:
    """The pooled vectors (`pool`: mean, or mean and max concatenated) of every trailer of a cache.

    Read from the summaries the cache stores; a cache without them (written by an older
    version) is pooled once now and the summaries are added to it for next time.
    """
    path = Path(path)
    reds = reductions(pool)
    stored = cache_mod.read_pooled(path, reds)
    if stored is None:
        stored = _add_pooled(path)
    ids, parts = stored
    x = parts[reds[0]] if len(reds) == 1 else np.concatenate([parts[r] for r in reds], axis=1)  # (n, F * k)
    return PooledSet(path, ids, x)


def _add_pooled(path: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """Compute a cache's summaries and store them in it when the file can be written."""
    t0 = time.perf_counter()
    before = path.stat()
    ids, pooled = compute_pooled(path)
    try:
        stored = cache_mod.store_pooled(path, pooled, before)
    except OSError as e:  # a read-only folder, a full disk: pool again next time
        log.warning("could not add pooled summaries to %s (%s); they are computed again on each use", path, e)
        return ids, pooled
    if stored:
        log.info("added pooled summaries to %s (a cache of an older version) in %.1f s", path,
                 time.perf_counter() - t0)
    else:
        log.warning("%s changed while it was pooled; its summaries were not stored", path)
    return ids, pooled
