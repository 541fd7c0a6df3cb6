"""What extraction reads: the videos to process, and the worker-side stream of preprocessed clips.

`resolve_inputs` turns files, folders and list files into (trailer id, path) pairs.
`ClipDataset` runs in DataLoader workers: it decodes each video, cuts shots and clips, applies
every backbone group's uint8 resize and crop, and yields small chunks, so only compact crops
cross process boundaries. A bad video yields a failure record instead of raising.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from trailers12k_feats import backbones as bb
from trailers12k_feats.utils import T12kError
from trailers12k_feats.video import VIDEO_EXTENSIONS, ClipSpec, VideoError, clips, find_videos

if TYPE_CHECKING:
    from trailers12k_feats.extract import ExtractConfig


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


@dataclass(frozen=True)
class Group:
    """Backbones that share frame selection and geometry share one uint8 tensor."""

    key: int
    pre: bb.Preprocess
    frames: tuple[int, ...]  # which of the clip's fpc frames the models see


def frame_index(entry: bb.Backbone, cfg: "ExtractConfig") -> tuple[int, ...]:
    fpc = cfg.clip.fpc
    if entry.kind == "3d":
        n = entry.num_frames or fpc  # a fixed-length model gets the clip resampled in time
    elif cfg.frame_pool == "center":
        return (fpc // 2,)
    else:
        n = cfg.image_frames or fpc
    # The centres of n equal segments of the clip: all frames when n == fpc, the middle one when n == 1.
    return tuple(int(i) for i in ((np.arange(n) + 0.5) * fpc / n - 0.5).round())


class ClipDataset(IterableDataset):
    """Yields chunks of preprocessed clips per video, a final marker, or a failure."""

    def __init__(self, videos: list[tuple[str, Path]], spec: ClipSpec, groups: list[Group], chunk: int,
                 threads: int) -> None:
        self.videos, self.spec, self.groups, self.chunk, self.threads = videos, spec, groups, chunk, threads

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        mine = self.videos if info is None else self.videos[info.id::info.num_workers]
        for tid, path in mine:
            yield from self._video(tid, path)

    def _video(self, tid: str, path: Path) -> Iterator[dict]:
        n = 0
        buf = []
        try:
            for clip in clips(path, self.spec, self.threads):
                buf.append(clip)
                if len(buf) == self.chunk:
                    yield self._pack(tid, buf)
                    n, buf = n + len(buf), []
            if buf:
                yield self._pack(tid, buf)
                n += len(buf)
            if n == 0:
                raise VideoError(f"{path}: shorter than one clip ({self.spec.fpc} frames at {self.spec.fps} fps "
                                 f"within one shot); try --leftover pad or --segmentation fixed")
            yield {"tid": tid, "clips": n}
        except Exception as e:  # noqa: BLE001 - a bad video must never stop the run
            reason = str(e) if isinstance(e, VideoError) else f"{path}: {type(e).__name__}: {e}"
            yield {"tid": tid, "path": str(path), "error": reason, "sent": n}

    def _pack(self, tid: str, buf: list) -> dict:
        frames = torch.from_numpy(np.stack([c.frames for c in buf]))  # (n, fpc, H, W, 3) uint8
        x = {}
        for g in self.groups:
            f = frames[:, list(g.frames)]  # (n, t, H, W, 3)
            n, t, H, W, _ = f.shape
            f = g.pre.geometric(f.reshape(n * t, H, W, 3).permute(0, 3, 1, 2))  # (n*t, 3, h, w)
            x[g.key] = f.reshape(n, t, *f.shape[1:]).contiguous()  # (n, t, 3, h, w) uint8
        return {"tid": tid, "x": x,
                "start": np.array([c.start for c in buf], np.float32),
                "end": np.array([c.end for c in buf], np.float32),
                "shot": np.array([c.shot for c in buf], np.int32)}


def as_is(item: dict) -> dict:
    return item  # DataLoader would turn numbers and arrays into tensors


def worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers resize with torch; one thread each avoids oversubscription
