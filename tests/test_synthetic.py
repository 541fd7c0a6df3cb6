import numpy as np
import pytest

from trailers12k_feats import GENRES, cache
from trailers12k_feats.paper import STREAMS
from trailers12k_feats.pooling import load_pooled
from trailers12k_feats.sources.synthetic import (
    PRIORS,
    SynthConfig,
    make_corpus,
    sample_labels,
)
from trailers12k_feats.training import data
from trailers12k_feats.utils import T12kError


def test_corpus_shape(corpus):
    meta = data.load_metadata(corpus / "mtgc.csv")
    assert len(meta) == 300 and (meta.labels.sum(1) >= 1).all()
    for split in range(3):
        sizes = [len(meta.subset(split, s)) for s in ("train", "val", "test")]
        assert sizes == [210, 30, 60]
    for name, stream in STREAMS.items():
        fs = cache.load(corpus / f"{name}.h5")
        assert fs.feature_dim == stream.dim and fs.ids == meta.ids
        assert fs.attrs.source == "synthetic" and fs.attrs.backbone == stream.backbone
        assert (fs.lengths < 30).any() and (fs.lengths > 30).any()
        assert (np.diff(fs.clip_start[:5]) > 0).all() and fs.shot.min() >= 0


def test_genre_priors_and_cooccurrence():
    y = sample_labels(20000, np.random.default_rng(0)).astype(float)
    assert (y.sum(1) >= 1).all()
    # Priors hold up to the genres added to trailers that drew none.
    np.testing.assert_allclose(y.mean(0), PRIORS, atol=0.06)
    corr = np.corrcoef(y.T)
    g = GENRES.index
    assert corr[g("action"), g("adventure")] > 0.2 and corr[g("crime"), g("thriller")] > 0.2
    assert corr[g("comedy"), g("horror")] < 0


def test_same_seed_same_corpus_with_any_number_of_workers(tmp_path):
    cfg = SynthConfig(num_trailers=80, streams=("k_r2plus1d", "i_swin"))  # 3 chunks of trailers
    for d, workers in (("a", 1), ("b", 2)):
        make_corpus(tmp_path / d, cfg, progress=False, workers=workers)
    for s in cfg.streams:
        a, b = (cache.load(tmp_path / d / f"{s}.h5") for d in ("a", "b"))
        assert a.ids == b.ids and (a.features == b.features).all() and (a.offsets == b.offsets).all()
        pa, pb = (load_pooled(tmp_path / d / f"{s}.h5", "meanmax") for d in ("a", "b"))  # the stored summaries
        assert pa.ids == b.ids and (pa.features == pb.features).all()
    assert (tmp_path / "a" / "mtgc.csv").read_text() == (tmp_path / "b" / "mtgc.csv").read_text()


def test_bad_config():
    with pytest.raises(T12kError, match="valid streams: i_shufflenet"):
        SynthConfig(streams=("i_vgg",))
    with pytest.raises(T12kError, match="at least 30"):
        SynthConfig(num_trailers=5)
