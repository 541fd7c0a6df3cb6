"""The videos an extraction reads: files, folders of videos and list files -> (trailer id, path)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from trailers12k_feats.extraction.video import VIDEO_EXTENSIONS, find_videos
from trailers12k_feats.utils import T12kError


def resolve_inputs(items: list[str | os.PathLike]) -> list[tuple[str, Path]]:
    """(trailer id, path) pairs from video files, folders of videos, or list files.

    A list file (.txt/.csv/.tsv) has one video per line: `path` or `path,id` (a header line
    `path,id` is allowed); relative paths are relative to the list. Otherwise the id is the
    file stem. Duplicate ids are an error.
    """
    pairs: list[tuple[str, Path]] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = find_videos(p)
            if not found:
                raise T12kError(f"{p} holds no video files ({', '.join(VIDEO_EXTENSIONS)}).")
            pairs += [(v.stem, v) for v in found]
        elif p.suffix.lower() in (".txt", ".csv", ".tsv"):
            pairs += _read_list(p)
        elif p.suffix.lower() in VIDEO_EXTENSIONS:
            pairs.append((p.stem, p))  # a missing file is reported as a failure, not a stop
        elif not p.exists():
            raise T12kError(f"{p} does not exist; give video files, folders of videos or a list file.")
        else:
            raise T12kError(f"{p} is not a video ({', '.join(VIDEO_EXTENSIONS)}), a folder or a list file (.txt/.csv).")
    seen: dict[str, Path] = {}
    for tid, path in pairs:
        if tid in seen and seen[tid] != path:
            raise T12kError(f"trailer id {tid} is given twice ({seen[tid]} and {path}); ids must be unique: "
                            "rename a file or give ids in a list file.")
        seen[tid] = path
    return sorted(seen.items())


def _read_list(path: Path) -> list[tuple[str, Path]]:
    if not path.is_file():
        raise T12kError(f"list file {path} does not exist.")
    out = []
    with open(path, newline="") as f:
        rows = list(csv.reader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ","))
    for lineno, row in enumerate(rows, 1):
        row = [c.strip() for c in row]
        if not row or not row[0] or row[0].startswith("#") or (lineno == 1 and row[0].lower() == "path"):
            continue
        if len(row) > 2:
            raise T12kError(f"{path}, line {lineno}: expected `path` or `path,id`, got {len(row)} fields.")
        v = Path(row[0]) if Path(row[0]).is_absolute() else path.parent / row[0]
        out.append((row[1] if len(row) == 2 and row[1] else v.stem, v))
    if not out:
        raise T12kError(f"list file {path} names no videos.")
    return out
