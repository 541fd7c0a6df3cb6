"""Shot detectors on edited videos: recall per kind of transition, false boundaries, F1 and speed, in one run.

The videos come from `sources.synthvideo.edited_video` (`random_edit`): shots of made-up
scenes (textured, with camera and object motion) joined by hard cuts, dissolves and fades
through black of 8 to 32 frames in equal shares and shuffled order, and a flash (2-3 frames
washed towards white) in every other shot, which is no boundary. Every detector runs through
`shots.find_shots` (`t12k shots`), which cuts shots with `video.segment` as extraction does,
so what is measured is what extraction does: decoding, the 48x27 copies TransNetV2 reads,
detection and the rule that turns probabilities into shots.

Per detector:
  * recall of cuts, dissolves and fades: a transition is found when a detected boundary (the
    frames between two consecutive shots, none for a cut) comes within TOL frames of it;
  * false boundaries per 1,000 frames: detected boundaries near no transition (and how many
    of them are at flashes);
  * precision, recall and F1 over all transitions;
  * spanned: transitions whose middle lies inside a shot, so a clip may hold both sides;
  * lost/cut: frames left out of every shot at a found hard cut, on average;
  * frames/s of all of it on the device at hand (`--device`, where TransNetV2 runs; the
    PySceneDetect detectors always run on the CPU), beside decoding alone and, for
    TransNetV2, the network alone.

    python bench/bench_shots.py [--videos 8] [--shots 12] [--size 192x108] [--device cpu]
        [--detectors content,adaptive,transnetv2] [--seed 0] [--threshold NAME=VALUE ...]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from machine import cpu_summary

from trailers12k_feats.extraction import shots, video
from trailers12k_feats.extraction.video import ClipSpec
from trailers12k_feats.sources.synthvideo import (
    JOINS,
    EditedVideo,
    Join,
    edited_video,
    random_edit,
)

TOL = 2  # frames between a detected boundary and a transition that still count as a match


def make_videos(root: Path, n: int, n_shots: int, size: tuple[int, int], seed: int) -> list[EditedVideo]:
    rng = np.random.default_rng(seed)
    return [edited_video(root / f"edit{i:03d}.mp4", size=size, seed=seed * 1000 + i, crf=20,
                         **random_edit(rng, n_shots)) for i in range(n)]


def shot_spans(ev: EditedVideo, spec: ClipSpec, device: str) -> list[tuple[int, int]]:
    """(first frame, end) of every shot, as `t12k shots` finds them."""
    (found,) = shots.find_shots([ev.path], spec, device)
    return [(s["start_frame"], s["end_frame"]) for s in found["shots"]]


def near(bound: tuple[int, int], join: Join) -> bool:
    """Whether a detected boundary (end of a shot, start of the next) comes within TOL frames of `join`."""
    return not (bound[1] + TOL < join.start or bound[0] - TOL > join.end)


def score(videos: list[EditedVideo], found: list[list[tuple[int, int]]]) -> dict:
    """Matches of detected boundaries with the known transitions, over all videos."""
    hits = {k: 0 for k in JOINS}
    total = {k: 0 for k in JOINS}
    false = spanned = at_flash = 0
    lost = []
    for ev, spans in zip(videos, found):
        bounds = [(a_end, b_start) for (_, a_end), (b_start, _) in zip(spans, spans[1:])]  # (end, next start)
        for j in ev.joins:
            total[j.kind] += 1
            matched = [b for b in bounds if near(b, j)]
            hits[j.kind] += bool(matched)
            if j.kind == "cut" and matched:
                lost.append(sum(b[1] - b[0] for b in matched))
            spanned += any(a < j.middle < b for a, b in spans)
        wrong = [b for b in bounds if not any(near(b, j) for j in ev.joins)]
        false += len(wrong)
        at_flash += sum(any(near(b, Join("flash", *f)) for f in ev.flashes) for b in wrong)
    tp, n = sum(hits.values()), sum(total.values())
    precision = tp / max(tp + false, 1)
    recall = tp / max(n, 1)
    return {"hits": hits, "total": total, "false": false, "at_flash": at_flash, "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / max(precision + recall, 1e-9), "spanned": spanned,
            "lost_per_cut": float(np.mean(lost)) if lost else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=8)
    ap.add_argument("--shots", type=int, default=12, help="shots per video (transitions: one fewer)")
    ap.add_argument("--size", default="192x108", help="WIDTHxHEIGHT of the videos")
    ap.add_argument("--device", default="cpu", help="where TransNetV2 runs: cpu or cuda[:N]")
    ap.add_argument("--detectors", default=",".join(shots.DETECTORS))
    ap.add_argument("--threshold", action="append", default=[], help="NAME=VALUE: a detector's threshold")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--short-side", type=int, default=108, help="decoded frames' shorter side (extraction: 256)")
    args = ap.parse_args()
    size = tuple(int(x) for x in args.size.split("x"))
    thresholds = {k: float(v) for k, v in (t.split("=") for t in args.threshold)}
    names = [shots.get_detector(n).name for n in args.detectors.split(",")]
    device = args.device
    print(cpu_summary(), f"torch threads {torch.get_num_threads()}", f"device {device}" +
          (f" ({torch.cuda.get_device_name(device)})" if device.startswith("cuda") else ""))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        videos = make_videos(Path(tmp), args.videos, args.shots, size, args.seed)
        frames = sum(ev.frames for ev in videos)
        print(f"{len(videos)} videos {args.size}, {frames} frames, {sum(len(ev.joins) for ev in videos)} "
              f"transitions, {sum(len(ev.flashes) for ev in videos)} flashes (made in {time.perf_counter() - t0:.0f} s)")
        t0 = time.perf_counter()
        for ev in videos:
            for _ in video.decode(ev.path, 24, args.short_side, small=shots.TransNetShots.small):
                pass
        print(f"decoding alone (with the 48x27 copies): {frames / (time.perf_counter() - t0):.0f} frames/s")
        for name in names:
            shots.get_detector(name).check()
        if "transnetv2" in names:
            shots.load_transnet(device)  # built once per process, as in an extraction worker
        header = (f"{'detector':<11} {'threshold':>9} {'cuts':>7} {'dissolves':>9} {'fades':>7} {'false/1k':>8} "
                  f"{'P':>6} {'R':>6} {'F1':>6} {'spanned':>7} {'lost/cut':>8} {'frames/s':>9}")
        rows = []
        for name in names:
            spec = ClipSpec(shots=name, short_side=args.short_side,
                            **({"shot_threshold": thresholds[name]} if name in thresholds else {}))
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            found = [shot_spans(ev, spec, device) for ev in videos]
            fps = frames / (time.perf_counter() - t0)
            s = score(videos, found)
            cell = {k: f"{100 * s['hits'][k] / max(s['total'][k], 1):.0f}%" for k in JOINS}
            rows.append(f"{name:<11} {spec.resolved(device).shot_threshold:>9g} {cell['cut']:>7} "
                        f"{cell['dissolve']:>9} {cell['fade']:>7} {1000 * s['false'] / frames:>8.2f} "
                        f"{s['precision']:>6.3f} {s['recall']:>6.3f} {s['f1']:>6.3f} {s['spanned']:>7} "
                        f"{s['lost_per_cut']:>8.2f} {fps:>9.0f}")
            print(f"  {name}: found {s['hits']} of {s['total']}; {s['false']} false boundaries, {s['at_flash']} "
                  "of them at flashes", flush=True)
        print(header)
        print("\n".join(rows))
        if "transnetv2" in names:
            det = shots.TransNetShots(device=device)
            window = np.random.default_rng(0).integers(0, 256, (shots.WINDOW, 27, 48, 3), dtype=np.uint8)
            det.probabilities(window)  # warm-up
            t0 = time.perf_counter()
            for _ in range(10):
                det.probabilities(window)
            dt = (time.perf_counter() - t0) / 10
            print(f"TransNetV2 network alone on {device}: {shots.STEP / dt:.0f} frames/s "
                  f"({1000 * dt:.0f} ms per window of {shots.WINDOW} frames, {shots.STEP} of them new)")


if __name__ == "__main__":
    main()
