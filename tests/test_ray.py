"""The Ray engine on a local 2-CPU Ray instance: extraction and reproduce equal the local engine's,
survive a killed driver and a killed actor, and refuse bad options in one sentence."""

import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import cut_test_videos

from cli import main
from trailers12k_feats import cache
from trailers12k_feats.engines import EngineConfig
from trailers12k_feats.extraction import backbones as bb
from trailers12k_feats.extraction import store
from trailers12k_feats.extraction.extract import ExtractConfig, extract
from trailers12k_feats.extraction.video import ClipSpec
from trailers12k_feats.sources.synthvideo import cut_video
from trailers12k_feats.training.grid import Grid, reproduce_grid
from trailers12k_feats.training.reproduce import ReproduceConfig
from trailers12k_feats.training.train import TrainConfig
from trailers12k_feats.utils import T12kError

LIGHT = "shufflenet_v2_3d_x1_0"
RAY = EngineConfig(engine="ray")


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray instance of 2 CPUs for the session; the runs under test connect to it."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = cut_test_videos(tmp_path_factory.mktemp("videos"))
    cut_video(d / "tt0000005.mp4", [24, 40], size=(160, 96), seed=5)
    return d


def _cfg(**kw):
    """A 2D backbone with real weights and a 3D one with random weights, fp32 kept as fp32."""
    base = {"backbones": ("mobilenet_v2", LIGHT), "clip": ClipSpec(fpc=8, short_side=128), "image_frames": 2,
            "batch_size": 5, "precision": "fp32", "dtype": "float32",
            "weights": (("mobilenet_v2", str(bb.offline_weights())), (LIGHT, "random"))}
    return ExtractConfig(**{**base, **kw})


def _trailers(path):
    return {c.id: c for c in cache.iter_trailers(path)}


def _assert_same_cache(a: Path, b: Path, exact: bool = True) -> None:
    ta, tb = _trailers(a), _trailers(b)
    assert list(ta) == list(tb)
    for tid in ta:
        x, y = ta[tid], tb[tid]
        for name in ("clip_start", "clip_end", "shot"):
            np.testing.assert_array_equal(getattr(x, name), getattr(y, name))
        if exact:
            np.testing.assert_array_equal(x.features, y.features)
        else:
            np.testing.assert_allclose(x.features, y.features, rtol=1e-3, atol=1e-3)
    assert cache.read_attrs(a) == cache.read_attrs(b)  # provenance: config, weights, precision


def _local(videos, out, cfg):
    """The local engine on one torch thread, as a 1-CPU actor runs, so fp32 sums add in the same order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return extract([videos], out, cfg, progress=False)
    finally:
        torch.set_num_threads(threads)


def test_ray_extraction_equals_the_local_engine(ray_cluster, videos, tmp_path):
    from trailers12k_feats.extraction.ray_engine import extract_ray

    local = _local(videos, tmp_path / "local", _cfg())
    res = extract_ray([videos], tmp_path / "ray", _cfg(), RAY, progress=False)
    assert (res.extracted, res.skipped, res.clips) == (local.extracted, 0, local.clips) == (3, 0, local.clips)
    assert [p.name for p in res.caches] == ["i_mobilenet.h5", "k_shufflenet.h5"]
    for name in ("i_mobilenet.h5", "k_shufflenet.h5"):
        _assert_same_cache(tmp_path / "local" / name, tmp_path / "ray" / name)  # bit-equal in fp32 on the CPU
    assert (tmp_path / "ray" / "failures.jsonl").read_text() == (tmp_path / "local" / "failures.jsonl").read_text()
    assert {f["id"] for f in res.failures} == {"tt0000003", "tt0000004"}
    # A rerun skips what is done (the bad videos are tried again, as locally).
    again = extract_ray([videos], tmp_path / "ray", _cfg(), RAY, progress=False)
    assert (again.extracted, again.skipped, len(again.failures)) == (0, 3, 2)


def test_killed_actor_is_restarted_and_its_batches_retried(ray_cluster, videos, tmp_path, monkeypatch):
    from trailers12k_feats.extraction import ray_engine

    kills = []
    real = ray_engine._RayRun.forward

    def forward(self, m):
        before = len(self.pending)
        real(self, m)
        if len(self.pending) > before and not kills:  # a batch was just sent: kill its actor under it
            ray_cluster.kill(self.actors[0], no_restart=False)
            kills.append(before)

    monkeypatch.setattr(ray_engine._RayRun, "forward", forward)
    cfg = _cfg(backbones=(LIGHT,), weights=((LIGHT, "random"),))
    # In arrival order (as with GPU actors): batches may mix other clips than locally, so features
    # agree within rounding; ids, clip times and shots exactly.
    any_order = EngineConfig(engine="ray", ordered=False)
    res = ray_engine.extract_ray([videos], tmp_path / "ray", cfg, any_order, progress=False)
    assert kills and res.extracted == 3 and {f["id"] for f in res.failures} == {"tt0000003", "tt0000004"}
    _local(videos, tmp_path / "local", cfg)
    _assert_same_cache(tmp_path / "local" / "k_shufflenet.h5", tmp_path / "ray" / "k_shufflenet.h5", exact=False)


def _our_workers(title: str) -> list[int]:
    """Pids of this test process's Ray workers now running `title` (Ray names a busy worker
    `ray::<task>`); only descendants of this process, so no one else's Ray is touched."""
    def parent(pid: int) -> int:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])

    out = []
    for p in Path("/proc").iterdir():
        try:
            if not (p.name.isdigit() and (p / "cmdline").read_bytes().startswith(title.encode())):
                continue
            pid = int(p.name)
            while pid > 1 and pid != os.getpid():
                pid = parent(pid)
        except OSError:  # gone meanwhile
            continue
        if pid == os.getpid():
            out.append(int(p.name))
    return out


def test_killed_decoding_task_is_retried_and_loses_or_repeats_no_clip(ray_cluster, tmp_path, monkeypatch):
    from trailers12k_feats.extraction import ray_engine

    cut_video(tmp_path / "v" / "tt0000001.mp4", [150, 150, 180], size=(96, 64), seed=1)  # 58 clips: 8 chunks
    kills = []
    real = ray_engine._RayRun.take

    def take(self, item):  # at the first chunk the task is paused with more to yield: kill it
        real(self, item)
        if "x" in item and not kills:
            kills.extend(_our_workers("ray::_decode"))
            for pid in kills:
                os.kill(pid, signal.SIGKILL)

    monkeypatch.setattr(ray_engine._RayRun, "take", take)
    cfg = _cfg(backbones=(LIGHT,), weights=((LIGHT, "random"),), batch_size=16)
    res = ray_engine.extract_ray([tmp_path / "v"], tmp_path / "ray", cfg, RAY, progress=False)
    assert kills and res.extracted == 1 and res.ok
    _local(tmp_path / "v", tmp_path / "local", cfg)
    _assert_same_cache(tmp_path / "local" / "k_shufflenet.h5", tmp_path / "ray" / "k_shufflenet.h5")


def test_driver_killed_then_rerun_keeps_every_trailer_once(ray_cluster, tmp_path):
    vids = tmp_path / "v"
    for i in range(6):
        cut_video(vids / f"tt{i:07d}.mp4", [40, 40], size=(160, 96), seed=i)
    address = ray_cluster.get_runtime_context().gcs_address
    args = ["extract", str(vids), "-b", LIGHT, "--weights", f"{LIGHT}=random", "--fpc", "8", "--flush-every", "1",
            "--cache", str(tmp_path / "c"), "--engine", "ray"]
    proc = subprocess.Popen([sys.executable, "-m", "cli", *args, "--ray-address", address],
                            cwd=Path(__file__).parents[1], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not store.segments(tmp_path / "c", "k_shufflenet") and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    assert proc.poll() is None, "extraction ended before it could be stopped"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = store.finished_ids(tmp_path / "c", "k_shufflenet")
    assert 1 <= len(done) < 6 and not (tmp_path / "c" / "k_shufflenet.h5").exists()
    out = CliRunner().invoke(main, args)  # in this process: the session's Ray instance
    assert out.exit_code == 0, out.output
    assert f"{len(done)} already done" in out.output
    final = cache.load(tmp_path / "c" / "k_shufflenet.h5")
    assert sorted(final.ids) == [f"tt{i:07d}" for i in range(6)]  # each once (ids are checked unique)


def test_grid_through_ray_equals_the_same_runs_made_locally(ray_cluster, corpus, tmp_path):
    base = ReproduceConfig(metadata=corpus / "mtgc.csv", cache_dir=corpus, rows=("k_r2plus1d",), splits=(0, 1),
                           train=TrainConfig(max_epochs=2, precision="fp32"))
    grid = Grid.parse(lr="1e-4,3e-4")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a task of --cpus-per-run 1
    try:
        reproduce_grid(dataclasses.replace(base, out_dir=tmp_path / "local"), grid, progress=False)
    finally:
        torch.set_num_threads(threads)
    text = reproduce_grid(dataclasses.replace(base, out_dir=tmp_path / "ray"), grid, RAY, progress=False)
    assert "lr-0.0001" in text and "lr-0.0003" in text
    files = sorted(p.relative_to(tmp_path / "local") for p in (tmp_path / "local").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "ray") for p in (tmp_path / "ray").rglob("*") if p.is_file())
    assert len([f for f in files if f.name == "metrics.json"]) == 4  # 2 settings x 2 splits
    for f in files:  # the same numbers; only the seconds each run took differ
        a, b = (tmp_path / side / f for side in ("local", "ray"))
        if f.name == "metrics.json":
            assert _untimed(json.loads(a.read_text())) == _untimed(json.loads(b.read_text())), f
        elif f.name == "history.csv":
            assert [r[:-1] for r in csv.reader(a.open())] == [r[:-1] for r in csv.reader(b.open())], f
        elif f.suffix in (".csv", ".md", ".json"):
            assert a.read_text() == b.read_text(), f
    # An interrupted grid resumes: only the run without metrics.json is trained again.
    run = tmp_path / "ray" / "lr-0.0003" / "runs" / "k_r2plus1d" / "split1"
    (run / "metrics.json").unlink()
    others = {p: p.stat().st_mtime_ns for p in (tmp_path / "ray").rglob("metrics.json")}
    reproduce_grid(dataclasses.replace(base, out_dir=tmp_path / "ray"), grid, RAY, progress=False)
    assert all(p.stat().st_mtime_ns == t for p, t in others.items())
    again = json.loads((run / "metrics.json").read_text())
    assert _untimed(again) == _untimed(json.loads((tmp_path / "local" / run.relative_to(tmp_path / "ray") /
                                                   "metrics.json").read_text()))


def _untimed(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "seconds"}


def one_line(r, *parts):
    assert r.exit_code == 1, r.output
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output, r.output
    for part in parts:
        assert part in r.output, r.output


def test_missing_ray_extra_is_one_sentence(videos, tmp_path, monkeypatch, corpus):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as where it is not installed
    r = CliRunner().invoke(main, ["extract", str(videos), "-b", LIGHT, "--cache", str(tmp_path), "--engine", "ray"])
    one_line(r, "--engine ray needs Ray, which is not installed; run pip install 'trailers12k_feats[ray]'.")
    r = CliRunner().invoke(main, ["reproduce", "--data-dir", str(corpus), "--rows", "k_r2plus1d", "--splits", "0",
                                  "--max-epochs", "1", "--out", str(tmp_path / "res"), "--engine", "ray"])
    one_line(r, "pip install 'trailers12k_feats[ray]'")


def test_bad_engine_options_are_one_sentence(ray_cluster, videos, tmp_path):
    def run(*extra):
        return CliRunner().invoke(main, ["extract", str(videos), "-b", LIGHT, "--weights", f"{LIGHT}=random",
                                         "--cache", str(tmp_path / "c"), *extra])

    one_line(run("--decode-cpus", "2"), "--decode-cpus apply only to the Ray engine; add --engine ray")
    one_line(run("--engine", "ray", "--ray-address", "not an address"), "--ray-address must be auto")
    one_line(run("--engine", "ray", "--gpus-per-actor", "1"), "--gpus-per-actor 1 but the cluster has 0 GPU(s)")
    one_line(run("--engine", "ray", "--actors", "2"), "2 actor(s) of 1 CPU(s)", "do not fit the cluster's 2 CPUs")
    one_line(run("--engine", "ray", "--workers", "2"), "--workers sets the local engine's decoding processes")
    one_line(run("--engine", "ray", "-b", "mobilenet_v2", "--weights", "mobilenet_v2=/nowhere/w.pth"), "/nowhere/w.pth")
    assert not (tmp_path / "c").exists()
    with pytest.raises(T12kError, match="--lr takes comma-separated float values such as 1e-4,3e-4"):
        Grid.parse(lr="1e-4,fast")
    with pytest.raises(T12kError, match="needs distinct values"):
        Grid.parse(seed="1,1")
    with pytest.raises(T12kError, match="--engine ray trains on CPUs"):  # as on a driver that sees a GPU
        from trailers12k_feats.training import train as train_mod
        from trailers12k_feats.training.ray_runs import reproduce_ray

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(train_mod, "check_device", lambda device: None)
            gpu = ReproduceConfig(metadata=tmp_path / "m.csv", cache_dir=tmp_path,
                                  train=TrainConfig(device="cuda", precision="fp32"))
        reproduce_ray([gpu], RAY)
    with pytest.raises(T12kError, match="unknown temporal module 'lstm'"):
        reproduce_grid(ReproduceConfig(metadata=tmp_path / "m.csv", cache_dir=tmp_path),
                       Grid.parse(temporal="tsfm,lstm"))


def test_slurm_scripts_use_options_the_commands_have():
    """Each `t12k ...` line of scripts/slurm names only options its command's --help lists."""
    root = Path(__file__).parents[1] / "scripts" / "slurm"
    seen = 0
    for script in sorted(root.iterdir()):
        text = script.read_text().replace("\\\n", " ")
        for line in text.splitlines():
            words = line.split("#")[0].split()
            if not words or words[0] != "t12k":
                continue
            cmd = words[1:3] if words[1] == "cache" else words[1:2]
            help_text = CliRunner().invoke(main, [*cmd, "--help"]).output
            for opt in (w for w in words if w.startswith("-")):
                assert f"{opt} " in help_text or f"{opt}," in help_text, (script.name, opt)
            seen += 1
    assert seen == 4  # extract in both sbatch files, cache merge and cache validate


def test_cli_comma_lists_make_a_grid_of_results_folders(corpus, tmp_path):
    out = tmp_path / "grid"
    args = ["reproduce", "--data-dir", str(corpus), "--rows", "k_r2plus1d", "--splits", "0", "--max-epochs", "1",
            "--seeds", "0,1", "--out", str(out)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["grid.csv", "grid.md", "seed-0", "seed-1"]
    for seed in (0, 1):
        run = out / f"seed-{seed}" / "runs" / "k_r2plus1d" / "split0"
        assert json.loads((run / "config.json").read_text())["config"]["seed"] == seed
        assert (out / f"seed-{seed}" / "summary.md").exists()
    rows = list(csv.DictReader((out / "grid.csv").open()))
    assert [(row["setting"], row["run"]) for row in rows] == [("seed-0", "k_r2plus1d"), ("seed-1", "k_r2plus1d")]
    assert rows[0]["uAP"] != rows[1]["uAP"]  # two seeds, two trainings
    assert "Grid (2 settings" in r.output and f"compared in {out}/grid.md" in r.output
    again = CliRunner().invoke(main, args)  # finished: nothing is trained again
    assert again.exit_code == 0 and again.output.split("Grid (")[1].strip() == r.output.split("Grid (")[1].strip()
