import numpy as np
import pytest

from trailers12k_feats import cache
from trailers12k_feats.apps import explore
from trailers12k_feats.training import data
from trailers12k_feats.utils import T12kError


@pytest.fixture(scope="module")
def swin(corpus):
    return cache.load(corpus / "ik_swin.h5"), data.load_metadata(corpus / "mtgc.csv")


def test_trailer_embeddings_are_clip_means(swin):
    fs, meta = swin
    ids = meta.ids[5:8][::-1]
    x = explore.trailer_embeddings(fs, ids)
    assert x.shape == (3, 768)
    np.testing.assert_allclose(x[0], fs.trailer(ids[0]).float().mean(0).numpy(), rtol=1e-5, atol=1e-5)
    assert explore.trailer_embeddings(fs, pool="meanmax").shape == (len(fs), 2 * 768)
    with pytest.raises(T12kError, match="1 trailers .*tt_nope.* are not in cache"):
        explore.trailer_embeddings(fs, ["tt_nope"])


def test_projections(swin):
    fs, _ = swin
    x = explore.trailer_embeddings(fs)[:120]
    for method in ("pca", "tsne"):
        xy = explore.project(x, method)
        assert xy.shape == (120, 2) and np.isfinite(xy).all()
    np.testing.assert_array_equal(explore.project(x, "tsne"), xy)  # seeded: the same picture twice
    # PCA keeps the dominant direction: a factor shared by half the (standardised) dims comes out on axis 0.
    rng = np.random.default_rng(0)
    t = rng.standard_normal(200)
    z = rng.standard_normal((200, 20)) * np.arange(1, 21)
    z[:, :10] += 3 * t[:, None] * np.arange(1, 11)
    assert abs(np.corrcoef(explore.project(z)[:, 0], t)[0, 1]) > 0.99
    with pytest.raises(T12kError, match="unknown projection 'umap'"):
        explore.project(x, "umap")
    with pytest.raises(T12kError, match="at least 5 trailers"):
        explore.project(x[:3])


def test_nearest_neighbours():
    x = np.array([[10.0, 0], [9, 1], [0, 10], [1, 9], [-10, -10]]) + 100  # shared offset: centring removes it
    ids = ["a", "b", "c", "d", "e"]
    nn = explore.nearest_neighbours(x, ids, "a", k=2)
    assert [t for t, _ in nn] == ["b", "d"] and nn[0][1] > nn[1][1]
    assert all(t != "a" for t, _ in explore.nearest_neighbours(x, ids, "a", k=4))
    with pytest.raises(T12kError, match="trailer z is not among the 5 embedded trailers"):
        explore.nearest_neighbours(x, ids, "z")


def test_cooccurrence():
    y = np.array([[1, 1, 0], [1, 0, 0], [0, 1, 1], [1, 1, 1]])
    c = explore.cooccurrence(y)
    np.testing.assert_array_equal(c, [[3, 2, 1], [2, 3, 2], [1, 2, 2]])
    r = explore.cooccurrence(y, "row")
    assert r[0, 1] == pytest.approx(2 / 3) and np.allclose(np.diag(r), 1)
    j = explore.cooccurrence(y, "jaccard")
    assert j[0, 1] == pytest.approx(2 / 4) and j[1, 2] == pytest.approx(2 / 3)
    with pytest.raises(T12kError, match="unknown normalize"):
        explore.cooccurrence(y, "col")


def test_clip_trajectory(tmp_path, toy_cache):
    start = np.arange(6, dtype=np.float32) * 2
    # tt2: one clip, no times or shots
    toy_cache(tmp_path / "t.h5", (6, 1), F=4, ids=["tt1", "tt2"], clips={"tt1": (start, start + 2, [0, 0, 1, 1, 1, 2])})
    fs = cache.load(tmp_path / "t.h5")
    t = explore.clip_trajectory(fs, "tt1")
    np.testing.assert_array_equal(t.time, [0, 2, 4, 6, 8, 10])
    np.testing.assert_array_equal(t.cuts, [2, 5])
    assert t.xy.shape == (6, 2) and 0 < t.explained.sum() <= 1 + 1e-9
    # The first axis carries the most variance of the trailer's own clips.
    assert t.xy[:, 0].var() >= t.xy[:, 1].var()
    one = explore.clip_trajectory(fs, "tt2")
    assert one.xy.shape == (1, 2) and list(one.time) == [0.0] and len(one.cuts) == 0
    with pytest.raises(T12kError, match="trailer tt3 is not in cache"):
        explore.clip_trajectory(fs, "tt3")


def test_figures(swin):
    fs, meta = swin
    rows = data.align(meta, [fs])
    x = explore.trailer_embeddings(fs, [meta.ids[i] for i in rows])
    fig = explore.embedding_figure(explore.project(x), meta.labels[rows])
    assert fig.axes[0].get_title().startswith("action (")
    fig = explore.cooccurrence_figure(explore.cooccurrence(meta.labels))
    assert len(fig.axes[0].texts) == 100
    tid = meta.ids[0]
    fig = explore.trajectory_figure(explore.clip_trajectory(fs, tid))
    assert tid in fig.get_suptitle()
