"""Crash-safe, resumable writing of a feature cache during extraction.

Finished trailers are written in batches as small complete caches ("segments") under
``<cache>/.segments/<stream>/``, each renamed into place only when whole, so a killed run
loses at most the trailers since its last flush and never leaves a partial one. The
cache's finished trailers are those of ``<stream>.h5`` plus those of its segments; a rerun
skips them. :func:`merge` folds the segments (from any number of shards) into
``<stream>.h5`` in trailer-id order, keeping each trailer once, then deletes them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from contextlib import ExitStack
from pathlib import Path

from trailers12k_feats import cache as cache_mod
from trailers12k_feats.cache import CacheAttrs, CacheReader, CacheWriter
from trailers12k_feats.utils import T12kError, pid_alive

log = logging.getLogger(__name__)

SEGMENTS = ".segments"


def segment_dir(cache_dir: str | os.PathLike, stream: str) -> Path:
    return Path(cache_dir) / SEGMENTS / stream


def segments(cache_dir: str | os.PathLike, stream: str) -> list[Path]:
    """Complete segment files of a stream, oldest first."""
    d = segment_dir(cache_dir, stream)
    return sorted(p for p in d.glob(f"*{cache_mod.SUFFIX}") if not p.name.startswith(".")) if d.is_dir() else []


def sources(cache_dir: str | os.PathLike, stream: str) -> list[Path]:
    """The merged cache (if any) followed by the stream's segments."""
    final = cache_mod.stream_path(cache_dir, stream)
    return ([final] if final.is_file() else []) + segments(cache_dir, stream)


def finished_ids(cache_dir: str | os.PathLike, stream: str) -> set[str]:
    """Trailers already extracted for a stream (merged or in segments)."""
    done: set[str] = set()
    for p in sources(cache_dir, stream):
        done.update(cache_mod.read_ids(p))
    return done


def check_compatible(cache_dir: str | os.PathLike, stream: str, features: dict, implied: dict | None = None) -> None:
    """Refuse to add to a cache whose existing trailers were made with other feature settings.

    `implied` gives settings that older caches did not record and the value they had then.
    """
    for p in sources(cache_dir, stream):
        old = cache_mod.read_attrs(p).config.get("features")
        if old is not None and implied:
            old = {**implied, **old}
        if old != features:
            diff = {k: (old.get(k) if old else None, v) for k, v in features.items() if not old or old.get(k) != v}
            raise T12kError(
                f"{p} was extracted with other settings ({', '.join(f'{k}: {a!r} there, {b!r} now' for k, (a, b) in diff.items())}); "
                "use the same settings to resume, or another --cache folder.")


def recorded_precision(cache_dir: str | os.PathLike, streams: list[str]) -> tuple[str | None, str]:
    """(precision, the files) of the existing caches and segments of `streams` when they all
    record the same one, else (None, "")."""
    found = {str(p): cache_mod.read_attrs(p).config.get("features", {}).get("precision")
             for s in streams for p in sources(cache_dir, s)}
    if len(set(found.values())) != 1 or None in found.values():  # none, disagreeing, or imported
        return None, ""
    return next(iter(found.values())), ", ".join(found)


def clean_stale(cache_dir: str | os.PathLike, stream: str) -> None:
    """Remove temporary files left by killed writers (their process is gone)."""
    for d in (segment_dir(cache_dir, stream), Path(cache_dir)):
        for tmp in d.glob(f".*{cache_mod.SUFFIX}.tmp-*") if d.is_dir() else []:
            pid = tmp.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not pid_alive(int(pid)):
                tmp.unlink(missing_ok=True)


def write_segment(cache_dir: str | os.PathLike, attrs: CacheAttrs, items: list[tuple], tag: str,
                  dtype: str = "float16") -> Path | None:
    """Write finished trailers `(tid, feats (C, F), start, end, shot[, decoded_s, declared_s])` as one new segment."""
    if not items:
        return None
    path = segment_dir(cache_dir, attrs.name) / f"{tag}-{time.time_ns()}{cache_mod.SUFFIX}"
    with CacheWriter(path, attrs, dtype=dtype) as w:
        for item in items:
            w.add(*item)
    return path


def merge(cache_dir: str | os.PathLike, stream: str) -> Path | None:
    """Fold `<stream>.h5` and its segments into a new `<stream>.h5` (sorted ids, each once).

    The first source holding a trailer wins (the merged cache, then segments oldest first).
    Reads one trailer at a time, so memory stays small for any cache size. The new file
    replaces the old one atomically; segments are deleted only after that. A damaged
    segment stops the merge before anything is changed, with advice on how to redo it.
    """
    srcs = sources(cache_dir, stream)
    segs = set(segments(cache_dir, stream))
    if not segs:
        return cache_mod.stream_path(cache_dir, stream) if srcs else None
    out = cache_mod.stream_path(cache_dir, stream)
    with ExitStack() as stack:
        readers, damaged = [], []
        for p in srcs:
            try:
                readers.append(stack.enter_context(CacheReader(p)))
            except T12kError as e:
                if p not in segs:
                    raise
                damaged.append((p, e))
        if damaged:
            raise _damaged_segments(damaged)
        where: dict[str, CacheReader] = {}  # tid -> its first source
        for r in readers:
            for tid in r.ids:
                where.setdefault(tid, r)
        attrs = readers[-1].attrs
        features = attrs.config.get("features")
        for r in readers:
            if r.attrs.config.get("features") != features:
                raise T12kError(f"{r.path} was extracted with other settings than {srcs[-1]}; move one of them away "
                                "and merge again.")
        with CacheWriter(out, attrs, dtype=readers[0].dtype) as w:
            for tid in sorted(where):
                r = where[tid]
                try:
                    c = r.get(tid)
                except T12kError as e:
                    raise (_damaged_segments([(r.path, e)]) if r.path in segs else e) from None
                w.add(tid, c.features, c.clip_start, c.clip_end, c.shot, c.decoded_s, c.declared_s)
    for p in segs:
        p.unlink(missing_ok=True)
    log.info("merged %d segment(s) into %s (%d trailers)", len(segs), out, len(where))
    return out


def _damaged_segments(damaged: list[tuple[Path, T12kError]]) -> T12kError:
    """What to do about unreadable segments: delete them and extract their trailers again."""
    lines = []
    for p, e in damaged:
        m = re.match(r"shard(\d+)of(\d+)-", p.name)
        if m and m[2] != "1":
            redo = f"shard {m[1]}/{m[2]} (`t12k extract ... --shard {m[1]}/{m[2]}`)"
        else:
            redo = "`t12k extract` on the same videos"
        lines.append(f"  {e}\n    -> delete {p} and rerun {redo}")  # the error names the file too
    return T12kError(f"{len(damaged)} segment(s) cannot be read (truncated or damaged, e.g. by a full disk); "
                     f"nothing was merged or deleted:\n" + "\n".join(lines) +
                     "\nThe rerun extracts only the trailers that are not in another segment; then merge again.")


def merge_all(cache_dir: str | os.PathLike) -> list[Path]:
    """Merge every stream that has segments under `cache_dir`; an error when none is merged."""
    root = Path(cache_dir) / SEGMENTS
    streams = sorted(d.name for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
    out = [p for s in streams if (p := merge(cache_dir, s)) is not None]
    if not out:
        raise T12kError(f"{cache_dir} has no extraction segments to merge.")
    return out


def write_failures(path: Path, failures: list[dict]) -> None:
    """The failure report: one JSON object per line (id, path, status, reason...); removed when empty."""
    if not failures:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        for row in failures:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def read_failures(path: str | os.PathLike) -> list[dict]:
    p = Path(path)
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.is_file() else []

