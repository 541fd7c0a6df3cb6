"""The worker side of extraction: videos -> preprocessed clip chunks, ready for the models.

`ClipDataset` runs in DataLoader workers: it decodes each video, cuts shots and clips, and
yields chunks of the clips' frames that any backbone sees (the union of the groups' frame
indices), once, however many backbones there are. Each group's resize, crop and
normalisation run batched on the model's device (:func:`crops`). A bad video yields a failure
record instead of raising; the end marker of a good one carries its decoded and declared
durations.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from trailers12k_feats.extraction import backbones as bb
from trailers12k_feats.extraction.video import (
    ClipSpec,
    Durations,
    VideoError,
    decode_clips,
)


@dataclass(frozen=True)
class Group:
    """Backbones that share frame selection and geometry share one uint8 crop."""

    key: int
    pre: bb.Preprocess
    frames: tuple[int, ...]  # which of the clip's fpc frames the models see


def union_frames(groups: list[Group]) -> tuple[int, ...]:
    """The clip frames some group sees, in order: what the workers ship."""
    return tuple(sorted({i for g in groups for i in g.frames}))


def crops(parts: list[torch.Tensor], group: Group, shipped: tuple[int, ...]) -> torch.Tensor:
    """Chunks of shipped frames -> one batch of the group's uint8 crops, on the chunks' device.

    parts: (n, k, H, W, 3) uint8 each, k = len(shipped); chunks of one size are resized
    together (videos differ in size). Returns (B, t, 3, h, w) uint8, B = sum of the n.
    """
    pos = [shipped.index(i) for i in group.frames]
    out, i = [], 0
    while i < len(parts):
        j = i + 1
        while j < len(parts) and parts[j].shape[2:] == parts[i].shape[2:]:
            j += 1
        f = torch.cat(parts[i:j])[:, pos]  # (n, t, H, W, 3)
        n, t, H, W, _ = f.shape
        c = group.pre.geometric(f.reshape(n * t, H, W, 3).permute(0, 3, 1, 2))  # (n*t, 3, h, w)
        out.append(c.reshape(n, t, *c.shape[1:]))
        i = j
    return torch.cat(out).contiguous()  # (B, t, 3, h, w)


def frame_index(kind: str, fpc: int, frame_pool: str = "mean", image_frames: int = 0) -> tuple[int, ...]:
    """Which of a clip's `fpc` frames a backbone of `kind` ("2d"/"3d") sees.

    A 3D model sees every frame; a 2D model the centre frame (`frame_pool="center"`) or
    `image_frames` evenly spaced ones (0: all).
    """
    if kind == "3d":
        n = fpc
    elif frame_pool == "center":
        return (fpc // 2,)
    else:
        n = image_frames or fpc
    # The centres of n equal segments of the clip: all frames when n == fpc, the middle one when n == 1.
    return tuple(int(i) for i in ((np.arange(n) + 0.5) * fpc / n - 0.5).round())


class ClipDataset(IterableDataset):
    """Yields chunks of preprocessed clips per video, then a final marker or a failure.

    Marker: {"tid", "path", "clips", "decoded_s", "declared_s"}. Failure: {"tid", "path",
    "error", "sent", "short"}, where "short" says the video held no whole clip (and "note" may
    say it was cut short).
    """

    def __init__(self, videos: list[tuple[str, Path]], spec: ClipSpec, frames: tuple[int, ...], chunk: int,
                 threads: int, device: str = "cpu") -> None:
        self.videos, self.spec, self.frames, self.chunk, self.threads = videos, spec, list(frames), chunk, threads
        self.device = device  # where the shot detector runs (TransNetV2 on the extraction device)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        mine = self.videos if info is None else self.videos[info.id::info.num_workers]
        for tid, path in mine:
            yield from self._video(tid, path)

    def _video(self, tid: str, path: Path) -> Iterator[dict]:
        n = 0
        buf = []
        durations = Durations()
        try:
            for clip in decode_clips(path, self.spec, self.threads, durations, self.device):
                buf.append(clip)
                if len(buf) == self.chunk:
                    yield self._pack(tid, buf)
                    n, buf = n + len(buf), []
            if buf:
                yield self._pack(tid, buf)
                n += len(buf)
            if n == 0:
                yield {"tid": tid, "path": str(path), "error": self._too_short(path), "sent": 0, "short": True,
                       "note": (f"only {durations.decoded:.1f} s of the {durations.declared:.1f} s its file declares "
                                f"decode (truncated or damaged?)") if durations.partial else ""}
                return
            yield {"tid": tid, "path": str(path), "clips": n, "decoded_s": durations.decoded,
                   "declared_s": durations.declared}
        except Exception as e:  # noqa: BLE001 - a bad video must never stop the run
            reason = str(e) if isinstance(e, VideoError) else f"{path}: {type(e).__name__}: {e}"
            yield {"tid": tid, "path": str(path), "error": reason, "sent": n, "short": False}

    def _too_short(self, path: Path) -> str:
        """Why a video gave no clip; the caller adds what to do (extract and predict differ)."""
        within = " within one shot" if self.spec.segmentation == "shots" else ""
        return f"{path}: shorter than one clip ({self.spec.fpc} frames at {self.spec.fps:g} fps{within})"

    def _pack(self, tid: str, buf: list) -> dict:
        x = torch.from_numpy(np.stack([c.frames[self.frames] for c in buf]))  # (n, k, H, W, 3) uint8
        return {"tid": tid, "x": x,
                "start": np.array([c.start for c in buf], np.float32),
                "end": np.array([c.end for c in buf], np.float32),
                "shot": np.array([c.shot for c in buf], np.int32)}


def as_is(item: dict) -> dict:
    return item  # DataLoader would turn numbers and arrays into tensors


def worker_init(_: int) -> None:
    torch.set_num_threads(1)  # the models' threads and FFmpeg's own need the cores
