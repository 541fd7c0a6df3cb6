"""A finished run's directory: config.json, history.csv, best.pt, predictions.csv and
metrics.json, written under a temporary name and renamed, so it appears only when complete."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from trailers12k_feats import GENRES, __version__
from trailers12k_feats import cache as cache_mod
from trailers12k_feats.runtime import PrecisionChoice
from trailers12k_feats.training.data import Metadata, TrailerData
from trailers12k_feats.training.heads import count_params
from trailers12k_feats.utils import atomic_path, config_dict, write_json

if TYPE_CHECKING:  # train.py imports this module
    from trailers12k_feats.training.train import RunResult, TrainConfig


def _write_history(path: Path, history: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(history[0]))
        w.writeheader()
        w.writerows(history)


def _write_predictions(path: Path, data: dict[str, TrailerData], val_probs: torch.Tensor,
                       test_probs: torch.Tensor) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["subset", "mid", *GENRES])
        for subset, probs in (("val", val_probs), ("test", test_probs)):
            for tid, p in zip(data[subset].ids, probs.tolist()):
                w.writerow([subset, tid, *(f"{v:.6f}" for v in p)])


def save_run(out_dir: str | os.PathLike, cfg: TrainConfig, meta: Metadata, sets: dict[str, cache_mod.FeatureSet],
             data: dict[str, TrailerData], left_out: int, model: torch.nn.Module, result: RunResult,
             val_probs: torch.Tensor, test_probs: torch.Tensor, precision: PrecisionChoice) -> None:
    """Write a finished run's directory (atomically): config.json, history.csv, best.pt (the
    weights of `model`, the best epoch's), predictions.csv and metrics.json. `cfg` holds the
    precision that ran; `precision` says what was asked for and why it was chosen."""
    info = {
        "config": config_dict(cfg),  # the precision that ran: `t12k predict` repeats it
        "precision": precision.record(),
        "streams": {r: {"name": fs.name, "path": str(fs.path), "feature_dim": fs.feature_dim,
                        "backbone": fs.attrs.backbone, "kind": fs.attrs.kind, "fps": fs.attrs.fps,
                        "fpc": fs.attrs.fpc, "segmentation": fs.attrs.segmentation,
                        "weights": fs.attrs.weights,
                        # how `t12k extract` made the features: what `t12k predict` repeats
                        "features": fs.attrs.config.get("features"),
                        "weights_path": dict(fs.attrs.config.get("extract", {}).get("weights", ())).get(
                            fs.attrs.backbone)}
                    for r, fs in sets.items()},
        "metadata": str(meta.path),
        "trailers": {k: len(v) for k, v in data.items()},
        "short_train_trailers_left_out": left_out,  # authors protocol: fewer clips than the window
        "params": count_params(model),
        "package_version": __version__,
    }
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        (tmp / "config.json").write_text(json.dumps(info, indent=2) + "\n")
        _write_history(tmp / "history.csv", result.history)
        torch.save({"model": model.state_dict(), "epoch": result.best_epoch, "info": info}, tmp / "best.pt")
        _write_predictions(tmp / "predictions.csv", data, val_probs, test_probs)
        write_json(tmp / "metrics.json", {"best_epoch": result.best_epoch, "epochs": result.epochs,
                                          "seconds": round(result.seconds, 1), "val": result.val,
                                          "test": result.test})
