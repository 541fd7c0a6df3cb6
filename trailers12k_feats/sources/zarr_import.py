"""Import the authors' released zarr stores into the project's HDF5 feature cache.

A released store (Zenodo record 5716410, docs/paper.md) is a zarr format-2 group with one
float32 array per trailer id, shape (clips, num_features), and a group attribute
``num_features``. Its folder name says how it was made:
``trailers_<i|k|ik>_<model>[_fps<N>]_fpc<N>.zarr`` -> stream ``<i|k|ik>_<model>``.

The import streams one trailer at a time into :class:`cache.CacheWriter`, so memory stays
at one trailer plus the index however large the store; the cache appears only when every
trailer was checked and written.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from trailers12k_feats.cache import CacheAttrs, CacheWriter, check_dtype, stream_path
from trailers12k_feats.paper import STREAMS
from trailers12k_feats.utils import T12kError

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^trailers_(?P<prefix>ik|i|k)_(?P<model>[a-z0-9]+)(?:_fps(?P<fps>\d+(?:\.\d+)?))?"
                     r"_fpc(?P<fpc>\d+)\.zarr(?:\.tar\.gz)?$")
STREAM_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
PRETRAINING = {"i": "ImageNet-1K", "k": "Kinetics", "ik": "ImageNet-1K + Kinetics-400"}
FP16_MAX = float(np.finfo(np.float16).max)  # 65504
ZARR_MISSING = "zarr is not installed; pip install 'trailers12k_feats[zarr]'."


@dataclass(frozen=True)
class ReleasedName:
    """What a released file name says: the stream, frames per second and frames per clip."""

    stream: str
    prefix: str  # i (ImageNet), k (Kinetics) or ik (both)
    fps: float  # 0.0: no fps in the name, frames at the video's own rate
    fpc: int


def parse_name(name: str) -> ReleasedName | None:
    """Parse `trailers_<prefix>_<model>[_fps<N>]_fpc<N>.zarr[.tar.gz]`; None if it does not match."""
    m = NAME_RE.match(name)
    if not m:
        return None
    return ReleasedName(f"{m['prefix']}_{m['model']}", m["prefix"], float(m["fps"] or 0), int(m["fpc"]))


def zarr_module() -> Any:
    """The zarr package (>= 3, which reads and writes format 2), or a clear error."""
    try:
        import zarr
    except ImportError:
        raise T12kError(ZARR_MISSING) from None
    if int(zarr.__version__.split(".")[0]) < 3:
        raise T12kError(f"zarr {zarr.__version__} is too old (3 or newer reads the released format 2 stores); "
                        f"pip install 'trailers12k_feats[zarr]'.")
    return zarr


@dataclass(frozen=True)
class ImportConfig:
    """One zarr store -> one cache file. `name` and `out` default from the store's folder name."""

    src: Path
    out_dir: Path = Path("cache")
    out: Path | None = None  # the cache file [out_dir/<name>.h5]
    name: str | None = None  # stream name [parsed from src's name]
    dtype: str = "float16"
    overwrite: bool = False
    provenance: dict = field(default_factory=dict)  # archive, md5, url when known

    def __post_init__(self) -> None:
        src = Path(self.src)
        object.__setattr__(self, "src", src)
        check_dtype(self.dtype)
        if not src.is_dir():
            raise T12kError(f"zarr store {src} does not exist or is not a folder; give the unpacked .zarr folder.")
        parsed = parse_name(src.name)
        name = self.name or (parsed.stream if parsed else None)
        if name is None:
            raise T12kError(f"cannot tell the stream of {src.name} from its name (expected "
                            f"trailers_<i|k|ik>_<model>[_fps<N>]_fpc<N>.zarr); pass --name, e.g. --name i_swin.")
        if not STREAM_RE.match(name):
            raise T12kError(f"stream name {name!r} must be letters, digits, '_', '.' or '-'; pass another --name.")
        object.__setattr__(self, "name", name)
        out = Path(self.out) if self.out else stream_path(self.out_dir, name)
        object.__setattr__(self, "out", out)
        if out.exists() and not self.overwrite:
            raise T12kError(f"cache {out} already exists; delete it, choose another output, or pass --overwrite.")

    def attrs(self, feature_dim: int) -> CacheAttrs:
        """Cache attributes: what the paper says about the stream, and where the features came from."""
        parsed = parse_name(self.src.name)
        known = STREAMS.get(self.name)
        prefix = parsed.prefix if parsed else ""
        return CacheAttrs(
            name=self.name, feature_dim=feature_dim,
            backbone=known.backbone if known else "unknown",
            kind=known.kind if known else ("3d" if prefix in ("k", "ik") else "2d"),
            pretraining=known.pretraining if known else PRETRAINING.get(prefix, "unknown"),
            weights="as released by the Trailers12k authors",
            fps=parsed.fps if parsed else 0.0, fpc=parsed.fpc if parsed else 24,
            segmentation="shots",
            source=str(self.provenance.get("archive") or self.src.resolve()),
        )


def open_store(src: Path) -> Any:
    """Open a zarr format-2 group read-only."""
    zarr = zarr_module()
    if not (src / ".zgroup").is_file():
        raise T12kError(f"{src} is not a zarr format-2 group (no .zgroup file); give the .zarr folder of an "
                        f"unpacked release archive.")
    try:
        return zarr.open_group(str(src), mode="r", zarr_format=2)
    except Exception as e:  # zarr raises several types for unreadable metadata
        raise T12kError(f"{src} is not a readable zarr group ({e}); unpack its archive again.") from None


def _num_features(group: Any, src: Path, first: str) -> int:
    value = group.attrs.get("num_features")
    if value is None:
        # The released stores all carry it; a hand-made store may not, so the first trailer decides.
        value = group[first].shape[-1]
        log.warning("%s has no num_features attribute; using %d from trailer %s", src, value, first)
    try:
        F = int(value)
    except (TypeError, ValueError):
        raise T12kError(f"{src}: attribute num_features is {value!r}, not a number; the store is damaged.") from None
    if F <= 0:
        raise T12kError(f"{src}: attribute num_features is {F}; the store is damaged.")
    return F


def _check(src: Path, tid: str, x: np.ndarray, F: int) -> None:
    """One trailer's array: (clips >= 1, F), floating point, finite."""
    if x.ndim != 2 or x.shape[1] != F or x.shape[0] == 0:
        raise T12kError(f"{src}: trailer {tid} has shape {x.shape}, expected (clips >= 1, {F}); the store is "
                        f"damaged, unpack or download it again.")
    if x.dtype.kind != "f":
        raise T12kError(f"{src}: trailer {tid} has dtype {x.dtype}, expected floating point features.")
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        raise T12kError(f"{src}: trailer {tid} (clip {int(np.argmin(finite))}) has NaN or Inf values; the "
                        f"store is damaged, unpack or download it again.")


def import_zarr(cfg: ImportConfig, progress: bool = True) -> Path:
    """Convert a released zarr store into a cache at `cfg.out`, every trailer and clip, checked."""
    group = open_store(cfg.src)
    ids = sorted(group.array_keys())  # sorted: the cache order must not depend on the file system
    if not ids:
        raise T12kError(f"{cfg.src} holds no trailer arrays; it is empty or not a released feature store.")
    skipped = sorted(group.group_keys())
    if skipped:
        log.warning("%s: ignoring %d subgroups (e.g. %s); trailers are arrays", cfg.src, len(skipped), skipped[0])
    F = _num_features(group, cfg.src, ids[0])
    known = STREAMS.get(cfg.name)
    if known and known.dim != F:
        raise T12kError(f"{cfg.src} has {F} features per clip but stream {cfg.name} has {known.dim}; pass the "
                        f"right --name for this store.")
    attrs = cfg.attrs(F)
    clips, max_abs, max_err, src_dtypes = 0, 0.0, 0.0, set()
    with CacheWriter(cfg.out, attrs, dtype=cfg.dtype) as w:
        for tid in tqdm(ids, desc=f"import {cfg.name}", unit="trailer", disable=not progress):
            x = np.asarray(group[tid][...])
            _check(cfg.src, tid, x, F)
            src_dtypes.add(str(x.dtype))
            x32 = x.astype(np.float32, copy=False)
            max_abs = max(max_abs, float(np.abs(x32).max()))
            if cfg.dtype == "float16":
                if max_abs > FP16_MAX:
                    raise T12kError(f"{cfg.src}: trailer {tid} has a value of magnitude {max_abs:g}, beyond the "
                                    f"float16 range (±{FP16_MAX:g}); import it with --dtype float32.")
                y = x32.astype(np.float16)
                max_err = max(max_err, float(np.abs(y.astype(np.float32) - x32).max()))
            else:
                y = x32
            w.add(tid, y)
            clips += len(y)
        # The statistics are known only now; the attributes are written by close().
        w.attrs = dataclasses.replace(attrs, config={
            "importer": "trailers12k_feats.sources.zarr_import", "zarr": str(cfg.src.resolve()), "stream": cfg.name,
            "num_features": F, "trailers": len(ids), "clips": clips, "source_dtype": ",".join(sorted(src_dtypes)),
            "dtype": cfg.dtype, "max_abs_value": max_abs, "max_abs_cast_error": max_err,
            **({"fps_note": "the file name gives no fps: frames at the video's own rate"} if not attrs.fps else {}),
            **cfg.provenance})
    log.info("imported %s -> %s: %d trailers, %d clips, dim %d, %s (largest cast error %.3g)",
             cfg.src, cfg.out, len(ids), clips, F, cfg.dtype, max_err)
    return cfg.out
