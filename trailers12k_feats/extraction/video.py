"""Decode a video into frames at a target rate, cut it into shots and the shots into clips.

One pass over the file: PyAV decodes (threaded), each source frame is scaled and converted
in libswscale only when it is used, and frames are resampled to the target fps by their
timestamps (a target time takes the frame shown at that moment), which is correct for
variable frame rates and needs no re-encode. Rotation metadata is applied. The same frames
feed the shot detector (PySceneDetect's ContentDetector, run frame by frame with no
look-ahead) and the clip builder, so memory holds one clip at a time however long the video.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import av
import numpy as np

from trailers12k_feats.utils import T12kError

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".ts", ".flv", ".wmv")
SEGMENTATIONS = ("shots", "fixed")
LEFTOVERS = ("drop", "pad")


class VideoError(T12kError):
    """A video that cannot be used (corrupt, no video stream, too short...): skip it, report why."""


@dataclass(frozen=True)
class ClipSpec:
    """How frames become clips. The cache records these; docs/extraction.md explains the choices."""

    fps: float = 24.0  # frames are resampled to this rate
    fpc: int = 24  # frames per clip
    segmentation: str = "shots"  # "shots": clips never cross a detected cut; "fixed": cuts ignored
    shot_threshold: float = 27.0  # ContentDetector threshold on the HSV frame difference
    min_shot_frames: int = 15  # no two cuts closer than this (PySceneDetect's min_scene_len)
    leftover: str = "drop"  # frames of a shot that do not fill a clip: "drop" them or "pad" a clip
    min_leftover: int = 0  # with "pad": a shorter remainder is still dropped; 0 = half a clip
    short_side: int = 256  # decoded frames are scaled so their shorter side has this many pixels

    def __post_init__(self) -> None:
        if not 1 <= self.fps <= 240:
            raise T12kError(f"fps must be within 1..240, got {self.fps}; the released features use 24.")
        if self.fpc < 1:
            raise T12kError(f"frames per clip must be >= 1, got {self.fpc}; the released features use 24.")
        if self.segmentation not in SEGMENTATIONS:
            raise T12kError(f"segmentation must be one of {', '.join(SEGMENTATIONS)}, got {self.segmentation!r}.")
        if self.leftover not in LEFTOVERS:
            raise T12kError(f"leftover must be one of {', '.join(LEFTOVERS)}, got {self.leftover!r}.")
        if not 0 <= self.min_leftover <= self.fpc:
            raise T12kError(f"min_leftover must be within 0..fpc ({self.fpc}), got {self.min_leftover}.")
        if self.short_side < 16:
            raise T12kError(f"short_side must be >= 16 pixels, got {self.short_side}.")
        if self.min_shot_frames < 1 or self.shot_threshold <= 0:
            raise T12kError("min_shot_frames must be >= 1 and shot_threshold > 0.")

    @property
    def rate(self) -> Fraction:
        """The target rate as an exact fraction (23.976 -> 24000/1001)."""
        return exact_rate(self.fps)

    @property
    def leftover_frames(self) -> int:
        """The shortest shot remainder that "pad" turns into a clip."""
        return self.min_leftover or max(1, self.fpc // 2)


@dataclass
class Clip:
    """`fpc` consecutive frames of one shot. Times are seconds on the resampled timeline."""

    frames: np.ndarray  # (T, H, W, 3) uint8 RGB
    start: float
    end: float
    shot: int  # shot index within the video (-1 with fixed segmentation)


# A video is "partial" when it decodes shorter than its container declares by more than
# max(PARTIAL_MIN_SECONDS, PARTIAL_FRACTION x declared): a truncated download or copy. The
# margin absorbs what is normal: a first frame after time 0, an audio track or edit list
# that outlasts the video by a few frames, rounding of the declared value.
PARTIAL_MIN_SECONDS = 1.0
PARTIAL_FRACTION = 0.05


def is_partial(decoded: float, declared: float | None) -> bool:
    """Whether `decoded` seconds fall short of the `declared` ones by more than the tolerance above."""
    if not declared or declared <= 0:
        return False
    return declared - decoded > max(PARTIAL_MIN_SECONDS, PARTIAL_FRACTION * declared)


@dataclass
class Durations:
    """Filled in by :func:`frames`: seconds decoded, and seconds the file declares (None: it does not say)."""

    decoded: float = 0.0
    declared: float | None = None

    @property
    def partial(self) -> bool:
        return is_partial(self.decoded, self.declared)


@dataclass(frozen=True)
class VideoInfo:
    path: str
    width: int  # display size after rotation and sample aspect ratio
    height: int
    rotation: int  # degrees counter-clockwise applied to the coded frames
    duration: float  # seconds (0 when the container does not say)
    rate: float  # average frame rate the container reports (0 when unknown)


def exact_rate(fps: float | Fraction) -> Fraction:
    """`fps` as a fraction; the NTSC rates (23.976, 29.97, 59.94) become n * 1000/1001."""
    for base in (24, 30, 48, 60, 120):
        if abs(float(fps) - base * 1000 / 1001) < 5e-4:
            return Fraction(base * 1000, 1001)
    return Fraction(fps).limit_denominator(1001)


def _open(path: str | os.PathLike) -> av.container.InputContainer:
    p = Path(path)
    if not p.is_file():
        raise VideoError(f"{p}: no such file" if not p.exists() else f"{p}: not a regular file")
    if p.stat().st_size == 0:
        raise VideoError(f"{p}: empty file")
    try:
        return av.open(str(p), metadata_errors="ignore")
    except av.FFmpegError as e:
        raise VideoError(f"{p}: cannot be opened as a video ({e})") from None


def _video_stream(container: av.container.InputContainer, path: str | os.PathLike) -> av.video.stream.VideoStream:
    if not container.streams.video:
        raise VideoError(f"{path}: has no video stream")
    return container.streams.video[0]


def declared_duration(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> float | None:
    """The video's length as the file declares it, in seconds, or None when it does not say.

    The video stream's own declarations come first (its duration, Matroska's DURATION tag,
    its frame count over its rate; the longest of them, since a truncated AVI's index-based
    duration shrinks while its header's frame count does not); the container's duration,
    which may include a longer audio track, only when the stream declares nothing.
    """
    found = []
    if stream.duration and stream.time_base:
        found.append(float(stream.duration * stream.time_base))
    tag = (stream.metadata or {}).get("DURATION") or (stream.metadata or {}).get("duration")
    if tag:
        try:
            h, m, sec = tag.split(":")
            found.append(int(h) * 3600 + int(m) * 60 + float(sec))
        except ValueError:
            pass  # an unreadable tag is no declaration
    if stream.frames and stream.average_rate:
        found.append(stream.frames / float(stream.average_rate))
    if found:
        return max(found)
    return float(container.duration / av.time_base) if container.duration else None


def _display_size(width: int, height: int, sar: Fraction | None, rotation: int) -> tuple[int, int]:
    if sar and sar > 0 and sar != 1:
        width = round(width * sar)
    return (height, width) if rotation % 180 else (width, height)


def video_info(path: str | os.PathLike) -> VideoInfo:
    """Size, rotation, duration and rate of a video without decoding all of it."""
    with _open(path) as c:
        s = _video_stream(c, path)
        rotation = 0
        for frame in c.decode(s):
            rotation = int(round(frame.rotation or 0))
            break
        w, h = _display_size(s.codec_context.width, s.codec_context.height, s.sample_aspect_ratio, rotation)
        duration = float(c.duration / av.time_base) if c.duration else 0.0
        return VideoInfo(str(path), w, h, rotation, duration, float(s.average_rate or 0))


def _scaled(width: int, height: int, short_side: int) -> tuple[int, int]:
    scale = short_side / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def frames(path: str | os.PathLike, fps: float | Fraction = 24, short_side: int = 256,
           threads: int = 0, durations: Durations | None = None) -> Iterator[np.ndarray]:
    """Yield RGB frames (H, W, 3) uint8 of `path` resampled to `fps`, shorter side `short_side`.

    Target frame k (time k/fps from the first frame) is the source frame on screen at that
    time, so a 23.976 or variable-rate source becomes an exact `fps` sequence. Frames are
    rotated to how a player shows them. Raises VideoError when nothing can be decoded.
    `durations`, when given, receives the declared length on opening and the decoded one
    once every frame has been yielded.
    """
    rate = exact_rate(fps)
    with _open(path) as c:
        s = _video_stream(c, path)
        if durations is not None:
            durations.declared = declared_duration(c, s)
        s.thread_type = "AUTO"  # frame + slice threads inside the decoder
        s.codec_context.thread_count = threads
        default_dur = 1 / Fraction(s.average_rate) if s.average_rate else Fraction(1, 25)
        t0 = None
        prev = prev_img = None  # last decoded frame and its converted image (converted only when used)
        prev_t = None
        k = 0  # next target frame index
        size = rotation = None
        n_decoded = 0
        try:
            for frame in c.decode(s):
                n_decoded += 1
                t = Fraction(frame.pts) * s.time_base if frame.pts is not None else None
                if t is None:
                    t = (prev_t + default_dur) if prev_t is not None else Fraction(0)
                if t0 is None:
                    t0 = t
                    rotation = int(round(frame.rotation or 0)) % 360
                    w, h = _display_size(frame.width, frame.height, s.sample_aspect_ratio, 0)
                    size = _scaled(w, h, short_side)
                t = t - t0
                if prev is not None and prev_t is not None and t <= prev_t:
                    continue  # out-of-order or duplicate timestamp: keep the earlier frame
                if prev is not None:
                    while k < t * rate:  # target times before this frame show the previous one
                        if prev_img is None:
                            prev_img = _convert(prev, size, rotation)
                        yield prev_img
                        k += 1
                prev, prev_img, prev_t = frame, None, t
        except av.FFmpegError as e:
            if prev is None:
                raise VideoError(f"{path}: cannot be decoded ({e})") from None
            # A truncated or damaged tail: keep what decoded, as players do.
            log.warning("%s: decoding stopped early after %d frames (%s)", path, n_decoded, e)
        if prev is None:
            raise VideoError(f"{path}: contains no decodable video frames")
        dur = Fraction(prev.duration) * s.time_base if prev.duration else default_dur
        end = prev_t + dur
        while k < end * rate:
            if prev_img is None:
                prev_img = _convert(prev, size, rotation)
            yield prev_img
            k += 1
        if durations is not None:
            durations.decoded = float(end)


def _convert(frame: av.VideoFrame, size: tuple[int, int], rotation: int) -> np.ndarray:
    img = frame.to_ndarray(width=size[0], height=size[1], format="rgb24", interpolation="AREA")  # (H, W, 3)
    if rotation:
        img = np.ascontiguousarray(np.rot90(img, k=rotation // 90))  # counter-clockwise, as players show it
    return img


class ShotDetector:
    """Hard-cut detection, one frame at a time: PySceneDetect's ContentDetector in suppress mode.

    Suppress mode reports a cut on the frame that starts the new shot, with no delay, so
    clips can be emitted as frames arrive. Frames are halved before scoring, as
    PySceneDetect downscales by default.
    """

    def __init__(self, threshold: float = 27.0, min_shot_frames: int = 15, fps: float | Fraction = 24) -> None:
        from scenedetect import FrameTimecode
        from scenedetect.detector import FlashFilter
        from scenedetect.detectors import ContentDetector

        self._tc = FrameTimecode
        self._fps = float(fps)
        self._det = ContentDetector(threshold=threshold, min_scene_len=min_shot_frames,
                                    filter_mode=FlashFilter.Mode.SUPPRESS)
        self._n = 0

    def is_cut(self, frame: np.ndarray) -> bool:
        """True when `frame` (H, W, 3) RGB starts a new shot."""
        bgr = np.ascontiguousarray(frame[::2, ::2, ::-1])
        cuts = self._det.process_frame(self._tc(self._n, fps=self._fps), bgr)
        self._n += 1
        return bool(cuts) and self._n > 1


def decode_clips(path: str | os.PathLike, spec: ClipSpec, threads: int = 0,
                 durations: Durations | None = None) -> Iterator[Clip]:
    """Yield the clips of a video: shots (or the fixed timeline) cut into `fpc`-frame clips.

    `durations` receives the decoded and declared lengths (see :func:`frames`).
    """
    rate = spec.rate
    detector = ShotDetector(spec.shot_threshold, spec.min_shot_frames, rate) if spec.segmentation == "shots" else None
    buf: list[np.ndarray] = []
    shot, start_k = 0, 0

    def finish(k_end: int) -> Iterator[Clip]:
        # Remainder of a shot shorter than a clip: dropped, or padded with its last frame.
        if buf and spec.leftover == "pad" and len(buf) >= spec.leftover_frames:
            frames_ = buf + [buf[-1]] * (spec.fpc - len(buf))
            yield Clip(np.stack(frames_), float(start_k / rate), float(k_end / rate),
                       shot if detector else -1)

    k = -1
    for k, img in enumerate(frames(path, rate, spec.short_side, threads, durations)):
        if detector is not None and detector.is_cut(img):
            yield from finish(k)
            buf, shot, start_k = [], shot + 1, k
        if not buf:
            start_k = k
        buf.append(img)
        if len(buf) == spec.fpc:
            yield Clip(np.stack(buf), float(start_k / rate), float((k + 1) / rate), shot if detector else -1)
            buf = []
    yield from finish(k + 1)


def find_videos(root: str | os.PathLike) -> list[Path]:
    """Video files directly inside or below `root`, by extension, sorted."""
    root = Path(root)
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS
                  and not p.name.startswith("."))
