"""Decode a video into frames at a target rate, cut it into shots and the shots into clips.

One pass over the file: PyAV decodes (threaded), each source frame is scaled and converted
in libswscale only when it is used, and frames are resampled to the target fps by their
timestamps (a target time takes the frame shown at that moment), which is correct for
variable frame rates and needs no re-encode. Rotation metadata is applied. The same frames
(and, for TransNetV2, 48x27 copies scaled in the same pass) feed the shot detector
(shots.py) and the clip builder, so memory holds one clip and the frames the detector has
not decided about yet (none for ContentDetector; for TransNetV2 up to 75, plus those of a
transition it is still reading, at most a few hundred), however long the video.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import deque
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import av
import numpy as np

from trailers12k_feats.extraction import shots
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
    segmentation: str = "shots"  # "shots": clips never cross a detected shot boundary; "fixed": boundaries ignored
    shots: str = "auto"  # shot detector (shots.DETECTORS); "auto": transnetv2 on CUDA, content on the CPU
    shot_threshold: float | None = None  # the detector's threshold; None: its own default (shots.DETECTORS)
    min_shot_frames: int = 15  # content and adaptive: no two cuts closer than this (PySceneDetect's min_scene_len)
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
        if self.min_shot_frames < 1:
            raise T12kError(f"min_shot_frames must be >= 1, got {self.min_shot_frames}.")
        if self.shots != shots.AUTO:
            if self.shot_threshold is not None:
                shots.get_detector(self.shots).check_threshold(self.shot_threshold)
            else:
                shots.get_detector(self.shots)
        elif self.shot_threshold is not None:
            raise T12kError(f"--shot-threshold {self.shot_threshold:g} needs --shots naming a detector: each reads "
                            f"its threshold differently and 'auto' picks one by device.")

    def resolved(self, device: str = "cpu") -> "ClipSpec":
        """This spec with "auto" replaced by the detector it picks on `device` and the threshold made explicit."""
        name = shots.resolve(self.shots, device)
        threshold = self.shot_threshold if self.shot_threshold is not None else shots.get_detector(name).threshold
        return dataclasses.replace(self, shots=name, shot_threshold=float(threshold))

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
    for img, _ in decode(path, fps, short_side, threads, durations):
        yield img


def decode(path: str | os.PathLike, fps: float | Fraction = 24, short_side: int = 256, threads: int = 0,
           durations: Durations | None = None, small: tuple[int, int] | None = None
           ) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """As :func:`frames`, yielding (frame, small copy): the copy is the same source frame scaled to
    `small` = (width, height) regardless of aspect (None: no copy), as TransNetV2 reads frames:
    bicubic, FFmpeg's default, with which its authors scale their inputs."""
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
                    if small is not None and rotation % 180:
                        small = small[::-1]  # scaled before it is turned, like the frames
                t = t - t0
                if prev is not None and prev_t is not None and t <= prev_t:
                    continue  # out-of-order or duplicate timestamp: keep the earlier frame
                if prev is not None:
                    while k < t * rate:  # target times before this frame show the previous one
                        if prev_img is None:
                            prev_img = _convert(prev, size, rotation), _convert(prev, small, rotation, "BICUBIC")
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
                prev_img = _convert(prev, size, rotation), _convert(prev, small, rotation, "BICUBIC")
            yield prev_img
            k += 1
        if durations is not None:
            durations.decoded = float(end)


def _convert(frame: av.VideoFrame, size: tuple[int, int] | None, rotation: int,
             interpolation: str = "AREA") -> np.ndarray | None:
    """`frame` scaled to `size` (width, height, before rotation) as RGB (H, W, 3) uint8, turned as a player shows it."""
    if size is None:
        return None
    img = frame.to_ndarray(width=size[0], height=size[1], format="rgb24", interpolation=interpolation)  # (H, W, 3)
    if rotation:
        img = np.ascontiguousarray(np.rot90(img, k=rotation // 90))  # counter-clockwise, as players show it
    return img


def segment(path: str | os.PathLike, spec: ClipSpec, threads: int = 0, durations: Durations | None = None,
            device: str = "cpu") -> Iterator[tuple[int, np.ndarray, int]]:
    """Yield (k, frame, shot) for every frame of `path` that belongs to a shot, in order.

    k is the frame's index at `spec.fps`; shot counts from 0 (-1 with fixed segmentation).
    Frames of a transition (a dissolve or fade TransNetV2 found) belong to no shot and are
    skipped. The detector runs on `device`; frames wait here until it has decided about them.
    """
    spec = spec.resolved(device)
    if spec.segmentation == "fixed":
        for k, (img, _) in enumerate(decode(path, spec.rate, spec.short_side, threads, durations)):
            yield k, img, -1
        return
    det = shots.build(spec.shots, spec.shot_threshold, spec.min_shot_frames, spec.rate, device)
    pending: deque[tuple[int, np.ndarray]] = deque()  # frames the detector may still place in a transition
    marks: deque[shots.Transition] = deque()  # transitions reported whose frames have not all left
    shot, filled, boundary = 0, False, False  # current shot, whether it has frames, whether the next one is new
    released = 0  # frames before this one have left

    def note(found: list[shots.Transition]) -> None:
        for t in found:
            if t.start < released or marks and t.start < marks[-1].end:
                raise RuntimeError(f"{spec.shots} reported a transition at frame {t.start} after deciding on it")
            marks.append(t)

    def release(upto: int) -> Iterator[tuple[int, np.ndarray, int]]:
        nonlocal shot, filled, boundary, released
        while pending and pending[0][0] < upto:
            k, img = pending.popleft()
            released, drop = k + 1, False
            while marks and k >= marks[0].start:
                boundary = True  # the shot ended before the transition
                if k < marks[0].end:
                    drop = True
                    break
                marks.popleft()
            if drop:
                continue
            if boundary and filled:
                shot, filled = shot + 1, False
            boundary, filled = False, True
            yield k, img, shot

    for k, (img, small) in enumerate(decode(path, spec.rate, spec.short_side, threads, durations, det.small)):
        pending.append((k, img))
        note(det.push(img, small))
        yield from release(det.decided)
    note(det.finish())
    yield from release(released + len(pending))


def decode_clips(path: str | os.PathLike, spec: ClipSpec, threads: int = 0,
                 durations: Durations | None = None, device: str = "cpu") -> Iterator[Clip]:
    """Yield the clips of a video: shots (or the fixed timeline) cut into `fpc`-frame clips.

    A clip never holds frames of two shots, nor frames of the transition between them.
    `durations` receives the decoded and declared lengths (see :func:`frames`); the shot
    detector runs on `device`.
    """
    rate = spec.rate
    buf: list[np.ndarray] = []
    shot, start_k, last = None, 0, -1

    def finish() -> Iterator[Clip]:
        # Remainder of a shot shorter than a clip: dropped, or padded with its last frame.
        if buf and spec.leftover == "pad" and len(buf) >= spec.leftover_frames:
            frames_ = buf + [buf[-1]] * (spec.fpc - len(buf))
            yield Clip(np.stack(frames_), float(start_k / rate), float((last + 1) / rate), shot)

    for k, img, s in segment(path, spec, threads, durations, device):
        if s != shot:
            yield from finish()
            buf, shot = [], s
        if not buf:
            start_k = k
        buf.append(img)
        last = k
        if len(buf) == spec.fpc:
            yield Clip(np.stack(buf), float(start_k / rate), float((k + 1) / rate), s)
            buf = []
    yield from finish()


def find_videos(root: str | os.PathLike) -> list[Path]:
    """Video files directly inside or below `root`, by extension, sorted."""
    root = Path(root)
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS
                  and not p.name.startswith("."))
