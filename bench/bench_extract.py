"""Extraction speed on one set of videos, in one run: decoding alone, each backbone alone, everything.

Prints
  * decode: frames/s of decoding + resampling + scaling alone, and with shot detection (the
    detector `auto` picks on --device) and clip building (what the workers do, without the
    backbones' uint8 resize/crop),
  * the workers' clip stream (`clipstream.ClipDataset`, in this process): decoding, shots, clips
    and every backbone group's uint8 resize/crop, as extraction runs it,
  * per backbone: clips/s of the model alone on clips already cropped by that stream,
  * full extraction (`extract.extract`) with all requested backbones: clips/s, seconds and
    the ratio full / decode-only (the aim is <= 1.2: compute hidden behind decoding),
  * precision check: each backbone's features in the chosen autocast dtype against fp32 on the
    same clips (max relative error, minimum cosine similarity).

    python bench/bench_extract.py [--backbones mobilenet_v2] [--videos 6] [--seconds 12]
        [--device cpu] [--precision fp32] [--workers 0] [--image-frames 0]

Weights: mobilenet_v2 from the offline package when present, others from the torch hub
cache, or random with --random-weights (speed does not depend on the values).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from machine import cpu_summary

from trailers12k_feats.extraction import backbones as bb
from trailers12k_feats.extraction import video
from trailers12k_feats.extraction.clipstream import ClipDataset
from trailers12k_feats.extraction.extract import (
    EXTRACT_PRECISIONS,
    ExtractConfig,
    build_models,
    extract,
)
from trailers12k_feats.sources.synthvideo import cut_video


def make_videos(root: Path, n: int, seconds: float, size: tuple[int, int]) -> list[Path]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        lengths, total = [], 0
        while total < seconds * 24:
            lengths.append(int(rng.integers(30, 100)))  # shots of 1.25-4 s, trailer-like
            total += lengths[-1]
        out.append(cut_video(root / f"tt{i:07d}.mp4", lengths, size=size, seed=i, crf=23))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbones", default="mobilenet_v2", help="comma-separated registry names")
    ap.add_argument("--videos", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=12.0, help="length of each video")
    ap.add_argument("--size", default="640x360", help="source video size WxH")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default=ExtractConfig.precision, choices=EXTRACT_PRECISIONS)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--image-frames", type=int, default=0)
    ap.add_argument("--random-weights", action="store_true")
    args = ap.parse_args()

    names = tuple(args.backbones.split(","))
    weights = tuple((n, str(bb.offline_weights())) for n in names if n == "mobilenet_v2" and bb.offline_weights())
    cfg = ExtractConfig(backbones=names, device=args.device, precision=args.precision, workers=args.workers,
                        batch_size=args.batch_size, image_frames=args.image_frames,
                        random_weights=args.random_weights, weights=() if args.random_weights else weights)
    spec = cfg.clip
    dev = args.device
    gpu = torch.cuda.get_device_name(0) if dev.startswith("cuda") else None
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_summary()}"
          + (f", {gpu}" if gpu else ""))
    W, H = (int(x) for x in args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = make_videos(tmp / "videos", args.videos, args.seconds, (W, H))
        print(f"{len(paths)} videos {W}x{H}, {args.seconds:.0f} s each; fps {spec.fps}, fpc {spec.fpc}, "
              f"short side {spec.short_side}, shots {spec.shots}; backbones {', '.join(names)}; {args.precision} on {dev}, "
              f"workers {args.workers}")

        t0 = time.perf_counter()
        n_frames = sum(1 for p in paths for _ in video.frames(p, spec.rate, spec.short_side))
        t_decode = time.perf_counter() - t0
        t0 = time.perf_counter()
        all_clips = [c for p in paths for c in video.decode_clips(p, spec, device=dev)]
        t_clips = time.perf_counter() - t0
        n_clips = len(all_clips)
        print(f"\ndecode alone:             {n_frames / t_decode:8.0f} frames/s  ({n_frames} frames, {t_decode:.1f} s)")
        print(f"decode + shots + clips:   {n_frames / t_clips:8.0f} frames/s  ({n_clips} clips, "
              f"{n_clips / t_clips:.1f} clips/s)")

        t0 = time.perf_counter()
        models = build_models(cfg)
        t_load = time.perf_counter() - t0
        # The workers' own stream: each model group's frames (clipstream.frame_index), resized and cropped.
        groups = list({m.group.key: m.group for m in models}.values())
        stream = ClipDataset([(p.stem, p) for p in paths], spec, groups, cfg.chunk, cfg.decode_threads, dev)
        t0 = time.perf_counter()
        kept, n_stream = [], 0  # the crops of the first clips feed the models below
        for item in stream:
            if "x" in item:
                if n_stream < 4 * args.batch_size:
                    kept.append(item["x"])
                n_stream += len(item["start"])
        t_stream = time.perf_counter() - t0
        print(f"clip stream with crops:   {n_frames / t_stream:8.0f} frames/s  ({n_stream} clips, "
              f"{n_stream / t_stream:.1f} clips/s; {len(groups)} crop group(s))")
        print()
        for m in models:
            x = torch.cat([c[m.group.key] for c in kept])[:4 * args.batch_size].to(dev)  # (n, t, 3, h, w) uint8
            n, t = x.shape[:2]
            batches = [x[i:i + args.batch_size] for i in range(0, n, args.batch_size)]
            m.embed(batches[0], cfg)  # warm-up
            if dev.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for b in batches:
                out = m.embed(b, cfg)
            if dev.startswith("cuda"):
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            print(f"{m.entry.name:22} alone: {n / dt:8.1f} clips/s  ({t} frames of {x.shape[-1]}px per clip)")
            if args.precision != "fp32":
                ref = m.embed(batches[0], ExtractConfig(backbones=names, device=dev, precision="fp32"))
                low = m.embed(batches[0], cfg)
                rel = ((low - ref).norm(dim=1) / ref.norm(dim=1)).max().item()
                cos = torch.nn.functional.cosine_similarity(low, ref, dim=1).min().item()
                print(f"{'':22} {args.precision} vs fp32: max relative error {rel:.2e}, min cosine {cos:.6f}")
            del out

        t0 = time.perf_counter()
        res = extract([tmp / "videos"], tmp / "cache", cfg, progress=False)
        t_full = time.perf_counter() - t0
        t_run = t_full - t_load  # the same models were loaded once above: that is the loading cost
        print(f"\nfull extraction:          {res.clips / t_full:8.1f} clips/s  ({res.clips} clips, {t_full:.1f} s, "
              f"of which {t_load:.1f} s loading the models)")
        print(f"ratio full / decode+clips: {t_full / t_clips:.2f}x, {t_run / t_clips:.2f}x without model loading "
              "(aim <= 1.2x)")


if __name__ == "__main__":
    main()
