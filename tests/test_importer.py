import sys

import numcodecs
import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from cli import main
from trailers12k_feats import cache
from trailers12k_feats.sources.zarr_import import (
    ZARR_MISSING,
    ImportConfig,
    import_zarr,
    parse_name,
)
from trailers12k_feats.utils import T12kError


def make_store(path, F=512, n=7, seed=0, scale=3.0, attrs=True):
    """A zarr store in the released layout: format 2, one float32 array per trailer, num_features."""
    rng = np.random.default_rng(seed)
    g = zarr.open_group(str(path), mode="w", zarr_format=2)
    if attrs:
        g.attrs["num_features"] = F
    arrays = {}
    for i in rng.permutation(n):  # written out of order: the import must sort
        x = (rng.standard_normal((int(rng.integers(1, 45)), F)) * scale).astype(np.float32)
        x[0, :3] = [1e-6, -7e-8, 1234.567]  # subnormal-range and large values survive the cast as the cast does
        tid = f"tt{1000000 + i:07d}"
        g.create_array(tid, data=x, chunks=(16, F), compressors=numcodecs.Blosc(cname="lz4", clevel=5, shuffle=1))
        arrays[tid] = x
    return arrays


def test_parse_name():
    p = parse_name("trailers_ik_swin_fps24_fpc24.zarr")
    assert (p.stream, p.prefix, p.fps, p.fpc) == ("ik_swin", "ik", 24.0, 24)
    p = parse_name("trailers_i_shufflenet_fpc24.zarr.tar.gz")
    assert (p.stream, p.fps, p.fpc) == ("i_shufflenet", 0.0, 24)
    assert parse_name("trailers_k_r2plus1d_fps24_fpc24.zarr").stream == "k_r2plus1d"
    assert parse_name("features.zarr") is None and parse_name("trailers_x_swin_fpc24.zarr") is None


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_import_value_for_value(tmp_path, dtype):
    src = tmp_path / "trailers_k_r2plus1d_fps24_fpc24.zarr"
    arrays = make_store(src)
    out = import_zarr(ImportConfig(src, out_dir=tmp_path / "data", dtype=dtype,
                                   provenance={"archive": "a.tar.gz", "md5": "0" * 32}), progress=False)
    assert out == tmp_path / "data" / "k_r2plus1d.h5"
    fs = cache.load(out)
    assert fs.ids == sorted(arrays)
    assert int(fs.lengths.sum()) == sum(len(x) for x in arrays.values())
    for tid, x in arrays.items():
        got = fs.trailer(tid).numpy()
        assert got.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(got, x.astype(dtype))  # exactly the cast, every clip
        # and the cast is within float16's rounding of the source: half an ulp, or 2^-25 near zero
        assert (np.abs(got.astype(np.float32) - x) <= 2.0 ** -11 * np.abs(x) + 2.0 ** -25).all()
    # The import stores each trailer's pooled summaries of the values as cast, as every writer does.
    ids, pooled = cache.read_pooled(out, ("mean", "max"))
    for tid, x in arrays.items():
        stored = x.astype(dtype).astype(np.float32)
        np.testing.assert_allclose(pooled["mean"][ids.index(tid)], stored.mean(0), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(pooled["max"][ids.index(tid)], stored.max(0))
    a = fs.attrs
    assert (a.name, a.backbone, a.kind, a.pretraining, a.fps, a.fpc) == \
        ("k_r2plus1d", "r2plus1d_18", "3d", "Kinetics-400", 24.0, 24)
    assert a.source == "a.tar.gz" and a.config["md5"] == "0" * 32 and a.config["trailers"] == len(arrays)
    assert a.config["source_dtype"] == "float32" and a.config["zarr"] == str(src.resolve())
    cache.validate(out)


def test_name_from_option_and_fps_unknown(tmp_path):
    src = tmp_path / "features.zarr"
    make_store(src, F=8, n=2, attrs=False)  # no num_features: taken from the first trailer
    with pytest.raises(T12kError, match="cannot tell the stream of features.zarr.*pass --name"):
        ImportConfig(src, out_dir=tmp_path)
    out = import_zarr(ImportConfig(src, out_dir=tmp_path, name="my_feats"), progress=False)
    a = cache.read_attrs(out)
    assert (a.name, a.feature_dim, a.backbone, a.fps) == ("my_feats", 8, "unknown", 0.0)
    src2 = tmp_path / "trailers_i_swin_fpc24.zarr"
    make_store(src2, F=768, n=1)
    a = cache.read_attrs(import_zarr(ImportConfig(src2, out_dir=tmp_path), progress=False))
    assert (a.name, a.kind, a.fps, a.fpc) == ("i_swin", "2d", 0.0, 24) and "fps_note" in a.config


def test_bad_stores_name_the_trailer_and_leave_nothing(tmp_path):
    src = tmp_path / "trailers_k_r2plus1d_fps24_fpc24.zarr"
    make_store(src, F=512, n=3)
    g = zarr.open_group(str(src), mode="a", zarr_format=2)
    cfg = ImportConfig(src, out_dir=tmp_path / "out")

    g.create_array("tt9999999", data=np.ones((4, 500), np.float32))
    with pytest.raises(T12kError, match=r"trailer tt9999999 has shape \(4, 500\), expected \(clips >= 1, 512\)"):
        import_zarr(cfg, progress=False)
    del g["tt9999999"]
    x = np.ones((4, 512), np.float32)
    x[2, 7] = np.nan
    g.create_array("tt9999999", data=x)
    with pytest.raises(T12kError, match=r"trailer tt9999999 \(clip 2\) has NaN or Inf"):
        import_zarr(cfg, progress=False)
    x[2, 7] = 7e4  # beyond float16
    g["tt9999999"][...] = x
    with pytest.raises(T12kError, match="tt9999999 has a value of magnitude 70000.*--dtype float32"):
        import_zarr(cfg, progress=False)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
    fs = cache.load(import_zarr(ImportConfig(src, out_dir=tmp_path / "out", dtype="float32"), progress=False))
    assert float(fs.trailer("tt9999999")[2, 7]) == 7e4

    g.attrs["num_features"] = 768
    with pytest.raises(T12kError, match="has 768 features per clip but stream k_r2plus1d has 512"):
        import_zarr(ImportConfig(src, out_dir=tmp_path / "o2"), progress=False)
    with pytest.raises(T12kError, match="not a zarr format-2 group"):
        import_zarr(ImportConfig(tmp_path / "out", name="x"), progress=False)
    with pytest.raises(T12kError, match="does not exist"):
        ImportConfig(tmp_path / "nope.zarr")


def test_missing_zarr_is_one_clear_message(tmp_path, monkeypatch):
    src = tmp_path / "trailers_i_swin_fpc24.zarr"
    make_store(src, F=768, n=1)
    monkeypatch.setitem(sys.modules, "zarr", None)  # makes `import zarr` fail
    with pytest.raises(T12kError) as e:
        import_zarr(ImportConfig(src, out_dir=tmp_path), progress=False)
    assert str(e.value) == ZARR_MISSING == "zarr is not installed; pip install 'trailers12k_feats[zarr]'."


def test_import_zarr_command(tmp_path):
    src = tmp_path / "trailers_ik_swin_fps24_fpc24.zarr"
    arrays = make_store(src, F=768, n=3)
    run = CliRunner().invoke
    r = run(main, ["import-zarr", str(src), "--data-dir", str(tmp_path / "d")])
    assert r.exit_code == 0, r.output
    assert r.output.strip().splitlines()[-1].endswith(f"wrote {tmp_path / 'd' / 'ik_swin.h5'}")  # after the bar
    assert cache.read_ids(tmp_path / "d" / "ik_swin.h5") == sorted(arrays)
    r = run(main, ["import-zarr", str(src), "--data-dir", str(tmp_path / "d")])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1 and "--overwrite" in r.output
    r = run(main, ["import-zarr", str(src), "--out", str(tmp_path / "x.h5"), "--name", "mine", "--dtype", "float32"])
    assert r.exit_code == 0 and cache.read_attrs(tmp_path / "x.h5").name == "mine"
