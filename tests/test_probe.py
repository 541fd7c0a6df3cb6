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


def test_fit_predict_is_scikit_learns_standardised_ridge():
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((300, 40)) * rng.uniform(0.1, 5, 40) + rng.normal(0, 3, 40)).astype(np.float32)
    x[:, 3] = 2.5  # a constant feature keeps scale 1, as StandardScaler keeps it
    y = (x[:, :10] + 3 * rng.standard_normal((300, 10)) > 0).astype(np.uint8)
    for alpha in (1.0, 1000.0):
        model = make_pipeline(StandardScaler(), Ridge(alpha=alpha, solver="cholesky"))
        model.fit(x[:200], y[:200].astype(np.float32))
        got = fit_predict(x[:200], y[:200], [x[200:250], x[250:]], alpha)
        for part, scores in zip((x[200:250], x[250:]), got):
            np.testing.assert_allclose(scores, model.predict(part), rtol=0, atol=2e-5)


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


def old_probe(meta_path, cache_dir, rows, splits, pool, alpha=1000.0):
    """The probe as it was before caches stored pooled summaries: every clip loaded and pooled,
    then scikit-learn's StandardScaler and Ridge, one (row, split) at a time."""
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from trailers12k_feats.paper import TABLE6
    from trailers12k_feats.training.data import load_metadata
    from trailers12k_feats.training.metrics import multilabel_metrics

    meta = load_metadata(meta_path)
    sets = {s: cache.load(cache_dir / f"{s}.h5") for r in rows for s in TABLE6[r].streams}
    pooled = {s: pool_features(fs, pool) for s, fs in sets.items()}
    table = {"val": [], "test": []}
    for row in rows:
        for split in splits:
            def feats(name, split=split, row=row):
                ids = [meta.ids[i] for i in meta.subset(split, name)]
                return np.concatenate([pooled[s][[sets[s].index[t] for t in ids]] for s in TABLE6[row].streams], 1)

            model = make_pipeline(StandardScaler(), Ridge(alpha=alpha, solver="cholesky"))
            model.fit(feats("train"), meta.labels[meta.subset(split, "train")].astype(np.float32))
            for subset in ("val", "test"):
                m = multilabel_metrics(meta.labels[meta.subset(split, subset)], model.predict(feats(subset)))
                table[subset].append({"run": row, "split": split, "epoch": 0, **m})
    return table


def assert_same_tables(a, b):
    for subset in ("val", "test"):
        assert [(r["run"], r["split"]) for r in a[subset]] == [(r["run"], r["split"]) for r in b[subset]]
        for ra, rb in zip(a[subset], b[subset]):
            assert ra.keys() == rb.keys()
            for k in ra:
                assert ra[k] == pytest.approx(rb[k], abs=1e-6), (subset, ra["run"], ra["split"], k)


@pytest.mark.parametrize("pool, rows", [("mean", ("i_swin", "shufflenet_fusion")), ("meanmax", ("k_r2plus1d",))])
def test_probe_from_summaries_equals_probe_from_pooled_clips(tmp_path, toy_cache, toy_metadata, pool, rows):
    # Streams with their paper dims, single-stream and fusion rows, 80 trailers of 1 to 8 clips.
    from trailers12k_feats.paper import TABLE6

    rng = np.random.default_rng(0)
    lengths = tuple(int(n) for n in rng.integers(1, 9, 80))
    streams = sorted({s for r in rows for s in TABLE6[r].streams})
    for seed, stream in enumerate(streams):
        F = {"i_swin": 768, "i_shufflenet": 1024, "k_shufflenet": 1024, "k_r2plus1d": 512}[stream]
        items = toy_cache(tmp_path / f"{stream}.h5", lengths, F=F, dtype="float16", seed=seed)
    toy_metadata(tmp_path / "mtgc.csv", [t for t, _ in items])
    splits = (0, 2)
    want = old_probe(tmp_path / "mtgc.csv", tmp_path, rows, splits, pool)
    cfg = ProbeConfig(tmp_path / "mtgc.csv", tmp_path, rows=rows, splits=splits, pool=pool)
    assert_same_tables(probe(cfg, progress=False), want)
    # Caches of an older writer (no summaries): pooled from their clips once, with the same table.
    for stream in streams:
        with h5py.File(tmp_path / f"{stream}.h5", "r+") as h5:
            del h5["pool_mean"], h5["pool_max"]
        assert cache.read_pooled(tmp_path / f"{stream}.h5") is None
    assert_same_tables(probe(cfg, progress=False), want)
    assert all(cache.read_pooled(tmp_path / f"{s}.h5") is not None for s in streams)


def test_probe_reads_no_clip(tmp_path, toy_cache, toy_metadata, monkeypatch):
    items = toy_cache(tmp_path / "i_swin.h5", (3, 1, 5) * 10, F=768)
    toy_metadata(tmp_path / "mtgc.csv", [t for t, _ in items])

    def no_clips(*a, **k):
        pytest.fail("the probe read clip features")

    for name in ("load", "iter_blocks", "CacheReader", "read_trailers"):
        monkeypatch.setattr(cache, name, no_clips)
    table = probe(ProbeConfig(tmp_path / "mtgc.csv", tmp_path, rows=("i_swin",), splits=(1,)), progress=False)
    assert [(r["run"], r["split"]) for r in table["test"]] == [("i_swin", 1)]
