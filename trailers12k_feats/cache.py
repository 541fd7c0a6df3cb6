"""The feature cache: one HDF5 file per feature set (backbone x clip settings).

Schema (``schema_version`` 1)::

    /features    (num_clips, F)  float16 (default) or float32   all trailers' clips, stacked
    /offsets     (n + 1,)        int64    trailer i owns rows offsets[i]:offsets[i+1]
    /ids         (n,)            str      trailer ids (IMDb ids such as tt0347149), unique
    /clip_start  (num_clips,)    float32  clip start time in seconds (NaN when unknown)
    /clip_end    (num_clips,)    float32  clip end time in seconds (NaN when unknown)
    /shot        (num_clips,)    int32    shot index of each clip within its trailer (-1 unknown)
    /decoded_s   (n,)            float32  optional: seconds of video each trailer decoded to (NaN unknown)
    /declared_s  (n,)            float32  optional: seconds its file declared (NaN unknown)
    /pool_mean   (n, F)          float32  optional: mean of each trailer's clips (as stored)
    /pool_max    (n, F)          float32  optional: their elementwise max
    attrs: schema_version, name, backbone, weights, pretraining, kind ("2d"/"3d"),
           feature_dim, fps, fpc, segmentation, source, package_version, config (JSON);
           optional: features_finite, features_finite_by (every stored value was checked
           finite, by that package version), size_before_pooled (file size before
           pool_* were added to an older cache)

Files are written to a temporary sibling and renamed into place when complete, so a
reader never sees a half-written cache. Training loads a whole feature set into RAM once
(:func:`load`) and slices views from it; nothing reads from disk per training sample.
Tools that copy or pick trailers (merging, prediction) read one trailer at a time
(:class:`CacheReader`, :func:`read_trailers`, :func:`iter_trailers`); pooling reads whole
trailers in large blocks (:func:`iter_blocks`) or the stored summaries (:func:`read_pooled`).
This module is the only code that opens HDF5 files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from trailers12k_feats import __version__
from trailers12k_feats.utils import T12kError, pid_alive

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
SUFFIX = ".h5"
REQUIRED_DATASETS = ("features", "offsets", "ids", "clip_start", "clip_end", "shot")
DURATION_DATASETS = ("decoded_s", "declared_s")  # optional, per trailer; written by extraction
DTYPES = ("float16", "float32")  # how features may be stored
# Per-trailer summaries of the clips, (n, F) float32 each: reduction -> dataset. Written by
# CacheWriter; added to older caches by pooling.load_pooled (see store_pooled).
POOLED = {"mean": "pool_mean", "max": "pool_max"}
# The record that every stored feature value was checked finite: `FINITE` is True and
# `FINITE_BY` names the package version that checked. `load` trusts it and skips its scan.
FINITE, FINITE_BY = "features_finite", "features_finite_by"
SIZE_BEFORE_POOLED = "size_before_pooled"  # file size before store_pooled added the summaries


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


class CacheWriter:
    """Append trailers to a new cache; the file appears at `path` only on :meth:`close`.

    Use as a context manager: an exception (or a killed process) leaves no file at `path`.
    Besides the clips it writes each trailer's pooled summaries (:data:`POOLED`) and the
    record that every value is finite (:data:`FINITE`), both computed from the values as
    stored while they are in hand.
    """

    FLUSH_BYTES = 64 << 20  # clips held in RAM before they are written in one block (the file is whole only at close)

    def __init__(self, path: str | os.PathLike, attrs: CacheAttrs, dtype: str = "float16",
                 chunk_rows: int = 4096) -> None:
        check_dtype(dtype)
        self.path = Path(path)
        self.attrs = attrs
        self.dtype = np.dtype(dtype)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Written under a hidden temporary name, renamed into place by close().
        self._tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self._h5 = h5py.File(self._tmp, "w")
        F = attrs.feature_dim
        rows = max(1, min(chunk_rows, (1 << 21) // (2 * F)))  # ~2 MB chunks
        self._feat = self._h5.create_dataset("features", (0, F), dtype=dtype, maxshape=(None, F),
                                             chunks=(rows, F))
        self._start = self._h5.create_dataset("clip_start", (0,), "float32", maxshape=(None,), chunks=(16384,))
        self._end = self._h5.create_dataset("clip_end", (0,), "float32", maxshape=(None,), chunks=(16384,))
        self._shot = self._h5.create_dataset("shot", (0,), "int32", maxshape=(None,), chunks=(16384,))
        prows = max(1, (1 << 20) // (4 * F))  # ~1 MB chunks
        self._pooled = {r: self._h5.create_dataset(name, (0, F), "float32", maxshape=(None, F), chunks=(prows, F))
                        for r, name in POOLED.items()}
        self._buf: list[tuple[np.ndarray, ...]] = []  # trailers not yet written: (feats, start, end, shot)
        self._buf_bytes = 0
        self._ids: list[str] = []
        self._seen: set[str] = set()
        self._offsets = [0]
        self._durations: list[tuple[float, float]] = []  # (decoded, declared) per trailer, NaN unknown
        self._closed = False

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, tid: str, feats: np.ndarray, clip_start: np.ndarray | None = None,
            clip_end: np.ndarray | None = None, shot: np.ndarray | None = None,
            decoded_s: float | None = None, declared_s: float | None = None) -> None:
        """Append one trailer's clip embeddings `feats` (C, F) with optional per-clip times/shots.

        `decoded_s` and `declared_s` are the seconds of video decoded and declared by its file;
        the cache stores them (datasets decoded_s, declared_s) when any trailer has them.
        """
        feats = np.asarray(feats)
        F = self.attrs.feature_dim
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
        n0 = self._offsets[-1]

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
        self._buf_bytes += feats.nbytes
        self._ids.append(str(tid))
        self._seen.add(str(tid))
        self._offsets.append(n0 + C)
        self._durations.append(tuple(np.nan if v is None else float(v) for v in (decoded_s, declared_s)))
        if self._buf_bytes >= self.FLUSH_BYTES:
            self._flush()

    def _flush(self) -> None:
        """Write the buffered trailers' clips and their summaries, one block per dataset."""
        if not self._buf:
            return
        parts = list(zip(*self._buf))  # (feats...), (start...), (end...), (shot...)
        lengths = np.array([len(f) for f in parts[0]])  # (k,)
        feats = np.concatenate(parts[0])  # (sum(lengths), F) as stored
        for ds, x in zip((self._feat, self._start, self._end, self._shot), (feats, *map(np.concatenate, parts[1:]))):
            n0 = ds.shape[0]
            ds.resize(n0 + len(x), axis=0)
            ds[n0:] = x
        n0 = self._pooled["mean"].shape[0]
        for r, rows in pool_clips(feats, lengths).items():  # (k, F) each
            self._pooled[r].resize(n0 + len(rows), axis=0)
            self._pooled[r][n0:] = rows
        self._buf.clear()
        self._buf_bytes = 0

    def close(self) -> Path:
        """Write the index, summaries and attributes, then move the file into place."""
        if self._closed:
            return self.path
        self._flush()
        h5 = self._h5
        h5.create_dataset("offsets", data=np.asarray(self._offsets, np.int64))
        h5.create_dataset("ids", data=np.asarray(self._ids, dtype=object), dtype=h5py.string_dtype())
        durations = np.asarray(self._durations, np.float32).reshape(-1, 2)  # (n, 2)
        if np.isfinite(durations).any():  # caches without any (synthetic, imported) stay as they were
            for j, name in enumerate(DURATION_DATASETS):
                h5.create_dataset(name, data=durations[:, j])
        for k, v in self.attrs.to_h5().items():
            h5.attrs[k] = v
        h5.attrs[FINITE], h5.attrs[FINITE_BY] = True, __version__  # add() refused any NaN or Inf
        h5.close()
        self._closed = True
        os.replace(self._tmp, self.path)
        log.info("wrote %s: %d trailers, %d clips, dim %d", self.path, len(self._ids),
                 self._offsets[-1], self.attrs.feature_dim)
        return self.path

    def abort(self) -> None:
        if not self._closed:
            self._closed = True
            self._h5.close()
            self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_cache(path: str | os.PathLike, attrs: CacheAttrs, items: Iterable[tuple[str, np.ndarray]],
                dtype: str = "float16") -> Path:
    """Write a cache from `(trailer_id, features (C, F))` pairs in one go."""
    with CacheWriter(path, attrs, dtype=dtype) as w:
        for tid, feats in items:
            w.add(tid, feats)
    return Path(path)


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


def _open(path: str | os.PathLike) -> h5py.File:
    path = Path(path)
    if not path.exists():
        raise T12kError(f"feature cache {path} does not exist; run `t12k synth`, `t12k extract` "
                        f"or `t12k import-zarr` to create it, or fix the path.")
    try:
        h5 = h5py.File(path, "r")
    except OSError as e:
        raise T12kError(f"feature cache {path} is not a readable HDF5 file ({e}); recreate it.") from None
    missing = [k for k in REQUIRED_DATASETS if k not in h5]
    if missing or "feature_dim" not in h5.attrs:
        h5.close()
        raise T12kError(f"feature cache {path} lacks {', '.join(missing) or 'its attributes'}; it is not a "
                        f"trailers12k_feats cache or was written incompletely; recreate it.")
    version = int(h5.attrs.get("schema_version", 0))
    if version != SCHEMA_VERSION:
        h5.close()
        raise T12kError(f"feature cache {path} has schema version {version}, this package reads "
                        f"{SCHEMA_VERSION}; recreate it with this version.")
    return h5


def read_attrs(path: str | os.PathLike) -> CacheAttrs:
    """The attributes of a cache without loading its features."""
    with _open(path) as h5:
        return CacheAttrs.from_h5(h5.attrs)


def _ids(h5: h5py.File) -> list[str]:
    return [str(s) for s in h5["ids"].asstr()[:]]


def read_ids(path: str | os.PathLike) -> list[str]:
    """The trailer ids of a cache without loading its features."""
    with _open(path) as h5:
        return _ids(h5)


class CacheReader:
    """An open cache read one trailer at a time, so memory stays small for any cache size.

    Opening reads the attributes, ids and index (and checks the index); use it as a context
    manager. Damage found while reading a trailer raises T12kError naming the file. `pooled`
    lists the reductions whose summaries the file stores, `finite_by` the package version that
    checked every value finite (None when none did).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._h5 = _open(self.path)
        try:
            self.attrs = CacheAttrs.from_h5(self._h5.attrs)
            ds = self._h5["features"]
            self.dtype = str(ds.dtype)
            self.ids = _ids(self._h5)
            self._offsets = self._h5["offsets"][:].astype(np.int64)
            _check_index(self.path, self._offsets, self.ids, ds.shape[0], ds.shape[1], self.attrs.feature_dim)
            self._durations = _durations(self.path, self._h5, len(self.ids))  # (n, 2)
            self.pooled = _pooled_shapes(self.path, self._h5, len(self.ids), ds.shape[1])
            self.finite_by = _finite_record(self._h5)
        except (OSError, KeyError, ValueError) as e:
            self._h5.close()
            raise T12kError(f"feature cache {self.path} is damaged ({e}); recreate it.") from None
        except BaseException:
            self._h5.close()
            raise
        self.index = {tid: i for i, tid in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, tid: object) -> bool:
        return tid in self.index

    @property
    def lengths(self) -> np.ndarray:
        """(n,) clips per trailer, in file order."""
        return np.diff(self._offsets)

    def get(self, tid: str) -> TrailerClips:
        """The clips of trailer `tid`."""
        i = self.index.get(tid)
        if i is None:
            raise T12kError(f"trailer {tid} is not in cache {self.path}.")
        r0, r1 = int(self._offsets[i]), int(self._offsets[i + 1])
        try:
            cols = [self._h5[k][r0:r1] for k in ("features", "clip_start", "clip_end", "shot")]
        except (OSError, KeyError, ValueError) as e:
            raise T12kError(f"feature cache {self.path}: trailer {tid} cannot be read ({e}); the file is "
                            f"damaged, recreate it.") from None
        return TrailerClips(tid, *cols, *(float(v) for v in self._durations[i]))

    def __iter__(self) -> Iterator[TrailerClips]:
        """Every trailer in file order."""
        return (self.get(tid) for tid in self.ids)

    def close(self) -> None:
        self._h5.close()

    def __enter__(self) -> CacheReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _durations(path: Path, h5: h5py.File, n: int) -> np.ndarray:
    """(n, 2) decoded and declared seconds per trailer; NaN where the cache has none."""
    out = np.full((n, 2), np.nan, np.float32)
    for j, name in enumerate(DURATION_DATASETS):
        if name in h5:
            if h5[name].shape != (n,):
                raise T12kError(f"feature cache {path}: {name} has shape {h5[name].shape}, expected ({n},); "
                                f"recreate it.")
            out[:, j] = h5[name][:]
    return out


def read_durations(path: str | os.PathLike) -> dict[str, tuple[float, float]]:
    """Per trailer, (seconds decoded, seconds its file declared); NaN where the cache does not say."""
    with _open(path) as h5:
        ids = _ids(h5)
        return {tid: (float(a), float(b)) for tid, (a, b) in zip(ids, _durations(Path(path), h5, len(ids)))}


def read_trailers(path: str | os.PathLike, ids: Iterable[str]) -> dict[str, TrailerClips]:
    """The clips of those of `ids` that a cache holds (the others are left out), in the order of `ids`."""
    with CacheReader(path) as r:
        return {tid: r.get(tid) for tid in ids if tid in r}


def iter_trailers(path: str | os.PathLike) -> Iterator[TrailerClips]:
    """Every trailer of a cache in file order, read one at a time."""
    with CacheReader(path) as r:
        yield from r


def feature_set(trailers: Sequence[TrailerClips], attrs: CacheAttrs, path: str | os.PathLike | None = None,
                dtype: torch.dtype | None = None) -> FeatureSet:
    """An in-RAM feature set of `trailers` (in that order), checked as :func:`load` checks a file.

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


def _finite_record(h5: h5py.File) -> str | None:
    """The package version that checked every stored value finite, or None when no writer did."""
    return str(_plain(h5.attrs.get(FINITE_BY, "unknown"))) if _plain(h5.attrs.get(FINITE, False)) is True else None


def _read_features(ds: h5py.Dataset, dtype: torch.dtype | None, block_bytes: int) -> torch.Tensor:
    """The whole dataset `ds` in a new tensor of `dtype` (default: as stored), read in blocks of
    about `block_bytes` straight into the tensor (through one block-sized buffer when `dtype`
    differs from the stored dtype, so two full copies never coexist)."""
    stored = torch.from_numpy(np.empty(0, ds.dtype)).dtype
    # NumPy allocates large arrays on huge pages (madvise), torch.empty does not: with 4 KB pages
    # the page faults of filling a fresh GB tensor cost about as much as reading it.
    as_numpy = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}.get(dtype or stored)
    out = (torch.from_numpy(np.empty(ds.shape, as_numpy)) if as_numpy is not None
           else torch.empty(ds.shape, dtype=dtype))  # (num_clips, F)
    rows = max(1, block_bytes // max(1, ds.shape[1] * ds.dtype.itemsize))
    buf = out.numpy() if out.dtype == stored else np.empty((min(rows, ds.shape[0]), ds.shape[1]), ds.dtype)
    for r0 in range(0, ds.shape[0], rows):
        r1 = min(r0 + rows, ds.shape[0])
        if out.dtype == stored:
            ds.read_direct(buf, np.s_[r0:r1], np.s_[r0:r1])
        else:
            ds.read_direct(buf, np.s_[r0:r1], np.s_[:r1 - r0])
            out[r0:r1] = torch.from_numpy(buf[:r1 - r0])
    return out


def load(path: str | os.PathLike, dtype: torch.dtype | None = None, block_bytes: int = 1 << 28) -> FeatureSet:
    """Load a whole feature set into RAM, checking its index and that every value is finite.

    A cache whose writer recorded that every value is finite (:data:`FINITE`) is not scanned
    again, unless `dtype` has a narrower range than the stored one; `validate` always scans.
    """
    path = Path(path)
    with _open(path) as h5:
        attrs = CacheAttrs.from_h5(h5.attrs)
        ds = h5["features"]
        offsets = h5["offsets"][:].astype(np.int64)
        ids = _ids(h5)
        _check_index(path, offsets, ids, ds.shape[0], ds.shape[1], attrs.feature_dim)
        clip_start, clip_end, shot = h5["clip_start"][:], h5["clip_end"][:], h5["shot"][:]
        features = _read_features(ds, dtype, block_bytes)  # (num_clips, F)
        narrower = torch.finfo(features.dtype).max < float(np.finfo(ds.dtype).max)  # float32 -> float16
        trusted = _finite_record(h5) is not None and not narrower
    if not trusted:
        _check_finite(path, features, offsets, ids)
    log.debug("loaded %s: %d trailers, %d clips, dim %d", path, len(ids), *features.shape)
    return FeatureSet(path, attrs, ids, features, torch.from_numpy(offsets), clip_start, clip_end, shot)


def _blocks(ds: h5py.Dataset, offsets: np.ndarray, max_rows: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """(t0, t1, clips of trailers t0..t1-1 stacked) in file order: whole trailers, at most
    `max_rows` rows a block unless one trailer alone has more."""
    n, t0 = len(offsets) - 1, 0
    while t0 < n:
        t1 = max(t0 + 1, int(np.searchsorted(offsets, offsets[t0] + max_rows, side="right")) - 1)
        t1 = min(t1, n)
        yield t0, t1, ds[offsets[t0]:offsets[t1]]
        t0 = t1


def _pooled_shapes(path: Path, h5: h5py.File, n: int, F: int) -> list[str]:
    """The reductions whose summaries a cache holds, after checking their shape and dtype."""
    for name in POOLED.values():
        if name in h5 and (h5[name].shape != (n, F) or h5[name].dtype != np.float32):
            raise T12kError(f"feature cache {path}: {name} has shape {h5[name].shape} and dtype {h5[name].dtype}, "
                            f"expected ({n}, {F}) float32; recreate the cache.")
    return [r for r, name in POOLED.items() if name in h5]


def validate(path: str | os.PathLike, chunk_rows: int = 65536, pooled: bool = False,
             trust_record: bool = False) -> CacheAttrs:
    """Check a cache's schema, index and values without keeping it in RAM; raise T12kError if bad.

    Every feature value is checked, unless `trust_record` and the cache records that its writer
    checked them (as `load` trusts it). With `pooled`, stored pooled summaries must also agree
    with the clips they summarise (only the probe reads them, so training does not ask for it).
    """
    path = Path(path)
    with _open(path) as h5:
        attrs = CacheAttrs.from_h5(h5.attrs)
        ds = h5["features"]
        offsets = h5["offsets"][:].astype(np.int64)
        ids = _ids(h5)
        _check_index(path, offsets, ids, ds.shape[0], ds.shape[1], attrs.feature_dim)
        for name in ("clip_start", "clip_end", "shot"):
            if h5[name].shape != (ds.shape[0],):
                raise T12kError(f"feature cache {path}: {name} has shape {h5[name].shape}, expected "
                                f"({ds.shape[0]},); recreate it.")
        _durations(path, h5, len(ids))
        reductions = _pooled_shapes(path, h5, len(ids), ds.shape[1])  # shapes always checked
        reductions = reductions if pooled else []
        if trust_record and not reductions and _finite_record(h5) is not None:
            return attrs
        for t0, t1, block in _blocks(ds, offsets, chunk_rows):
            _check_finite(path, block, offsets[t0:] - offsets[t0], ids[t0:])
            if reductions:
                got = pool_clips(block, np.diff(offsets[t0:t1 + 1]))
                for r in reductions:
                    stored = h5[POOLED[r]][t0:t1]  # (t1 - t0, F)
                    bad = ~np.isclose(stored, got[r], rtol=1e-4, atol=1e-4).all(axis=1)
                    if bad.any():
                        raise T12kError(f"feature cache {path}: the stored {POOLED[r]} of trailer "
                                        f"{ids[t0 + int(np.argmax(bad))]} does not match its clips; delete the "
                                        f"cache's pool_* datasets (the probe computes them again) or recreate it.")
    return attrs


def iter_blocks(path: str | os.PathLike, max_rows: int = 1 << 16) -> Iterator[tuple[list[str], np.ndarray, np.ndarray]]:
    """Whole trailers at a time in file order, read in blocks of about `max_rows` clips:
    (ids, lengths (k,), clips (sum(lengths), F) as stored), each block checked finite."""
    path = Path(path)
    with _open(path) as h5:
        attrs, ds = CacheAttrs.from_h5(h5.attrs), h5["features"]
        offsets, ids = h5["offsets"][:].astype(np.int64), _ids(h5)
        _check_index(path, offsets, ids, ds.shape[0], ds.shape[1], attrs.feature_dim)
        for t0, t1, block in _blocks(ds, offsets, max_rows):
            _check_finite(path, block, offsets[t0:] - offsets[t0], ids[t0:])
            yield ids[t0:t1], np.diff(offsets[t0:t1 + 1]), block


def read_pooled(path: str | os.PathLike, reductions: Sequence[str] = ("mean",)) -> tuple[list[str], dict] | None:
    """(ids, {reduction: (n, F) float32}) of the pooled summaries a cache stores, or None when it
    lacks any of `reductions` (keys of :data:`POOLED`)."""
    path = Path(path)
    with _open(path) as h5:
        ids = _ids(h5)
        F = int(h5["features"].shape[1])
        if not set(reductions) <= set(_pooled_shapes(path, h5, len(ids), F)):
            return None
        out = {}
        for r in reductions:
            out[r] = np.empty((len(ids), F), np.float32)  # (n, F)
            if ids:
                h5[POOLED[r]].read_direct(out[r])
        return ids, out


def store_pooled(path: str | os.PathLike, pooled: dict[str, np.ndarray], stat: os.stat_result) -> bool:
    """Add per-trailer summaries {reduction: (n, F)} to an existing cache and record that its
    values are finite; False (nothing changed) if the file is no longer the one `stat` describes.

    Crash safety: the file is copied to a hidden sibling ``.<name>.tmp-<pid>``, the datasets
    are added to the copy, and the copy is renamed over the original (os.replace, atomic). A
    process killed before the rename leaves the original untouched and at most that
    temporary file, which no reader opens (removed by the next call, or by extraction, once
    its process is gone); after the rename the file holds complete summaries. HDF5 files are
    never changed in place: a write cut short can leave one unreadable.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    for old in path.parent.glob(f".{path.name}.tmp-*"):  # left by killed processes
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)):
            old.unlink(missing_ok=True)

    def same(st: os.stat_result) -> bool:
        return (st.st_ino, st.st_size, st.st_mtime_ns) == (stat.st_ino, stat.st_size, stat.st_mtime_ns)

    try:
        shutil.copy2(path, tmp)
        if not same(path.stat()):  # replaced or rewritten since `pooled` was computed from it
            tmp.unlink()
            return False
        with h5py.File(tmp, "r+") as h5:
            n, F = len(h5["ids"]), int(h5["features"].shape[1])
            for r, x in pooled.items():
                if x.shape != (n, F):
                    raise T12kError(f"{POOLED[r]} for {path} must have shape ({n}, {F}), got {x.shape}.")
                if POOLED[r] in h5:
                    del h5[POOLED[r]]
                h5.create_dataset(POOLED[r], data=x.astype(np.float32), chunks=(max(1, min(n, (1 << 18) // F)), F))
            h5.attrs[FINITE], h5.attrs[FINITE_BY] = True, __version__  # the pass that pooled checked every value
            if SIZE_BEFORE_POOLED not in h5.attrs:
                h5.attrs[SIZE_BEFORE_POOLED] = stat.st_size
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return True


def fingerprint(path: str | os.PathLike, rows: int = 16) -> dict[str, Any]:
    """A cache's identity, cheap enough to compute on every run: path, trailers, clips, feature
    dim, dtype, file size and a SHA-256 of its attributes, ids, offsets and `rows` evenly spaced
    feature rows (hashing every feature of a multi-GB file would take minutes). The size is the
    one before pooled summaries were added to an older cache, since they change no feature."""
    path = Path(path)
    with _open(path) as h5:
        ds = h5["features"]
        ids, offsets = _ids(h5), h5["offsets"][:].astype(np.int64)
        digest = hashlib.sha256(json.dumps(CacheAttrs.from_h5(h5.attrs).to_h5(), sort_keys=True).encode())
        digest.update("\n".join(ids).encode())
        digest.update(offsets.tobytes())
        picks = np.unique(np.linspace(0, ds.shape[0] - 1, min(rows, ds.shape[0])).round().astype(np.int64))
        if len(picks):
            digest.update(np.ascontiguousarray(ds[picks]).tobytes())  # (rows, F)
        return {"path": str(path), "trailers": len(ids), "clips": int(ds.shape[0]), "feature_dim": int(ds.shape[1]),
                "dtype": str(ds.dtype), "bytes": int(h5.attrs.get(SIZE_BEFORE_POOLED, path.stat().st_size)),
                "sha256": digest.hexdigest()}


def stream_path(cache_dir: str | os.PathLike, stream: str) -> Path:
    """Where the cache of a named stream lives: `<cache_dir>/<stream>.h5`."""
    return Path(cache_dir) / f"{stream}{SUFFIX}"


def list_caches(root: str | os.PathLike) -> list[Path]:
    """Cache files (``*.h5``) under a directory, sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise T12kError(f"cache directory {root} does not exist.")
    return sorted(p for p in root.glob(f"*{SUFFIX}") if not p.name.startswith("."))
