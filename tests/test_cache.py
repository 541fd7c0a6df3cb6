import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from trailers12k_feats import __version__, cache, cache_info
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


def assert_summaries_match_clips(path):
    """The cache at `path` stores mean and max summaries equal to pooling its clips, and the finite record."""
    from trailers12k_feats.pooling import pool_features

    fs = cache.load(path)
    ids, pooled = cache.read_pooled(path, ("mean", "max"))
    assert ids == fs.ids
    got = np.concatenate([pooled["mean"], pooled["max"]], axis=1)  # (n, 2F)
    np.testing.assert_allclose(got, pool_features(fs, "meanmax"), rtol=1e-6, atol=1e-6)
    with h5py.File(path, "r") as h5:
        assert bool(h5.attrs[cache.FINITE]) is True and h5.attrs[cache.FINITE_BY] == __version__


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_writer_stores_summaries_of_the_values_as_stored(tmp_path, toy_cache, dtype):
    p = tmp_path / "toy.h5"
    items = toy_cache(p, (3, 1, 5, 300), F=8, dtype=dtype)
    assert_summaries_match_clips(p)
    _, pooled = cache.read_pooled(p, ("mean", "max"))
    for i, (_, x) in enumerate(items):
        stored = x.astype(dtype).astype(np.float32)  # what the cache holds, rounded to float16 or not
        np.testing.assert_allclose(pooled["mean"][i], stored.mean(0), rtol=1e-5, atol=1e-6)
        assert (pooled["max"][i] == stored.max(0)).all()
    assert cache.read_pooled(p, ("max",))[1].keys() == {"max"}
    with cache.CacheReader(p) as r:
        assert r.pooled == ["mean", "max"] and r.finite_by == __version__


def test_every_writer_path_stores_summaries(tmp_path, toy_cache):
    from trailers12k_feats.extraction import store
    from trailers12k_feats.sources.synthetic import SynthConfig, make_corpus

    make_corpus(tmp_path / "synth", SynthConfig(num_trailers=30, streams=("k_r2plus1d",)), progress=False)
    assert_summaries_match_clips(tmp_path / "synth" / "k_r2plus1d.h5")
    rng = np.random.default_rng(0)
    a = cache.CacheAttrs(name="k_toy", backbone="toy_net", feature_dim=4)
    for tag, ids in (("shard0of2", ["tt2", "tt0"]), ("shard1of2", ["tt1"])):
        store.write_segment(tmp_path, a, [(t, rng.standard_normal((3, 4)), np.zeros(3), np.ones(3),
                                           np.zeros(3, np.int32)) for t in ids], tag)
    assert store.merge(tmp_path, "k_toy") == tmp_path / "k_toy.h5"
    assert_summaries_match_clips(tmp_path / "k_toy.h5")


def test_writer_refuses_values_beyond_float16(tmp_path):
    with cache.CacheWriter(tmp_path / "t.h5", attrs(4), dtype="float16") as w:
        with pytest.raises(T12kError, match="exceed the range of float16 .*write the cache as float32"):
            w.add("a", np.full((2, 4), 7e4, np.float32))  # finite in float32, Inf in float16
        w.add("a", np.full((2, 4), 6e4, np.float32))
    assert cache.validate(tmp_path / "t.h5").name == "toy"


def test_load_trusts_the_finite_record_and_scans_caches_without_it(tmp_path, toy_cache, monkeypatch):
    p = tmp_path / "toy.h5"
    toy_cache(p, (3, 1, 5), dtype="float32")
    scans = []
    real = cache._check_finite
    monkeypatch.setattr(cache, "_check_finite", lambda *a, **k: scans.append(a[0]) or real(*a, **k))
    cache.load(p)
    cache.load(p, dtype=torch.float64)  # a wider dtype keeps every value finite
    assert scans == []
    cache.load(p, dtype=torch.float16)  # a narrower one may not
    assert scans == [p]
    with h5py.File(p, "r+") as h5:
        del h5.attrs[cache.FINITE]  # as caches of older writers are
    fs = cache.load(p)
    assert scans == [p, p] and fs.features.dtype == torch.float32
    cache.validate(p)
    assert len(scans) == 3  # validate always scans


def test_load_reads_in_blocks_into_one_tensor(tmp_path, toy_cache):
    p = tmp_path / "toy.h5"
    items = toy_cache(p, (3, 1, 5, 2), F=6, dtype="float16")
    whole = cache.load(p)
    for dtype in (None, torch.float32):
        fs = cache.load(p, dtype=dtype, block_bytes=20)  # blocks of one row (a row is 12 bytes)
        assert fs.features.dtype == (dtype or torch.float16)
        assert torch.equal(fs.features, whole.features.to(fs.features.dtype))
    np.testing.assert_array_equal(whole.trailer(items[2][0]).numpy(), items[2][1].astype(np.float16))


def test_validate_catches_summaries_that_disagree_with_the_clips(tmp_path, toy_cache):
    p = tmp_path / "toy.h5"
    toy_cache(p, (3, 1, 5))
    with h5py.File(p, "r+") as h5:
        h5["features"][6, 0] += 3.0  # trailer 2 changed after writing: still finite
    with pytest.raises(T12kError, match="stored pool_mean of trailer tt0000002 does not match its clips"):
        cache.validate(p, pooled=True)
    assert cache.validate(p).name == "toy"  # what training checks: the clips alone
    with h5py.File(p, "r+") as h5:
        del h5["pool_max"]
        h5["pool_max"] = np.zeros((2, 8), np.float32)
    for pooled in (False, True):
        with pytest.raises(T12kError, match=r"pool_max has shape \(2, 8\) .*expected \(3, 8\) float32"):
            cache.validate(p, pooled=pooled)


def test_iter_blocks_yields_whole_trailers(tmp_path, toy_cache):
    p = tmp_path / "toy.h5"
    items = toy_cache(p, (3, 1, 5, 2), dtype="float32")
    blocks = list(cache.iter_blocks(p, max_rows=4))
    assert [(ids, lengths.tolist()) for ids, lengths, _ in blocks] == [
        (["tt0000000", "tt0000001"], [3, 1]), (["tt0000002"], [5]), (["tt0000003"], [2])]
    np.testing.assert_array_equal(np.concatenate([b for *_, b in blocks]), np.concatenate([x for _, x in items]))


def strip_to_older_cache(path):
    """Remove what this version adds (summaries, finite record), as a cache of an older writer."""
    with h5py.File(path, "r+") as h5:
        for name in cache.POOLED.values():
            del h5[name]
        del h5.attrs[cache.FINITE], h5.attrs[cache.FINITE_BY]


def test_older_caches_get_summaries_once_and_keep_their_fingerprint(tmp_path, toy_cache, monkeypatch):
    from trailers12k_feats import pooling

    p = tmp_path / "toy.h5"
    toy_cache(p, (3, 1, 5), dtype="float16")
    strip_to_older_cache(p)
    assert cache.read_pooled(p) is None
    before = cache.fingerprint(p)
    ps = pooling.load_pooled(p, "meanmax")
    assert ps.ids == cache.read_ids(p) and ps.features.shape == (3, 16)
    assert_summaries_match_clips(p)  # stored, with the finite record of the pass that computed them
    assert cache.fingerprint(p) == before  # the size recorded is the one before the summaries
    assert sorted(f.name for f in tmp_path.iterdir()) == ["toy.h5"]  # no temporary file left
    monkeypatch.setattr(pooling, "compute_pooled", lambda *a: pytest.fail("pooled again"))
    np.testing.assert_array_equal(pooling.load_pooled(p, "meanmax").features, ps.features)


def test_a_write_cut_short_leaves_the_cache_as_it_was(tmp_path, toy_cache, monkeypatch):
    from trailers12k_feats import pooling

    p = tmp_path / "toy.h5"
    toy_cache(p, (3, 1, 5))
    strip_to_older_cache(p)
    original = p.read_bytes()

    def killed(*a):
        raise KeyboardInterrupt  # as a Ctrl-C (or a kill) before the rename

    monkeypatch.setattr(cache.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        pooling.load_pooled(p)
    monkeypatch.undo()
    assert p.read_bytes() == original and sorted(f.name for f in tmp_path.iterdir()) == ["toy.h5"]
    assert cache.read_pooled(p) is None and cache.validate(p).name == "toy"
    # A temporary copy left by a process killed with SIGKILL is never read, and the next run removes it.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    (tmp_path / f".toy.h5.tmp-{dead}").write_bytes(original[:1000])  # a half-made copy
    assert cache.list_caches(tmp_path) == [p]
    pooling.load_pooled(p)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["toy.h5"] and cache.read_pooled(p) is not None


def test_summaries_are_not_stored_when_the_cache_changes_or_cannot_be_written(tmp_path, toy_cache, monkeypatch,
                                                                               caplog):
    from trailers12k_feats import pooling

    p = tmp_path / "toy.h5"
    toy_cache(p, (3, 1, 5))
    strip_to_older_cache(p)
    _, pooled = pooling.compute_pooled(p)
    stale = p.stat()
    toy_cache(p, (2, 2), seed=1)  # replaced by another cache meanwhile
    assert not cache.store_pooled(p, pooled, stale)
    assert cache.read_ids(p) == ["tt0000000", "tt0000001"] and cache.validate(p)
    strip_to_older_cache(p)

    def full(*a):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache, "store_pooled", full)
    ps = pooling.load_pooled(p)
    assert ps.features.shape == (2, 8) and cache.read_pooled(p) is None
    assert "could not add pooled summaries" in caplog.text and "No space left" in caplog.text
