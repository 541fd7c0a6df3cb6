import h5py
import numpy as np
import pytest
import torch

from trailers12k_feats import cache
from trailers12k_feats.utils import T12kError


def attrs(F=8, **kw):
    return cache.CacheAttrs(name="toy", backbone="toy_net", feature_dim=F, **kw)


def test_roundtrip(tmp_path, toy_cache):
    p = tmp_path / "toy.h5"
    items = toy_cache(p, (3, 1, 5), F=8, dtype="float16", config={"a": 1})
    fs = cache.load(p)
    assert fs.ids == [t for t, _ in items]
    assert fs.features.dtype == torch.float16 and fs.features.shape == (9, 8)
    assert fs.lengths.tolist() == [3, 1, 5]
    for tid, x in items:
        np.testing.assert_allclose(fs.trailer(tid).float().numpy(), x, atol=2e-3)
    assert fs.attrs.config == {"a": 1} and fs.attrs.backbone == "toy_net"
    assert np.isnan(fs.clip_start).all() and (fs.shot == -1).all()
    assert cache.validate(p).name == "toy"
    s = cache.summary(p)
    assert s["trailers"] == 3 and s["clips"] == 9 and s["trailers_under_30_clips"] == 3


def test_float32_and_times(tmp_path):
    p = tmp_path / "toy.h5"
    with cache.CacheWriter(p, attrs(4), dtype="float32") as w:
        w.add("a", np.ones((2, 4)), clip_start=[0, 1], clip_end=[1, 2], shot=[0, 1])
    fs = cache.load(p)
    assert fs.features.dtype == torch.float32
    assert fs.clip_end.tolist() == [1.0, 2.0] and fs.shot.tolist() == [0, 1]


def test_nothing_left_on_failure(tmp_path):
    p = tmp_path / "toy.h5"
    with pytest.raises(RuntimeError), cache.CacheWriter(p, attrs(4)) as w:
        w.add("a", np.ones((2, 4)))
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_bad_input(tmp_path):
    with cache.CacheWriter(tmp_path / "t.h5", attrs(4)) as w:
        with pytest.raises(T12kError, match="shape"):
            w.add("a", np.ones((2, 3)))
        with pytest.raises(T12kError, match="NaN or Inf"):
            w.add("a", np.full((2, 4), np.nan))
        w.add("a", np.ones((2, 4)))
        with pytest.raises(T12kError, match="added twice"):
            w.add("a", np.ones((2, 4)))


def test_missing_and_not_a_cache(tmp_path):
    with pytest.raises(T12kError, match="does not exist"):
        cache.load(tmp_path / "nope.h5")
    (tmp_path / "junk.h5").write_text("not hdf5")
    with pytest.raises(T12kError, match="not a readable HDF5"):
        cache.load(tmp_path / "junk.h5")
    with h5py.File(tmp_path / "other.h5", "w") as h5:
        h5["x"] = 1
    with pytest.raises(T12kError, match="lacks features"):
        cache.load(tmp_path / "other.h5")


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nonfinite_features_are_found(tmp_path, value, toy_cache):
    p = tmp_path / "toy.h5"
    toy_cache(p, (3, 1, 5))
    with h5py.File(p, "r+") as h5:
        h5["features"][5, 2] = value  # trailer 2 (rows 4..8), clip 1
    for fn in (cache.load, cache.validate):
        with pytest.raises(T12kError, match=r"trailer tt0000002 \(clip 1\) has NaN or Inf"):
            fn(p)


def test_corrupt_index(tmp_path, toy_cache):
    p = tmp_path / "toy.h5"
    toy_cache(p, (3, 1, 5))
    with h5py.File(p, "r+") as h5:
        h5["offsets"][3] = 7
    with pytest.raises(T12kError, match="offsets do not span"):
        cache.load(p)


def test_dim_attribute_mismatch(tmp_path, toy_cache):
    p = tmp_path / "toy.h5"
    toy_cache(p, (3, 1, 5))
    with h5py.File(p, "r+") as h5:
        h5.attrs["feature_dim"] = 16
    with pytest.raises(T12kError, match="dim 8 but attribute feature_dim says 16"):
        cache.validate(p)


def test_list_caches(tmp_path, toy_cache):
    toy_cache(tmp_path / "b.h5")
    toy_cache(tmp_path / "a.h5")
    assert [p.name for p in cache.list_caches(tmp_path)] == ["a.h5", "b.h5"]
    assert cache.stream_path(tmp_path, "i_swin") == tmp_path / "i_swin.h5"
