import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
from click.testing import CliRunner

from cli import main
from trailers12k_feats.training.probe import ProbeConfig
from trailers12k_feats.training.reproduce import ReproduceConfig
from trailers12k_feats.training.train import TrainConfig


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_synth_and_cache_info(tmp_path):
    r = run("synth", tmp_path / "c", "--trailers", 40, "--streams", "k_r2plus1d,i_swin")
    assert r.exit_code == 0, r.output
    r = run("cache", "info", tmp_path / "c")
    assert r.exit_code == 0 and "i_swin: swin_t (2d, ImageNet-1K), dim 768" in r.output
    assert "40 trailers" in r.output
    r = run("cache", "info", "--json", tmp_path / "c" / "k_r2plus1d.h5")
    assert json.loads(r.output)[0]["feature_dim"] == 512
    assert "ok" in run("cache", "validate", tmp_path / "c").output


def test_train_command(corpus, tmp_path):
    r = run("train", "--data-dir", corpus, "--row", "resnet_fusion", "--split", 1, "--max-epochs", 1,
            "--out", tmp_path / "run")
    assert r.exit_code == 0, r.output
    assert "test uAP" in r.output and (tmp_path / "run" / "metrics.json").exists()
    r = run("train", "--data-dir", corpus, "--row", "i_swin", "--out", tmp_path / "run")
    assert r.exit_code == 1 and "already exists" in r.output


def test_reproduce_and_probe_commands(corpus, tmp_path):
    r = run("reproduce", "--data-dir", corpus, "--rows", "k_r2plus1d", "--splits", "0,2", "--max-epochs", 1,
            "--out", tmp_path / "res")
    assert r.exit_code == 0, r.output
    assert "| R2+1D | 2 |" in r.output and (tmp_path / "res" / "tst.csv").exists()
    r = run("probe", "--data-dir", corpus, "--rows", "i_swin,ik_swin", "--pool", "meanmax")
    assert r.exit_code == 0 and "| Swin-3D | 3 |" in r.output


def test_errors_are_one_clear_line(tmp_path):
    r = run("reproduce", "--data-dir", tmp_path, "--rows", "nope")
    assert r.exit_code == 1
    assert r.output.strip().splitlines() == [
        "Error: unknown Table 6 row 'nope'; valid rows: i_shufflenet, k_shufflenet, shufflenet_fusion, i_resnet, "
        "k_r2plus1d, resnet_fusion, i_swin, ik_swin."]
    r = run("probe", "--data-dir", tmp_path)
    assert r.exit_code == 1 and "mtgc.csv does not exist" in r.output and "Traceback" not in r.output


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
    assert "[bf16|fp32]" in r.output
    # --protocol: train's default from TrainConfig, reproduce's from ReproduceConfig (the paper's).
    for cmd, value in (("train", cfg.protocol), ("reproduce", ReproduceConfig.protocol)):
        line = " ".join(run(cmd, "--help").output.split("--protocol", 1)[1].split("--", 1)[0].split())
        assert f"[default: {value}]" in line and "[authors|masked]" in line, line
    assert (cfg.protocol, ReproduceConfig.protocol) == ("masked", "authors")
    r = run("probe", "--help")
    assert f"[default: {ProbeConfig.alpha:g}]" in " ".join(r.output.split())
    assert "[fp32|bf16|fp16]" in run("extract", "--help").output


def test_cli_imports_the_package_only_in_commands():
    code = ("import sys, cli; heavy = [m for m in sys.modules if m.startswith(('trailers12k_feats.training', "
            "'trailers12k_feats.extraction', 'trailers12k_feats.apps', 'h5py', 'sklearn', 'torchvision'))]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[1]).stdout
    assert out.strip() == "[]"
