"""Stage 1 on a Ray cluster (`t12k extract --engine ray`): the local engine's extraction, spread out.

Ray core tasks and an actor pool rather than a Ray Data pipeline (docs/scaling.md says why):

- Decoding tasks (`--decode-cpus` each), one per trailer, decode, cut shots, clip and keep the
  frames the backbones see, exactly as the local engine's workers (`clipstream.ClipDataset`).
  Each is a streaming generator that yields, per chunk of `chunk` clips, the chunk's metadata
  and then its frames, and pauses while `CHUNKS_AHEAD` chunks wait unread: a trailer never
  sits in memory whole, however long. The driver reads the metadata only; the frames move
  from the decoding task's node to a model actor's, never through the driver.
- Model actors load every requested backbone once (a GPU each by default, else CPUs) and embed
  batches of clips that cross trailers, formed with the local engine's rule. With `ordered`
  (the default for CPU actors) the driver takes the trailers in input order, so a batch holds
  the same clips in both engines and fp32 features on the CPU are bit-equal; otherwise (GPU
  actors) it takes each chunk as it comes, so no trailer's decoding waits for an earlier one's,
  and features equal the local engine's within the precision's tolerance.
- The driver keeps the book-keeping of the local engine (`bookkeeping._Run`: trailers in flight,
  failures, partial videos, flushes) and writes the same crash-safe segments, then merges them.
  A decoding task or actor that dies is retried by Ray (a retried batch returns once), and a
  trailer is written once, when all its clips are embedded.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from trailers12k_feats.engines import EngineConfig, connect, ray_get
from trailers12k_feats.extraction import backbones as bb
from trailers12k_feats.extraction import shots, store
from trailers12k_feats.extraction.clipstream import ClipDataset, crops, union_frames
from trailers12k_feats.extraction.extract import (
    EXTRACT_PRECISIONS,
    HINTS,
    ExtractConfig,
    ExtractResult,
    _Model,
    _Run,
    build_models,
    finish,
    resume,
)
from trailers12k_feats.extraction.inputs import resolve_inputs
from trailers12k_feats.runtime import AUTO, PrecisionChoice, resolve_precision
from trailers12k_feats.utils import T12kError

log = logging.getLogger(__name__)

CHUNKS_AHEAD = 4  # chunks a decoding task may run ahead of the driver (bounds memory per trailer)
BATCHES_PER_ACTOR = 2  # batches queued on an actor: one running, one waiting, so it never idles


# ---------------------------------------------------------------------------- remote side

def _decode(tid: str, path: str, spec: Any, frames: tuple[int, ...], chunk: int, threads: int):
    """A trailer's chunks: per chunk its metadata {"tid", "start", "end", "shot", "n"} and then its
    (n, k, H, W, 3) uint8 frames; last the end marker or a failure record (as ClipDataset)."""
    torch.set_num_threads(1)  # FFmpeg's threads and the other tasks need the cores
    for item in ClipDataset([(tid, Path(path))], spec, frames, chunk, threads):
        if "x" in item:
            x = item.pop("x").numpy()
            yield {**item, "n": len(x)}
            yield x
        else:
            yield item


def _plan(cfg: ExtractConfig, device: str, recorded: str | None, where: str) -> PrecisionChoice:
    """On a node like the actors': the precision `cfg.precision` resolves to there, after checking that
    every weight file is found (a missing one stops the run before any actor loads)."""
    missing = []
    for name in cfg.backbones:
        if not cfg.is_random(name):
            try:
                bb.weights_path(bb.get_backbone(name), dict(cfg.weights).get(name))
            except T12kError as e:
                missing.append(str(e))
    if missing:
        raise T12kError(" ".join(missing))
    return resolve_precision(cfg.precision, device, EXTRACT_PRECISIONS, recorded=recorded, where=where)


class _Embedder:
    """A model actor: every requested backbone, loaded once, embedding batches of clip chunks."""

    def __init__(self, cfg: ExtractConfig, device: str, precision: PrecisionChoice, threads: float) -> None:
        if device == "cpu":
            torch.set_num_threads(max(1, int(threads)))
        self.cfg = dataclasses.replace(cfg, device=device)  # checked here, where the device is
        self.models = build_models(self.cfg, precision)
        self.cfg = dataclasses.replace(self.cfg, precision=precision.precision)  # what the passes run in
        self.shipped = union_frames(list({m.group.key: m.group for m in self.models}.values()))

    def plan(self) -> tuple[list, tuple[int, ...]]:
        """The cache attributes of each backbone, as the local engine on this device records them, and
        the clip frames that the decoding tasks must ship."""
        return [m.attrs for m in self.models], self.shipped

    def embed(self, *parts: np.ndarray) -> dict[str, np.ndarray]:
        """Chunks of (n, k, H, W, 3) uint8 frames -> backbone -> (sum n, F) float32."""
        x = [torch.from_numpy(np.array(p)).to(self.cfg.device) for p in parts]  # store arrays are read-only
        return {m.entry.name: m.embed(crops(x, m.group, self.shipped), self.cfg).cpu().numpy()
                for m in self.models}


# ---------------------------------------------------------------------------- driver side

class _Frames:
    """A chunk's frames, left in the object store: its reference and its number of clips."""

    def __init__(self, ref: Any, n: int) -> None:
        self.ref, self.n = ref, n

    def __len__(self) -> int:
        return self.n


class _RayRun(_Run):
    """The local engine's book-keeping; a full batch goes to the least busy actor instead of a model."""

    def __init__(self, ray: Any, actors: list, *args: Any) -> None:
        super().__init__(*args)
        self.ray, self.actors = ray, actors
        self.busy = [0] * len(actors)
        self.pending: dict[Any, tuple[int, list[tuple[str, int, int]]]] = {}  # result -> (actor, [(tid, i0, n)])

    def upload(self, x: Any) -> Any:
        return x  # the frames stay in the object store until an actor reads them

    def forward(self, m: _Model) -> None:
        # Every model's buffer gets the same chunks, in model order: the last one's turn sends the
        # batch for all of them.
        if m is not self.models[-1] or not m.buf:
            return
        batch = m.buf
        for mm in self.models:
            mm.buf, mm.rows = [], 0
        while min(self.busy) >= BATCHES_PER_ACTOR:
            self.collect(block=True)
        a = self.busy.index(min(self.busy))
        ref = self.actors[a].embed.remote(*[x.ref for _, _, x in batch])
        self.pending[ref] = (a, [(tid, i0, len(x)) for tid, i0, x in batch])
        self.busy[a] += 1

    def collect(self, block: bool) -> None:
        """Take the features of finished batches (waiting for one when `block`)."""
        if not self.pending:
            return
        ready, _ = self.ray.wait(list(self.pending), num_returns=1 if block else len(self.pending),
                                 timeout=None if block else 0)
        for ref in ready:
            a, rows = self.pending.pop(ref)
            self.busy[a] -= 1
            try:
                out = self.ray.get(ref)
            except self.ray.exceptions.RayError as e:  # past Ray's restarts and retries
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise T12kError(f"a model actor failed more often than Ray retries it ({type(e).__name__}: "
                                f"{first}); the finished trailers are saved, run the same command again to "
                                f"resume.") from None
            r, touched = 0, []
            for tid, i0, n in rows:
                tr = self.trailers.get(tid)
                if tr is not None:  # None: failed or dropped meanwhile
                    for m in self.models:
                        tr.feats.setdefault(m.entry.name, {})[i0] = torch.from_numpy(out[m.entry.name][r:r + n].copy())
                        tr.embedded[m.entry.name] = tr.embedded.get(m.entry.name, 0) + n
                    touched.append(tid)
                r += n
            for tid in dict.fromkeys(touched):
                self._check(tid)


def pool_plan(resources: dict, engine: EngineConfig) -> tuple[float, int]:
    """(GPUs per actor, actors) for a cluster of `resources` (ray.cluster_resources())."""
    gpus = engine.gpus_per_actor
    if gpus is None:
        gpus = 1.0 if resources.get("GPU", 0) > 0 else 0.0
    if gpus > resources.get("GPU", 0):
        raise T12kError(f"--gpus-per-actor {gpus:g} but the cluster has {resources.get('GPU', 0):g} GPU(s); "
                        f"lower it, or --gpus-per-actor 0 for CPU actors.")
    cpus = resources.get("CPU", 0)
    size = engine.actors or (int(resources["GPU"] // gpus) if gpus
                             else max(1, int(cpus // 2 // max(engine.actor_cpus, 1))))
    if size * engine.actor_cpus + engine.decode_cpus > cpus:
        raise T12kError(f"{size} actor(s) of {engine.actor_cpus:g} CPU(s) and a decoding task of "
                        f"{engine.decode_cpus:g} do not fit the cluster's {cpus:g} CPUs; lower --actors, "
                        f"--actor-cpus or --decode-cpus.")
    return gpus, size


def extract_ray(inputs: list[str | os.PathLike], cache_dir: str | os.PathLike, cfg: ExtractConfig,
                engine: EngineConfig, progress: bool = True, *, report: bool = True) -> ExtractResult:
    """:func:`extract.extract` on the Ray cluster of `engine`: the same caches, failure report and result.

    The videos and `cache_dir` must be on a filesystem every node reaches. `cfg.device` is the
    driver's; the actors run on GPUs when `engine` gives them some, else on CPUs.
    """
    t0 = time.perf_counter()
    if cfg.workers != -1:
        raise T12kError("--workers sets the local engine's decoding processes; with --engine ray decoding runs in "
                        "Ray tasks (--decode-cpus).")
    ray = connect(engine)
    cache_dir = Path(cache_dir)
    k, n = cfg.shard
    videos = resolve_inputs(inputs)[k - 1::n]
    if cfg.clip.segmentation == "shots":
        shots.get_detector(cfg.clip.shots).check()
    gpus, size = pool_plan(ray.cluster_resources(), engine)
    device = "cuda" if gpus else "cpu"
    streams = [bb.get_backbone(b).stream for b in cfg.backbones]
    recorded, where = store.recorded_precision(cache_dir, streams) if cfg.precision == AUTO else (None, "")
    plan = ray.remote(_plan).options(num_cpus=0, num_gpus=gpus)
    precision = ray_get(ray, plan.remote(cfg, device, recorded, where))
    Embedder = ray.remote(_Embedder).options(num_cpus=engine.actor_cpus, num_gpus=gpus,
                                             max_restarts=engine.max_retries, max_task_retries=engine.max_retries)
    actors = [Embedder.remote(cfg, device, precision, engine.actor_cpus) for _ in range(size)]
    decode = ray.remote(_decode).options(num_cpus=engine.decode_cpus, max_retries=engine.max_retries,
                                         num_returns="streaming",
                                         _generator_backpressure_num_objects=2 * CHUNKS_AHEAD)
    try:
        attrs, shipped = ray_get(ray, actors[0].plan.remote())
        models = [_Model(bb.get_backbone(a.backbone), None, None, a, set()) for a in attrs]
        cfg = dataclasses.replace(cfg, precision=precision.precision)
        todo, tag, report_path = resume(cache_dir, models, videos, cfg.shard)
        run = _RayRun(ray, actors, models, cfg, cache_dir, tag, report_path if report else None, HINTS, shipped)
        slots = max(1, int((ray.cluster_resources().get("CPU", 1) - size * engine.actor_cpus) // engine.decode_cpus))
        ordered = engine.ordered if engine.ordered is not None else device == "cpu"
        _drive(ray, run, todo, decode, cfg, shipped, 2 * slots, ordered, progress, t0)
    finally:
        for a in actors:
            ray.kill(a)  # frees their GPUs and CPUs for the next run of this process
    return finish(run, cache_dir, cfg.shard, len(videos) - len(todo), report_path if report else None, t0)


def _drive(ray: Any, run: _RayRun, todo: list, decode: Any, cfg: ExtractConfig, shipped: tuple[int, ...],
           lookahead: int, ordered: bool, progress: bool, t0: float) -> None:
    """Feed the trailers' chunks to `run`, `lookahead` trailers decoding at once: `ordered`, one trailer
    after the other in input order (the local engine's batches); else each chunk as it comes."""
    bar = tqdm(total=len(todo), unit="trailer", desc="extract (ray)", disable=not progress, dynamic_ncols=True)
    queue = deque(todo)
    active: dict[Any, list] = {}  # generator -> [tid, path, clips sent], in input order

    def pull(gen: Any) -> bool:
        """One item of `gen` into `run`; False once the trailer is done (finished or failed)."""
        tid, path, sent = active[gen]
        try:
            item = ray.get(next(gen))
            if "n" in item:
                item["x"] = _Frames(next(gen), item.pop("n"))
                active[gen][2] += len(item["x"])
        except StopIteration:
            del active[gen]
            return False
        except ray.exceptions.RayError as e:  # the task died more often than Ray retries it
            log.warning("decoding %s failed: %s", path, e)
            item = {"tid": tid, "path": str(path), "error": f"{path}: the decoding task failed ({type(e).__name__}) "
                    f"after Ray's retries", "sent": sent, "short": False}
            del active[gen]
        run.take(item)
        run.collect(block=False)
        show()
        return gen in active

    def show() -> None:
        bar.update(run.completed + run.dropped - bar.n)
        bar.set_postfix(clips_s=f"{run.clips / max(time.perf_counter() - t0, 1e-9):.1f}", failed=len(run.failures),
                        partial=len(run.partial))

    try:
        while queue or active:
            while queue and len(active) < lookahead:
                tid, path = queue.popleft()
                active[decode.remote(tid, str(path), cfg.clip, shipped, cfg.chunk, cfg.decode_threads)] = [tid, path, 0]
            if ordered:
                head = next(iter(active))
                while pull(head):
                    pass
            else:  # whichever decoding task has a chunk (or its end) ready
                ready, _ = ray.wait(list(active), num_returns=1, fetch_local=False)
                pull(ready[0])
        run.forward(run.models[-1])
        while run.pending:
            run.collect(block=True)
            show()
    finally:
        bar.close()
        run.flush()  # also on Ctrl-C or a lost actor: every finished trailer is kept
