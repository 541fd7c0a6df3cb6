import csv
import json

import numpy as np
import pytest
import torch

from trailers12k_feats import GENRES, cache
from trailers12k_feats.training import data
from trailers12k_feats.training.heads import build_divita
from trailers12k_feats.training.metrics import multilabel_metrics
from trailers12k_feats.training.train import (
    TrainConfig,
    load_streams,
    snippet_probs,
    train_run,
)
from trailers12k_feats.utils import T12kError


def setup(corpus, image="i_swin", video=None):
    meta = data.load_metadata(corpus / "mtgc.csv")
    roles = {k: cache.stream_path(corpus, v) for k, v in (("image", image), ("video", video)) if v}
    sets, rows = load_streams(meta, roles)
    return meta, sets, rows


@pytest.mark.slow
def test_run_directory(corpus, tmp_path):
    meta, sets, rows = setup(corpus, "i_swin", "ik_swin")
    res = train_run(TrainConfig(max_epochs=3), meta, sets, rows, tmp_path / "run", progress=False)
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == ["best.pt", "config.json", "history.csv", "metrics.json",
                                                    "predictions.csv"]
    info = json.loads((run / "config.json").read_text())
    assert info["config"]["split"] == 0 and info["streams"]["video"]["name"] == "ik_swin"
    with open(run / "history.csv") as f:
        history = list(csv.DictReader(f))
    assert len(history) == res.epochs == 3
    assert [float(h["train_loss"]) for h in history] == pytest.approx([h["train_loss"] for h in res.history])
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test"] == res.test and metrics["val"] == res.val and metrics["best_epoch"] == res.best_epoch
    with open(run / "predictions.csv") as f:
        preds = list(csv.DictReader(f))

    # The checkpoint loads safely and, rebuilt from its own recorded settings, reproduces the saved
    # val and test probabilities (snippet averages) and from them the saved metrics.
    ckpt = torch.load(run / "best.pt", weights_only=True)
    assert ckpt["epoch"] == metrics["best_epoch"] and ckpt["info"] == info
    cfg = TrainConfig(**ckpt["info"]["config"])
    dims = {role: s["feature_dim"] for role, s in ckpt["info"]["streams"].items()}
    model = build_divita(dims["image"], dims["video"], temporal=cfg.temporal, fusion=cfg.fusion, dropout=cfg.dropout)
    model.load_state_dict(ckpt["model"])
    for subset in ("val", "test"):
        d = data.TrailerData(meta, sets, meta.subset(0, subset))
        saved = [r for r in preds if r["subset"] == subset]
        assert [r["mid"] for r in saved] == d.ids
        saved = np.array([[float(r[g]) for g in GENRES] for r in saved])  # (n, 10)
        np.testing.assert_allclose(snippet_probs(model, d, cfg).numpy(), saved, rtol=0, atol=1e-5)
        got = multilabel_metrics(d.labels.numpy(), saved)
        assert got["uAP"] == pytest.approx(metrics[subset]["uAP"], abs=1e-3)


@pytest.mark.slow
def test_same_seed_same_metrics(corpus):
    meta, sets, rows = setup(corpus)
    cfg = TrainConfig(max_epochs=2, seed=3)
    a = train_run(cfg, meta, sets, rows, progress=False)
    b = train_run(cfg, meta, sets, rows, progress=False)
    assert a.test == b.test and [h["train_loss"] for h in a.history] == [h["train_loss"] for h in b.history]
    c = train_run(TrainConfig(max_epochs=2, seed=4), meta, sets, rows, progress=False)
    assert c.history[0]["train_loss"] != a.history[0]["train_loss"]


def test_early_stopping_and_best_checkpoint(corpus):
    meta, sets, rows = setup(corpus)
    res = train_run(TrainConfig(max_epochs=40, early_stop_patience=2, lr=3e-3), meta, sets, rows, progress=False)
    losses = [h["val_loss"] for h in res.history]
    best = min(range(len(losses)), key=losses.__getitem__) + 1
    assert res.best_epoch == best
    assert res.epochs == min(best + 2, 40)  # stops 2 epochs without improvement after the best
    # The final val metrics are those of the best epoch's weights, not the last epoch's.
    assert res.val["uAP"] == pytest.approx(res.history[best - 1]["val_uAP"], abs=1e-9)
    if res.epochs > best:
        assert res.val["uAP"] != res.history[-1]["val_uAP"]


@pytest.mark.slow
def test_learns_something(corpus):
    meta, sets, rows = setup(corpus, "ik_swin")
    res = train_run(TrainConfig(max_epochs=15, lr=1e-3), meta, sets, rows, progress=False)
    prevalence = 100 * meta.labels.mean()
    assert res.test["uAP"] > prevalence + 15  # chance level is the positive rate


def test_bad_config():
    with pytest.raises(T12kError, match="valid: tsfm, savg, gru, conv"):
        TrainConfig(temporal="rnn")
    with pytest.raises(T12kError, match="split must be 0, 1 or 2"):
        TrainConfig(split=3)
    with pytest.raises(T12kError, match="batch_size must be at least 1"):
        TrainConfig(batch_size=0)


def test_interrupted_run_leaves_nothing(corpus, tmp_path, monkeypatch):
    meta, sets, rows = setup(corpus)
    from trailers12k_feats.training import train as train_mod

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "_write_predictions", boom)
    with pytest.raises(KeyboardInterrupt):
        train_run(TrainConfig(max_epochs=1), meta, sets, rows, tmp_path / "run", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_device_check():
    if not torch.cuda.is_available():
        with pytest.raises(T12kError, match="CUDA is not available; use --device cpu"):
            TrainConfig(device="cuda")
    with pytest.raises(T12kError, match="device must be 'cpu' or 'cuda"):
        TrainConfig(device="tpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_trains_on_gpu(corpus):
    meta, sets, rows = setup(corpus)
    res = train_run(TrainConfig(max_epochs=2, device="cuda"), meta, sets, rows, progress=False)
    assert res.epochs == 2 and 0 < res.test["uAP"] <= 100
