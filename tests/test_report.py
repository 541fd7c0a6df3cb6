import json
import re
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from matplotlib.image import imread

from cli import main
from trailers12k_feats import cache
from trailers12k_feats.apps import plots
from trailers12k_feats.apps import report as report_mod
from trailers12k_feats.apps.report import figures, load, write_report
from trailers12k_feats.training import data
from trailers12k_feats.training.reproduce import ReproduceConfig, reproduce
from trailers12k_feats.training.train import TrainConfig, load_streams, train_run
from trailers12k_feats.utils import T12kError

ROWS = ("k_r2plus1d", "i_swin")


@pytest.fixture(scope="module")
def results(corpus, tmp_path_factory):
    """A results folder: 2 rows x 2 splits, 2 epochs each (read-only: copy before modifying)."""
    out = tmp_path_factory.mktemp("report") / "res"
    reproduce(ReproduceConfig(metadata=corpus / "mtgc.csv", cache_dir=corpus, out_dir=out, rows=ROWS, splits=(0, 1),
                              train=TrainConfig(max_epochs=2, lr=1e-3)), progress=False)
    return out


def check_page(index):
    """Every PNG is a real, non-blank image and the page links exactly the PNGs of its folder."""
    folder = index.parent
    pngs = sorted(p.name for p in folder.glob("*.png"))
    assert pngs and sorted(p.name for p in folder.iterdir()) == sorted(pngs + ["index.html"])
    for name in pngs:
        assert (folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        img = imread(folder / name)
        assert img.shape[0] > 300 and img.shape[1] > 600 and img[..., :3].std() > 0.05, name
    page = index.read_text()
    assert sorted(re.findall(r'src="([^"]+)"', page)) == pngs
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    return pngs, page


def test_report_of_results_folder(results, tmp_path):
    res = tmp_path / "res"
    shutil.copytree(results, res)
    index = write_report(res)
    assert index == res / "report" / "index.html"
    pngs, page = check_page(index)
    assert pngs == sorted(["table6.png", "genre_ap.png", *(f"{k}_{r}.png" for k in ("pr", "training") for r in ROWS)])
    assert "R2+1D" in page and "71.76 ± 2.72" in page  # our summary beside the paper's Table 6
    assert not [p for p in res.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_loaded_data_match_the_files(results):
    obj = load(results)
    assert [(r.row, r.split) for r in obj.runs] == [(r, s) for r in ROWS for s in (0, 1)]
    run = obj.runs[0]
    metrics = json.loads((run.path / "metrics.json").read_text())
    from trailers12k_feats.training.metrics import multilabel_metrics
    # Labels joined from the metadata + saved probabilities give back the saved metrics.
    m = multilabel_metrics(run.labels["test"], run.probs["test"])
    assert m["uAP"] == pytest.approx(metrics["test"]["uAP"], abs=1e-3)
    assert len(run.history) == 2 and {"train_loss", "val_loss", "val_uAP"} <= run.history[0].keys()
    assert obj.summary["i_swin"]["uAP"][2] == 2


def test_report_of_run_directory_via_cli(results, tmp_path):
    r = CliRunner().invoke(main, ["report", str(results / "runs" / "i_swin" / "split1"), "--out", str(tmp_path / "r")],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert f"report written to {tmp_path / 'r' / 'index.html'}" in r.output
    pngs, page = check_page(tmp_path / "r" / "index.html")
    assert pngs == ["genre_ap.png", "pr_curves.png", "table6.png", "training.png"]
    assert "Swin-2D split1" in page and "72.96 ± 4.17" in page


def test_run_outside_table6_and_escaping(corpus, tmp_path):
    meta = data.load_metadata(corpus / "mtgc.csv")
    roles = {"image": cache.stream_path(corpus, "i_swin"), "video": cache.stream_path(corpus, "k_r2plus1d")}
    sets, rows = load_streams(meta, roles)
    run = tmp_path / "a<b>&c"
    train_run(TrainConfig(max_epochs=1), meta, sets, rows, run, progress=False)
    pngs, page = check_page(write_report(run))
    assert "table6.png" not in pngs  # no Table 6 row uses these streams: nothing to compare with
    assert "a&lt;b&gt;&amp;c split0" in page and "a<b>" not in page


def test_figures_are_the_notebook_api(results):
    figs = figures(load(results))
    assert list(figs)[:2] == ["table6", "genre_ap"]
    fig = figs["genre_ap"]
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["R2+1D (2 splits)", "Swin-2D (2 splits)"]
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any(t.startswith("paper mAP 66.1 (no per-genre values)") for t in legend)


def test_missing_or_garbage_folder(tmp_path):
    with pytest.raises(T12kError, match="does not exist or is not a folder; pass a run directory"):
        write_report(tmp_path / "nope")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    with pytest.raises(T12kError, match="is neither a run directory .* nor a results folder"):
        write_report(tmp_path / "junk")
    (tmp_path / "empty" / "runs").mkdir(parents=True)
    with pytest.raises(T12kError, match="has no finished run under runs/<row>/split<k>/"):
        write_report(tmp_path / "empty")
    r = CliRunner().invoke(main, ["report", str(tmp_path / "junk")])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "junk"]


def test_damaged_run(results, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(results / "runs" / "i_swin" / "split0", run)
    (run / "metrics.json").write_text("{not json")
    with pytest.raises(T12kError, match=r"metrics.json cannot be read .*rerun it or remove it"):
        write_report(run)
    (run / "predictions.csv").unlink()
    with pytest.raises(T12kError, match="lacks predictions.csv; it is not a finished run"):
        write_report(run)


def test_moved_metadata(results, corpus, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(results / "runs" / "i_swin" / "split0", run)
    info = json.loads((run / "config.json").read_text())
    info["metadata"] = str(tmp_path / "gone" / "mtgc.csv")
    (run / "config.json").write_text(json.dumps(info))
    with pytest.raises(T12kError, match="gone/mtgc.csv .* does not exist; pass --metadata"):
        write_report(run)
    check_page(write_report(run, metadata=corpus / "mtgc.csv"))


def test_output_folder_guards(results, tmp_path):
    res = tmp_path / "res"
    shutil.copytree(results, res)
    with pytest.raises(T12kError, match="would replace"):
        write_report(res, tmp_path)
    with pytest.raises(T12kError, match="exists and is not an earlier report"):
        write_report(res, res / "runs")
    assert (res / "runs" / "i_swin" / "split0" / "metrics.json").exists()


def test_failure_leaves_no_half_report(results, tmp_path, monkeypatch):
    res = tmp_path / "run"
    shutil.copytree(results / "runs" / "k_r2plus1d" / "split1", res)
    write_report(res)
    (res / "report" / "old.png").write_bytes(b"x")
    before = sorted(p.name for p in (res / "report").iterdir())

    def boom(*a, **k):
        raise RuntimeError("plot failed")

    monkeypatch.setattr("matplotlib.figure.Figure.savefig", boom)  # report imports matplotlib when drawing
    with pytest.raises(RuntimeError):
        write_report(res)
    assert sorted(p.name for p in (res / "report").iterdir()) == before  # the earlier report is intact
    assert not [p for p in res.iterdir() if p.name.startswith(".")]
    monkeypatch.undo()
    check_page(write_report(res))  # a new report replaces the earlier one whole
    assert not (res / "report" / "old.png").exists()


def test_pr_curves_genre_without_positives():
    y = np.zeros((20, 10))
    y[:10, 0] = 1
    p = np.random.default_rng(0).random((20, 10))
    fig = plots.pr_curves({"test": (y, p)})
    legend = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert legend[0] == "test: no positives"


def test_unwritable_report_folder_is_refused_before_plotting(results, tmp_path, monkeypatch):
    monkeypatch.setattr(report_mod, "figures", lambda *a: pytest.fail("figures drawn before --out was checked"))
    f = tmp_path / "file"
    f.write_text("x")
    r = CliRunner().invoke(main, ["report", str(results), "--out", str(f / "rep")], catch_exceptions=False)
    assert r.exit_code == 1 and r.output.strip().splitlines() == [
        (f"Error: report folder {f / 'rep'} cannot be created: it would be inside {f}, which is a regular file; "
         f"choose another --out.")]
    with pytest.raises(T12kError, match="report folder .*file/rep/deeper cannot be created: it would be inside"):
        write_report(results, f / "rep" / "deeper")
