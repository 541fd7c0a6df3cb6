"""The book-keeping of one extraction run, shared by the local engine (extract.py) and Ray's.

Before the run, :func:`resume` readies the cache folder and finds the trailers still to do.
During it, :class:`_Run` takes the decoding workers' items: it batches clips per backbone
across shots and trailers, keeps each trailer's embeddings until every backbone has them
all, flushes finished trailers to crash-safe segments (store.py) and keeps the failure
report. After it, :func:`finish` merges the segments and returns the :class:`ExtractResult`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from trailers12k_feats.extraction import shots, store
from trailers12k_feats.extraction.clipstream import crops
from trailers12k_feats.extraction.video import is_partial

if TYPE_CHECKING:
    from trailers12k_feats.extraction.extract import ExtractConfig, _Model

log = logging.getLogger(__name__)


@dataclass
class ExtractResult:
    caches: list[Path]
    extracted: int  # trailers written, partial ones kept included
    skipped: int
    failures: list[dict]  # videos not extracted: {"id", "path", "status": "failed", "reason"}
    seconds: float
    clips: int
    partial: list[dict] = field(default_factory=list)  # {"id", "path", "status": "partial", "reason",
    #                                                     "decoded_s", "declared_s", "kept"}
    report: Path | None = None  # the failure report of this run (None when not written)

    @property
    def ok(self) -> bool:
        return not self.failures and not self.partial

    def summary(self, partial: str = "keep") -> str:
        """What the run did, in one line, then the caches it wrote; `partial` is the run's setting."""
        lines = [f"{self.extracted} trailer(s) extracted ({self.clips} clips, {self.seconds:.0f} s), "
                 f"{self.skipped} already done, {len(self.failures)} failed, {len(self.partial)} partial "
                 f"({'kept' if partial == 'keep' else 'dropped'})"]
        return "\n".join(lines + [f"  {p}" for p in self.caches])


class _Trailer:
    def __init__(self) -> None:
        self.n = 0  # clips received
        self.total: int | None = None  # set by the end marker
        self.meta: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.feats: dict[str, dict[int, torch.Tensor]] = {}  # backbone -> first clip -> (n, F) on the device
        self.embedded: dict[str, int] = {}
        self.durations: tuple[float | None, float | None] = (None, None)  # (decoded, declared) seconds


def resume(cache_dir: Path, models: list[_Model], videos: list[tuple[str, Path]],
           shard: tuple[int, int]) -> tuple[list[tuple[str, Path]], str, Path]:
    """Make `cache_dir` ready for `models`: stale segments removed, earlier feature settings
    checked, each model's finished trailers read (`m.done`). Returns the videos some model still
    needs, the tag of this shard's segments and the path of its failure report."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    for m in models:
        store.clean_stale(cache_dir, m.attrs.name)
        store.check_compatible(cache_dir, m.attrs.name, m.attrs.config["features"], shots.IMPLIED)
        m.done = store.finished_ids(cache_dir, m.attrs.name)
    todo = [(t, p) for t, p in videos if any(t not in m.done for m in models)]
    if len(videos) > len(todo):
        log.info("skipping %d trailer(s) already in %s", len(videos) - len(todo), cache_dir)
    k, n = shard
    tag = f"shard{k}of{n}"
    return todo, tag, cache_dir / ("failures.jsonl" if n == 1 else f"failures.{tag}.jsonl")


def finish(run: _Run, cache_dir: Path, shard: tuple[int, int], skipped: int, report_path: Path | None,
           t0: float) -> ExtractResult:
    """After the last batch: with one shard, each model's segments merged into its cache (else a
    log line saying to merge once every shard is done); failures reported; the result."""
    k, n = shard
    caches = [p for m in run.models if n == 1 and (p := store.merge(cache_dir, m.attrs.name)) is not None]
    if n > 1:
        log.info("shard %d/%d done; once every shard has finished run `t12k cache merge %s`", k, n, cache_dir)
    if (run.failures or run.partial) and report_path is not None:
        log.warning("%d video(s) failed, %d partial; reasons in %s", len(run.failures), len(run.partial), report_path)
    return ExtractResult(caches, run.completed, skipped, run.failures, time.perf_counter() - t0, run.clips,
                         run.partial, report_path)


class _Run:
    """Book-keeping of one extraction: buffers per backbone, trailers in flight, flushes."""

    def __init__(self, models: list[_Model], cfg: ExtractConfig, cache_dir: Path, tag: str, report: Path | None,
                 hints: dict[str, str], shipped: tuple[int, ...]) -> None:
        self.models, self.cfg, self.cache_dir, self.tag, self.report = models, cfg, cache_dir, tag, report
        self.hints, self.shipped = hints, shipped
        # Uploads on a stream of their own overlap the models' work on the current one.
        self.copies = torch.cuda.Stream(cfg.device) if cfg.device.startswith("cuda") else None
        self.trailers: dict[str, _Trailer] = {}
        self.finished: list[str] = []
        self.failures: list[dict] = []
        self.partial: list[dict] = []
        self.completed = 0
        self.clips = 0
        self.last_flush = time.monotonic()

    def take(self, item: dict) -> None:
        tid = item["tid"]
        tr = self.trailers.setdefault(tid, _Trailer())
        if "error" in item:
            reason = item["error"] + (self.hints["short"] if item.get("short") else "")
            if item.get("note"):
                reason += f"; {item['note']}"
            self.failures.append({"id": tid, "path": item["path"], "status": "failed", "reason": reason})
            self._forget(tid)
            return
        if "clips" in item:
            tr.total = item["clips"]
            decoded, declared = item.get("decoded_s"), item.get("declared_s")
            tr.durations = (decoded, declared)
            if decoded is not None and is_partial(decoded, declared):
                keep = self.cfg.partial == "keep"
                reason = (f"{item['path']}: only {decoded:.1f} s of the {declared:.1f} s its file declares decode, "
                          f"so the file is truncated or damaged{self.hints['keep' if keep else 'drop']}")
                log.warning("%s", reason)
                self.partial.append({"id": tid, "path": item["path"], "status": "partial", "reason": reason,
                                     "decoded_s": round(decoded, 3), "declared_s": round(declared, 3), "kept": keep})
                if not keep:
                    self._forget(tid)
                    return
            self._check(tid)
            return
        i0, c = tr.n, len(item["start"])
        tr.n += c
        tr.meta.append((item["start"], item["end"], item["shot"]))
        x = self.upload(item["x"])  # (n, k, H, W, 3) uint8, once for every backbone
        for m in self.models:
            m.buf.append((tid, i0, x))
            m.rows += c
            if m.rows >= self.cfg.batch_size:
                self.forward(m)

    @property
    def dropped(self) -> int:
        """Trailers given up on: failed, or partial and dropped."""
        return len(self.failures) + sum(not p["kept"] for p in self.partial)

    def _forget(self, tid: str) -> None:
        del self.trailers[tid]
        for m in self.models:  # forget clips of it still waiting in a batch
            m.buf = [b for b in m.buf if b[0] != tid]
            m.rows = sum(len(b[2]) for b in m.buf)

    def upload(self, x: torch.Tensor) -> torch.Tensor:
        """A (pinned) chunk of frames onto the device without waiting for the copy."""
        if self.copies is None:
            return x.to(self.cfg.device)
        with torch.cuda.stream(self.copies):
            y = x.to(self.cfg.device, non_blocking=True)
        compute = torch.cuda.current_stream(self.cfg.device)
        compute.wait_stream(self.copies)  # work queued from now on sees the frames
        y.record_stream(compute)  # the allocator must not reuse them before that work is done
        return y

    def forward(self, m: _Model) -> None:
        if not m.buf:
            return
        x = crops([b[2] for b in m.buf], m.group, self.shipped)  # (B, t, 3, h, w) uint8 on the device
        out = m.embed(x, self.cfg)  # (B, F), left on the device until the flush
        r = 0
        touched = []
        for tid, i0, xb in m.buf:
            tr = self.trailers.get(tid)
            if tr is not None:
                tr.feats.setdefault(m.entry.name, {})[i0] = out[r:r + len(xb)]
                tr.embedded[m.entry.name] = tr.embedded.get(m.entry.name, 0) + len(xb)
                touched.append(tid)
            r += len(xb)
        m.buf, m.rows = [], 0
        for tid in dict.fromkeys(touched):
            self._check(tid)

    def _check(self, tid: str) -> None:
        tr = self.trailers.get(tid)
        if tr is None or tr.total is None or tid in self.finished:
            return
        if all(tr.embedded.get(m.entry.name, 0) == tr.total for m in self.models):
            self.finished.append(tid)
            self.completed += 1
            self.clips += tr.total
            if len(self.finished) >= self.cfg.flush_trailers or time.monotonic() - self.last_flush >= self.cfg.flush_seconds:
                self.flush()

    def flush(self) -> None:
        """Write finished trailers to one new segment per backbone; update the failure report."""
        if self.finished:
            for m in self.models:
                tids = [t for t in self.finished if t not in m.done]  # in m.done: written by an earlier run
                #                                                   that died between two segment renames
                parts = [self.trailers[t].feats[m.entry.name] for t in tids]
                if not tids:
                    continue
                # One copy back per backbone and flush: (sum C, F) in trailer and clip order.
                feats = torch.cat([p[i] for p in parts for i in sorted(p)]).cpu().numpy()
                items, r = [], 0
                for tid in tids:
                    tr = self.trailers[tid]
                    start, end, shot = (np.concatenate(col) for col in zip(*tr.meta))
                    items.append((tid, feats[r:r + len(start)], start, end, shot, *tr.durations))
                    r += len(start)
                store.write_segment(self.cache_dir, m.attrs, items, self.tag, self.cfg.dtype)
                m.done.update(t for t, *_ in items)
            for tid in self.finished:
                del self.trailers[tid]
            self.finished = []
        if self.report is not None:
            store.write_failures(self.report, self.failures + self.partial)
        self.last_flush = time.monotonic()
