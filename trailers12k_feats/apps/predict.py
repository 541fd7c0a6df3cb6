"""Genre probabilities of new videos with a trained run: extract what the run needs, apply its head.

A run directory records, per stream, how `t12k extract` made its features (backbone,
weights, clip settings). Prediction repeats exactly that extraction (a trailer already in
the run's own cache is read from it instead), then evaluates the best checkpoint with the
protocol's snippet averaging, fusing both streams when the run has two.

Every input gets a row: status "ok", "partial" (the file decodes shorter than it declares,
so the probabilities come from the part that decoded) or "failed" (no probabilities), with
the reason in "error".
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from trailers12k_feats import GENRES, GENRES_SHORT
from trailers12k_feats import cache as cache_mod
from trailers12k_feats.cache import CacheAttrs, TrailerClips
from trailers12k_feats.extraction import shots
from trailers12k_feats.extraction.extract import ExtractConfig, extract
from trailers12k_feats.extraction.inputs import resolve_inputs
from trailers12k_feats.extraction.video import ClipSpec
from trailers12k_feats.training.data import TrailerData
from trailers12k_feats.training.evaluation import snippet_probs
from trailers12k_feats.training.heads import build_divita
from trailers12k_feats.training.protocols import head_options
from trailers12k_feats.training.train import TrainConfig
from trailers12k_feats.utils import T12kError

log = logging.getLogger(__name__)

FORMATS = ("table", "csv", "json")
STATUSES = ("ok", "partial", "failed")

# Advice added to extraction's reasons: predict has no --leftover or --partial, the run's clip settings decide.
HINTS = {
    "short": "; one clip of this run's settings is the shortest video it can classify",
    "keep": "; the probabilities come from the part that decoded",
}


@dataclass(frozen=True)
class PredictConfig:
    run_dir: Path
    cache_dir: Path | None = None  # keep extracted features here (reused next time); None = temporary
    device: str = "cpu"
    workers: int = -1  # decoding processes, as in ExtractConfig (-1: 0 on the CPU, the usable cores but one on CUDA)
    weights: tuple[tuple[str, str], ...] = ()  # (backbone, path) when not in the torch hub cache

    def __post_init__(self) -> None:
        for name in ("config.json", "best.pt"):
            if not (Path(self.run_dir) / name).is_file():
                raise T12kError(f"{self.run_dir} is not a finished run directory ({name} is missing); "
                                "give a folder written by `t12k train` or `t12k reproduce` (runs/<row>/split<k>).")


@dataclass
class TrainedHead:
    """A trained head and what its inputs were."""

    model: torch.nn.Module
    train: TrainConfig
    streams: dict[str, dict]  # role ("image"/"video") -> provenance recorded at training


def load_head(run_dir: str | os.PathLike, device: str = "cpu") -> TrainedHead:
    """The best checkpoint of a run directory, rebuilt and in eval mode."""
    run_dir = Path(run_dir)
    info = json.loads((run_dir / "config.json").read_text())
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    train = TrainConfig(**{k: v for k, v in info["config"].items() if k in fields} | {"device": device})
    streams = info["streams"]
    model = build_divita(streams.get("image", {}).get("feature_dim"), streams.get("video", {}).get("feature_dim"),
                         temporal=train.temporal, fusion=train.fusion, dropout=train.dropout,
                         **head_options(train.protocol))
    state = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    return TrainedHead(model.to(device).eval(), train, streams)


def _extract_config(stream: dict, cfg: PredictConfig) -> ExtractConfig:
    feats = stream.get("features")
    if not feats:
        where = stream.get("path", "?")
        raise T12kError(f"stream {stream.get('name')} of this run comes from {where}, which was not made by "
                        "`t12k extract` (synthetic or imported features); predict needs a run trained on "
                        "features extracted by this tool, so it can extract the same ones from your video.")
    settings = {**shots.IMPLIED, **feats}  # a run from before the detector was recorded used content
    clip = ClipSpec(**{f.name: settings[f.name] for f in dataclasses.fields(ClipSpec) if f.name in settings})
    weights = dict(cfg.weights)
    recorded = stream.get("weights_path")
    if feats["backbone"] not in weights and recorded and recorded != "random" and Path(recorded).is_file():
        weights[feats["backbone"]] = recorded  # the file the features were extracted with (hash still checked)
    if feats["weights"] == "random":
        weights[feats["backbone"]] = "random"  # the run was trained on random-weight features: same seed, same net
    extra = {k: feats[k] for k in ("frame_pool", "image_frames") if k in feats}
    return ExtractConfig(backbones=(feats["backbone"],), clip=clip, precision=feats["precision"], device=cfg.device,
                         workers=cfg.workers, weights=tuple((k, v) for k, v in weights.items()
                                                            if k == feats["backbone"]), **extra)


def _read(path: Path, ids: list[str]) -> tuple[dict[str, TrailerClips], CacheAttrs | None]:
    """Clips of the given trailers that a cache holds, and how it was made (nothing if there is no cache)."""
    if not path.is_file():
        return {}, None
    return cache_mod.read_trailers(path, ids), cache_mod.read_attrs(path)


class _NotUnder(logging.Filter):
    """Drops log records that name a folder about to be deleted (predict's temporary cache)."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = str(folder)

    def filter(self, record: logging.LogRecord) -> bool:
        return self.folder not in record.getMessage()


@contextlib.contextmanager
def _silent_about(folder: Path) -> Iterator[None]:
    loggers = [logging.getLogger(n) for n in ("trailers12k_feats.cache", "trailers12k_feats.extraction.store",
                                              "trailers12k_feats.extraction.extract")]
    f = _NotUnder(folder)
    for lg in loggers:
        lg.addFilter(f)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(f)


def predict(videos: list[str | os.PathLike], cfg: PredictConfig, progress: bool = True) -> dict:
    """Probabilities of the 10 genres for each video.

    Returns {"run", "streams", "predictions": one row per input in input order, "failures":
    the rows whose status is not "ok"}. A row is {"id", "path", "status", "error", "clips",
    "probabilities"}: status "ok", "partial" or "failed"; error "" when ok; clips None and
    probabilities {} when failed.
    """
    run = load_head(cfg.run_dir, cfg.device)
    pairs = resolve_inputs(videos)
    ids = [t for t, _ in pairs]
    clips: dict[str, dict[str, TrailerClips]] = {}
    made: dict[str, CacheAttrs] = {}  # role -> attributes of a cache its clips come from
    problems: dict[str, dict] = {}  # id -> its failure or partial record (a failure wins)
    with tempfile.TemporaryDirectory(prefix="t12k-predict-") as tmp:
        out_dir = Path(cfg.cache_dir) if cfg.cache_dir else Path(tmp)
        # A temporary folder is gone when predict returns: no report in it, no log line naming it.
        for role, stream in run.streams.items():
            ecfg = _extract_config(stream, cfg)
            have, attrs = _read(Path(stream.get("path", "")), ids)  # trailers already in the run's own cache
            todo = [str(p) for t, p in pairs if t not in have]
            if todo:
                with _silent_about(out_dir) if not cfg.cache_dir else contextlib.nullcontext():
                    res = extract(todo, out_dir, ecfg, progress=progress, report=bool(cfg.cache_dir), hints=HINTS)
                for rec in res.partial + res.failures:  # failures last: they replace a partial of another stream
                    if rec["id"] not in problems or rec["status"] == "failed":
                        problems[rec["id"]] = rec
                fresh, fresh_attrs = _read(cache_mod.stream_path(out_dir, stream["name"]), ids)
                have |= fresh
                attrs = fresh_attrs or attrs
            clips[role] = have
            if attrs is not None:
                made[role] = attrs
    ok = [t for t in ids if all(t in c for c in clips.values())]
    probs: dict[str, tuple[int, list[float]]] = {}
    if ok:
        # A role's two sources were extracted with the same recorded settings: either's attributes describe both.
        sets = {role: cache_mod.feature_set([c[t] for t in ok], made[role], dtype=torch.float32)
                for role, c in clips.items()}
        p = snippet_probs(run.model, TrailerData(ok, sets), run.train)  # (n, 10)
        lengths = sets[next(iter(sets))].lengths.tolist()
        probs = {tid: (int(n), row) for tid, n, row in zip(ok, lengths, p.tolist())}
    rows = []
    for tid, path in pairs:
        rec = problems.get(tid)
        if tid not in probs and rec is None:  # cannot happen unless a cache lost it; say so rather than drop it
            rec = {"status": "failed", "reason": f"{path}: no features were extracted for {tid}"}
        status = "ok" if rec is None else ("partial" if tid in probs else "failed")
        n, p = probs.get(tid, (None, []))
        rows.append({"id": tid, "path": str(path), "status": status, "error": rec["reason"] if rec else "",
                     "clips": n, "probabilities": dict(zip(GENRES, (round(v, 6) for v in p)))})
    return {"run": str(cfg.run_dir), "streams": {r: s["name"] for r, s in run.streams.items()},
            "predictions": rows, "failures": [r for r in rows if r["status"] != "ok"]}


def format_predictions(result: dict, fmt: str = "table", threshold: float = 0.5) -> str:
    """The predictions as an aligned table, CSV or JSON: one row per input, failed ones included."""
    if fmt not in FORMATS:
        raise T12kError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}.")
    rows = result["predictions"]
    if fmt == "json":
        return json.dumps(result, indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["id", "path", "clips", *GENRES, "status", "error"])
        for r in rows:
            p = r["probabilities"]
            w.writerow([r["id"], r["path"], "" if r["clips"] is None else r["clips"],
                        *(f"{p[g]:.6f}" if g in p else "" for g in GENRES), r["status"], r["error"]])
        return buf.getvalue().rstrip("\n")
    width = max([len("trailer")] + [len(r["id"]) for r in rows])
    head = f"{'trailer':<{width}}  " + " ".join(f"{g:>5}" for g in GENRES_SHORT) + "  genres (p >= 0.5)"
    out = [head]
    for r in rows:
        if r["status"] == "failed":
            out.append(f"{r['id']:<{width}}  failed: {r['error']}")
            continue
        p = list(r["probabilities"].values())
        top = [g for g, v in sorted(zip(GENRES, p), key=lambda x: -x[1]) if v >= threshold]
        line = f"{r['id']:<{width}}  " + " ".join(f"{v:5.2f}" for v in p) + "  " + (", ".join(top) or "-")
        out.append(line + (f"  (partial: {r['error']})" if r["status"] == "partial" else ""))
    return "\n".join(out)
