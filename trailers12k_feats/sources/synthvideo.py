"""Write small synthetic videos with PyAV: known hard cuts, chosen rates, sizes and rotation.

Each shot is a smooth random texture of its own palette, panning slowly, so frames within a
shot differ little and a cut changes every pixel: the shot boundaries are known exactly.
Used by the tests and the demo; nothing here is needed to extract real trailers.
"""

from __future__ import annotations

import os
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
