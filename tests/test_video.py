from fractions import Fraction

import av
import numpy as np
import pytest

from trailers12k_feats.extraction import video
from trailers12k_feats.extraction.shots import ContentShots
from trailers12k_feats.extraction.video import ClipSpec, VideoError
from trailers12k_feats.sources.synthvideo import (
    cut_video,
    shot_frames,
    shot_texture,
    write_video,
)
from trailers12k_feats.utils import T12kError


def _cuts(frames, fps=24):
    det = ContentShots(fps=fps)
    return [i for i, f in enumerate(frames) if det.is_cut(f)]


@pytest.fixture(scope="module")
def shots_video(tmp_path_factory):
    return cut_video(tmp_path_factory.mktemp("v") / "cuts.mp4", [30, 50, 20, 40], size=(96, 64), fps=24)


def test_hard_cuts_are_found_at_their_frames(shots_video):
    frames = list(video.frames(shots_video, 24, short_side=64))
    assert len(frames) == 140
    assert frames[0].shape == (64, 96, 3) and frames[0].dtype == np.uint8
    assert _cuts(frames) == [30, 80, 100]


def test_clips_stay_inside_shots_and_leftovers_follow_the_setting(shots_video):
    drop = list(video.decode_clips(shots_video, ClipSpec(fpc=8, short_side=64)))
    # Shots of 30, 50, 20, 40 frames hold 3, 6, 2, 5 whole clips; remainders are dropped.
    assert [c.shot for c in drop] == [0] * 3 + [1] * 6 + [2] * 2 + [3] * 5
    assert all(c.frames.shape == (8, 64, 96, 3) for c in drop)
    starts = [round(c.start * 24) for c in drop]
    assert starts == [0, 8, 16, 30, 38, 46, 54, 62, 70, 80, 88, 100, 108, 116, 124, 132]
    assert all(abs((c.end - c.start) * 24 - 8) < 1e-6 for c in drop)
    # "pad": remainders of >= 4 frames (half a clip) become clips padded with their last frame.
    pad = list(video.decode_clips(shots_video, ClipSpec(fpc=8, short_side=64, leftover="pad")))
    assert [(c.shot, round(c.start * 24), round(c.end * 24)) for c in pad if (c.end - c.start) * 24 < 7.5] == \
        [(0, 24, 30), (2, 96, 100)]
    assert len(pad) == len(drop) + 2
    short = next(c for c in pad if c.shot == 0 and round(c.start * 24) == 24)
    assert (short.frames[6:] == short.frames[5]).all()


def test_fixed_segmentation_ignores_cuts(shots_video):
    fixed = list(video.decode_clips(shots_video, ClipSpec(fpc=8, short_side=64, segmentation="fixed")))
    assert len(fixed) == 140 // 8
    assert {c.shot for c in fixed} == {-1}
    assert [round(c.start * 24) for c in fixed] == list(range(0, 136, 8))


@pytest.mark.parametrize("src_fps, shot_len, expect", [
    (30, 30, [24, 48, 72]),  # a cut every second lands on target frames 24, 48, 72
    (Fraction(24000, 1001), 24, [25, 49, 73]),  # 23.976: cut i at 24.024 i s -> ceil(24.024 i)
])
def test_resampling_by_timestamps(tmp_path, src_fps, shot_len, expect):
    p = cut_video(tmp_path / "r.mp4", [shot_len] * 4, fps=src_fps)
    frames = list(video.frames(p, 24, short_side=64))
    duration = 4 * shot_len / float(src_fps)
    assert len(frames) == int(np.ceil(duration * 24 - 1e-9))
    assert _cuts(frames) == expect


def test_variable_frame_rate(tmp_path):
    rng = np.random.default_rng(0)
    H, W = 64, 96
    frames, times, t = [], [], 0.0
    # Shot 1: 20 frames at 1/24 s; shot 2: 10 frames at 1/10 s; shot 3: 30 frames at 1/60 s.
    for n, dt in ((20, 1 / 24), (10, 1 / 10), (30, 1 / 60)):
        for f in shot_frames(shot_texture(rng, H, W), n, H, W):
            frames.append(f)
            times.append(t)
            t += dt
    p = write_video(tmp_path / "vfr.mkv", frames, fps=24, times=times)
    out = list(video.frames(p, 24, short_side=64))
    # Shot 2 starts at 20/24 s = frame 20; shot 3 at 20/24 + 1 s = frame 44.
    assert _cuts(out) == [20, 44]
    assert len(out) == pytest.approx((20 / 24 + 1 + 30 / 60) * 24, abs=1.01)


def test_rotation_metadata_is_applied(tmp_path):
    plain = cut_video(tmp_path / "plain.mp4", [20], size=(96, 64), seed=3)
    rotated = cut_video(tmp_path / "rot.mp4", [20], size=(96, 64), seed=3, rotation=90)
    a = list(video.frames(plain, 24, short_side=64))
    b = list(video.frames(rotated, 24, short_side=64))
    assert b[0].shape == (96, 64, 3)
    assert np.array_equal(b[5], np.rot90(a[5], 1))
    info = video.video_info(rotated)
    assert (info.width, info.height, info.rotation) == (64, 96, 90)


@pytest.mark.parametrize("size, short, expect", [((160, 90), 64, (64, 114)), ((64, 128), 32, (64, 32))])
def test_frames_keep_aspect_at_the_requested_short_side(tmp_path, size, short, expect):
    p = cut_video(tmp_path / "s.mp4", [10], size=size)
    assert next(video.frames(p, 24, short_side=short)).shape[:2] == expect


def test_bad_videos_raise_video_errors(tmp_path, shots_video):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"not a video" * 100)
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(shots_video.read_bytes()[: shots_video.stat().st_size // 2])
    empty = tmp_path / "empty.mp4"
    empty.touch()
    audio = tmp_path / "audio.mka"
    with av.open(str(audio), "w") as c:
        s = c.add_stream("mp2", rate=44100)
        for i in range(5):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1152), np.int16), format="s16", layout="mono")
            frame.sample_rate, frame.pts = 44100, i * 1152
            for pkt in s.encode(frame):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    for path, words in ((garbage, "cannot be opened"), (truncated, "cannot be"), (empty, "empty file"),
                        (audio, "no video stream"), (tmp_path / "missing.mp4", "no such file"), (tmp_path, "not a regular file")):
        with pytest.raises(VideoError, match=words):
            list(video.frames(path, 24))


def test_clip_spec_validation():
    with pytest.raises(T12kError, match="segmentation"):
        ClipSpec(segmentation="scenes")
    with pytest.raises(T12kError, match="frames per clip"):
        ClipSpec(fpc=0)
    assert ClipSpec(fps=23.976).rate == Fraction(24000, 1001)


def faststart(src, dst):
    """`src` remuxed with its index at the front, so a truncated copy still opens (as a web-ready MP4 does)."""
    with av.open(str(src)) as i, av.open(str(dst), "w", options={"movflags": "faststart"}) as o:
        s = i.streams.video[0]
        out = o.add_stream_from_template(s)
        for packet in i.demux(s):
            if packet.dts is not None:
                packet.stream = out
                o.mux(packet)
    return dst


def truncated(src, dst, fraction=0.5):
    """The first `fraction` of `src`'s bytes, as an interrupted copy leaves them."""
    data = src.read_bytes()
    dst.write_bytes(data[:int(len(data) * fraction)])
    return dst


@pytest.fixture(scope="module")
def twelve_seconds(tmp_path_factory):
    """12 s videos (three 4 s shots at 24 fps) as mkv and as mp4 with the index first."""
    d = tmp_path_factory.mktemp("twelve")
    mkv = cut_video(d / "full.mkv", [96, 96, 96], size=(96, 64), seed=1)
    mp4 = faststart(cut_video(d / "plain.mp4", [96, 96, 96], size=(96, 64), seed=1), d / "full.mp4")
    return {"mkv": mkv, "mp4": mp4}


@pytest.mark.parametrize("ext", ["mkv", "mp4"])
def test_decoded_and_declared_durations(tmp_path, twelve_seconds, ext):
    full = video.Durations()
    assert len(list(video.frames(twelve_seconds[ext], 24, short_side=64, durations=full))) == 288
    assert full.declared == pytest.approx(12.0) and full.decoded == pytest.approx(12.0, abs=0.01) and not full.partial
    half = video.Durations()
    clips = list(video.decode_clips(truncated(twelve_seconds[ext], tmp_path / f"half.{ext}"),
                                    ClipSpec(fpc=8, short_side=64), durations=half))
    assert half.declared == pytest.approx(12.0) and 4.5 < half.decoded < 7.5 and half.partial
    assert clips and clips[-1].end <= half.decoded + 1e-6


def test_partial_tolerance():
    # shorter than declared by more than max(1 s, 5 %) is partial
    assert not video.is_partial(11.1, 12.0) and video.is_partial(10.9, 12.0)
    assert not video.is_partial(115.0, 120.0) and video.is_partial(113.9, 120.0)
    assert not video.is_partial(3.0, None) and not video.is_partial(3.0, 0.0)
