"""Multi-label AP metrics as the DIViTA / Trailers12k paper reports them.

Every "AP" in the paper (docs/metrics.md) is the area under the precision-recall
curve by the trapezoid rule, i.e. ``sklearn.metrics.auc(recall, precision)`` on
``sklearn.metrics.precision_recall_curve``, NOT ``average_precision_score``. Both are
implemented here in numpy, vectorised over many curves at once so that the
per-trailer (sample) average over thousands of trailers costs a few array passes
instead of thousands of sklearn calls. The step-wise AP (``average_precision_score``)
is also reported, under its own ``ap_*`` names, for comparison with other work.

Convention: a curve with no positives (a genre absent from a split, a trailer with no
genre) has AP 0. sklearn warns and gives recall NaN / 1 there; the paper counts such a
genre as 0, and we use the same rule for samples so that all averages are finite.
"""

from __future__ import annotations

import numpy as np

from trailers12k_feats import GENRES_SHORT, NUM_GENRES

__all__ = [
    "METRIC_KEYS",
    "AP_KEYS",
    "pr_auc",
    "average_precision",
    "multilabel_metrics",
    "metric_columns",
    "format_metrics",
]

# The four headline numbers of the paper's tables, in the order they are printed.
METRIC_KEYS: tuple[str, ...] = ("uAP", "mAP", "wAP", "sAP")
# Step-wise AP (sklearn average_precision_score) variants, reported alongside.
AP_KEYS: tuple[str, ...] = ("ap_micro", "ap_macro", "ap_weighted", "ap_samples")


def _genre_keys(k: int) -> list[str]:
    """Per-genre column names: the paper's short names for 10 genres, else g0..gK-1."""
    return list(GENRES_SHORT) if k == NUM_GENRES else [f"g{i}" for i in range(k)]


def _row_curves(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Trapezoid PR-AUC and step AP of every row of (M, L) labels ``y`` and scores ``s``.

    Each row is one independent curve. Follows sklearn's construction: sort by
    descending score, one curve point per distinct score (taking the cumulative counts
    at the last element of each tie group), prepend the (recall 0, precision 1) point,
    and integrate. sklearn <1.3 cut the curve at the first threshold reaching full
    recall while newer versions keep the rest; the points after that all sit at
    recall 1, so they add zero width and the area is the same either way.
    Rows without positives give 0 for both.
    """
    m, n = s.shape
    if n == 0:
        return np.zeros(m), np.zeros(m)
    # Stable descending order; the order inside a tie group is irrelevant because only
    # the group's last cumulative count is used.
    order = np.argsort(-s, axis=1, kind="stable")
    ss = np.take_along_axis(s, order, axis=1)
    ys = np.take_along_axis(y, order, axis=1)

    tp = np.cumsum(ys, axis=1, dtype=np.float64)
    npos = tp[:, -1]
    # Guard the division; rows with no positives are zeroed at the end.
    denom = np.where(npos > 0, npos, 1.0)[:, None]
    idx = np.arange(n)
    # precision = tp / (tp + fp) and tp + fp = rank + 1 (never 0, so no warnings).
    precision = tp / (idx + 1.0)
    recall = tp / denom

    # Tie groups: a point exists only at the last element of each group of equal scores.
    is_first = np.empty((m, n), dtype=bool)
    is_first[:, 0] = True
    np.not_equal(ss[:, 1:], ss[:, :-1], out=is_first[:, 1:])
    is_last = np.empty((m, n), dtype=bool)
    is_last[:, :-1] = is_first[:, 1:]
    is_last[:, -1] = True

    # The previous curve point of a group's last element is the element just before the
    # group's first one; find it with a running max of group-start indices.
    start = np.maximum.accumulate(np.where(is_first, idx, 0), axis=1)
    prev = start - 1
    has_prev = prev >= 0
    prev_c = np.maximum(prev, 0)
    # Before the first group, the curve starts at sklearn's appended (0, 1) point.
    p_prev = np.where(has_prev, np.take_along_axis(precision, prev_c, axis=1), 1.0)
    r_prev = np.where(has_prev, np.take_along_axis(recall, prev_c, axis=1), 0.0)

    dr = np.where(is_last, recall - r_prev, 0.0)
    area = (dr * (precision + p_prev) * 0.5).sum(axis=1)
    ap = (dr * precision).sum(axis=1)
    has_pos = npos > 0
    return np.where(has_pos, area, 0.0), np.where(has_pos, ap, 0.0)


def _as_binary_vectors(y_true: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate a binary label vector and a score vector and return them as (1, L) rows."""
    y = np.asarray(y_true)
    s = np.asarray(score, dtype=np.float64)
    if y.ndim != 1 or s.ndim != 1 or y.shape != s.shape:
        raise ValueError(
            f"y_true and score must be 1-D arrays of equal length, got shapes {y.shape} "
            f"and {s.shape}; pass one label vector and its matching score vector."
        )
    if not np.isin(y, (0, 1)).all():
        raise ValueError("y_true must contain only 0 and 1; binarise the labels first.")
    if not np.isfinite(s).all():
        raise ValueError("score contains NaN or Inf; check the model outputs before scoring.")
    return y.astype(np.float64)[None, :], s[None, :]


def pr_auc(y_true: np.ndarray, score: np.ndarray) -> float:
    """Trapezoid area under the precision-recall curve (the paper's "AP").

    Equals ``sklearn.metrics.auc(recall, precision)`` with
    ``precision, recall, _ = precision_recall_curve(y_true, score)``; returns 0.0 when
    ``y_true`` has no positives (the paper counts such a genre as 0; sklearn warns).
    """
    y, s = _as_binary_vectors(y_true, score)
    return float(_row_curves(y, s)[0][0])


def average_precision(y_true: np.ndarray, score: np.ndarray) -> float:
    """Step-wise average precision, as ``sklearn.metrics.average_precision_score``.

    Sum over distinct thresholds of (recall increase) x precision; 0.0 without positives.
    """
    y, s = _as_binary_vectors(y_true, score)
    return float(_row_curves(y, s)[1][0])


def _validate_multilabel(y_true: np.ndarray, y_prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Check shapes and values of a multi-label problem; return float64 copies."""
    y = np.asarray(y_true)
    p = np.asarray(y_prob)
    if y.ndim != 2 or p.ndim != 2:
        raise ValueError(
            f"y_true and y_prob must be 2-D (trailers, genres), got {y.ndim}-D and {p.ndim}-D; "
            "reshape them to (N, num_genres)."
        )
    if y.shape != p.shape:
        raise ValueError(
            f"y_true and y_prob must have the same shape, got {y.shape} and {p.shape}; "
            "pass labels and scores for the same trailers and genres."
        )
    if y.shape[0] < 1 or y.shape[1] < 1:
        raise ValueError(
            f"need at least one trailer and one genre, got shape {y.shape}; "
            "check that the split is not empty."
        )
    if not np.issubdtype(p.dtype, np.number) and p.dtype != np.bool_:
        raise ValueError(f"y_prob must be numeric, got dtype {p.dtype}; pass the model scores.")
    p = p.astype(np.float64, copy=False)
    if not np.isin(y, (0, 1)).all():
        raise ValueError("y_true must contain only 0 and 1; binarise the genre labels first.")
    if not np.isfinite(p).all():
        raise ValueError(
            "y_prob contains NaN or Inf; check the model outputs (e.g. a diverged run) before scoring."
        )
    return y.astype(np.float64), p


def multilabel_metrics(y_true: np.ndarray, y_prob: np.ndarray) -> dict[str, float]:
    """The paper's multi-label metrics, all x100 (percent).

    Keys: ``uAP`` (micro: one curve over all flattened (trailer, genre) pairs), ``mAP``
    (macro: mean of per-genre values, a genre without positives counts 0), ``wAP``
    (per-genre values weighted by each genre's share of all positives, so a genre
    without positives has weight 0), ``sAP`` (mean over trailers of the value over that
    trailer's genres; a trailer without positives counts 0), one key per genre (short
    names ``act`` .. ``thr`` when there are 10 genres, else ``g0`` ..), and the step-wise
    AP variants ``ap_micro``, ``ap_macro``, ``ap_weighted``, ``ap_samples`` (equal to
    sklearn ``average_precision_score`` with that ``average`` wherever sklearn defines it).
    All AP values here are trapezoid PR-AUC (see ``pr_auc``) unless named ``ap_*``.
    """
    y, p = _validate_multilabel(y_true, y_prob)
    k = y.shape[1]

    micro_auc, micro_ap = _row_curves(y.reshape(1, -1), p.reshape(1, -1))
    # Genres as rows: one (K, N) batch; trailers as rows: one (N, K) batch.
    genre_auc, genre_ap = _row_curves(np.ascontiguousarray(y.T), np.ascontiguousarray(p.T))
    sample_auc, sample_ap = _row_curves(y, p)

    support = y.sum(axis=0)
    total = support.sum()
    if total > 0:
        w = support / total
        w_auc, w_ap = float(w @ genre_auc), float(w @ genre_ap)
    else:
        # No positives anywhere: every per-genre value is 0 anyway (sklearn returns 0 too).
        w_auc = w_ap = 0.0

    out: dict[str, float] = {
        "uAP": 100.0 * float(micro_auc[0]),
        "mAP": 100.0 * float(genre_auc.mean()),
        "wAP": 100.0 * w_auc,
        "sAP": 100.0 * float(sample_auc.mean()),
    }
    for name, v in zip(_genre_keys(k), genre_auc):
        out[name] = 100.0 * float(v)
    out["ap_micro"] = 100.0 * float(micro_ap[0])
    out["ap_macro"] = 100.0 * float(genre_ap.mean())
    out["ap_weighted"] = 100.0 * w_ap
    out["ap_samples"] = 100.0 * float(sample_ap.mean())
    return out


def metric_columns(num_genres: int = NUM_GENRES) -> list[str]:
    """CSV columns for a metrics row: the four headline metrics then one per genre."""
    return list(METRIC_KEYS) + _genre_keys(num_genres)


def format_metrics(m: dict) -> str:
    """One-line summary of the headline metrics, e.g. ``uAP 71.23 mAP 66.01 wAP 70.10 sAP 76.55``.

    Keys missing from ``m`` are skipped, so partial dicts still print.
    """
    return " ".join(f"{k} {float(m[k]):.2f}" for k in METRIC_KEYS if k in m)
