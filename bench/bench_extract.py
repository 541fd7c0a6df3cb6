"""Extraction speed on one set of videos, in one run: decoding alone, each backbone alone, everything.

Prints
  * decode in this process (at most 4 videos): frames/s of decoding + resampling + scaling
    alone, and with shot detection (--shots on --device) and clip building (what the workers
    do, without the backbones' uint8 resize/crop),
  * the workers' clip stream (`clipstream.ClipDataset` in a DataLoader with the extraction's
    workers): decoding, shots and clips, as extraction runs it (`decode_clips_per_s`),
  * per backbone: clips/s of its resize/crop on the device, and of the model alone on
    preprocessed clips; all models together: 1 / the sum of their seconds per clip, each
    model's resize/crop included since extraction runs it on the model's device
    (`compute_clips_per_s`),
  * full extraction (`extract.extract`) with all requested backbones: clips/s, seconds and
    its time over the clip stream's (the aim is <= 1.2: compute hidden behind decoding),
  * precision check: each backbone's features in the chosen autocast dtype against fp32 on the
    same clips (max relative error, minimum cosine similarity); `--precision auto` (the default,
    as in `t12k extract`) is resolved first and the choice printed.

    python bench/bench_extract.py [--backbones mobilenet_v2] [--videos 6] [--seconds 12] [--copies 1]
        [--size 640x360] [--device cpu] [--precision auto] [--workers 0] [--image-frames 0]
        [--shots auto] [--json FILE]

`--copies K` extracts K copies of each made video (under other ids): more work for the
workers without the time of encoding it. The in-process decoding figures use at most 4 videos.

`--json FILE` writes device, backbones, workers, decode_clips_per_s, compute_clips_per_s,
clips_per_s (full extraction, model loading excluded) and ratio: clips_per_s / min(decode,
compute) on a GPU, clips_per_s / (1 / (1/decode + 1/compute)) on the CPU, where both share the cores.

Weights: mobilenet_v2 from the offline package when present, others from the torch hub
cache, or random with --random-weights (speed does not depend on the values).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from machine import cpu_summary

from trailers12k_feats.extraction import backbones as bb
from trailers12k_feats.extraction import shots, video
from trailers12k_feats.extraction.clipstream import crops, union_frames
from trailers12k_feats.extraction.extract import (
    EXTRACT_PRECISIONS,
    ExtractConfig,
    build_models,
    clip_loader,
    extract,
    extract_precision,
)
from trailers12k_feats.extraction.video import ClipSpec
from trailers12k_feats.sources.synthvideo import cut_video


def make_videos(root: Path, n: int, seconds: float, size: tuple[int, int], copies: int = 1) -> list[Path]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        lengths, total = [], 0
        while total < seconds * 24:
            lengths.append(int(rng.integers(30, 100)))  # shots of 1.25-4 s, trailer-like
            total += lengths[-1]
        out.append(cut_video(root / f"tt{i:07d}.mp4", lengths, size=size, seed=i, crf=23))
    for c in range(1, copies):
        for i in range(n):
            out.append(root / f"tt{c * n + i:07d}.mp4")
            shutil.copyfile(out[i], out[-1])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbones", default="mobilenet_v2", help="comma-separated registry names")
    ap.add_argument("--videos", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=12.0, help="length of each video")
    ap.add_argument("--copies", type=int, default=1, help="extract this many copies of each video")
    ap.add_argument("--shots", default=ClipSpec.shots, help="shot detector (auto: transnetv2 on CUDA, content on the CPU)")
    ap.add_argument("--size", default="640x360", help="source video size WxH")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default=ExtractConfig.precision, choices=EXTRACT_PRECISIONS)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--image-frames", type=int, default=0)
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--json", type=Path, help="write the figures to this file")
    args = ap.parse_args()

    names = tuple(args.backbones.split(","))
    weights = tuple((n, str(bb.offline_weights())) for n in names if n == "mobilenet_v2" and bb.offline_weights())
    cfg = ExtractConfig(backbones=names, clip=ClipSpec(shots=args.shots), device=args.device,
                        precision=args.precision, workers=args.workers,
                        batch_size=args.batch_size, image_frames=args.image_frames,
                        random_weights=args.random_weights, weights=() if args.random_weights else weights)
    choice = extract_precision(cfg)  # `auto` resolved as `t12k extract` resolves it
    cfg = dataclasses.replace(cfg, precision=choice.precision)
    spec = cfg.clip
    dev = args.device
    gpu = torch.cuda.get_device_name(0) if dev.startswith("cuda") else None
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_summary()}"
          + (f", {gpu}" if gpu else ""))
    if choice.requested != choice.precision:
        print(f"precision {choice.requested} -> {choice.precision}: {choice.reason}")
    W, H = (int(x) for x in args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = make_videos(tmp / "videos", args.videos, args.seconds, (W, H), args.copies)
        print(f"{len(paths)} videos {W}x{H}, {args.seconds:.0f} s each; fps {spec.fps}, fpc {spec.fpc}, "
              f"short side {spec.short_side}, shots {spec.shots}; backbones {', '.join(names)}; {cfg.precision} on {dev}, "
              f"workers {args.workers}")

        sample = paths[:4]  # in this process: a few videos are enough for its rates
        if shots.resolve(spec.shots, dev) == "transnetv2":  # loaded and run once first: its start is not its rate
            t0 = time.perf_counter()
            shots.TransNetShots(device=dev).probabilities(np.zeros((shots.WINDOW, 27, 48, 3), np.uint8))
            print(f"TransNetV2 loaded and run once on {dev} in {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        n_frames = sum(1 for p in sample for _ in video.frames(p, spec.rate, spec.short_side))
        t_decode = time.perf_counter() - t0
        t0 = time.perf_counter()
        all_clips = [c for p in sample for c in video.decode_clips(p, spec, device=dev)]
        t_clips = time.perf_counter() - t0
        n_clips = len(all_clips)
        print(f"\nin one process, {len(sample)} videos:")
        print(f"decode alone:             {n_frames / t_decode:8.0f} frames/s  ({n_frames} frames, {t_decode:.1f} s)")
        print(f"decode + shots + clips:   {n_frames / t_clips:8.0f} frames/s  ({n_clips} clips, "
              f"{n_clips / t_clips:.1f} clips/s)")

        t0 = time.perf_counter()
        models = build_models(cfg)
        t_load = time.perf_counter() - t0
        # The workers' own stream, in the extraction's DataLoader set-up: decode, shots, clips.
        shipped = union_frames(list({m.group.key: m.group for m in models}.values()))
        nw = cfg.num_workers
        loader = clip_loader([(p.stem, p) for p in paths], cfg, shipped)  # extraction's own stream
        t0 = time.perf_counter()
        kept, n_stream, errors, t_first = [], 0, [], None  # the frames of the first clips feed the models below
        for item in loader:
            if t_first is None:  # the workers' start: each loads what it needs (a shot detector on its device)
                t_first = time.perf_counter() - t0
            if "x" in item:
                if n_stream < 4 * args.batch_size:
                    kept.append(item["x"])
                n_stream += len(item["start"])
            elif item.get("error"):
                errors.append(item["error"])
        t_stream = time.perf_counter() - t0
        if not n_stream:
            raise SystemExit(f"the clip stream gave no clip; {len(errors)} video(s) failed, e.g.: "
                             f"{errors[0] if errors else 'no reason given'}")
        decode_rate = n_stream / t_stream
        print(f"clip stream, {nw} worker(s): {decode_rate:8.1f} clips/s  ({n_stream} clips of {len(paths)} videos, "
              f"{t_stream:.1f} s, the first item after {t_first:.1f} s; {len(shipped)} of {spec.fpc} frames shipped "
              f"per clip)")
        print()
        sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)
        seconds = 0.0  # all models' seconds per clip
        for m in models:
            parts = [x.to(dev) for x in kept]
            crops(parts[:1], m.group, shipped)  # warm-up
            sync()
            t0 = time.perf_counter()
            x = crops(parts, m.group, shipped)  # (n, t, 3, h, w) uint8
            sync()
            t_pre = time.perf_counter() - t0
            pre_rate = len(x) / t_pre
            # The resize/crop runs on the model's device in the extraction: it counts as that device's work.
            seconds += 1 / pre_rate
            x = x[:4 * args.batch_size]
            n, t = x.shape[:2]
            batches = [x[i:i + args.batch_size] for i in range(0, n, args.batch_size)]
            for b in batches:  # warm-up: one pass over every batch shape (oneDNN builds kernels per shape)
                m.embed(b, cfg)
            sync()
            t0 = time.perf_counter()
            for b in batches:
                out = m.embed(b, cfg)
            sync()
            dt = time.perf_counter() - t0
            seconds += dt / n
            print(f"{m.entry.name:22} alone: {n / dt:8.1f} clips/s  ({t} frames of {x.shape[-1]}px per clip); "
                  f"its resize/crop {pre_rate:.1f} clips/s")
            if cfg.precision != "fp32":
                ref = m.embed(batches[0], ExtractConfig(backbones=names, device=dev, precision="fp32"))
                low = m.embed(batches[0], cfg)
                rel = ((low - ref).norm(dim=1) / ref.norm(dim=1)).max().item()
                cos = torch.nn.functional.cosine_similarity(low, ref, dim=1).min().item()
                print(f"{'':22} {cfg.precision} vs fp32: max relative error {rel:.2e}, min cosine {cos:.6f}")
            del out
        compute_rate = 1 / seconds
        print(f"{'all models':22}      : {compute_rate:8.1f} clips/s  (each model and its resize/crop, one after another)")

        t0 = time.perf_counter()
        res = extract([tmp / "videos"], tmp / "cache", cfg, progress=False)
        t_full = time.perf_counter() - t0
        t_run = t_full - t_load  # the same models were loaded once above: that is the loading cost
        print(f"\nfull extraction:          {res.clips / t_full:8.1f} clips/s  ({res.clips} clips, {t_full:.1f} s, "
              f"of which {t_load:.1f} s loading the models)")
        print(f"time full / clip stream: {t_full / t_stream:.2f}x, {t_run / t_stream:.2f}x without model loading "
              "(aim <= 1.2x)")
        rate = res.clips / t_run
        # A GPU and the workers run side by side; on the CPU the models and the workers share the cores.
        bound = min(decode_rate, compute_rate) if dev.startswith("cuda") else 1 / (1 / decode_rate + 1 / compute_rate)
        print(f"clips/s without model loading {rate:.1f}; decode {decode_rate:.1f}, compute {compute_rate:.1f} "
              f"-> bound {bound:.1f}, ratio {rate / bound:.2f}")
        if args.json:
            fig = {"device": gpu or f"cpu: {cpu_summary()}", "backbones": list(names), "workers": nw,
                   "precision": cfg.precision, "shots": shots.resolve(spec.shots, dev), "clips": n_stream,
                   "first_item_s": t_first, "decode_clips_per_s": decode_rate,
                   "compute_clips_per_s": compute_rate, "clips_per_s": rate, "ratio": rate / bound}
            args.json.write_text(json.dumps(fig, indent=1) + "\n")


if __name__ == "__main__":
    main()
