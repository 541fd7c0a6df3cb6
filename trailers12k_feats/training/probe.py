"""The fast probe: a linear multi-label classifier on pooled clip features, answers in seconds.

Each trailer's clips are pooled per stream (mean, or mean and max concatenated), read from
the summaries each cache stores (pooling.py), so no clip is read; fusion rows concatenate
the two streams' pooled vectors. A standardised ridge regression (one Gram matrix and one
Cholesky solve for all 10 genres) scores the genres; AP metrics only need a ranking, so its
scores are used as they are.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from trailers12k_feats.paper import TABLE6, get_row
from trailers12k_feats.pooling import POOLS, load_pooled
from trailers12k_feats.training.data import SPLITS, align, check_splits, load_metadata
from trailers12k_feats.training.metrics import multilabel_metrics
from trailers12k_feats.training.streams import (
    check_caches,
    resolve_streams,
    stream_cache,
)
from trailers12k_feats.training.tables import format_table, summarise
from trailers12k_feats.utils import T12kError

log = logging.getLogger(__name__)

__all__ = ["POOLS", "ProbeConfig", "fit_predict", "format_probe", "probe"]


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


@dataclass
class _Block:
    """One stream's pooled features in one split, ready for the ridge: the columns of a design."""

    z: np.ndarray  # (n_train, F) training z-scores: (x - mean) * scale
    mean: np.ndarray  # (F,) training mean, float32
    scale: np.ndarray  # (F,) 1 / training std (1 for constant columns), float32
    evals: list[np.ndarray]  # (n_eval, F) features of each evaluated set, as they are
    gram: np.ndarray  # (F, F) z.T @ z
    zy: np.ndarray  # (F, 10) z.T @ (y - mean of y)
    chol: dict[float, torch.Tensor] = field(default_factory=dict)  # alpha -> Cholesky factor of gram + alpha I


def _standardise(x_train: np.ndarray, y_centred: np.ndarray, x_eval: list[np.ndarray]) -> _Block:
    """z-scores of the training set, with StandardScaler's rule that constant columns keep scale 1.

    The variances come from the diagonal of the Gram matrix of the centred columns, which the
    ridge needs anyway (a separate float64 variance pass cost as much as the Gram matrix).
    """
    x_train = np.asarray(x_train, np.float32)
    n, eps = len(x_train), np.finfo(np.float64).eps
    mean = x_train.mean(0, dtype=np.float64)  # (F,)
    shift = mean.astype(np.float32)
    z = x_train - shift  # (n, F) centred
    gram = z.T @ z  # (F, F)
    var = np.diag(gram).astype(np.float64) / n  # (F,)
    constant = var <= n * eps * var + (n * mean * eps) ** 2
    scale = (1 / np.sqrt(np.where(constant, 1.0, var))).astype(np.float32)
    z *= scale
    gram *= scale[:, None]
    gram *= scale[None, :]
    return _Block(z, shift, scale, [np.asarray(x, np.float32) for x in x_eval], gram, z.T @ y_centred)


def _factor(b: _Block, alpha: float) -> torch.Tensor:
    """The lower Cholesky factor of `b.gram + alpha I`, computed once per block."""
    if alpha not in b.chol:
        g = torch.from_numpy(b.gram).clone()
        g.diagonal().add_(alpha)
        # torch's Cholesky (MKL) is several times faster here than SciPy's (OpenBLAS) on the same matrix.
        b.chol[alpha] = torch.linalg.cholesky(g)  # (F, F)
    return b.chol[alpha]


def _ridge(blocks: list[_Block], y_mean: np.ndarray, alpha: float) -> list[np.ndarray]:
    """Fit the ridge on the columns of `blocks` side by side and score each evaluated set.

    The system (Z'Z + alpha I) w = Z'y of side-by-side blocks a | b is solved by block
    Cholesky: the factor of block a alone (shared with the row that uses a alone) and that of
    the Schur complement of b, which is the factor of the whole matrix; so rows that share a
    stream share its Gram matrix and its factorisation. Scoring folds the z-scores into the weights.
    """
    a, rest = blocks[0], blocks[1:]
    la = _factor(a, alpha)  # (Fa, Fa)
    ya = torch.linalg.solve_triangular(la, torch.from_numpy(a.zy), upper=False)  # (Fa, 10)
    if not rest:
        ws = [torch.linalg.solve_triangular(la.T, ya, upper=True).numpy()]
    else:
        dims = np.cumsum([0] + [b.z.shape[1] for b in rest])
        g_ab = np.concatenate([a.z.T @ b.z for b in rest], axis=1)  # (Fa, Fb)
        g_bb = np.empty((dims[-1], dims[-1]), np.float32)  # (Fb, Fb)
        for i, b in enumerate(rest):
            for j, c in enumerate(rest):
                g_bb[dims[i]:dims[i + 1], dims[j]:dims[j + 1]] = b.gram if i == j else b.z.T @ c.z
        g_bb.flat[::dims[-1] + 1] += np.float32(alpha)
        cross = torch.linalg.solve_triangular(la, torch.from_numpy(g_ab), upper=False)  # (Fa, Fb)
        lb = torch.linalg.cholesky(torch.from_numpy(g_bb) - cross.T @ cross)  # (Fb, Fb) Schur complement
        zy_b = torch.from_numpy(np.concatenate([b.zy for b in rest]))  # (Fb, 10)
        yb = torch.linalg.solve_triangular(lb, zy_b - cross.T @ ya, upper=False)
        wb = torch.linalg.solve_triangular(lb.T, yb, upper=True)  # (Fb, 10)
        wa = torch.linalg.solve_triangular(la.T, ya - cross @ wb, upper=True)  # (Fa, 10)
        ws = [wa.numpy()] + [wb[dims[i]:dims[i + 1]].numpy() for i in range(len(rest))]
    ws = [b.scale[:, None] * w for b, w in zip(blocks, ws)]  # (F_b, 10) weights on the features
    bias = y_mean - sum(b.mean @ w for b, w in zip(blocks, ws))  # (10,)
    return [(sum(b.evals[e] @ w for b, w in zip(blocks, ws)) + bias).astype(np.float64)
            for e in range(len(a.evals))]


def fit_predict(x_train: np.ndarray, y_train: np.ndarray, x_eval: list[np.ndarray], alpha: float) -> list[np.ndarray]:
    """Fit a standardised multi-output ridge and score each array of `x_eval`.

    The model of scikit-learn's ``make_pipeline(StandardScaler(), Ridge(alpha, solver="cholesky"))``
    on float32 features, computed as it does (z-scores, one Gram matrix and a Cholesky solve in
    float32; equal up to float rounding) without its input checks and copies, which cost more
    than the solve.
    """
    y = y_train.astype(np.float32)  # (n, 10)
    y_mean = y.mean(0)
    return _ridge([_standardise(x_train, y - y_mean, x_eval)], y_mean, alpha)


def probe(cfg: ProbeConfig, progress: bool = True) -> dict[str, list[dict]]:
    """The probe over the selected rows and splits: {"val": [...], "test": [...]} as in val.csv."""
    meta = load_metadata(cfg.metadata)
    meta.check_splits(cfg.splits)
    for r in cfg.rows:  # dims and fused clip settings, before any pooling
        check_caches(resolve_streams(cfg.cache_dir, row=r).values(), cfg.allow_mismatched_clips)
    streams = sorted({s for r in cfg.rows for s in TABLE6[r].streams})
    pooled = {}
    t0 = time.perf_counter()
    for s in tqdm(streams, desc="pool", unit="cache", disable=not progress, leave=False):
        ps = load_pooled(stream_cache(cfg.cache_dir, s), cfg.pool)
        align(meta, [ps], cfg.on_missing)
        pooled[s] = ps
    log.info("read the %s-pooled features of %d streams in %.1f s", cfg.pool, len(streams), time.perf_counter() - t0)
    present = np.array([all(t in pooled[s].index for s in streams) for t in meta.ids])
    results = {}
    bar = tqdm(total=len(cfg.rows) * len(cfg.splits), desc="probe", unit="run", disable=not progress, leave=False)
    for split in cfg.splits:  # each stream standardised and factorised once per split, for every row using it
        subsets = {n: meta.subset(split, n) for n in ("train", "val", "test")}
        subsets = {n: r[present[r]] for n, r in subsets.items()}
        y = meta.labels[subsets["train"]].astype(np.float32)  # (n_train, 10)
        y_mean = y.mean(0)
        blocks: dict[str, _Block] = {}
        for row_name in cfg.rows:
            for s in TABLE6[row_name].streams:
                if s not in blocks:
                    x, where = pooled[s].features, pooled[s].index
                    rows = {n: [where[meta.ids[i]] for i in r] for n, r in subsets.items()}
                    blocks[s] = _standardise(x[rows["train"]], y - y_mean, [x[rows["val"]], x[rows["test"]]])
            scores = _ridge([blocks[s] for s in TABLE6[row_name].streams], y_mean, cfg.alpha)
            results[row_name, split] = {subset: multilabel_metrics(meta.labels[subsets[subset]], sc)
                                        for subset, sc in zip(("val", "test"), scores)}
            bar.update()
    bar.close()
    table: dict[str, list[dict]] = {"val": [], "test": []}
    for row_name in cfg.rows:
        for split in cfg.splits:
            for subset in ("val", "test"):
                table[subset].append({"run": row_name, "split": split, "epoch": 0, **results[row_name, split][subset]})
    log.info("probe: %d runs in %.1f s", len(results), time.perf_counter() - t0)
    return table


def format_probe(table: dict[str, list[dict]], pool: str) -> str:
    """The test metrics of a `probe` table, mean and std over splits beside the paper's, as
    `t12k probe` prints them; `pool`: the pooling the table was made with."""
    return format_table(summarise(table["test"]), f"test, linear probe on {pool}-pooled features")
