import numpy as np
import pytest
import torch

from trailers12k_feats import GENRES, cache
from trailers12k_feats.training import data
from trailers12k_feats.utils import T12kError

IDS = ["t0", "t1", "t2"]
HEADER = "mid," + ",".join(GENRES) + ",split0,split1,split2\n"


def write_csv(tmp_path, body, header=HEADER):
    p = tmp_path / "mtgc.csv"
    p.write_text(header + body)
    return p


def test_load_metadata(tmp_path):
    p = write_csv(tmp_path, "tt1,1,0,0,0,0,0,0,0,0,1,0,1,2\ntt2,0,0,1,0,0,0,0,0,0,0,1,2,0\n")
    m = data.load_metadata(p)
    assert m.ids == ["tt1", "tt2"]
    assert m.labels.tolist()[0] == [1, 0, 0, 0, 0, 0, 0, 0, 0, 1]
    assert m.splits.tolist() == [[0, 1, 2], [1, 2, 0]]
    assert m.subset(0, "val").tolist() == [1]


@pytest.mark.parametrize("body,header,msg", [
    ("", "mid,drama,action\n", "line 1: the header must be"),
    ("tt1,1,0,0,0,0,0,0,0,0,0,0,1\n", HEADER, "line 2: expected 14 columns"),
    ("tt1,1,0,0,0,0,0,0,0,0,0,0,1,3\n", HEADER, "line 2: column split2 of tt1 must be one of 0/1/2, got '3'"),
    ("tt1,1,0,0,0,0,0,0,0,0,2,0,1,2\n", HEADER, "line 2: column thriller of tt1 must be one of 0/1"),
    ("tt1,0,0,0,0,0,0,0,0,0,0,0,1,2\n", HEADER, "line 2: trailer tt1 has no genre"),
    ("tt1,1,0,0,0,0,0,0,0,0,0,0,1,2\ntt1,1,0,0,0,0,0,0,0,0,0,0,1,2\n", HEADER, "line 3: trailer tt1 already"),
    ("", HEADER, "has a header but no trailers"),
])
def test_bad_metadata(tmp_path, body, header, msg):
    with pytest.raises(T12kError, match=msg):
        data.load_metadata(write_csv(tmp_path, body, header))


def test_missing_metadata_file(tmp_path):
    with pytest.raises(T12kError, match="does not exist"):
        data.load_metadata(tmp_path / "mtgc.csv")


def test_metadata_with_a_byte_order_mark_or_other_encoding(tmp_path):
    p = tmp_path / "mtgc.csv"
    p.write_bytes(b"\xef\xbb\xbf" + (HEADER + "tt1,1,0,0,0,0,0,0,0,0,1,0,1,2\n").encode())  # as Excel saves UTF-8
    m = data.load_metadata(p)
    assert m.ids == ["tt1"] and m.labels.tolist()[0][0] == 1
    # a header that differs only in characters one cannot see says which they are
    p.write_text("\u200b" + HEADER + "tt1,1,0,0,0,0,0,0,0,0,1,0,1,2\n")
    with pytest.raises(T12kError, match=r"line 1: the header must be .*got '\\u200bmid,"):
        data.load_metadata(p)
    p.write_bytes(HEADER.encode() + "tt\xe9,1,0,0,0,0,0,0,0,0,1,0,1,2\n".encode("latin-1"))
    with pytest.raises(T12kError, match=r"mtgc.csv is not UTF-8 text \(byte 0xe9 at offset \d+\); save it as UTF-8"):
        data.load_metadata(p)


def test_empty_split(tmp_path):
    m = data.load_metadata(write_csv(tmp_path, "tt1,1,0,0,0,0,0,0,0,0,0,0,0,0\n"))
    with pytest.raises(T12kError, match="the val set of split0 is empty"):
        m.subset(0, "val")


def test_metadata_roundtrip(tmp_path):
    labels = np.eye(10, dtype=np.uint8)[:3]
    splits = np.array([[0, 1, 2], [1, 2, 0], [2, 0, 1]])
    data.write_metadata(tmp_path / "m.csv", ["a", "b", "c"], labels, splits)
    m = data.load_metadata(tmp_path / "m.csv")
    assert m.ids == ["a", "b", "c"] and (m.labels == labels).all() and (m.splits == splits).all()


def test_align_reports_missing_both_ways(tmp_path, caplog, toy_cache, toy_metadata):
    toy_cache(tmp_path / "c.h5", [3, 3, 3], F=4, ids=["a", "b", "x"])
    fs = cache.load(tmp_path / "c.h5")
    meta = data.load_metadata(toy_metadata(tmp_path / "m.csv", ["a", "b", "c"]))
    with pytest.raises(T12kError, match=r"1 of 3 trailers in .* are missing from cache .* \(e.g. c\)"):
        data.align(meta, [fs])
    rows = data.align(meta, [fs], on_missing="warn")
    assert rows.tolist() == [0, 1]
    assert "1 trailers are not in" in caplog.text and "dropping them" in caplog.text


def test_windows_and_masks(tmp_path, toy_cache, toy_metadata):
    toy_cache(tmp_path / "c.h5", [50, 5, 30], F=4, ids=IDS, ramp=True)  # float32; values name trailer and clip
    fs = cache.load(tmp_path / "c.h5")
    meta = data.load_metadata(toy_metadata(tmp_path / "m.csv", IDS))
    d = data.TrailerData.from_metadata(meta, {"image": fs}, np.arange(3))
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        b = d.random_windows(torch.arange(3), 30, gen)
        assert b.x["image"].shape == (3, 30, 4)
        assert b.mask.sum(1).tolist() == [30, 5, 30]
        # A window is 30 consecutive clips of its own trailer; padding is zero.
        x = b.x["image"][0]
        first = int(x[0, 0] / 4)
        assert torch.equal(x, fs.trailer("t0")[first:first + 30])
        assert (b.x["image"][1, 5:] == 0).all() and torch.equal(b.x["image"][1, :5], fs.trailer("t1"))
        assert torch.equal(b.x["image"][2], fs.trailer("t2"))


def test_snippets_cover_every_clip_once(tmp_path, toy_cache, toy_metadata):
    toy_cache(tmp_path / "c.h5", [61, 5, 30], F=4, ids=IDS, ramp=True)  # float32; values name trailer and clip
    fs = cache.load(tmp_path / "c.h5")
    meta = data.load_metadata(toy_metadata(tmp_path / "m.csv", IDS))
    d = data.TrailerData.from_metadata(meta, {"image": fs}, np.arange(3))
    owner, first = d.snippets(torch.arange(3), 30)
    assert owner.tolist() == [0, 0, 0, 1, 2] and first.tolist() == [0, 30, 60, 0, 0]
    b = d.gather(owner, first, 30, torch.float32)
    assert b.mask.sum().item() == 61 + 5 + 30
    # Each trailer's snippets, in order and without their padding, are exactly its clips.
    for row, tid in enumerate(IDS):
        mine = (owner == row).nonzero().flatten()
        got = torch.cat([b.x["image"][i][b.mask[i]] for i in mine])
        assert torch.equal(got, fs.trailer(tid)), tid
        assert (b.x["image"][mine][~b.mask[mine]] == 0).all()


def test_streams_use_shorter_length(tmp_path, toy_cache, toy_metadata):
    toy_cache(tmp_path / "a.h5", [10], F=4, ids=["t0"], ramp=True)
    a = cache.load(tmp_path / "a.h5")
    toy_cache(tmp_path / "b.h5", [7], F=4, ids=["t0"])  # random values: not the image stream's
    b = cache.load(tmp_path / "b.h5")
    meta = data.load_metadata(toy_metadata(tmp_path / "m.csv", ["t0"]))
    d = data.TrailerData.from_metadata(meta, {"image": a, "video": b}, np.arange(1))
    assert d.lengths.tolist() == [7]
    batch = d.gather(torch.tensor([0]), torch.tensor([0]), 30, torch.float32)
    assert batch.mask.sum().item() == 7 and batch.x["video"].shape == (1, 30, 4)
    # Both streams are read at the same clip positions, cut at the shorter one.
    assert torch.equal(batch.x["image"][0, :7], a.trailer("t0")[:7])
    assert torch.equal(batch.x["video"][0, :7], b.trailer("t0"))
    assert (batch.x["image"][0, 7:] == 0).all() and (batch.x["video"][0, 7:] == 0).all()


def test_unlabelled_trailers_give_the_same_windows_without_labels(tmp_path, toy_cache, toy_metadata):
    toy_cache(tmp_path / "c.h5", [61, 5, 30], F=4, ids=IDS, ramp=True)
    fs = cache.load(tmp_path / "c.h5")
    meta = data.load_metadata(toy_metadata(tmp_path / "m.csv", IDS))
    labelled = data.TrailerData.from_metadata(meta, {"image": fs}, np.array([2, 0]))
    assert labelled.ids == [IDS[2], IDS[0]]
    assert torch.equal(labelled.labels, torch.from_numpy(meta.labels[[2, 0]].astype(np.float32)))
    bare = data.TrailerData([IDS[2], IDS[0]], {"image": fs})
    assert bare.labels is None
    owner, first = bare.snippets(torch.arange(2), 30)
    a, b = labelled.gather(owner, first, 30, torch.float32), bare.gather(owner, first, 30, torch.float32)
    assert b.y is None and a.y.shape == (len(owner), 10)
    assert torch.equal(a.x["image"], b.x["image"]) and torch.equal(a.mask, b.mask)
    assert bare.random_windows(torch.arange(2), 30, torch.Generator().manual_seed(0)).y is None
    with pytest.raises(T12kError, match=r"labels must have shape \(2, 10\).*got \(2, 3\)"):
        data.TrailerData([IDS[2], IDS[0]], {"image": fs}, np.zeros((2, 3)))
    with pytest.raises(T12kError, match=r"1 trailers are not in cache .*c.h5 \(e.g. nope\)"):
        data.TrailerData([IDS[0], "nope"], {"image": fs})


def test_check_splits():
    assert data.check_splits([2, 0]) == (2, 0)
    with pytest.raises(T12kError, match="split must be 0, 1 or 2, got 3, -1"):
        data.check_splits([0, 3, -1])
    with pytest.raises(T12kError, match="select at least one split among 0, 1, 2"):
        data.check_splits([])
