"""Write small synthetic videos with PyAV: known hard cuts, chosen rates, sizes and rotation.

Each shot is a smooth random texture of its own palette, panning slowly, so frames within a
shot differ little and a cut changes every pixel: the shot boundaries are known exactly.
`edited_video` joins made-up scenes with cuts, dissolves and fades through black and adds
flashes that are no boundary, for the shot detectors' tests and benchmark
(bench/bench_shots.py). Used by the tests and the demo; nothing here is needed to extract
real trailers.
"""

from __future__ import annotations

import colorsys
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import av
import numpy as np

from trailers12k_feats.utils import atomic_path


def shot_texture(rng: np.random.Generator, height: int, width: int, colour: Sequence[float] | None = None,
                 pad: int = 64) -> np.ndarray:
    """A smooth RGB texture (height + pad, width + pad, 3) uint8 to pan over during a shot."""
    H, W = height + pad, width + pad
    small = rng.random((H // 16 + 2, W // 16 + 2, 3))
    # Bilinear upsampling of coarse noise gives large soft blobs that survive compression.
    ys, xs = np.linspace(0, small.shape[0] - 1.001, H), np.linspace(0, small.shape[1] - 1.001, W)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    a, b = small[y0][:, x0], small[y0][:, x0 + 1]
    c, d = small[y0 + 1][:, x0], small[y0 + 1][:, x0 + 1]
    img = (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy  # (H, W, 3) in [0, 1]
    base = np.asarray(colour if colour is not None else rng.random(3), float)
    img = 0.55 * img + 0.45 * base
    return (img * 255).clip(0, 255).astype(np.uint8)


def shot_frames(texture: np.ndarray, n: int, height: int, width: int, speed: float = 1.0) -> list[np.ndarray]:
    """`n` frames panning diagonally over `texture`."""
    pad = min(texture.shape[0] - height, texture.shape[1] - width)
    out = []
    for i in range(n):
        o = int(round(i * speed)) % max(pad, 1)
        out.append(texture[o:o + height, o:o + width])
    return out


def write_video(path: str | os.PathLike, frames: Sequence[np.ndarray], fps: float | Fraction = 24,
                times: Sequence[float] | None = None, rotation: int = 0, codec: str = "libx264",
                crf: int = 18) -> Path:
    """Encode RGB frames (H, W, 3) uint8 into `path` (container from the suffix).

    `times` gives each frame's presentation time in seconds (variable frame rate); by
    default frame i is shown at i / fps. `rotation` stores a display rotation
    (counter-clockwise degrees) in the container instead of rotating pixels.
    """
    path = Path(path)
    rate = Fraction(fps).limit_denominator(1001)
    H, W = frames[0].shape[:2]
    with atomic_path(path) as tmp:
        with av.open(str(tmp), "w", format=_format(path)) as c:
            s = c.add_stream(codec, rate=rate)
            s.width, s.height, s.pix_fmt = W, H, "yuv420p"
            if codec == "libx264":
                s.options = {"crf": str(crf), "preset": "ultrafast"}
            if times is not None:
                s.codec_context.time_base = Fraction(1, 1000)
            if rotation:
                s.set_display_rotation(rotation)
            for i, img in enumerate(frames):
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
                if times is not None:
                    frame.pts, frame.time_base = int(round(times[i] * 1000)), Fraction(1, 1000)
                for packet in s.encode(frame):
                    c.mux(packet)
            for packet in s.encode():
                c.mux(packet)
    return path


def _format(path: Path) -> str:
    return {".mkv": "matroska", ".webm": "webm", ".avi": "avi", ".mov": "mov"}.get(path.suffix.lower(), "mp4")


def cut_video(path: str | os.PathLike, shot_lengths: Sequence[int], size: tuple[int, int] = (96, 64),
              fps: float | Fraction = 24, seed: int = 0, **kw) -> Path:
    """A video of shots with the given frame counts and known cuts; `size` is (width, height)."""
    rng = np.random.default_rng(seed)
    W, H = size
    frames: list[np.ndarray] = []
    for n in shot_lengths:
        frames += shot_frames(shot_texture(rng, H, W), n, H, W)
    return write_video(path, frames, fps=fps, **kw)


# ---------------------------------------------------------------------------- edited videos

JOINS = ("cut", "dissolve", "fade")  # how `edited_video` joins two shots


@dataclass(frozen=True)
class Join:
    """A known shot boundary of an edited video, in frames of its own rate.

    Frames `start`..`end - 1` are the transition (blends of two shots, or frames of a fade);
    a hard cut has `start == end`, the first frame of the new shot.
    """

    kind: str
    start: int
    end: int

    @property
    def middle(self) -> float:
        """Where one shot gives way to the other: a clip holding frames on both sides spans it."""
        return (self.start + self.end) / 2


@dataclass(frozen=True)
class EditedVideo:
    path: Path
    frames: int
    joins: tuple[Join, ...]
    flashes: tuple[tuple[int, int], ...]  # (first frame, end) of flashes inside shots: no boundary


class Scene:
    """A made-up scene filmed by a panning camera, so that a shot detector sees what it sees in
    films: a lit backdrop split at a horizon, textured at every scale (1/f noise), with
    objects of the scene's own palette fixed in it and one moving across it. Two scenes differ
    in layout and colour; consecutive frames of one differ by a little motion."""

    def __init__(self, rng: np.random.Generator, height: int, width: int, frames: int, hue: float) -> None:
        self.H, self.W = height, width
        scale = height / 108  # motion and detail scale with the picture, so any size looks alike
        self.v = scale * rng.uniform(0.5, 2.5, 2) * rng.choice([-1, 1], 2)  # camera pixels per frame (y, x)
        self.pad = pad = int(np.abs(self.v).max() * frames) + 4
        H, W = height + 2 * pad, width + 2 * pad

        def colour() -> np.ndarray:  # RGB near the scene's hue, any saturation and brightness
            rgb = colorsys.hsv_to_rgb((hue + rng.normal(0, 0.12)) % 1, rng.uniform(0.3, 1), rng.uniform(0.15, 1))
            return np.array(rgb, np.float32) * 255

        y, x = np.ogrid[:H, :W]
        horizon = rng.uniform(0.25, 0.75) * H + rng.uniform(-0.2, 0.2) * (x - W / 2)  # (1, W)
        img = np.where((y < horizon)[..., None], colour(), colour())  # (H, W, 3)
        for _ in range(int(rng.integers(6, 14))):  # objects of the scene: boxes and ellipses
            cy, cx = rng.random(2) * (H, W)
            ry, rx = rng.uniform(0.05, 0.3, 2) * (height, width)
            inside = (np.abs(y - cy) <= ry) & (np.abs(x - cx) <= rx) if rng.random() < 0.5 else \
                ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1
            img = np.where(inside[..., None], colour(), img)
        cells = [max(1, round(c * scale)) for c in (32, 16, 8, 4, 2)]
        grain = sum(_noise(rng, H, W, c) * c for c in cells) / sum(cells)  # (H, W) 1/f noise, about -1..1
        self.tex = img * (1 + 0.35 * grain[..., None]) + 20 * grain[..., None]  # (H, W, 3)
        self.obj = (rng.uniform(0.2, 0.8, 2) * (height, width), rng.uniform(-2, 2, 2), colour(),
                    max(3.0, min(height, width) / 6))

    def frame(self, i: int) -> np.ndarray:
        """Frame `i` of the shot (H, W, 3) float32; negative and late `i` continue the motion."""
        oy, ox = (self.pad + np.round(self.v * i)).astype(int).clip(0, 2 * self.pad)
        img = self.tex[oy:oy + self.H, ox:ox + self.W].copy()
        (cy, cx), (vy, vx), colour, r = self.obj
        y, x = np.ogrid[:self.H, :self.W]
        img[(y - (cy + vy * i)) ** 2 + (x - (cx + vx * i)) ** 2 <= r * r] = colour
        return img


def _noise(rng: np.random.Generator, height: int, width: int, cell: int) -> np.ndarray:
    """Smooth noise in -1..1 (height, width) with features of about `cell` pixels (bilinear)."""
    small = rng.uniform(-1, 1, (height // cell + 2, width // cell + 2)).astype(np.float32)
    ys, xs = np.arange(height) / cell, np.arange(width) / cell
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    top = small[y0][:, x0] * (1 - fx) + small[y0][:, x0 + 1] * fx
    bottom = small[y0 + 1][:, x0] * (1 - fx) + small[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def edited_video(path: str | os.PathLike, shots: Sequence[int], joins: Sequence[tuple[str, int]],
                 flashes: Sequence[tuple[int, int, int]] = (), size: tuple[int, int] = (160, 96),
                 fps: float | Fraction = 24, seed: int = 0, crf: int = 20) -> EditedVideo:
    """A video of `shots` (frames of each shot shown alone) joined by `joins`, with known boundaries.

    `joins[i]` = (kind, frames) joins shot i to shot i+1: ("cut", 0); ("dissolve", n): n frames
    blending the first shot (still moving) into the second (already moving); ("fade", n): n
    frames fading the first shot to black and the second in from black. `flashes` are (shot,
    offset, frames): a few frames of that shot washed towards white, as a camera flash or an
    explosion shows them, which is no boundary. `size` is (width, height).
    """
    if len(joins) != len(shots) - 1:
        raise ValueError(f"{len(shots)} shots need {len(shots) - 1} joins, got {len(joins)}")
    rng = np.random.default_rng(seed)
    W, H = size
    lengths = [n + sum(j[1] for j in joins[max(i - 1, 0):i + 1]) for i, n in enumerate(shots)]
    # Neighbouring scenes are a quarter to three quarters of the colour wheel apart: distinct shots.
    hues = np.cumsum(rng.uniform(0.25, 0.75, len(shots))) % 1
    scenes = [Scene(rng, H, W, n, hue) for n, hue in zip(lengths, hues)]
    out: list[np.ndarray] = []
    marks: list[Join] = []
    flash_at: list[tuple[int, int]] = []
    pending = {(s, o): n for s, o, n in flashes}
    for i, n in enumerate(shots):
        start = len(out)
        out += [scenes[i].frame(f) for f in range(n)]
        for (s, o), m in pending.items():
            if s == i:  # washed towards white, strongest first
                flash_at.append((start + o, start + o + m))
                for j in range(start + o, start + o + m):
                    out[j] = out[j] + (255 - out[j]) * (0.9 - 0.2 * (j - start - o))
        if i == len(shots) - 1:
            break
        kind, m = joins[i]
        if kind not in JOINS or (kind == "cut") != (m == 0):
            raise ValueError(f"a join is (kind, frames) with kind one of {', '.join(JOINS)} and 0 frames for a cut "
                             f"only; got {joins[i]!r}")
        a, b = scenes[i], scenes[i + 1]
        first = len(out)
        for j in range(m):
            if kind == "dissolve":
                w = (j + 1) / (m + 1)
                out.append((1 - w) * a.frame(n + j) + w * b.frame(j - m))
            else:
                t = (j + 0.5) / m
                out.append(a.frame(n + j) * (1 - 2 * t) if t < 0.5 else b.frame(j - m) * (2 * t - 1))
        marks.append(Join(kind, first, len(out)))
    frames = [np.clip(f, 0, 255).astype(np.uint8) for f in out]
    p = write_video(path, frames, fps=fps, crf=crf)
    return EditedVideo(p, len(frames), tuple(marks), tuple(sorted(flash_at)))


def random_edit(rng: np.random.Generator, shots: int = 12, shot_frames: tuple[int, int] = (30, 80),
                transition_frames: tuple[int, int] = (8, 32)) -> dict:
    """Arguments of `edited_video` for `shots` shots: lengths in `shot_frames`, cuts, dissolves and
    fades in equal shares and shuffled order, transitions of `transition_frames` frames (both
    ranges inclusive), and a flash of 2-3 frames in every other shot, 10 frames or more from
    its ends (a flash against a cut is a transition of its own, which trailers use too)."""
    if shot_frames[0] < 24:
        raise ValueError(f"shots of fewer than 24 frames leave no room for a flash; got {shot_frames}")
    kinds = [JOINS[i % len(JOINS)] for i in range(shots - 1)]
    rng.shuffle(kinds)
    lo, hi = transition_frames
    joins = [(k, 0 if k == "cut" else int(rng.integers(lo, hi + 1))) for k in kinds]
    lengths = [int(rng.integers(shot_frames[0], shot_frames[1] + 1)) for _ in range(shots)]
    flashes = [(i, int(rng.integers(10, n - 12)), int(rng.integers(2, 4))) for i, n in enumerate(lengths) if i % 2]
    return {"shots": lengths, "joins": joins, "flashes": flashes}
