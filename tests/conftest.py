"""Shared fixtures: a small synthetic corpus built once per test session, and writers of toy
caches and metadata files for tests that need a few hand-made trailers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from trailers12k_feats import NUM_GENRES, runtime
from trailers12k_feats.cache import CacheAttrs, CacheWriter
from trailers12k_feats.runtime import CACHE_ENV, PROBE_FILE
from trailers12k_feats.sources.synthetic import SynthConfig, make_corpus
from trailers12k_feats.sources.synthvideo import cut_video
from trailers12k_feats.training.data import write_metadata

torch.set_num_threads(2)


@pytest.fixture(autouse=True, scope="session")
def probe_cache(tmp_path_factory):
    """The folder `--precision auto` keeps its per-machine probe in: a session tmp folder, never
    the user's cache (subprocesses inherit it)."""
    folder = tmp_path_factory.mktemp("t12k_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(folder))
        yield folder


class FakeProbe:
    """Stands in for runtime.measure_matmul: returns `figures` (edit them), counts `calls`."""

    def __init__(self, folder: Path) -> None:
        self.figures = {"fp32": 259.0, "bf16": 144.0, "spread": 1.0, "seconds": 0.1}  # bf16 slower
        self.calls = 0
        self.path = folder / PROBE_FILE  # the per-machine cache file

    def __call__(self, *args, **kwargs) -> dict:
        self.calls += 1
        return dict(self.figures)


@pytest.fixture
def fake_probe(tmp_path, monkeypatch) -> FakeProbe:
    """`--precision auto` on a quiet machine whose probe measures `fake_probe.figures`, with its
    own empty cache folder; delete `fake_probe.path` to have it measured again."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "probe_cache"))
    fake = FakeProbe(tmp_path / "probe_cache")
    monkeypatch.setattr(runtime, "measure_matmul", fake)
    monkeypatch.setattr(runtime, "machine_load", lambda: (0.0, 2))
    monkeypatch.setattr(runtime, "_UNKEPT", {})
    return fake


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """300 trailers, all six streams (read-only: copy before modifying)."""
    out = tmp_path_factory.mktemp("corpus")
    make_corpus(out, SynthConfig(num_trailers=300, seed=1), progress=False)
    return out


def cut_test_videos(d: Path) -> Path:
    """Four small videos in `d`: two good ones (mp4, and mkv at 30 fps), one shorter than a
    clip and one corrupt file."""
    cut_video(d / "tt0000001.mp4", [30, 50, 20], size=(160, 96), seed=1)
    cut_video(d / "tt0000002.mkv", [40, 26], size=(128, 96), seed=2, fps=30)
    cut_video(d / "tt0000003.mp4", [5], size=(160, 96), seed=3)  # shorter than one clip
    (d / "tt0000004.mp4").write_bytes(b"\x00corrupt" * 64)
    return d


def write_toy_cache(path, lengths=(3, 1, 5), *, F=8, dtype="float32", ids=None, ramp=False, seed=0, clips=None,
                    **attrs) -> list[tuple[str, np.ndarray]]:
    """Write a cache of `len(lengths)` trailers with `lengths[i]` clips of dim `F` at `path`.

    Ids are `ids` or tt0000000, tt0000001, ...; features are standard normal (seeded), or with
    `ramp` the numbers 0, 1, 2, ... in row-major order plus 100 * trailer index, so a value tells
    which trailer and clip it came from. `clips` maps an id to its (clip_start, clip_end, shot)
    arrays (others have none). `attrs` go to CacheAttrs (name defaults to the file's stem,
    backbone to "toy_net"). Returns the (id, features (C, F) float32) pairs written.
    """
    path = Path(path)
    ids = list(ids) if ids is not None else [f"tt{i:07d}" for i in range(len(lengths))]
    if len(ids) != len(lengths):
        raise ValueError(f"{len(ids)} ids for {len(lengths)} lengths")
    rng = np.random.default_rng(seed)
    items = []
    for i, (tid, n) in enumerate(zip(ids, lengths)):
        if ramp:
            x = np.arange(n * F, dtype=np.float32).reshape(n, F) + 100 * i  # (n, F)
        else:
            x = rng.standard_normal((n, F)).astype(np.float32)  # (n, F)
        items.append((tid, x))
    attrs = {"name": path.stem, "backbone": "toy_net", **attrs}
    with CacheWriter(path, CacheAttrs(feature_dim=F, **attrs), dtype=dtype) as w:
        for tid, x in items:
            w.add(tid, x, *(clips or {}).get(tid, ()))
    return items


def write_toy_metadata(path, ids, seed=0) -> Path:
    """Write an `mtgc.csv` for `ids`: random genres (at least one per trailer) and, in each split
    column, the pattern train, train, train, val, test rotated by the column's index."""
    rng = np.random.default_rng(seed)
    n = len(ids)
    labels = rng.random((n, NUM_GENRES)) < 0.3
    labels[np.arange(n), rng.integers(0, NUM_GENRES, n)] = True
    split = np.array([0, 0, 0, 1, 2])[np.arange(n) % 5]
    write_metadata(path, ids, labels, np.stack([np.roll(split, k) for k in range(3)], 1))
    return Path(path)


@pytest.fixture
def toy_cache():
    """The toy cache writer, :func:`write_toy_cache`."""
    return write_toy_cache


@pytest.fixture
def toy_metadata():
    """The toy metadata writer, :func:`write_toy_metadata`."""
    return write_toy_metadata


@pytest.fixture
def toy_group(tmp_path):
    """80 toy trailers of 5 to 89 clips (some shorter than a window) in an image and a video cache
    (img.h5, F=24; vid.h5, F=16) with their metadata: (Metadata, the folder)."""
    from trailers12k_feats.training.data import load_metadata

    lengths = np.random.default_rng(0).integers(5, 90, 80)
    ids = [f"tt{i:07d}" for i in range(80)]
    write_toy_cache(tmp_path / "img.h5", lengths, F=24, ids=ids, seed=1)
    write_toy_cache(tmp_path / "vid.h5", lengths, F=16, ids=ids, seed=2)
    return load_metadata(write_toy_metadata(tmp_path / "mtgc.csv", ids)), tmp_path
