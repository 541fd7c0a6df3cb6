import csv
import json
import logging
import math
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from trailers12k_feats import GENRES, cache
from trailers12k_feats.training import data
from trailers12k_feats.training import train as train_mod
from trailers12k_feats.training.heads import build_divita
from trailers12k_feats.training.metrics import multilabel_metrics
from trailers12k_feats.training.streams import check_dim, resolve_streams
from trailers12k_feats.training.train import (
    TrainConfig,
    Trainer,
    TrainJob,
    load_streams,
    snippet_probs,
    train_from_caches,
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
        d = data.TrailerData.from_metadata(meta, sets, meta.subset(0, subset))
        saved = [r for r in preds if r["subset"] == subset]
        assert [r["mid"] for r in saved] == d.ids
        saved = np.array([[float(r[g]) for g in GENRES] for r in saved])  # (n, 10)
        bare = data.TrailerData(d.ids, sets)  # no labels: what predict evaluates
        np.testing.assert_allclose(snippet_probs(model, bare, cfg).numpy(), saved, rtol=0, atol=1e-5)
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


def test_training_needs_labels(corpus):
    meta, sets, rows = setup(corpus)
    labelled = data.TrailerData.from_metadata(meta, sets, rows[:20])
    with pytest.raises(T12kError, match="training needs labelled trailers, but val has none"):
        Trainer(TrainConfig(), {"train": labelled, "val": data.TrailerData(labelled.ids, sets), "test": labelled})


def test_bad_config():
    with pytest.raises(T12kError, match="valid: tsfm, savg, gru, conv"):
        TrainConfig(temporal="rnn")
    with pytest.raises(T12kError, match="split must be 0, 1 or 2"):
        TrainConfig(split=3)
    with pytest.raises(T12kError, match="batch_size must be at least 1"):
        TrainConfig(batch_size=0)
    with pytest.raises(T12kError, match=r"unknown precision 'fp16'; valid: auto, bf16, fp32\.$"):
        TrainConfig(precision="fp16")
    for lr in (float("inf"), float("nan"), 1e6, 0.0, -1e-4):
        with pytest.raises(T12kError, match=r"lr must be a finite number in \(0, 1\], got .*; larger AdamW steps "):
            TrainConfig(lr=lr)
    for wd in (float("inf"), float("nan"), -0.01):
        with pytest.raises(T12kError, match=r"weight_decay must be a finite number >= 0, got "):
            TrainConfig(weight_decay=wd)
    assert TrainConfig(lr=1.0, weight_decay=0.0).lr == 1.0


def poisoned(corpus, monkeypatch, at_step):
    """A Trainer whose model's output turns NaN at training step `at_step` (counted from 1)."""
    from trailers12k_feats.training import train as train_mod

    meta, sets, rows = setup(corpus)
    trainer = Trainer(TrainConfig(max_epochs=2, batch_size=64), train_mod._split_data(meta, sets, rows, 0))
    real, calls = trainer._logits, []

    def logits(batch):
        calls.append(1)
        out = real(batch)
        return out * float("nan") if len(calls) >= at_step else out

    monkeypatch.setattr(trainer, "_logits", logits)
    return trainer


def test_diverged_training_loss_is_caught_where_it_appears(corpus, monkeypatch):
    trainer = poisoned(corpus, monkeypatch, at_step=3)
    with pytest.raises(T12kError, match=r"^split0: training loss is nan at epoch 1, step 3 of 4; training diverged, "
                                        r"lower --lr or use --precision fp32\.$"):
        trainer.fit(progress=False, desc="split0")


def test_nan_probabilities_in_evaluation_are_a_diverged_run(corpus, monkeypatch):
    from trailers12k_feats.training import train as train_mod

    meta, sets, rows = setup(corpus)
    trainer = Trainer(TrainConfig(max_epochs=2), train_mod._split_data(meta, sets, rows, 0))
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.fill_(float("nan"))
    loss, metrics, probs = trainer.evaluate(trainer.data["val"])  # no crash on NaN probabilities
    assert math.isnan(loss) and math.isnan(metrics["uAP"]) and torch.isnan(probs).all()
    monkeypatch.setattr(trainer, "train_epoch", lambda *a, **k: 0.5)
    with pytest.raises(T12kError, match=r"^epochs: validation loss is nan at epoch 1; training diverged, lower --lr"):
        trainer.fit(progress=False)


def copy_with(src, dst, **attrs):
    """A copy of cache `src` at `dst` with some attributes replaced."""
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as h5:
        h5.attrs.update(attrs)
    return dst


def test_resolve_streams(tmp_path):
    assert resolve_streams(tmp_path, row="resnet_fusion") == {"image": tmp_path / "i_resnet.h5",
                                                               "video": tmp_path / "k_r2plus1d.h5"}
    assert resolve_streams(tmp_path, row="Swin-3D", image="x/mine.h5") == {"image": Path("x/mine.h5"),
                                                                           "video": tmp_path / "ik_swin.h5"}
    with pytest.raises(T12kError, match="give --row, or --image and/or --video"):
        resolve_streams(tmp_path)


def test_a_cache_must_have_the_dim_of_its_stream(corpus, tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    shutil.copy(corpus / "mtgc.csv", d)
    shutil.copy(corpus / "i_resnet.h5", d / "i_swin.h5")  # 2048-d features saved as the 768-d Swin-2D
    job = TrainJob(metadata=d / "mtgc.csv", cache_dir=d, out=tmp_path / "run", row="i_swin")
    with pytest.raises(T12kError, match=r"cache .*i_swin.h5 has feature dim 2048 but stream i_swin has dim 768; "
                                        r"point --cache-dir"):
        train_from_caches(job, progress=False)
    assert not (tmp_path / "run").exists()
    # Named anything else, the file is refused when the stream name it records disagrees with its dim.
    mine = copy_with(corpus / "i_resnet.h5", tmp_path / "mine.h5", name="i_swin")
    with pytest.raises(T12kError, match="stream i_swin .the name the cache records. has dim 768"):
        check_dim(mine, cache.read_attrs(mine))
    check_dim(corpus / "i_resnet.h5", cache.read_attrs(corpus / "i_resnet.h5"))


@pytest.mark.parametrize("name,value,shown", [("fpc", 16, "fpc is 24 in .*i_swin.h5 but 16 in .*ik_swin.h5"),
                                              ("fps", 25.0, "fps is 24 in .*i_swin.h5 but 25 in .*ik_swin.h5"),
                                              ("segmentation", "fixed", "segmentation is shots in .* but fixed")])
def test_fusing_streams_with_other_clips_is_refused(corpus, tmp_path, caplog, name, value, shown):
    meta = data.load_metadata(corpus / "mtgc.csv")
    caches = {"image": corpus / "i_swin.h5", "video": copy_with(corpus / "ik_swin.h5", tmp_path / "ik_swin.h5",
                                                               **{name: value})}
    with pytest.raises(T12kError, match=f"cannot fuse these streams: {shown}.*--allow-mismatched-clips"):
        load_streams(meta, caches)
    with caplog.at_level(logging.WARNING):
        sets, rows = load_streams(meta, caches, allow_mismatched_clips=True)
    assert set(sets) == {"image", "video"} and len(rows) == len(meta)
    assert "fusing streams whose clips differ" in caplog.text and f"{name} is" in caplog.text


def test_fps_0_means_unknown_and_is_not_refused(corpus, tmp_path, caplog):
    # Released image streams record fps 0 (the video's own rate); their video streams fps 24.
    meta = data.load_metadata(corpus / "mtgc.csv")
    image = copy_with(corpus / "i_swin.h5", tmp_path / "i_swin.h5", fps=0.0)
    with caplog.at_level(logging.WARNING):
        sets, _ = load_streams(meta, {"image": image, "video": corpus / "ik_swin.h5"})
    assert set(sets) == {"image", "video"}
    assert f"{image} records fps 0" in caplog.text and "cannot be compared" in caplog.text
    with pytest.raises(T12kError, match="fpc is 24 in .* but 8 in"):  # the other fields are still compared
        load_streams(meta, {"image": image, "video": copy_with(corpus / "ik_swin.h5", tmp_path / "v.h5", fpc=8)})


def test_interrupted_run_leaves_nothing(corpus, tmp_path, monkeypatch):
    meta, sets, rows = setup(corpus)
    from trailers12k_feats.training import rundir

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(rundir, "_write_predictions", boom)
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
def test_trains_on_gpu(corpus, monkeypatch):
    meta, sets, rows = setup(corpus)
    cfg = TrainConfig(max_epochs=2, device="cuda", precision="fp32")
    res = train_run(cfg, meta, sets, rows, progress=False)
    assert res.epochs == 2 and 0 < res.test["uAP"] <= 100
    again = train_run(cfg, meta, sets, rows, progress=False)  # seeded: the same run on the same device
    assert again.history[-1]["val_loss"] == res.history[-1]["val_loss"] and again.test == res.test
    # Features that do not fit stay in host RAM and batches are copied each step: the same run.
    monkeypatch.setattr(data, "DEVICE_SHARE", 0.0)
    host = train_run(cfg, meta, sets, rows, progress=False)
    for h, d in zip(host.history, res.history, strict=True):
        assert h["val_loss"] == pytest.approx(d["val_loss"], abs=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_gpu_step_waits_for_nothing(corpus):
    meta, sets, rows = setup(corpus, "i_swin", "ik_swin")
    trainer = Trainer(TrainConfig(device="cuda", precision="bf16"), train_mod._split_data(meta, sets, rows, 0))
    assert all(f.is_cuda for f in trainer.on_device["train"].features.values())
    order, first = (t.cuda() for t in trainer.data["train"].epoch_windows(32, 30, trainer.gen))
    trainer.model.train()
    trainer.step(order[:32], first[:32])  # warm-up: lazy initialisations may wait
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = [trainer.step(order[s:s + 32], first[s:s + 32]) for s in (32, 64, 96)]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(bool(torch.isfinite(x)) for x in losses)


def test_auto_precision_is_resolved_before_training_and_recorded(corpus, tmp_path, fake_probe):
    job = TrainJob(metadata=corpus / "mtgc.csv", cache_dir=corpus, out=tmp_path / "run", image="k_r2plus1d",
                   train=TrainConfig(max_epochs=1))
    assert job.train.precision == "auto"
    train_from_caches(job, progress=False)
    info = json.loads((tmp_path / "run" / "config.json").read_text())
    assert info["config"]["precision"] == "fp32"  # what ran, as `t12k predict` repeats it
    rec = info["precision"]
    assert rec["requested"] == "auto" and rec["precision"] == "fp32"
    assert "bf16 matmul 144 GFLOP/s vs fp32 259 GFLOP/s" in rec["reason"]
    assert rec["probe"]["fp32"] == 259.0 and rec["probe"]["cache"] == str(fake_probe.path)

    meta, sets, rows = setup(corpus, "k_r2plus1d")
    split = train_mod._split_data(meta, sets, rows, 0)
    trainer = Trainer(TrainConfig(max_epochs=1), split)  # resolved from the kept probe
    assert trainer.cfg.precision == "fp32" and trainer.dtype == torch.float32 and trainer.precision.probe["cached"]
    with pytest.raises(T12kError, match="the precision choice is for --precision auto, but the config asks for bf16"):
        Trainer(TrainConfig(precision="bf16"), split, trainer.precision)
