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
This module is the only code that opens HDF5 files: the writer, readers, loader, validation,
stored summaries and fingerprint live here. What needs no file lives in
:mod:`trailers12k_feats.cache_types` and is re-exported here, so ``cache.X`` reaches it too:
the format's constants, :class:`CacheAttrs`, the in-memory types (:class:`TrailerClips`,
:class:`FeatureSet`, :func:`feature_set`), the checks of trailers before they are written
(:class:`StagedTrailers`) and of an index and its values, :func:`pool_clips`, and the path
helpers :func:`stream_path` and :func:`list_caches`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from trailers12k_feats import __version__
from trailers12k_feats.cache_types import (  # re-exported: each is also cache.<name>
    DTYPES,  # noqa: F401
    DURATION_DATASETS,
    FINITE,
    FINITE_BY,
    POOLED,
    REQUIRED_DATASETS,
    SCHEMA_VERSION,
    SIZE_BEFORE_POOLED,
    SUFFIX,  # noqa: F401
    CacheAttrs,
    FeatureSet,
    StagedTrailers,
    TrailerClips,
    _check_finite,
    _check_index,
    _plain,
    check_dtype,
    feature_set,  # noqa: F401
    list_caches,  # noqa: F401
    pool_clips,
    stream_path,  # noqa: F401
)
from trailers12k_feats.utils import T12kError, pid_alive

log = logging.getLogger(__name__)


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
        self._staged = StagedTrailers(self.path, F, self.dtype)  # checked trailers, not yet written
        self._closed = False

    def __len__(self) -> int:
        return len(self._staged.ids)

    def add(self, tid: str, feats: np.ndarray, clip_start: np.ndarray | None = None,
            clip_end: np.ndarray | None = None, shot: np.ndarray | None = None,
            decoded_s: float | None = None, declared_s: float | None = None) -> None:
        """Append one trailer's clip embeddings `feats` (C, F) with optional per-clip times/shots.

        `decoded_s` and `declared_s` are the seconds of video decoded and declared by its file;
        the cache stores them (datasets decoded_s, declared_s) when any trailer has them.
        """
        self._staged.add(tid, feats, clip_start, clip_end, shot, decoded_s, declared_s)
        if self._staged.nbytes >= self.FLUSH_BYTES:
            self._flush()

    def _flush(self) -> None:
        """Write the buffered trailers' clips and their summaries, one block per dataset."""
        block = self._staged.take()
        if block is None:
            return
        lengths, feats, *cols = block  # (k,), (sum(lengths), F) as stored, then per-clip start, end, shot
        for ds, x in zip((self._feat, self._start, self._end, self._shot), (feats, *cols)):
            n0 = ds.shape[0]
            ds.resize(n0 + len(x), axis=0)
            ds[n0:] = x
        n0 = self._pooled["mean"].shape[0]
        for r, rows in pool_clips(feats, lengths).items():  # (k, F) each
            self._pooled[r].resize(n0 + len(rows), axis=0)
            self._pooled[r][n0:] = rows

    def close(self) -> Path:
        """Write the index, summaries and attributes, then move the file into place."""
        if self._closed:
            return self.path
        self._flush()
        h5 = self._h5
        h5.create_dataset("offsets", data=np.asarray(self._staged.offsets, np.int64))
        h5.create_dataset("ids", data=np.asarray(self._staged.ids, dtype=object), dtype=h5py.string_dtype())
        durations = np.asarray(self._staged.durations, np.float32).reshape(-1, 2)  # (n, 2)
        if np.isfinite(durations).any():  # caches without any (synthetic, imported) stay as they were
            for j, name in enumerate(DURATION_DATASETS):
                h5.create_dataset(name, data=durations[:, j])
        for k, v in self.attrs.to_h5().items():
            h5.attrs[k] = v
        h5.attrs[FINITE], h5.attrs[FINITE_BY] = True, __version__  # add() refused any NaN or Inf
        h5.close()
        self._closed = True
        os.replace(self._tmp, self.path)
        log.info("wrote %s: %d trailers, %d clips, dim %d", self.path, len(self._staged.ids),
                 self._staged.offsets[-1], self.attrs.feature_dim)
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


