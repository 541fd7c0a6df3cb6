"""The fast probe: a linear multi-label classifier on pooled clip features, answers in seconds.

Each trailer's clips are pooled once per stream (mean, or mean and max concatenated);
fusion rows concatenate the two streams' pooled vectors. A standardised ridge
regression (scikit-learn, one solve for all 10 genres) scores the genres; AP metrics
only need a ranking, so its scores are used as they are.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from tqdm import tqdm

from trailers12k_feats import cache as cache_mod
from trailers12k_feats.cache import FeatureSet
from trailers12k_feats.paper import TABLE6, get_row
from trailers12k_feats.training.data import SPLITS, align, check_splits, load_metadata
from trailers12k_feats.training.metrics import multilabel_metrics
from trailers12k_feats.training.streams import (
    check_caches,
    resolve_streams,
    stream_cache,
)
from trailers12k_feats.utils import T12kError

log = logging.getLogger(__name__)

POOLS = ("mean", "meanmax")


@dataclass(frozen=True)
class ProbeConfig:
    """Rows, splits, pooling and ridge penalty of a probe table."""

    metadata: Path
    cache_dir: Path
    rows: tuple[str, ...] = tuple(TABLE6)
    splits: tuple[int, ...] = SPLITS
    pool: str = "mean"
    alpha: float = 1000.0  # ridge penalty on standardised features
    on_missing: str = "error"
    allow_mismatched_clips: bool = False  # fusion rows: pool streams whose fps, fpc or segmentation differ

    def __post_init__(self) -> None:
        object.__setattr__(self, "rows", tuple(get_row(r).name for r in self.rows))
        if self.pool not in POOLS:
            raise T12kError(f"unknown pooling {self.pool!r}; valid: {', '.join(POOLS)}.")
        if self.alpha <= 0:
            raise T12kError(f"alpha must be positive, got {self.alpha}.")
        if not self.rows:
            raise T12kError("select at least one Table 6 row.")
        object.__setattr__(self, "splits", check_splits(self.splits))


def pool_features(fs: FeatureSet, pool: str = "mean", chunk: int = 1 << 18) -> np.ndarray:
    """(n, F) mean or (n, 2F) mean+max of each trailer's clips."""
    lengths = fs.lengths
    reductions = ("mean", "max") if pool == "meanmax" else ("mean",)
    out = np.empty((len(fs), fs.feature_dim * len(reductions)), np.float32)
    # Whole trailers per chunk of clips, so a float32 copy never holds the whole cache.
    t0 = 0
    while t0 < len(fs):
        t1 = int(np.searchsorted(fs.offsets.numpy(), int(fs.offsets[t0]) + chunk, side="right")) - 1
        t1 = max(t1, t0 + 1)
        x = fs.features[fs.offsets[t0]:fs.offsets[t1]].float()  # (clips, F)
        parts = [torch.segment_reduce(x, r, lengths=lengths[t0:t1], axis=0) for r in reductions]
        out[t0:t1] = torch.cat(parts, 1).numpy()  # (t1 - t0, F * len(reductions))
        t0 = t1
    return out


def fit_predict(x_train: np.ndarray, y_train: np.ndarray, x_eval: list[np.ndarray], alpha: float) -> list[np.ndarray]:
    """Fit a standardised multi-output ridge and score each array of `x_eval`."""
    model = make_pipeline(StandardScaler(), Ridge(alpha=alpha, solver="cholesky"))
    model.fit(x_train, y_train.astype(np.float32))
    return [model.predict(x).astype(np.float64) for x in x_eval]


def probe(cfg: ProbeConfig, progress: bool = True) -> dict[str, list[dict]]:
    """The probe over the selected rows and splits: {"val": [...], "test": [...]} as in val.csv."""
    meta = load_metadata(cfg.metadata)
    meta.check_splits(cfg.splits)
    for r in cfg.rows:  # dims and fused clip settings, before any pooling
        check_caches(resolve_streams(cfg.cache_dir, row=r).values(), cfg.allow_mismatched_clips)
    streams = sorted({s for r in cfg.rows for s in TABLE6[r].streams})
    pooled, index = {}, {}
    t0 = time.perf_counter()
    for s in tqdm(streams, desc="pool", unit="cache", disable=not progress, leave=False):
        fs = cache_mod.load(stream_cache(cfg.cache_dir, s))
        align(meta, [fs], cfg.on_missing)
        pooled[s] = pool_features(fs, cfg.pool)
        index[s] = fs.index
        del fs
    log.info("pooled %d streams in %.1f s", len(streams), time.perf_counter() - t0)
    present = np.array([all(t in index[s] for s in streams) for t in meta.ids])
    table: dict[str, list[dict]] = {"val": [], "test": []}
    jobs = [(r, k) for r in cfg.rows for k in cfg.splits]
    for row_name, split in tqdm(jobs, desc="probe", unit="run", disable=not progress, leave=False):
        row = TABLE6[row_name]
        subsets = {n: meta.subset(split, n) for n in ("train", "val", "test")}
        subsets = {n: r[present[r]] for n, r in subsets.items()}

        def feats(rows: np.ndarray) -> np.ndarray:
            ids = [meta.ids[i] for i in rows]
            return np.concatenate([pooled[s][[index[s][t] for t in ids]] for s in row.streams], 1)

        scores = fit_predict(feats(subsets["train"]), meta.labels[subsets["train"]],
                             [feats(subsets["val"]), feats(subsets["test"])], cfg.alpha)
        for subset, sc in zip(("val", "test"), scores):
            m = multilabel_metrics(meta.labels[subsets[subset]], sc)
            table[subset].append({"run": row_name, "split": split, "epoch": 0, **m})
    log.info("probe: %d runs in %.1f s", len(jobs), time.perf_counter() - t0)
    return table
