"""Looking at a feature cache: trailer embeddings, projections, neighbours, clip trajectories.

The helpers behind `notebooks/explore_embeddings.ipynb`, kept here so the notebook stays
thin and the analysis is tested. Figures are built without pyplot (see plots.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE
from sklearn.preprocessing import StandardScaler

from trailers12k_feats import GENRES, GENRES_SHORT
from trailers12k_feats.cache import FeatureSet
from trailers12k_feats.pooling import pool_features
from trailers12k_feats.utils import T12kError

__all__ = ["trailer_embeddings", "project", "nearest_neighbours", "cooccurrence", "Trajectory", "clip_trajectory",
           "embedding_figure", "cooccurrence_figure", "trajectory_figure"]

METHODS = ("pca", "tsne")


def trailer_embeddings(fs: FeatureSet, ids: Sequence[str] | None = None, pool: str = "mean") -> np.ndarray:
    """(n, F) mean of each trailer's clips (`pool="meanmax"`: (n, 2F) mean and max), in `ids` order."""
    x = pool_features(fs, pool)
    if ids is None:
        return x
    missing = [t for t in ids if t not in fs.index]
    if missing:
        raise T12kError(f"{len(missing)} trailers (e.g. {missing[0]}) are not in cache {fs.path}; "
                        f"pass ids that the cache holds.")
    return x[[fs.index[t] for t in ids]]


def project(x: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
    """(n, 2) projection of standardised rows of `x` by PCA or t-SNE (after PCA to 50 dims)."""
    x = np.asarray(x, np.float64)
    if method not in METHODS:
        raise T12kError(f"unknown projection {method!r}; valid: {', '.join(METHODS)}.")
    if x.ndim != 2 or len(x) < 5:
        raise T12kError(f"need a 2-D array of at least 5 trailers to project, got shape {x.shape}.")
    z = StandardScaler().fit_transform(x)
    if method == "pca":
        return PCA(2, random_state=seed).fit_transform(z)
    # PCA first: t-SNE on 50 components is as good and far cheaper than on 768-2048 dims.
    z = PCA(min(50, *z.shape), random_state=seed).fit_transform(z)
    perplexity = float(min(30.0, (len(z) - 1) / 3))
    return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(z)


def nearest_neighbours(x: np.ndarray, ids: Sequence[str], query: str, k: int = 5) -> list[tuple[str, float]]:
    """The `k` trailers most similar to `query`: (id, cosine similarity of centred embeddings)."""
    ids = list(ids)
    if query not in ids:
        raise T12kError(f"trailer {query} is not among the {len(ids)} embedded trailers; pick one of them.")
    # Centring removes the offset every trailer shares, which would make all cosines near 1.
    z = np.asarray(x, np.float64) - np.mean(x, axis=0)
    z /= np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    q = ids.index(query)
    sim = z @ z[q]
    sim[q] = -np.inf
    best = np.argsort(-sim, kind="stable")[:k]
    return [(ids[i], float(sim[i])) for i in best]


def cooccurrence(labels: np.ndarray, normalize: str | None = None) -> np.ndarray:
    """(G, G) genre co-occurrence of (n, G) 0/1 labels.

    `normalize`: None gives counts (the diagonal is each genre's count); "row" gives
    P(column genre | row genre); "jaccard" gives |A and B| / |A or B|.
    """
    y = np.asarray(labels, np.float64)
    c = y.T @ y
    if normalize is None:
        return c
    d = np.diag(c)
    if normalize == "row":
        return c / np.maximum(d[:, None], 1)
    if normalize == "jaccard":
        return c / np.maximum(d[:, None] + d[None, :] - c, 1)
    raise T12kError(f"unknown normalize {normalize!r}; valid: None, 'row', 'jaccard'.")


@dataclass
class Trajectory:
    """One trailer's clips over time, projected on their own first two principal components."""

    tid: str
    time: np.ndarray  # (C,) clip start in seconds (clip index where the cache has no times)
    xy: np.ndarray  # (C, 2)
    shot: np.ndarray  # (C,) shot index, -1 unknown
    cuts: np.ndarray  # indices c where clip c starts a new shot
    explained: np.ndarray  # (2,) share of the trailer's clip variance on each axis


def clip_trajectory(fs: FeatureSet, tid: str) -> Trajectory:
    """The path of trailer `tid`'s clip embeddings over time, with its shot cuts."""
    x = fs.trailer(tid).float().numpy()  # (C, F)
    i = fs.index[tid]
    a, b = int(fs.offsets[i]), int(fs.offsets[i + 1])
    start, shot = np.asarray(fs.clip_start[a:b], np.float64), np.asarray(fs.shot[a:b])
    time = start if np.isfinite(start).all() else np.arange(len(x), dtype=np.float64)
    xy, explained = np.zeros((len(x), 2)), np.zeros(2)
    if len(x) > 1:
        n = min(2, len(x) - 1)
        pca = PCA(n).fit(x)
        xy[:, :n], explained[:n] = pca.transform(x), pca.explained_variance_ratio_
    known = (shot[1:] >= 0) & (shot[:-1] >= 0)
    cuts = np.flatnonzero(known & (shot[1:] != shot[:-1])) + 1
    return Trajectory(tid, time, xy, shot, cuts, explained)


def embedding_figure(xy: np.ndarray, labels: np.ndarray, genres: Sequence[str] = GENRES,
                     title: str = "Trailer embeddings") -> Figure:
    """Small multiples, one per genre: every trailer in grey, that genre's trailers in colour.

    Trailers have several genres, so one colour per point would hide most of them.
    """
    xy, y = np.asarray(xy), np.asarray(labels)
    ncols = 5
    nrows = -(-len(genres) // ncols)
    fig = Figure(figsize=(3 * ncols, 3 * nrows + 0.4), layout="constrained")
    axes = fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False).ravel()
    size = float(np.clip(3000 / max(len(xy), 1), 2, 20))
    for j, (ax, g) in enumerate(zip(axes, genres)):
        pos = y[:, j] > 0
        ax.scatter(xy[~pos, 0], xy[~pos, 1], s=size, c="lightgray", lw=0)
        ax.scatter(xy[pos, 0], xy[pos, 1], s=size, color=f"C{j % 10}", lw=0)
        ax.set_title(f"{g} ({int(pos.sum())})", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[len(genres):]:
        ax.set_axis_off()
    fig.suptitle(f"{title}: each panel colours one genre's trailers")
    return fig


def cooccurrence_figure(matrix: np.ndarray, genres: Sequence[str] = GENRES_SHORT,
                        title: str = "Genre co-occurrence") -> Figure:
    """Heatmap of a co-occurrence matrix, values written in the cells."""
    m = np.asarray(matrix, np.float64)
    fig = Figure(figsize=(7, 6), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(m, cmap="viridis")
    fig.colorbar(im, ax=ax, shrink=0.8)
    ticks = np.arange(len(genres))
    ax.set_xticks(ticks, genres)
    ax.set_yticks(ticks, genres)
    fmt = "{:.0f}" if np.allclose(m, np.round(m)) else "{:.2f}"
    hi = np.nanmax(m) if m.size else 0
    for (i, j), v in np.ndenumerate(m):
        ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=7, color="k" if v > 0.6 * hi else "w")
    ax.set_title(title)
    return fig


def trajectory_figure(t: Trajectory, title: str | None = None) -> Figure:
    """Left: the clip path in its PCA plane, coloured by time; right: both axes over time.

    Shot cuts are marked: crosses on the path, vertical lines over time.
    """
    fig = Figure(figsize=(12, 4.2), layout="constrained")
    ax_path, ax_time = fig.subplots(1, 2, width_ratios=(1, 1.6))
    ax_path.plot(t.xy[:, 0], t.xy[:, 1], color="lightgray", lw=0.8, zorder=1)
    sc = ax_path.scatter(t.xy[:, 0], t.xy[:, 1], c=t.time, cmap="viridis", s=18, zorder=2)
    if len(t.cuts):
        ax_path.scatter(t.xy[t.cuts, 0], t.xy[t.cuts, 1], marker="x", color="tab:red", s=30, zorder=3,
                        label="first clip of a shot")
        ax_path.legend(fontsize=8)
    fig.colorbar(sc, ax=ax_path, label="time (s)")
    ax_path.set(xlabel=f"PC1 ({100 * t.explained[0]:.0f}% var)", ylabel=f"PC2 ({100 * t.explained[1]:.0f}% var)",
                title="clip embeddings, PCA of this trailer")
    for k, name in enumerate(("PC1", "PC2")):
        ax_time.plot(t.time, t.xy[:, k], marker=".", lw=1, label=name)
    for c in t.cuts:
        ax_time.axvline(t.time[c], color="tab:red", lw=0.6, alpha=0.5)
    ax_time.set(xlabel="time (s)", ylabel="projection", title=f"over time; red lines: {len(t.cuts)} shot cuts")
    ax_time.legend(fontsize=8)
    fig.suptitle(title or f"Clip trajectory of {t.tid} ({len(t.time)} clips)")
    return fig
