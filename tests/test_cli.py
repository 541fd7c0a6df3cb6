import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from cli import main
from trailers12k_feats import cache
from trailers12k_feats.extraction.extract import ExtractConfig
from trailers12k_feats.paper import get_row
from trailers12k_feats.training.probe import ProbeConfig
from trailers12k_feats.training.reproduce import ReproduceConfig
from trailers12k_feats.training.train import TrainConfig


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_synth_and_cache_info(tmp_path):
    c = tmp_path / "c"
    r = run("synth", c, "--trailers", 40, "--streams", "k_r2plus1d,i_swin")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in c.iterdir()) == ["i_swin.h5", "k_r2plus1d.h5", "mtgc.csv", "synth_config.json"]
    sets = {name: cache.load(c / f"{name}.h5") for name in ("i_swin", "k_r2plus1d")}

    def counts(fs):  # the line `cache info` prints, from the clips actually stored
        n = fs.lengths.numpy()
        return (f"  40 trailers, {n.sum()} clips (min {n.min()}, median {np.median(n):g}, max {n.max()}; "
                f"{(n < 30).sum()} trailers under 30 clips)")

    r = run("cache", "info", c)
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert len(lines) == 6  # three lines per cache, in name order
    assert lines[0].startswith(f"{c / 'i_swin.h5'}  (") and lines[0].endswith(" MB, float16)")
    assert lines[1].startswith("  i_swin: swin_t (2d, ImageNet-1K), dim 768, fps 24, fpc 24, segmentation shots")
    assert lines[2] == counts(sets["i_swin"])
    assert lines[3].startswith(f"{c / 'k_r2plus1d.h5'}  (")
    assert lines[4].startswith("  k_r2plus1d: r2plus1d_18 (3d, ") and ", dim 512, " in lines[4]
    assert lines[5] == counts(sets["k_r2plus1d"])

    r = run("cache", "info", "--json", c / "k_r2plus1d.h5")
    (info,) = json.loads(r.output)
    n = sets["k_r2plus1d"].lengths.numpy()
    assert (info["path"], info["name"], info["feature_dim"], info["kind"]) == (str(c / "k_r2plus1d.h5"),
                                                                              "k_r2plus1d", 512, "3d")
    assert (info["trailers"], info["clips"], info["dtype"]) == (40, n.sum(), "float16")
    assert info["clips_per_trailer"] == {"min": n.min(), "median": np.median(n), "max": n.max()}

    r = run("cache", "validate", c)
    assert r.exit_code == 0 and r.output.splitlines() == [f"ok  {c / 'i_swin.h5'}", f"ok  {c / 'k_r2plus1d.h5'}"]

    # A NaN in one clip: validation names the file, the trailer and the clip, and exits with status 1.
    fs = sets["k_r2plus1d"]
    tid, row = fs.ids[3], int(fs.offsets[3]) + 2
    with h5py.File(c / "k_r2plus1d.h5", "r+") as h5:
        h5["features"][row, 5] = np.nan
    r = run("cache", "validate", c)
    assert r.exit_code == 1
    error = (f"Error: feature cache {c / 'k_r2plus1d.h5'}: trailer {tid} (clip 2) has NaN or Inf features; "
             "re-extract that trailer or drop it from the cache.")
    assert r.output.splitlines() == [f"ok  {c / 'i_swin.h5'}", error]


def test_train_command(corpus, tmp_path):
    r = run("train", "--data-dir", corpus, "--row", "resnet_fusion", "--split", 1, "--max-epochs", 1,
            "--out", tmp_path / "run")
    assert r.exit_code == 0, r.output
    # What it prints is what it saved, for the row's two streams on split 1.
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert f"best epoch {metrics['best_epoch']}/1" in r.output
    for subset, label in (("val", "val "), ("test", "test")):
        assert f"  {label} uAP {metrics[subset]['uAP']:.2f} mAP {metrics[subset]['mAP']:.2f}" in r.output
    assert f"run saved to {tmp_path / 'run'}" in r.output
    info = json.loads((tmp_path / "run" / "config.json").read_text())
    row = get_row("resnet_fusion")
    assert (info["config"]["split"], info["config"]["max_epochs"]) == (1, 1)
    assert {k: s["name"] for k, s in info["streams"].items()} == {"image": row.image, "video": row.video}
    r = run("train", "--data-dir", corpus, "--row", "i_swin", "--out", tmp_path / "run")
    assert r.exit_code == 1 and "already exists" in r.output


def test_reproduce_and_probe_commands(corpus, tmp_path):
    r = run("reproduce", "--data-dir", corpus, "--rows", "k_r2plus1d", "--splits", "0,2", "--max-epochs", 1,
            "--out", tmp_path / "res")
    assert r.exit_code == 0, r.output
    assert "| R2+1D | 2 |" in r.output
    with open(tmp_path / "res" / "tst.csv") as f:
        assert [(t["run"], t["split"]) for t in csv.DictReader(f)] == [("k_r2plus1d", "0"), ("k_r2plus1d", "2")]
    r = run("probe", "--data-dir", corpus, "--rows", "i_swin,ik_swin", "--pool", "meanmax")
    assert r.exit_code == 0 and "| Swin-2D | 3 |" in r.output and "| Swin-3D | 3 |" in r.output


def test_errors_are_one_clear_line(tmp_path):
    r = run("reproduce", "--data-dir", tmp_path, "--rows", "nope")
    assert r.exit_code == 1
    assert r.output.strip().splitlines() == [
        ("Error: unknown Table 6 row 'nope'; valid rows: i_shufflenet, k_shufflenet, shufflenet_fusion, i_resnet, "
         "k_r2plus1d, resnet_fusion, i_swin, ik_swin.")]
    r = run("probe", "--data-dir", tmp_path)
    assert r.exit_code == 1 and "mtgc.csv does not exist" in r.output and "Traceback" not in r.output


def test_ctrl_c_ends_any_command_with_status_130_and_one_line(tmp_path, monkeypatch):
    from trailers12k_feats.sources import synthetic

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "make_corpus", interrupted)
    r = CliRunner().invoke(main, ["synth", str(tmp_path / "c")])
    assert r.exit_code == 130 and r.stderr.splitlines() == ["interrupted"] and r.stdout == ""
    monkeypatch.setattr("trailers12k_feats.cache.list_caches", interrupted)
    r = CliRunner().invoke(main, ["cache", "info", str(tmp_path)])  # a subgroup's command too
    assert r.exit_code == 130 and r.stderr.splitlines() == ["interrupted"]


def test_wrong_dim_cache_is_refused_by_train_and_probe(corpus, tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    shutil.copy(corpus / "mtgc.csv", d)
    shutil.copy(corpus / "i_resnet.h5", d / "i_swin.h5")  # 2048-d features saved as the 768-d Swin-2D
    for args in (("train", "--row", "i_swin", "--out", tmp_path / "run"), ("probe", "--rows", "i_swin")):
        r = run(args[0], "--data-dir", d, *args[1:])
        assert r.exit_code == 1, r.output
        assert r.output.startswith(f"Error: cache {d / 'i_swin.h5'} has feature dim 2048 but stream i_swin has "
                                   f"dim 768;") and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_train_allow_mismatched_clips(corpus, tmp_path):
    video = tmp_path / "video.h5"
    shutil.copy(corpus / "ik_swin.h5", video)
    with h5py.File(video, "r+") as h5:
        h5.attrs["fpc"] = 12
    args = ("train", "--data-dir", corpus, "--image", "i_swin", "--video", video, "--max-epochs", 1)
    r = run(*args, "--out", tmp_path / "run")
    assert r.exit_code == 1 and "fpc is 24 in" in r.output and "but 12 in" in r.output
    r = run(*args, "--out", tmp_path / "run", "--allow-mismatched-clips")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "run" / "config.json").read_text())["streams"]["video"]["fpc"] == 12


def test_help_shows_the_configs_defaults():
    r = run("train", "--help")
    cfg = TrainConfig()
    for opt, value in (("--max-epochs", cfg.max_epochs), ("--precision", cfg.precision), ("--split", cfg.split)):
        line = " ".join(r.output.split(opt, 1)[1].split("--", 1)[0].split())
        assert f"[default: {value}]" in line, line
    assert "[auto|bf16|fp32]" in r.output
    # --protocol: train's default from TrainConfig, reproduce's from ReproduceConfig (the paper's).
    for cmd, value in (("train", cfg.protocol), ("reproduce", ReproduceConfig.protocol)):
        line = " ".join(run(cmd, "--help").output.split("--protocol", 1)[1].split("--", 1)[0].split())
        assert f"[default: {value}]" in line and "[authors|masked]" in line, line
    assert (cfg.protocol, ReproduceConfig.protocol) == ("masked", "authors")
    r = run("probe", "--help")
    assert f"[default: {ProbeConfig.alpha:g}]" in " ".join(r.output.split())
    assert "[auto|fp32|bf16|fp16]" in run("extract", "--help").output


def test_precision_defaults_to_auto_in_every_command_that_has_it():
    for cmd, cfg in (("train", TrainConfig), ("reproduce", TrainConfig), ("extract", ExtractConfig)):
        line = " ".join(run(cmd, "--help").output.split("--precision", 1)[1].split("\n  -", 1)[0].split())
        assert cfg.precision == "auto" and "[default: auto]" in line and "[auto|" in line, line
        assert "bf16 on CUDA" in line and "faster than fp32" in line, line


def test_cli_imports_the_package_only_in_commands():
    code = ("import sys, cli, trailers12k_feats.engines as e; e.EngineConfig(engine='ray'); "
            "heavy = [m for m in sys.modules if m.startswith(('trailers12k_feats.training', "
            "'trailers12k_feats.extraction', 'trailers12k_feats.apps', 'h5py', 'sklearn', 'torch', 'av', "
            "'scenedetect', 'timm', 'matplotlib', 'ray'))]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[1]).stdout
    assert out.strip() == "[]"


VIDEO_MODEL_PLOT_LIBS = ("av", "scenedetect", "timm", "matplotlib", "ray")  # ray: only with --engine ray

# Each command run for real, in one fresh interpreter, and the video, model and plotting
# libraries loaded once it has finished (modules stay loaded, so a command that needs one shows it).
IMPORTS_AFTER = """
import json, sys
from cli import main
from trailers12k_feats.apps import report

libs = json.loads(sys.argv[2])
def loaded():
    return sorted({m.partition(".")[0] for m in sys.modules} & set(libs))
out = []
for args in json.loads(sys.argv[1]):
    if args == ["report.load"]:
        report.load(sys.argv[3])  # what a notebook reads of a run, without drawing
    else:
        try:
            main(args, standalone_mode=False)
        except SystemExit as e:
            assert not e.code, (args, e.code)
    out.append([args, loaded()])
print(json.dumps(out))
"""


def test_commands_without_video_or_plots_import_no_video_model_or_plot_library(corpus, tmp_path):
    runs = [["--help"], ["train", "--help"], ["probe", "--help"], ["reproduce", "--help"], ["cache", "info", "--help"],
            ["download", "--help"], ["import-zarr", "--help"], ["report", "--help"], ["synth", "--help"],
            ["synth", tmp_path / "s", "--trailers", 30, "--streams", "i_swin"],
            ["cache", "info", "--json", corpus], ["cache", "validate", corpus / "i_swin.h5"],
            ["train", "--data-dir", corpus, "--row", "i_swin", "--max-epochs", 1, "--out", tmp_path / "run"],
            ["report.load"],
            ["probe", "--data-dir", corpus, "--rows", "i_swin,resnet_fusion", "--splits", 0],
            ["reproduce", "--data-dir", corpus, "--rows", "k_r2plus1d", "--splits", 0, "--max-epochs", 1,
             "--out", tmp_path / "res"]]
    runs = [[str(a) for a in args] for args in runs]
    r = subprocess.run([sys.executable, "-c", IMPORTS_AFTER, json.dumps(runs), json.dumps(VIDEO_MODEL_PLOT_LIBS),
                        str(tmp_path / "run")], capture_output=True, text=True, check=False,
                       cwd=Path(__file__).parents[1])
    assert r.returncode == 0, r.stderr[-3000:]
    done = json.loads(r.stdout.strip().splitlines()[-1])
    assert [args for args, _ in done] == runs  # every command ran
    assert {" ".join(args[:2]): libs for args, libs in done if libs} == {}
    assert (tmp_path / "run" / "metrics.json").exists() and (tmp_path / "res" / "tst.csv").exists()
    # The check can fail: a command that does use a video library shows it.
    r = subprocess.run([sys.executable, "-c", IMPORTS_AFTER, json.dumps([["extract", "--help"]]),
                        json.dumps(VIDEO_MODEL_PLOT_LIBS), ""], capture_output=True, text=True, check=True,
                       cwd=Path(__file__).parents[1])
    assert json.loads(r.stdout.strip().splitlines()[-1]) == [[["extract", "--help"], ["av"]]], r.stderr[-2000:]


def one_line_error(r, *parts):
    assert r.exit_code == 1, r.output
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output, r.output
    for part in parts:
        assert part in r.output, r.output


def test_out_under_a_regular_file_is_refused_before_any_work(corpus, tmp_path, monkeypatch):
    from trailers12k_feats.training import reproduce as rep_mod
    from trailers12k_feats.training import train as train_mod

    monkeypatch.setattr(train_mod, "load_streams", lambda *a, **k: pytest.fail("caches loaded before --out checked"))
    monkeypatch.setattr(rep_mod, "_check_inputs", lambda *a, **k: pytest.fail("inputs checked before --out"))
    f = tmp_path / "file"
    f.write_text("x")
    r = run("train", "--data-dir", corpus, "--row", "i_swin", "--max-epochs", 1, "--out", f / "run")
    one_line_error(r, f"Error: run directory {f / 'run'} cannot be created: it would be inside {f}, which is a "
                      f"regular file; choose another --out.")
    r = run("reproduce", "--data-dir", corpus, "--rows", "i_swin", "--splits", 0, "--out", f / "res")
    one_line_error(r, f"output folder {f / 'res'} cannot be created", "regular file")
    r = run("reproduce", "--data-dir", corpus, "--rows", "i_swin", "--splits", 0, "--out", f)
    one_line_error(r, f"output folder {f} cannot be created: {f} is a regular file; choose another --out.")
    r = run("demo", "--out", f / "demo")
    one_line_error(r, f"output folder {f / 'demo'} cannot be created", "regular file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders, so chmod cannot make one "
                                               "(the regular-file case above runs as root too)")
def test_read_only_out_is_refused_before_any_work(corpus, tmp_path, monkeypatch):
    from trailers12k_feats.training import train as train_mod

    monkeypatch.setattr(train_mod, "load_streams", lambda *a, **k: pytest.fail("caches loaded before --out checked"))
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        r = run("train", "--data-dir", corpus, "--row", "i_swin", "--max-epochs", 1, "--out", ro / "sub" / "run")
        one_line_error(r, f"run directory {ro / 'sub' / 'run'} cannot be written: folder {ro} is not writable",
                       "choose another --out")
        r = run("reproduce", "--data-dir", corpus, "--rows", "i_swin", "--splits", 0, "--out", ro)
        one_line_error(r, f"output folder {ro} cannot be written: folder {ro} is not writable")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_absurd_learning_rates_are_refused(corpus, tmp_path):
    for lr in ("inf", "1e6", "nan"):
        r = run("train", "--data-dir", corpus, "--row", "i_swin", "--lr", lr, "--out", tmp_path / "run")
        one_line_error(r, "lr must be a finite number in (0, 1]", "the protocol uses 1e-4")
    assert not (tmp_path / "run").exists()
