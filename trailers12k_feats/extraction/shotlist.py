"""`t12k shots`: the shots of videos as extraction would cut them (video.segment with the
chosen detector, no backbone run), and their table. Re-exported by shots.py."""

from __future__ import annotations

import dataclasses
import os


def find_shots(inputs: list[str | os.PathLike], spec, device: str = "cpu", threads: int = 0) -> list[dict]:
    """The shots of each video (files, folders or list files) as extraction would cut them with `spec`
    (a video.ClipSpec; its segmentation is ignored) and the detector on `device`, no backbone run.

    One dict per video: {"video", "detector", "fps", "shots": [{"start_frame", "end_frame",
    "start", "end"}, ...]}: frames at `spec.fps`, end exclusive, times in seconds. Frames of
    a transition belong to no shot, so one shot may end before the next starts.
    """
    # imported here: shots.py re-exports this module's functions, and video.py imports shots.py
    from trailers12k_feats.extraction import video
    from trailers12k_feats.extraction.inputs import resolve_inputs
    from trailers12k_feats.extraction.shots import get_detector

    spec = dataclasses.replace(spec, segmentation="shots").resolved(device)
    get_detector(spec.shots).check()
    out = []
    for _, path in resolve_inputs(inputs):
        spans: list[list[int]] = []  # [shot, first frame, end]
        for k, _, s in video.segment(path, spec, threads, device=device):
            if spans and spans[-1][0] == s:
                spans[-1][2] = k + 1
            else:
                spans.append([s, k, k + 1])
        out.append({"video": str(path), "detector": spec.shots, "fps": spec.fps,
                    "shots": [{"start_frame": a, "end_frame": b, "start": round(float(a / spec.rate), 4),
                               "end": round(float(b / spec.rate), 4)} for _, a, b in spans]})
    return out


def format_shots(found: list[dict]) -> str:
    """`find_shots`'s answer as a short table per video."""
    lines = []
    for v in found:
        lines.append(f"{v['video']}: {len(v['shots'])} shots ({v['detector']}, {v['fps']:g} fps)")
        lines.append("  shot  start_frame  end_frame    start      end")
        for i, s in enumerate(v["shots"]):
            lines.append(f"  {i:>4}  {s['start_frame']:>11}  {s['end_frame']:>9}  {s['start']:>7.2f}  {s['end']:>7.2f}")
    return "\n".join(lines)
