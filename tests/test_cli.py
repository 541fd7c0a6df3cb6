import json

from click.testing import CliRunner

from cli import main


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
