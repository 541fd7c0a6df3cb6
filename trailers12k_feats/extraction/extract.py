"""Stage 1: videos -> per-clip embeddings of frozen backbones -> the HDF5 feature cache.

One decoding pass per video feeds every requested backbone. Decoding, shot detection and
clip building run in worker processes (``workers``), once per clip however many backbones;
the main process uploads the clips' frames once, batches clips across shots and trailers,
resizes, crops and normalises them per backbone on the device and runs the backbones. On
CUDA the upload runs on its own stream and outputs stay on the device until a flush copies
them back in one go, so copies, compute and book-keeping overlap. Finished trailers are flushed to crash-safe segments (see store.py), so a killed
run resumes where it stopped; bad videos are skipped and listed in a failure report, and so
are videos that decode shorter than their file declares (truncated: "partial"). That
book-keeping (resume, the run's batches and flushes, finish, ExtractResult) lives in
bookkeeping.py; this module holds the config, the models and the run's loop.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from trailers12k_feats import __version__
from trailers12k_feats.cache import CacheAttrs, check_dtype
from trailers12k_feats.engines import EngineConfig
from trailers12k_feats.extraction import backbones as bb
from trailers12k_feats.extraction import shots, store
from trailers12k_feats.extraction.bookkeeping import (  # also extract.<name>
    ExtractResult,
    _Run,
    finish,
    resume,
)
from trailers12k_feats.extraction.clipstream import (
    ClipDataset,
    Group,
    as_is,
    frame_index,
    union_frames,
    worker_init,
)
from trailers12k_feats.extraction.inputs import resolve_inputs
from trailers12k_feats.extraction.video import ClipSpec
from trailers12k_feats.runtime import (
    AUTO,
    PRECISIONS,
    PrecisionChoice,
    autocast,
    check_device,
    check_precision,
    resolve_precision,
    usable_cores,
)
from trailers12k_feats.utils import T12kError, check_interrupted, config_dict

log = logging.getLogger(__name__)

EXTRACT_PRECISIONS = (AUTO, "fp32", "bf16", "fp16")
FRAME_POOLS = ("mean", "center")
PARTIALS = ("keep", "drop")  # what to do with a video that decodes shorter than its file declares

# What a failure report adds to a reason, per kind of failure; `t12k predict` has its own.
HINTS = {
    "short": "; try --leftover pad or --segmentation fixed",
    "keep": "; the clips that decoded are kept in the cache (--partial drop leaves such videos out)",
    "drop": "; left out of the cache (--partial drop): replace the file and run again",
}


@dataclass(frozen=True)
class ExtractConfig:
    """Stage 1 settings. Those under `features` decide the embeddings and must match on resume."""

    backbones: tuple[str, ...] = ("mobilenet_v2",)
    clip: ClipSpec = field(default_factory=ClipSpec)
    frame_pool: str = "mean"  # 2D backbones: "mean" of the clip's frame embeddings or the "center" frame's
    image_frames: int = 0  # 2D backbones: embed this many evenly spaced frames per clip; 0 = all fpc
    # autocast dtype: "fp32", "bf16" or "fp16" (docs/extraction.md compares them), or "auto": bf16 on
    # CUDA, and on the CPU whichever a cached matmul probe finds faster (runtime.resolve_precision)
    precision: str = AUTO
    device: str = "cpu"
    batch_size: int = 16  # clips per forward pass, across shots and trailers
    max_images: int = 256  # 2D backbones: frames per forward pass at most (bounds memory)
    workers: int = -1  # decoding processes; 0 decodes in the main process; -1: 0 on the CPU, cores - 1 on CUDA
    decode_threads: int = 0  # FFmpeg threads per video; 0 = FFmpeg's choice
    chunk: int = 8  # clips a worker sends at once
    shard: tuple[int, int] = (1, 1)  # (K, N): this process takes every N-th video from the K-th
    flush_trailers: int = 100  # write finished trailers to a segment after this many...
    flush_seconds: float = 120.0  # ...or this many seconds, whichever comes first
    weights: tuple[tuple[str, str], ...] = ()  # (backbone, path or "random") overriding the torch hub cache
    random_weights: bool = False  # every backbone random (tests and smoke runs; recorded in the cache)
    dtype: str = "float16"  # cache storage
    partial: str = "keep"  # a video decoding shorter than it declares (truncated): "keep" its clips or "drop" it

    def __post_init__(self) -> None:
        if not self.backbones:
            raise T12kError("give at least one --backbone; `t12k backbones` lists them.")
        if len(set(self.backbones)) != len(self.backbones):
            raise T12kError(f"a backbone is requested twice: {', '.join(self.backbones)}.")
        if self.frame_pool not in FRAME_POOLS:
            raise T12kError(f"frame_pool must be one of {', '.join(FRAME_POOLS)}, got {self.frame_pool!r}.")
        if self.partial not in PARTIALS:
            raise T12kError(f"partial must be one of {', '.join(PARTIALS)}, got {self.partial!r}; fix --partial.")
        if not 0 <= self.image_frames <= self.clip.fpc:
            raise T12kError(f"image_frames must be within 0..fpc ({self.clip.fpc}), got {self.image_frames}.")
        check_device(self.device)
        # "auto" becomes the detector it picks on this device, and the threshold explicit, as the cache records them.
        object.__setattr__(self, "clip", self.clip.resolved(self.device))
        check_precision(self.precision, self.device, EXTRACT_PRECISIONS)
        if min(self.batch_size, self.max_images, self.chunk, self.flush_trailers) < 1 or self.workers < -1:
            raise T12kError("batch_size, max_images, chunk and flush_trailers must be >= 1, workers >= -1 (auto).")
        check_dtype(self.dtype)
        k, n = self.shard
        if not 1 <= k <= n:
            raise T12kError(f"--shard must be K/N with 1 <= K <= N, got {k}/{n}.")
        unknown = {b for b, _ in self.weights} - set(self.backbones)
        if unknown:
            raise T12kError(f"--weights names backbone(s) not requested: {', '.join(sorted(unknown))}.")

    @property
    def num_workers(self) -> int:
        """Decoding processes: on the CPU inference needs the cores; a GPU needs decoding in parallel
        on every core this process may run on but the one that feeds the GPU."""
        if self.workers >= 0:
            return self.workers
        return max(1, usable_cores() - 1) if self.device.startswith("cuda") else 0

    @property
    def model_threads(self) -> int | None:
        """Torch threads of the main process on the CPU with workers: the cores the workers leave
        (at least one), since more threads than cores stall both sides; None: leave torch's."""
        if self.device != "cpu" or self.num_workers == 0:
            return None
        return max(1, usable_cores() - self.num_workers)

    def is_random(self, backbone: str) -> bool:
        return self.random_weights or dict(self.weights).get(backbone) == "random"

    def features(self, entry: bb.Backbone) -> dict:
        """The settings that decide one backbone's embeddings (compared when resuming)."""
        d = {"backbone": entry.name, "weights": bb.weights_tag(entry, self.is_random(entry.name)),
             "precision": self.precision, **dataclasses.asdict(self.clip)}
        if entry.kind == "2d":
            d.update(frame_pool=self.frame_pool, image_frames=self.image_frames)
        return d


# ---------------------------------------------------------------------------- model side

@dataclass
class _Model:
    entry: bb.Backbone
    net: torch.nn.Module
    group: Group
    attrs: CacheAttrs
    done: set[str]  # trailers already in the cache
    buf: list = field(default_factory=list)  # (tid, index of first clip, (n, k, H, W, 3) uint8 frames)
    rows: int = 0

    def embed(self, x: torch.Tensor, cfg: ExtractConfig) -> torch.Tensor:
        """(B, t, 3, h, w) uint8 on the device -> (B, F) float32."""
        with torch.inference_mode(), autocast(x.device.type, PRECISIONS[cfg.precision]):
            if self.entry.kind == "3d":
                v = self.group.pre.normalize(x).permute(0, 2, 1, 3, 4)  # (B, 3, t, h, w)
                return self.net(v.contiguous(memory_format=torch.channels_last_3d)).float()
            B, t = x.shape[:2]
            flat = x.reshape(B * t, *x.shape[2:])  # (B*t, 3, h, w)
            step = max(1, cfg.max_images)
            out = torch.cat([self.net(self.group.pre.normalize(flat[i:i + step])
                                      .contiguous(memory_format=torch.channels_last)).float()
                             for i in range(0, B * t, step)])  # (B*t, F)
            return out.view(B, t, -1).mean(1)  # (B, F): the clip is the mean of its frames


def clip_loader(videos: list[tuple[str, Path]], cfg: ExtractConfig, shipped: list[int]) -> DataLoader:
    """The decoding workers' stream of (trailer id, path) `videos`: each item a chunk of clips
    with frames `shipped` (see ClipDataset), or a trailer's end or failure."""
    cuda = cfg.device.startswith("cuda")
    # TransNetV2 runs where the clips are cut, in the decoding workers, on the extraction device:
    # CUDA in a worker needs a worker started afresh, not forked from a process that uses CUDA.
    spawn = cuda and cfg.num_workers and cfg.clip.segmentation == "shots" and cfg.clip.shots == "transnetv2"
    return DataLoader(ClipDataset(videos, cfg.clip, shipped, cfg.chunk, cfg.decode_threads, cfg.device),
                      batch_size=None, collate_fn=as_is, num_workers=cfg.num_workers, pin_memory=cuda,
                      worker_init_fn=worker_init if cfg.num_workers else None,
                      prefetch_factor=4 if cfg.num_workers else None,
                      multiprocessing_context="spawn" if spawn else None)


def extract_precision(cfg: ExtractConfig, cache_dir: str | os.PathLike | None = None) -> PrecisionChoice:
    """The concrete precision `cfg.precision` runs in; with `auto`, that of the caches in
    `cache_dir` the run adds to (store.recorded_precision), so no cache mixes two."""
    recorded, where = None, ""
    if cfg.precision == AUTO and cache_dir is not None:
        recorded, where = store.recorded_precision(cache_dir, [bb.get_backbone(n).stream for n in cfg.backbones])
    return resolve_precision(cfg.precision, cfg.device, EXTRACT_PRECISIONS, recorded=recorded, where=where)


def build_models(cfg: ExtractConfig, precision: PrecisionChoice | None = None) -> list[_Model]:
    """Look up, check and load every requested backbone before any video is touched.

    `precision`: `cfg.precision` resolved (here when None); the attributes' config records it.
    """
    precision = precision or extract_precision(cfg)
    if precision.requested != cfg.precision:
        raise T12kError(f"the precision choice is for --precision {precision.requested}, but the config asks for "
                        f"{cfg.precision}; resolve it with extract_precision(cfg).")
    cfg = dataclasses.replace(cfg, precision=precision.precision)
    entries = [bb.get_backbone(n) for n in cfg.backbones]
    given = dict(cfg.weights)
    missing = []  # every missing file is named at once, before loading any
    for e in entries:
        if not cfg.is_random(e.name):
            try:
                bb.weights_path(e, given.get(e.name))
            except T12kError as err:
                missing.append(str(err))
    if missing:
        raise T12kError(" ".join(missing))
    streams = [e.stream for e in entries]
    if len(set(streams)) != len(streams):
        raise T12kError(f"two backbones write the same cache: {', '.join(streams)}.")
    groups: dict[tuple, Group] = {}
    models = []
    for e in entries:
        pre = e.preprocess()
        idx = frame_index(e.kind, cfg.clip.fpc, cfg.frame_pool, cfg.image_frames)
        g = groups.setdefault((pre.geometry, idx), Group(len(groups), pre, idx))
        net = bb.load(e, given.get(e.name), random=cfg.is_random(e.name))
        net = net.to(cfg.device, memory_format=torch.channels_last if e.kind == "2d" else torch.channels_last_3d)
        feats = cfg.features(e)
        attrs = CacheAttrs(name=e.stream, backbone=e.name, feature_dim=e.feature_dim, weights=feats["weights"],
                           pretraining=e.pretraining, kind=e.kind, fps=cfg.clip.fps, fpc=cfg.clip.fpc,
                           segmentation=cfg.clip.segmentation, source="t12k extract", package_version=__version__,
                           config={"extract": config_dict(cfg), "features": feats, "precision": precision.record()})
        models.append(_Model(e, net, g, attrs, set()))
    return models


# ---------------------------------------------------------------------------- the run

def extract(inputs: list[str | os.PathLike], cache_dir: str | os.PathLike, cfg: ExtractConfig,
            progress: bool = True, *, report: bool = True, hints: dict[str, str] | None = None,
            engine: EngineConfig | None = None) -> ExtractResult:
    """Extract every requested backbone's clip embeddings of `inputs` into `cache_dir`.

    Checks inputs, weights and any existing cache first; skips finished trailers; never
    stops on a bad video (it goes to the failure report). A video that decodes shorter than
    its file declares by more than max(1 s, 5%) is "partial": warned about, reported, and
    kept or dropped by `cfg.partial`. With one shard the segments are merged into
    `<cache_dir>/<stream>.h5` at the end; with several, run :func:`store.merge_all`
    (`t12k cache merge`) once all shards are done. `report=False` writes no failure report
    (for callers that show failures themselves and delete `cache_dir`); `hints` replaces
    the advice added to reasons (:data:`HINTS`). `engine` with `engine="ray"` runs the same
    extraction on a Ray cluster (ray_engine.extract_ray, with the default hints).
    """
    if engine is not None and engine.ray:
        from trailers12k_feats.extraction.ray_engine import extract_ray

        return extract_ray(inputs, cache_dir, cfg, engine, progress, report=report)
    t0 = time.perf_counter()
    cache_dir = Path(cache_dir)
    k, n = cfg.shard
    videos = resolve_inputs(inputs)[k - 1::n]
    if cfg.clip.segmentation == "shots":
        shots.get_detector(cfg.clip.shots).check()  # a missing detector stops the run before any video
    precision = extract_precision(cfg, cache_dir)
    models = build_models(cfg, precision)
    cfg = dataclasses.replace(cfg, precision=precision.precision)  # what the forward passes run in
    todo, tag, report_path = resume(cache_dir, models, videos, cfg.shard)
    shipped = union_frames(list({m.group.key: m.group for m in models}.values()))
    loader = clip_loader(todo, cfg, shipped)
    run = _Run(models, cfg, cache_dir, tag, report_path if report else None, {**HINTS, **(hints or {})}, shipped)
    bar = tqdm(total=len(todo), unit="trailer", desc="extract", disable=not progress, dynamic_ncols=True)
    threads = torch.get_num_threads()
    if cfg.model_threads:
        torch.set_num_threads(cfg.model_threads)
    try:
        for item in loader:
            check_interrupted()  # Ctrl-C stops here even where a library swallowed its exception
            run.take(item)
            bar.update(run.completed + run.dropped - bar.n)
            bar.set_postfix(clips_s=f"{run.clips / max(time.perf_counter() - t0, 1e-9):.1f}", failed=len(run.failures),
                            partial=len(run.partial))
        for m in models:
            run.forward(m)
        bar.update(run.completed + run.dropped - bar.n)
    finally:
        bar.close()
        run.flush()  # also on Ctrl-C: every finished trailer is kept
        torch.set_num_threads(threads)
    return finish(run, cache_dir, cfg.shard, len(videos) - len(todo), report_path if report else None, t0)
