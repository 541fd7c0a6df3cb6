import shutil

import h5py
import numpy as np
import pytest

from trailers12k_feats import cache
from trailers12k_feats.pooling import pool_features
from trailers12k_feats.training.probe import (
    ProbeConfig,
    fit_predict,
    probe,
)
from trailers12k_feats.utils import T12kError


def test_pooling(tmp_path, toy_cache):
    items = toy_cache(tmp_path / "c.h5", (1, 4, 7), F=3)
    fs = cache.load(tmp_path / "c.h5")
    mean = pool_features(fs, "mean")
    both = pool_features(fs, "meanmax", chunk=5)  # chunks smaller than a trailer still work
    for i, (_, x) in enumerate(items):
        np.testing.assert_allclose(mean[i], x.mean(0), rtol=1e-6)
        np.testing.assert_allclose(both[i], np.concatenate([x.mean(0), x.max(0)]), rtol=1e-6)


def test_fit_predict_finds_a_linear_signal():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 20)).astype(np.float32)
    y = (x[:, :10] > 0).astype(np.uint8)
    (scores,) = fit_predict(x[:300], y[:300], [x[300:]], alpha=1.0)
    assert np.corrcoef(scores[:, 0], x[300:, 0])[0, 1] > 0.8


def test_probe_table(corpus):
    table = probe(ProbeConfig(corpus / "mtgc.csv", corpus, rows=("i_swin", "shufflenet_fusion"), splits=(0, 2)),
                  progress=False)
    assert [(r["run"], r["split"]) for r in table["test"]] == [("i_swin", 0), ("i_swin", 2),
                                                                ("shufflenet_fusion", 0), ("shufflenet_fusion", 2)]
    assert all(0 < r["uAP"] <= 100 for r in table["test"] + table["val"])


def test_bad_config(corpus):
    with pytest.raises(T12kError, match="valid: mean, meanmax"):
        ProbeConfig(corpus / "mtgc.csv", corpus, pool="median")
    with pytest.raises(T12kError, match="valid rows"):
        ProbeConfig(corpus / "mtgc.csv", corpus, rows=("nope",))
    with pytest.raises(T12kError, match="split must be 0, 1 or 2, got 3"):
        ProbeConfig(corpus / "mtgc.csv", corpus, splits=(0, 3))


def test_wrong_dim_and_mismatched_clips_are_refused(corpus, tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    for f in ("mtgc.csv", "i_shufflenet.h5", "k_shufflenet.h5"):
        shutil.copy(corpus / f, d)
    shutil.copy(corpus / "i_resnet.h5", d / "i_swin.h5")  # 2048-d features saved as the 768-d Swin-2D
    with pytest.raises(T12kError, match=r"i_swin.h5 has feature dim 2048 but stream i_swin has dim 768"):
        probe(ProbeConfig(d / "mtgc.csv", d, rows=("i_swin",), splits=(0,)), progress=False)
    with h5py.File(d / "k_shufflenet.h5", "r+") as h5:
        h5.attrs["fpc"] = 16
    cfg = ProbeConfig(d / "mtgc.csv", d, rows=("shufflenet_fusion",), splits=(0,))
    with pytest.raises(T12kError, match="fpc is 24 in .*i_shufflenet.h5 but 16 in .*k_shufflenet.h5"):
        probe(cfg, progress=False)
    table = probe(ProbeConfig(d / "mtgc.csv", d, rows=("shufflenet_fusion",), splits=(0,),
                              allow_mismatched_clips=True), progress=False)
    assert [r["run"] for r in table["test"]] == ["shufflenet_fusion"]
