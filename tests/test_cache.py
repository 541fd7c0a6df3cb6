import h5py
import numpy as np
import pytest
import torch

from trailers12k_feats import cache, cache_info
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
    s = cache_info.summary(p)
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
    msg = r"trailer tt0000002 \(clip 1\) has NaN or Inf"
    with pytest.raises(T12kError, match=msg):  # validate checks every value, whatever the writer recorded
        cache.validate(p)
    with h5py.File(p, "r+") as h5:
        del h5.attrs[cache.FINITE]  # as a writer before the finite record left it
    for fn in (cache.load, cache.validate):
        with pytest.raises(T12kError, match=msg):
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


def write_timed(path, dtype="float16"):
    """Three trailers with known clip times and shots."""
    rng = np.random.default_rng(1)
    rows = []
    with cache.CacheWriter(path, attrs(4, config={"a": 1}), dtype=dtype) as w:
        for i, n in enumerate((2, 3, 1)):
            x = rng.standard_normal((n, 4)).astype(np.float32)
            start, shot = np.arange(n, dtype=np.float32) + i, np.full(n, i, np.int32)
            w.add(f"tt{i}", x, clip_start=start, clip_end=start + 1, shot=shot)
            rows.append((f"tt{i}", x, start, shot))
    return rows


def test_reader_reads_one_trailer_at_a_time(tmp_path):
    p = tmp_path / "toy.h5"
    rows = write_timed(p)
    with cache.CacheReader(p) as r:
        assert r.ids == ["tt0", "tt1", "tt2"] and len(r) == 3 and "tt1" in r and "tt9" not in r
        assert r.dtype == "float16" and r.attrs.config == {"a": 1}
        c = r.get("tt1")
        with pytest.raises(T12kError, match=r"trailer tt9 is not in cache .*toy.h5"):
            r.get("tt9")
    assert c.id == "tt1" and len(c) == 3 and c.features.shape == (3, 4) and c.features.dtype == np.float16
    got = cache.read_trailers(p, ["tt2", "tt9", "tt0"])  # absent ids are left out, order kept
    assert list(got) == ["tt2", "tt0"]
    walked = list(cache.iter_trailers(p))
    assert [c.id for c in walked] == ["tt0", "tt1", "tt2"]
    for c, (tid, x, start, shot) in zip(walked, rows):
        assert c.id == tid
        np.testing.assert_allclose(c.features.astype(np.float32), x, atol=2e-3)
        assert c.clip_start.tolist() == start.tolist() and c.clip_end.tolist() == (start + 1).tolist()
        assert c.shot.tolist() == shot.tolist()
    (tmp_path / "empty.h5").write_bytes(b"")
    with pytest.raises(T12kError, match="empty.h5 is not a readable HDF5 file"):
        cache.read_trailers(tmp_path / "empty.h5", ["tt0"])


def test_feature_set_from_trailers_equals_load(tmp_path):
    p = tmp_path / "toy.h5"
    write_timed(p, dtype="float32")
    loaded = cache.load(p)
    built = cache.feature_set(list(cache.iter_trailers(p)), cache.read_attrs(p), path=p)
    assert built.ids == loaded.ids and built.attrs == loaded.attrs and built.path == p
    assert torch.equal(built.features, loaded.features) and torch.equal(built.offsets, loaded.offsets)
    for k in ("clip_start", "clip_end", "shot"):
        assert np.array_equal(getattr(built, k), getattr(loaded, k))
    half = cache.feature_set([cache.read_trailers(p, ["tt1"])["tt1"]], attrs(4), dtype=torch.float16)
    assert half.ids == ["tt1"] and half.features.dtype == torch.float16 and half.path.name == "toy"
    assert torch.equal(half.trailer("tt1"), loaded.trailer("tt1").half())


def test_feature_set_and_trailer_clips_refuse_bad_input(tmp_path):
    def clips(tid, x):
        n = len(x)
        return cache.TrailerClips(tid, x, np.zeros(n, np.float32), np.ones(n, np.float32), np.zeros(n, np.int32))

    with pytest.raises(T12kError, match=r"trailer a: features must be \(clips >= 1, F\)"):
        cache.TrailerClips("a", np.ones((2, 4)), np.zeros(3), np.zeros(2), np.zeros(2))
    with pytest.raises(T12kError, match="trailer a: features must be"):
        clips("a", np.ones((0, 4)))
    with pytest.raises(T12kError, match="dim 4 but attribute feature_dim says 8"):
        cache.feature_set([clips("a", np.ones((2, 4)))], attrs(8))
    with pytest.raises(T12kError, match="trailer id a appears more than once"):
        cache.feature_set([clips("a", np.ones((2, 4))), clips("a", np.ones((1, 4)))], attrs(4))
    bad = np.ones((3, 4))
    bad[2, 1] = np.inf
    with pytest.raises(T12kError, match=r"trailer b \(clip 2\) has NaN or Inf"):
        cache.feature_set([clips("a", np.ones((2, 4))), clips("b", bad)], attrs(4))
    with pytest.raises(T12kError, match="no trailers"):
        cache.feature_set([], attrs(4))


def test_one_dtype_check_for_every_writer(tmp_path):
    from trailers12k_feats.extraction.extract import ExtractConfig
    from trailers12k_feats.sources.download import DownloadConfig
    from trailers12k_feats.sources.zarr_import import ImportConfig

    assert cache.DTYPES == ("float16", "float32")
    assert [cache.check_dtype(d) for d in cache.DTYPES] == list(cache.DTYPES)
    msg = r"cache dtype must be one of float16, float32, got 'bfloat16'"
    for make in (lambda: cache.CacheWriter(tmp_path / "t.h5", attrs(4), dtype="bfloat16"),
                 lambda: ImportConfig(tmp_path, dtype="bfloat16"),
                 lambda: DownloadConfig(dtype="bfloat16"),
                 lambda: ExtractConfig(dtype="bfloat16")):
        with pytest.raises(T12kError, match=msg):
            make()
    assert list(tmp_path.iterdir()) == []  # the writer refused before creating any file


def test_per_trailer_durations_are_optional(tmp_path, toy_cache):
    p = tmp_path / "toy.h5"
    toy_cache(p)  # no durations given: no datasets, readers report NaN
    with h5py.File(p, "r") as h5:
        assert not set(cache.DURATION_DATASETS) & set(h5)
    assert all(np.isnan(v).all() for v in cache.read_durations(p).values())
    assert np.isnan(cache.read_trailers(p, ["tt0000000"])["tt0000000"].decoded_s)
    with cache.CacheWriter(p, attrs(4)) as w:
        w.add("a", np.ones((2, 4)), decoded_s=5.75, declared_s=12.0)
        w.add("b", np.ones((1, 4)))  # unknown for this one
    d = cache.read_durations(p)
    assert d["a"] == (5.75, 12.0) and np.isnan(d["b"]).all()
    with cache.CacheReader(p) as r:
        assert (r.get("a").decoded_s, r.get("a").declared_s) == (5.75, 12.0)
    assert cache.validate(p).name == "toy" and len(cache.load(p)) == 2
    with h5py.File(p, "a") as h5:
        del h5["declared_s"]
        h5["declared_s"] = np.zeros(5, np.float32)
    with pytest.raises(T12kError, match=r"declared_s has shape \(5,\), expected \(2,\); recreate it"):
        cache.validate(p)
