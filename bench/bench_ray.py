"""The Ray engine against the local one on the same videos, then Trailers12k's extraction time on paper.

1. Measured here: the same videos and settings through `extract.extract` (local engine) and
   `ray_engine.extract_ray` (a Ray instance started on this machine; its start-up is timed
   apart, since a cluster is up before a run): wall time, clips/s and the ratio Ray / local
   (the aim on 2 cores: <= 1.3). Also measured: decoding per core (`clipstream.ClipDataset` in
   one process, as a decoding task runs it) and the driver's CPU seconds per chunk of clips
   (its process time while it streams the chunks, Ray's threads in it included).
2. On paper: the time of Trailers12k's six backbones (the paper's streams) on one box with one
   GPU (the local engine), one box with 8 GPUs and 8 such nodes (the Ray engine), from per-clip
   costs: decoding per core (measured in part 1, or --decode-per-core), each backbone's clips/s
   on one GPU (--model-clips-per-s, defaults measured with --measure-models on an H200, see
   MODEL_CLIPS_PER_S), the driver's cost per chunk (part 1) and the network (--net-gbps, an
   assumption). Each resource's capacity in clips/s, the one that binds, and the hours.
3. `--measure-models DEVICE`: each of the six backbones' clips/s on DEVICE (resize/crop on the
   device and the model, `extract.build_models` with random weights, the precision `auto` picks),
   printed as the JSON that --model-clips-per-s takes.

    python bench/bench_ray.py [--videos 12] [--seconds 30] [--backbones mobilenet_v2,shufflenet_v2_3d_x1_0]
    python bench/bench_ray.py --paper-only --decode-per-core 20     # part 2 alone
    python bench/bench_ray.py --measure-models cuda                   # part 3 on a GPU machine
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import tempfile
import time
from pathlib import Path

import torch
from bench_extract import make_videos
from machine import cpu_summary

from trailers12k_feats.engines import EngineConfig, connect
from trailers12k_feats.extraction.clipstream import ClipDataset, crops, frame_index, union_frames
from trailers12k_feats.extraction.extract import ExtractConfig, build_models, extract, extract_precision
from trailers12k_feats.extraction.video import ClipSpec
from trailers12k_feats.paper import STREAMS

SIX = tuple(s.backbone for s in STREAMS.values())  # Trailers12k's six backbones, as the paper's streams
# clips/s of each backbone alone on one GPU (resize/crop of 24 frames at short side 256 included, batch 64,
# bf16 as `auto` picks, random weights), measured on an NVIDIA H200 (torch 2.11) with measure_models, as
# `--measure-models cuda` runs it.
MODEL_CLIPS_PER_S = {"shufflenet_v2_x1_0": 1470.3, "shufflenet_v2_3d_x1_0": 4208.1, "resnet50": 603.4,
                     "r2plus1d_18": 1013.7, "swin_t": 217.8, "swin3d_t": 180.0}


def timed_extract(videos: Path, out: Path, cfg: ExtractConfig, engine: EngineConfig | None) -> dict:
    """One extraction (local when `engine` is None): wall seconds, driver CPU seconds, clips, chunks."""
    w0, loop = time.perf_counter(), [0.0]
    if engine is None:
        res = extract([videos], out, cfg, progress=False)
    else:
        from trailers12k_feats.extraction import ray_engine

        drive = ray_engine._drive

        def timed_drive(*a, **k):  # the driver's CPU while it streams chunks (start-up and merge apart)
            c0 = time.process_time()
            try:
                return drive(*a, **k)
            finally:
                loop[0] = time.process_time() - c0

        ray_engine._drive = timed_drive
        try:
            res = ray_engine.extract_ray([videos], out, cfg, engine, progress=False)
        finally:
            ray_engine._drive = drive
    wall = time.perf_counter() - w0
    return {"wall_s": wall, "driver_loop_cpu_s": loop[0], "clips": res.clips, "clips_per_s": res.clips / wall}


def decode_per_core(paths: list[Path], cfg: ExtractConfig) -> tuple[float, int]:
    """(clips/s, chunks) of decoding, shots and clips in this process on one thread, as a decoding task."""
    groups = [frame_index(k, cfg.clip.fpc, cfg.frame_pool, cfg.image_frames) for k in ("2d", "3d")]
    shipped = tuple(sorted({i for g in groups for i in g}))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t0, clips, chunks = time.perf_counter(), 0, 0
    try:
        for item in ClipDataset([(p.stem, p) for p in paths], cfg.clip, shipped, cfg.chunk, 1):
            if "x" in item:
                clips, chunks = clips + len(item["start"]), chunks + 1
    finally:
        torch.set_num_threads(threads)
    return clips / (time.perf_counter() - t0), chunks


def measure_models(device: str, names: tuple[str, ...], batch: int, rounds: int) -> dict[str, float]:
    """clips/s of each backbone alone on `device`: resize/crop of shipped frames and the forward pass."""
    out = {}
    spec = ClipSpec(shots="content")
    for name in names:
        cfg = ExtractConfig(backbones=(name,), clip=spec, device=device, random_weights=True, batch_size=batch)
        cfg = dataclasses.replace(cfg, precision=extract_precision(cfg).precision)
        (m,) = build_models(cfg)
        shipped = union_frames([m.group])
        h = spec.short_side
        x = torch.randint(0, 256, (batch, len(shipped), h, h * 16 // 9, 3), dtype=torch.uint8, device=device)
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        m.embed(crops([x], m.group, shipped), cfg)  # warm-up
        sync()
        t0 = time.perf_counter()
        for _ in range(rounds):
            m.embed(crops([x], m.group, shipped), cfg)
        sync()
        out[name] = round(batch * rounds / (time.perf_counter() - t0), 1)
        print(f"{name:24s} {out[name]:9.1f} clips/s  ({cfg.precision} on {device})", flush=True)
        del m
    return out


@dataclasses.dataclass
class Setting:
    name: str
    nodes: int
    gpus_per_node: int
    cores_per_node: int
    ray: bool
    drivers: int = 1  # Ray drivers, one per --shard K/N, each with its own actors


def projection(args: argparse.Namespace, decode: float, driver_s_per_chunk: float) -> None:
    """Part 2: each resource's capacity in clips/s for the settings, the bottleneck and the hours."""
    rates = json.loads(args.model_clips_per_s) if args.model_clips_per_s else MODEL_CLIPS_PER_S
    if set(rates) != set(SIX):
        raise SystemExit(f"--model-clips-per-s needs the clips/s of {', '.join(SIX)} (run --measure-models on a GPU)")
    per_gpu = 1 / sum(1 / r for r in rates.values())  # an actor runs all six on every clip
    spec = ClipSpec()
    frames = spec.fpc  # by default 2D models see every frame of a clip (their mean), 3D ones too
    clip_bytes = frames * spec.short_side * (spec.short_side * 16 // 9) * 3
    clips = args.trailers * args.clips_per_trailer
    settings = [Setting("local engine, 1 box, 1 GPU", 1, 1, args.cores_small, False),
                Setting("Ray, 1 box, 8 GPUs", 1, 8, args.cores_big, True),
                Setting("Ray, 8 nodes x 8 GPUs", 8, 8, args.cores_big, True),
                Setting("  same, 8 drivers (--shard)", 8, 8, args.cores_big, True, drivers=8)]
    print(f"\non paper: {args.trailers} trailers x {args.clips_per_trailer} clips = {clips:,} clips of {frames} "
          f"frames ({clip_bytes / 1e6:.1f} MB each as uint8 at short side {spec.short_side}); decoding "
          f"{decode:.1f} clips/s per core; one GPU runs the six backbones at {per_gpu:.1f} clips/s "
          f"({', '.join(f'{k} {v:g}' for k, v in rates.items())}); driver {driver_s_per_chunk * 1e3:.2f} ms per "
          f"chunk of {args.chunk} clips; network {args.net_gbps:g} GB/s per node")
    head = (f"{'setting':28s} {'decode':>9s} {'models':>9s} {'driver':>9s} {'network':>9s}  {'bottleneck':10s} "
            f"{'hours':>7s}")
    print(head + "\n" + "-" * len(head))
    for s in settings:
        gpus = s.nodes * s.gpus_per_node
        # Cores left to decoding: one per model actor (or the local engine's main process), one for the driver.
        free = s.nodes * s.cores_per_node - gpus - (s.drivers if s.ray else 0)
        cap = {"decode": decode * free, "models": per_gpu * gpus,
               "driver": s.drivers * args.chunk / driver_s_per_chunk if s.ray else math.inf,
               # a chunk crosses to another node's actor with probability (nodes - 1) / nodes
               "network": (args.net_gbps * 1e9 * s.nodes / clip_bytes / ((s.nodes - 1) / s.nodes)
                           if s.nodes > 1 else math.inf)}
        bound = min(cap, key=cap.get)
        cells = " ".join(f"{v:9.0f}" if math.isfinite(v) else f"{'-':>9s}" for v in cap.values())
        print(f"{s.name:28s} {cells}  {bound:10s} {clips / cap[bound] / 3600:7.2f}")
    print("(clips/s each resource could sustain; hours = clips / the smallest)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbones", default="mobilenet_v2,shufflenet_v2_3d_x1_0",
                    help="part 1: comma-separated registry names (random weights: speed does not depend on them)")
    ap.add_argument("--videos", type=int, default=12)
    ap.add_argument("--seconds", type=float, default=30.0, help="length of each video")
    ap.add_argument("--size", default="640x360", help="source video size WxH")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--image-frames", type=int, default=2, help="part 1: 2D frames per clip (0: all)")
    ap.add_argument("--chunk", type=int, default=ExtractConfig.chunk)
    ap.add_argument("--paper-only", action="store_true", help="skip part 1 (needs --decode-per-core)")
    ap.add_argument("--decode-per-core", type=float, help="clips/s of decoding per core  [default: measured]")
    ap.add_argument("--driver-ms-per-chunk", type=float, help="[default: measured in part 1, else 2]")
    ap.add_argument("--model-clips-per-s", help="JSON {backbone: clips/s on one GPU}  [default: MODEL_CLIPS_PER_S]")
    ap.add_argument("--trailers", type=int, default=12000)
    ap.add_argument("--clips-per-trailer", type=int, default=120, help="about 2 min at one clip per second")
    ap.add_argument("--cores-small", type=int, default=16, help="CPU cores of the 1-GPU box")
    ap.add_argument("--cores-big", type=int, default=96, help="CPU cores of an 8-GPU node")
    ap.add_argument("--net-gbps", type=float, default=3.0, help="GB/s of object transfer between nodes, per node")
    ap.add_argument("--measure-models", metavar="DEVICE", help="part 3 only: measure the six backbones on DEVICE")
    ap.add_argument("--model-batch", type=int, default=64)
    ap.add_argument("--json", type=Path, help="write the measured figures to this file")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {cpu_summary()}")

    if args.measure_models:
        if args.measure_models.startswith("cuda"):
            print(torch.cuda.get_device_name(0))
        rates = measure_models(args.measure_models, SIX, args.model_batch, 5)
        print(json.dumps(rates))
        return
    figures: dict = {}
    decode, driver = args.decode_per_core, (args.driver_ms_per_chunk or 2.0) / 1e3
    if not args.paper_only:
        names = tuple(args.backbones.split(","))
        cfg = ExtractConfig(backbones=names, precision=args.precision, image_frames=args.image_frames,
                            random_weights=True, chunk=args.chunk)
        W, H = (int(x) for x in args.size.split("x"))
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            paths = make_videos(tmp / "videos", args.videos, args.seconds, (W, H))
            print(f"{len(paths)} videos {W}x{H}, {args.seconds:g} s each; backbones {', '.join(names)}; "
                  f"{args.precision}, {torch.get_num_threads()} torch threads locally")
            measured, chunks = decode_per_core(paths, cfg)
            decode = decode or measured
            local = timed_extract(tmp / "videos", tmp / "local", cfg, None)
            t0 = time.perf_counter()
            connect(EngineConfig(engine="ray"))
            start = time.perf_counter() - t0
            ray = timed_extract(tmp / "videos", tmp / "ray", cfg, EngineConfig(engine="ray"))
        driver = args.driver_ms_per_chunk / 1e3 if args.driver_ms_per_chunk else ray["driver_loop_cpu_s"] / chunks
        ratio = ray["wall_s"] / local["wall_s"]
        print(f"decoding alone, one core:   {measured:7.1f} clips/s")
        print(f"local engine:               {local['wall_s']:7.1f} s  {local['clips_per_s']:7.1f} clips/s")
        print(f"Ray engine:                 {ray['wall_s']:7.1f} s  {ray['clips_per_s']:7.1f} clips/s  "
              f"(Ray start {start:.1f} s apart; driver loop {ray['driver_loop_cpu_s']:.2f} CPU s, "
              f"{driver * 1e3:.2f} ms per chunk)")
        print(f"Ray / local wall time:      {ratio:7.2f}  (aim <= 1.3)")
        figures = {"local": local, "ray": ray, "ratio": ratio, "ray_start_s": start, "decode_per_core": measured,
                   "driver_s_per_chunk": driver}
    elif decode is None:
        raise SystemExit("--paper-only needs --decode-per-core")
    projection(args, decode, driver)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
