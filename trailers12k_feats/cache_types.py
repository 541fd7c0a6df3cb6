"""The feature cache's format and in-memory types: everything of the cache that opens no file.

What the HDF5 schema is made of (dataset and attribute names, :data:`DTYPES`,
:data:`POOLED`, the :data:`FINITE` record), how a feature set was made (:class:`CacheAttrs`),
the in-RAM forms of cached clips (:class:`TrailerClips`, :class:`FeatureSet`,
:func:`feature_set`) with the index and finiteness checks they share with the loader, the
checks of trailers before a writer stores them (:class:`StagedTrailers`), the per-trailer
summaries (:func:`pool_clips`) and where caches live (:func:`stream_path`, :func:`list_caches`).
:mod:`trailers12k_feats.cache`, the only code that opens HDF5 files, re-exports every name
here; the rest of the package imports them from there.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trailers12k_feats import __version__
from trailers12k_feats.utils import T12kError

SCHEMA_VERSION = 1
SUFFIX = ".h5"
REQUIRED_DATASETS = ("features", "offsets", "ids", "clip_start", "clip_end", "shot")
DURATION_DATASETS = ("decoded_s", "declared_s")  # optional, per trailer; written by extraction
DTYPES = ("float16", "float32")  # how features may be stored
# Per-trailer summaries of the clips, (n, F) float32 each: reduction -> dataset. Written by
# cache.CacheWriter; added to older caches by pooling.load_pooled (see cache.store_pooled).
POOLED = {"mean": "pool_mean", "max": "pool_max"}
# The record that every stored feature value was checked finite: `FINITE` is True and
# `FINITE_BY` names the package version that checked. `cache.load` trusts it and skips its scan.
FINITE, FINITE_BY = "features_finite", "features_finite_by"
SIZE_BEFORE_POOLED = "size_before_pooled"  # file size before cache.store_pooled added the summaries


def check_dtype(dtype: str) -> str:
    """`dtype` if caches can store features in it (one of :data:`DTYPES`), else a T12kError."""
    if dtype not in DTYPES:
        raise T12kError(f"cache dtype must be one of {', '.join(DTYPES)}, got {dtype!r} "
                        f"(float16 halves the size, float32 keeps full precision).")
    return dtype


@dataclass(frozen=True)
class CacheAttrs:
    """How a feature set was made; stored as HDF5 attributes of the cache."""

    name: str
    backbone: str
    feature_dim: int
    weights: str = "unknown"
    pretraining: str = "unknown"
    kind: str = "2d"  # "2d" (per-frame model, frames averaged) or "3d" (clip model)
    fps: float = 24.0
    fpc: int = 24
    segmentation: str = "shots"
    source: str = "unknown"
    package_version: str = __version__
    config: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in ("2d", "3d"):
            raise T12kError(f"cache kind must be '2d' or '3d', got {self.kind!r}.")
        if int(self.feature_dim) <= 0:
            raise T12kError(f"cache feature_dim must be positive, got {self.feature_dim}.")

    def to_h5(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["config"] = json.dumps(d["config"], sort_keys=True)
        d["schema_version"] = SCHEMA_VERSION
        return d

    @classmethod
    def from_h5(cls, attrs: Any) -> "CacheAttrs":
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: _plain(v) for k, v in attrs.items() if k in names}
        d["config"] = json.loads(d.get("config") or "{}")
        return cls(**d)


def _plain(v: Any) -> Any:
    """HDF5 attribute values as plain Python values."""
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    return v


def pool_clips(x: np.ndarray | torch.Tensor, lengths: np.ndarray | torch.Tensor,
               reductions: Iterable[str] = tuple(POOLED)) -> dict[str, np.ndarray]:
    """The summaries `reductions` (keys of :data:`POOLED`) of consecutive trailers of `lengths[i]`
    clips each, whose clips `x` (sum(lengths), F) are stacked: {"mean": (k, F), "max": (k, F)}
    float32, reduced in float32 as the probe always pooled (torch's segment reductions are many
    times faster than NumPy's reduceat down a column)."""
    clips = torch.as_tensor(np.ascontiguousarray(x) if isinstance(x, np.ndarray) else x).float()  # (sum, F)
    lengths = torch.as_tensor(np.asarray(lengths, np.int64))  # (k,)
    return {r: torch.segment_reduce(clips, r, lengths=lengths, axis=0).numpy() for r in reductions}


class StagedTrailers:
    """Trailers checked and held in RAM until a cache writer stores them (see cache.CacheWriter).

    :meth:`add` refuses what a cache may not hold: a wrong shape, a repeated id, NaN or Inf,
    values beyond the range of `dtype`. `ids`, `offsets` and `durations` index every trailer
    added so far; :meth:`take` hands over the clips added since the last take.
    """

    def __init__(self, path: Path, feature_dim: int, dtype: np.dtype) -> None:
        self.path, self.feature_dim, self.dtype = path, feature_dim, dtype  # `path` is only shown in messages
        self.ids: list[str] = []
        self.offsets = [0]
        self.durations: list[tuple[float, float]] = []  # (decoded, declared) per trailer, NaN unknown
        self.nbytes = 0  # of the clips not yet taken
        self._buf: list[tuple[np.ndarray, ...]] = []  # trailers not yet taken: (feats, start, end, shot)
        self._seen: set[str] = set()

    def add(self, tid: str, feats: np.ndarray, clip_start: np.ndarray | None = None,
            clip_end: np.ndarray | None = None, shot: np.ndarray | None = None,
            decoded_s: float | None = None, declared_s: float | None = None) -> None:
        """Check and hold one trailer's clips `feats` (C, F), converted to `dtype`, with its per-clip
        times/shots and its seconds decoded and declared (as :meth:`cache.CacheWriter.add`)."""
        feats = np.asarray(feats)
        F = self.feature_dim
        if feats.ndim != 2 or feats.shape[1] != F or feats.shape[0] == 0:
            raise T12kError(f"trailer {tid}: features must have shape (clips >= 1, {F}), got {feats.shape}.")
        if tid in self._seen:
            raise T12kError(f"trailer {tid} was added twice to cache {self.path}.")
        if not np.isfinite(feats).all():
            raise T12kError(f"trailer {tid}: features contain NaN or Inf; refusing to cache them.")
        given = feats
        with np.errstate(over="ignore"):  # overflow is reported below
            feats = feats.astype(self.dtype, copy=False)  # (C, F) the values the cache will hold
        if not np.isfinite(feats).all():  # finite values beyond float16's range become Inf
            raise T12kError(f"trailer {tid}: features exceed the range of {self.dtype} (|x| > "
                            f"{np.finfo(self.dtype).max:g}); write the cache as float32.")
        C = feats.shape[0]
        n0 = self.offsets[-1]

        def col(x: np.ndarray | None, fill: float, dtype: str) -> np.ndarray:
            if x is None:
                return np.full(C, fill, dtype)
            x = np.array(x, dtype)  # a copy: it is held until written
            if x.shape != (C,):
                raise T12kError(f"trailer {tid}: per-clip arrays must have shape ({C},), got {x.shape}.")
            return x

        # held until written, so a copy where the caller could still change the array
        self._buf.append((feats.copy() if feats is given else feats, col(clip_start, np.nan, "float32"),
                          col(clip_end, np.nan, "float32"), col(shot, -1, "int32")))
        self.nbytes += feats.nbytes
        self.ids.append(str(tid))
        self._seen.add(str(tid))
        self.offsets.append(n0 + C)
        self.durations.append(tuple(np.nan if v is None else float(v) for v in (decoded_s, declared_s)))

    def take(self) -> tuple[np.ndarray, ...] | None:
        """(lengths (k,), clips (sum(lengths), F) as stored, clip_start, clip_end, shot) of the
        trailers added since the last take, stacked; None when there are none."""
        if not self._buf:
            return None
        parts = list(zip(*self._buf))  # (feats...), (start...), (end...), (shot...)
        lengths = np.array([len(f) for f in parts[0]])  # (k,)
        block = (lengths, *map(np.concatenate, parts))  # clips (sum(lengths), F), then (sum(lengths),) each
        self._buf.clear()
        self.nbytes = 0
        return block


@dataclass(frozen=True)
class TrailerClips:
    """One trailer's clips as a cache stores them."""

    id: str
    features: np.ndarray  # (C, F) float16 or float32
    clip_start: np.ndarray  # (C,) float32 seconds, NaN when unknown
    clip_end: np.ndarray  # (C,) float32 seconds, NaN when unknown
    shot: np.ndarray  # (C,) int32 shot index, -1 when unknown
    decoded_s: float = float("nan")  # seconds of video decoded (NaN when the cache does not say)
    declared_s: float = float("nan")  # seconds its file declared (NaN when the cache does not say)

    def __post_init__(self) -> None:
        C = self.features.shape[0] if self.features.ndim == 2 else 0
        if C == 0 or any(x.shape != (C,) for x in (self.clip_start, self.clip_end, self.shot)):
            raise T12kError(f"trailer {self.id}: features must be (clips >= 1, F) and clip_start, clip_end, shot "
                            f"(clips,), got {self.features.shape}, {self.clip_start.shape}, "
                            f"{self.clip_end.shape}, {self.shot.shape}.")

    def __len__(self) -> int:
        return int(self.features.shape[0])


@dataclass
class FeatureSet:
    """A whole feature set in RAM: one stacked tensor plus per-trailer offsets."""

    path: Path
    attrs: CacheAttrs
    ids: list[str]
    features: torch.Tensor  # (num_clips, F), float16 or float32
    offsets: torch.Tensor  # (n + 1,) int64
    clip_start: np.ndarray  # (num_clips,)
    clip_end: np.ndarray  # (num_clips,)
    shot: np.ndarray  # (num_clips,)

    def __post_init__(self) -> None:
        self.index = {tid: i for i, tid in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def name(self) -> str:
        return self.attrs.name

    @property
    def feature_dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]  # (n,)

    def trailer(self, tid: str) -> torch.Tensor:
        """The (C, F) clip embeddings of one trailer (a view, no copy)."""
        try:
            i = self.index[tid]
        except KeyError:
            raise T12kError(f"trailer {tid} is not in cache {self.path}.") from None
        return self.features[self.offsets[i]:self.offsets[i + 1]]


def feature_set(trailers: Sequence[TrailerClips], attrs: CacheAttrs, path: str | os.PathLike | None = None,
                dtype: torch.dtype | None = None) -> FeatureSet:
    """An in-RAM feature set of `trailers` (in that order), checked as :func:`cache.load` checks a file.

    `attrs` says how the features were made; `path` is only shown in messages (default: the
    set's name).
    """
    path = Path(path if path is not None else attrs.name)
    if not trailers:
        raise T12kError(f"feature set {path}: no trailers given.")
    ids = [t.id for t in trailers]
    offsets = np.concatenate([[0], np.cumsum([len(t) for t in trailers])]).astype(np.int64)  # (n + 1,)
    feats = np.concatenate([t.features for t in trailers])  # (num_clips, F)
    _check_index(path, offsets, ids, feats.shape[0], feats.shape[1], attrs.feature_dim)
    features = torch.from_numpy(feats)
    if dtype is not None:
        features = features.to(dtype)
    _check_finite(path, features, offsets, ids)
    cols = [np.concatenate([getattr(t, k) for t in trailers]) for k in ("clip_start", "clip_end", "shot")]
    return FeatureSet(path, attrs, ids, features, torch.from_numpy(offsets), *cols)


def _check_index(path: Path, offsets: np.ndarray, ids: list[str], num_clips: int, F: int, attr_F: int) -> None:
    n = len(ids)
    if F != attr_F:
        raise T12kError(f"feature cache {path}: features have dim {F} but attribute feature_dim says {attr_F}.")
    if offsets.shape != (n + 1,) or offsets[0] != 0 or offsets[-1] != num_clips:
        raise T12kError(f"feature cache {path}: offsets do not span the {num_clips} clips of {n} trailers; "
                        f"the file is corrupt, recreate it.")
    lengths = np.diff(offsets)
    if (lengths <= 0).any():
        bad = ids[int(np.argmax(lengths <= 0))]
        raise T12kError(f"feature cache {path}: trailer {bad} has no clips; the file is corrupt, recreate it.")
    if len(set(ids)) != n:
        seen: set[str] = set()
        dup = next(t for t in ids if t in seen or seen.add(t))
        raise T12kError(f"feature cache {path}: trailer id {dup} appears more than once; recreate it.")


def _check_finite(path: Path, features: torch.Tensor | np.ndarray, offsets: np.ndarray, ids: list[str],
                  rows: int = 1 << 15) -> None:
    """Stop at the first clip of `features` (clips of `ids`, rows `offsets`) with NaN or Inf.

    Scans blocks of `rows` rows with NumPy, several times faster than torch.isfinite on the CPU
    (float16 above all) and with a small temporary mask."""
    if isinstance(features, torch.Tensor):
        features = features.float() if features.dtype == torch.bfloat16 else features  # NumPy has no bfloat16
        features = features.numpy()
    for r0 in range(0, features.shape[0], rows):
        finite = np.isfinite(features[r0:r0 + rows]).all(axis=1)  # (rows,)
        if not finite.all():
            row = r0 + int(np.argmin(finite))
            i = int(np.searchsorted(offsets, row, side="right") - 1)
            raise T12kError(f"feature cache {path}: trailer {ids[i]} (clip {row - offsets[i]}) has NaN or Inf "
                            f"features; re-extract that trailer or drop it from the cache.")


def stream_path(cache_dir: str | os.PathLike, stream: str) -> Path:
    """Where the cache of a named stream lives: `<cache_dir>/<stream>.h5`."""
    return Path(cache_dir) / f"{stream}{SUFFIX}"


def list_caches(root: str | os.PathLike) -> list[Path]:
    """Cache files (``*.h5``) under a directory, sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise T12kError(f"cache directory {root} does not exist.")
    return sorted(p for p in root.glob(f"*{SUFFIX}") if not p.name.startswith("."))
