"""The demo pipeline end to end (videos -> extraction -> heads -> report) and `t12k predict` on its runs."""

import csv
import io
import json

import numpy as np
import pytest
from click.testing import CliRunner

from cli import main
from trailers12k_feats import GENRES
from trailers12k_feats.apps import demo
from trailers12k_feats.apps.predict import PredictConfig, format_predictions, predict
from trailers12k_feats.sources.synthvideo import cut_video
from trailers12k_feats.utils import T12kError


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    res = demo.run(out, demo.DemoConfig(trailers=40, seconds=4, max_epochs=4), progress=False)
    return out, res


@pytest.mark.slow
def test_demo_runs_the_whole_pipeline(pipeline):
    out, res = pipeline
    assert [line.split()[0] for line in res["table"].splitlines()] == ["image", "video", "fusion"]
    for name in ("image", "video", "fusion"):
        assert (out / "runs" / name / "metrics.json").exists()
    assert all(p.exists() and p.name == "index.html" for p in res["reports"])
    # k_shufflenet from a random-weight backbone is not the paper's ShuffleNet-3D: no Table 6 chart.
    assert (out / "runs" / "video" / "report" / "training.png").exists()
    assert not (out / "runs" / "video" / "report" / "table6.png").exists()
    assert demo.HELD_OUT in res["prediction"] and res["truth"]
    cfg = json.loads((out / "runs" / "fusion" / "config.json").read_text())
    assert cfg["streams"]["image"]["features"]["backbone"] == "mobilenet_v2"
    assert cfg["streams"]["image"]["weights"] == "MobileNet_V2_Weights.IMAGENET1K_V1"
    assert cfg["streams"]["video"]["weights"] == "random"


@pytest.mark.slow
def test_predict_equals_the_runs_own_test_predictions(pipeline, tmp_path):
    out, _ = pipeline
    run = out / "runs" / "fusion"
    with open(run / "predictions.csv") as f:
        row = next(r for r in csv.DictReader(f) if r["subset"] == "test")
    video = out / "videos" / f"{row['mid']}.mp4"
    # From the run's own cache, and re-extracted from the video into a fresh folder: same numbers.
    for cache_dir in (None, tmp_path / "fresh"):
        cfg = PredictConfig(run_dir=run, cache_dir=cache_dir)
        if cache_dir is not None:  # hide the run's cache so the video is decoded and embedded again
            cfg = PredictConfig(run_dir=_without_cache(run, tmp_path), cache_dir=cache_dir)
        res = predict([video], cfg, progress=False)
        got = [res["predictions"][0]["probabilities"][g] for g in GENRES]
        np.testing.assert_allclose(got, [float(row[g]) for g in GENRES], atol=1e-4)
    assert (tmp_path / "fresh" / "i_mobilenet.h5").exists()


def _without_cache(run, tmp_path):
    """A copy of a run directory whose recorded cache paths lead nowhere."""
    import shutil

    copy = tmp_path / "run_copy"
    shutil.copytree(run, copy)
    cfg = json.loads((copy / "config.json").read_text())
    for s in cfg["streams"].values():
        s["path"] = str(tmp_path / "gone.h5")
    (copy / "config.json").write_text(json.dumps(cfg))
    return copy


@pytest.mark.slow
def test_predict_command_formats_and_failures(pipeline, tmp_path, caplog):
    from test_video import faststart, truncated

    out, _ = pipeline
    held = out / "held_out" / f"{demo.HELD_OUT}.mp4"
    r = CliRunner().invoke(main, ["predict", str(held), "--run", str(out / "runs" / "video"), "--format", "csv"])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0] == "id,path,clips," + ",".join(GENRES) + ",status,error" and len(lines) == 2
    assert lines[1].startswith(demo.HELD_OUT) and lines[1].endswith(",ok,")

    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"nope" * 10)
    tiny = cut_video(tmp_path / "tiny.mp4", [1], size=(96, 64))  # one frame
    cut = truncated(faststart(held, tmp_path / "whole.mp4"), tmp_path / "cut.mp4")
    inputs = [str(held), str(bad), str(tiny), str(cut)]
    caplog.clear()
    by_format = {}
    for fmt in ("csv", "json", "table"):
        r = CliRunner().invoke(main, ["predict", *inputs, "--run", str(out / "runs" / "video"), "--format", fmt])
        assert r.exit_code == 3, r.output
        by_format[fmt] = r.stdout
        # the reasons go to stderr too, in every format (inputs come in id order, as extraction takes them)
        assert [line.split(": ")[:2] for line in r.stderr.splitlines()][-3:] == \
            [["broken", "failed"], ["cut", "partial"], ["tiny", "failed"]]
    assert not [m for m in caplog.messages if "t12k-predict-" in m]  # nothing names the deleted folder

    rows = list(csv.DictReader(io.StringIO(by_format["csv"])))
    assert [(x["id"], x["status"]) for x in rows] == [("broken", "failed"), ("cut", "partial"), ("tiny", "failed"),
                                                     (demo.HELD_OUT, "ok")]
    broken, partial, short, ok = rows
    assert ok["error"] == "" and all(0 <= float(ok[g]) <= 1 for g in GENRES) and int(ok["clips"]) > 0
    assert "cannot be opened" in broken["error"] and all(broken[g] == "" for g in GENRES) and broken["clips"] == ""
    assert short["error"] == (f"{tiny}: shorter than one clip (8 frames at 24 fps within one shot); one clip of "
                              "this run's settings is the shortest video it can classify")
    assert "--leftover" not in by_format["csv"] + by_format["table"]
    assert "its file declares decode, so the file is truncated or damaged; the probabilities come from the part " \
           "that decoded" in partial["error"] and all(0 <= float(partial[g]) <= 1 for g in GENRES)
    assert 0 < int(partial["clips"]) < int(ok["clips"])

    body = json.loads(by_format["json"])
    assert [(p["id"], p["status"]) for p in body["predictions"]] == [(x["id"], x["status"]) for x in rows]
    assert body["predictions"][0]["probabilities"] == {} and body["predictions"][0]["clips"] is None
    assert [f["id"] for f in body["failures"]] == ["broken", "cut", "tiny"]
    table = by_format["table"].splitlines()
    assert table[0].split()[:3] == ["trailer", "act", "adv"]
    assert [line.split()[0] for line in table[1:]] == ["broken", "cut", "tiny", demo.HELD_OUT]
    assert table[1].split()[:2] == ["broken", "failed:"] and "(partial: " in table[2]
    assert format_predictions(body).splitlines() == table


def test_predict_refuses_runs_without_extraction_provenance(corpus, tmp_path):
    r = CliRunner().invoke(main, ["train", "--data-dir", str(corpus), "--row", "i_swin", "--max-epochs", "1",
                                  "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    with pytest.raises(T12kError, match="not made by `t12k extract`"):
        predict([tmp_path / "x.mp4"], PredictConfig(run_dir=tmp_path / "run"))
    with pytest.raises(T12kError, match="not a finished run directory"):
        PredictConfig(run_dir=tmp_path)
