"""Which cache feeds which role of a head, and the checks every command makes before using caches.

A Table 6 row or a stream name maps to `<cache_dir>/<name>.h5`. A cache must hold the stream it
is named after (the paper's dim for that stream), and two streams fused in one head must cut the
trailers into the same clips, since windows pair their clips by index.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Iterable

from trailers12k_feats import cache as cache_mod
from trailers12k_feats.cache import CacheAttrs
from trailers12k_feats.paper import STREAMS, get_row
from trailers12k_feats.utils import T12kError

log = logging.getLogger(__name__)

ROLES = ("image", "video")
CLIP_FIELDS = ("fps", "fpc", "segmentation")  # cache attributes that decide where clips fall


def stream_cache(cache_dir: str | os.PathLike, stream: str) -> Path:
    """A stream name -> `<cache_dir>/<name>.h5`; a path ending in .h5 is used as it is."""
    return Path(stream) if stream.endswith(cache_mod.SUFFIX) else cache_mod.stream_path(cache_dir, stream)


def resolve_streams(cache_dir: str | os.PathLike, row: str | None = None, image: str | None = None,
                    video: str | None = None) -> dict[str, Path]:
    """Role ("image", "video") -> cache file of a Table 6 row and/or of streams given as names or
    .h5 paths; a stream given explicitly replaces the row's for its role."""
    if row:
        r = get_row(row)
        image, video = image or r.image, video or r.video
    if not (image or video):
        raise T12kError("give --row, or --image and/or --video.")
    return {role: stream_cache(cache_dir, s) for role, s in zip(ROLES, (image, video)) if s}


def check_dim(path: Path, attrs: CacheAttrs) -> None:
    """Refuse a cache whose feature dim is not that of the paper stream it is named after, by its
    file name or by the name it records (either would label results as that stream)."""
    for name in dict.fromkeys((Path(path).stem, attrs.name)):
        known = STREAMS.get(name)
        if known and int(attrs.feature_dim) != known.dim:
            via = "" if name == Path(path).stem else " (the name the cache records)"
            raise T12kError(f"cache {path} has feature dim {attrs.feature_dim} but stream {name}{via} has dim "
                            f"{known.dim}; point --cache-dir (or --image/--video) at the {name} cache, or "
                            f"rename a file that holds another stream's features.")


def _show(v: object) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def check_clips(caches: dict[Path, CacheAttrs], allow_mismatched_clips: bool = False) -> list[str]:
    """Refuse to fuse caches whose fps, fpc or segmentation differ, unless allowed; return the
    warnings to log (allowed mismatches, and fps 0, which means "the video's own rate" and so
    cannot be compared)."""
    notes: list[str] = []
    (pa, a), *others = caches.items()
    for pb, b in others:
        for name in CLIP_FIELDS:
            va, vb = getattr(a, name), getattr(b, name)
            if name == "fps" and not (va and vb):
                notes.append(f"the fps of {pa} and {pb} cannot be compared: "
                             f"{pa if not va else pb} records fps 0 (the video's own rate)")
                continue
            if va == vb or (name == "fps" and math.isclose(va, vb)):
                continue
            what = f"{name} is {_show(va)} in {pa} but {_show(vb)} in {pb}"
            if not allow_mismatched_clips:
                raise T12kError(f"cannot fuse these streams: {what}, so the same clip index covers different "
                                f"stretches of a trailer; extract both with the same --{name}, or pass "
                                f"--allow-mismatched-clips to fuse them anyway.")
            notes.append(f"fusing streams whose clips differ ({what}); clips are paired by index")
    return notes


def check_caches(paths: Iterable[Path], allow_mismatched_clips: bool = False) -> dict[Path, CacheAttrs]:
    """Read the attributes of the caches one head will use, check their dims and, for several,
    their clip settings (logging the warnings of `check_clips`); nothing is loaded."""
    attrs = {Path(p): cache_mod.read_attrs(p) for p in paths}
    for p, a in attrs.items():
        check_dim(p, a)
    if len(attrs) > 1:
        for note in check_clips(attrs, allow_mismatched_clips):
            log.warning("%s", note)
    return attrs
