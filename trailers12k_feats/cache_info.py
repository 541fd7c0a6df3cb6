"""What `t12k cache info` and `t12k cache validate` show: cache files named by paths, and a
summary of each read through :class:`cache.CacheReader` (no HDF5 is opened here)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from trailers12k_feats import cache as cache_mod


def expand(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """The cache files that `paths` name: a file as it is, a folder as every cache in it."""
    return [f for p in map(Path, paths) for f in (cache_mod.list_caches(p) if p.is_dir() else [p])]


def summary(path: str | os.PathLike) -> dict[str, Any]:
    """A small dict describing a cache (for `t12k cache info`); `pooled` lists the stored
    per-trailer summaries and `finite_checked_by` the version that checked every value (or None)."""
    path = Path(path)
    with cache_mod.CacheReader(path) as r:
        lengths = r.lengths  # (n,)
        out = {
            "path": str(path),
            "size_mb": round(path.stat().st_size / 2**20, 1),
            "trailers": len(lengths),
            "clips": int(lengths.sum()),
            "dtype": r.dtype,
            "clips_per_trailer": {
                "min": int(lengths.min()) if len(lengths) else 0,
                "median": float(np.median(lengths)) if len(lengths) else 0.0,
                "max": int(lengths.max()) if len(lengths) else 0,
            },
            "trailers_under_30_clips": int((lengths < 30).sum()),
            "pooled": list(r.pooled),
            "finite_checked_by": r.finite_by,
        }
        out.update(dataclasses.asdict(r.attrs))
    return out


def format_summary(s: dict[str, Any]) -> str:
    """A :func:`summary` as the three lines `t12k cache info` prints."""
    c = s["clips_per_trailer"]
    return (f"{s['path']}  ({s['size_mb']} MB, {s['dtype']})\n"
            f"  {s['name']}: {s['backbone']} ({s['kind']}, {s['pretraining']}), dim {s['feature_dim']}, "
            f"fps {s['fps']:g}, fpc {s['fpc']}, segmentation {s['segmentation']}, source {s['source']}\n"
            f"  {s['trailers']} trailers, {s['clips']} clips (min {c['min']}, median {c['median']:g}, "
            f"max {c['max']}; {s['trailers_under_30_clips']} trailers under 30 clips)")
