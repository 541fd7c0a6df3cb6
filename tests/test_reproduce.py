import csv
import dataclasses
import json
import shutil

import h5py
import numpy as np
import pytest

from trailers12k_feats import cache
from trailers12k_feats.paper import TABLE6, get_row
from trailers12k_feats.training import data
from trailers12k_feats.training.reproduce import ReproduceConfig, reproduce
from trailers12k_feats.training.tables import COLUMNS, format_table, summarise
from trailers12k_feats.training.train import TrainConfig
from trailers12k_feats.utils import T12kError

FAST = TrainConfig(max_epochs=1)


def config(corpus, out, **kw):
    kw.setdefault("rows", ("k_r2plus1d", "resnet_fusion"))
    kw.setdefault("splits", (0, 1))
    kw.setdefault("train", FAST)
    kw.setdefault("jobs", 1)  # in this process, where the tests' patches apply
    return ReproduceConfig(metadata=corpus / "mtgc.csv", cache_dir=corpus, out_dir=out, **kw)


def read(path):
    return list(csv.DictReader(open(path)))


@pytest.mark.slow
def test_reproduce_writes_tables_and_resumes(corpus, tmp_path, monkeypatch):
    out = tmp_path / "res"
    table = reproduce(config(corpus, out), progress=False)
    assert "R2+1D" in table and "ResNet-Fusion" in table and "71.76±2.72" in table  # paper beside ours
    tst = read(out / "tst.csv")
    assert [(r["run"], r["split"]) for r in tst] == [("k_r2plus1d", "0"), ("k_r2plus1d", "1"),
                                                      ("resnet_fusion", "0"), ("resnet_fusion", "1")]
    assert list(tst[0]) == ["run", "split", "epoch", "uAP", "mAP", "wAP", "sAP",
                            "act", "adv", "com", "cri", "dra", "fan", "hor", "rom", "sci", "thr"]
    assert len(read(out / "val.csv")) == 4
    summary = read(out / "summary.csv")
    row = next(r for r in summary if r["run"] == "k_r2plus1d" and r["subset"] == "test" and r["metric"] == "uAP")
    x = [float(r["uAP"]) for r in tst if r["run"] == "k_r2plus1d"]
    assert float(row["mean"]) == pytest.approx(np.mean(x), abs=1e-3)
    assert float(row["std"]) == pytest.approx(np.std(x, ddof=1), abs=1e-3)
    assert row["paper_mean"] == "71.76"

    # A second call with one more split trains only the new runs.
    from trailers12k_feats.training import reproduce as rep_mod
    calls = []
    real = rep_mod.train_run
    monkeypatch.setattr(rep_mod, "train_run", lambda cfg, *a, **k: calls.append(cfg.split) or real(cfg, *a, **k))
    reproduce(config(corpus, out, splits=(0, 1, 2)), progress=False)
    assert calls == [2, 2]
    assert len(read(out / "tst.csv")) == 6


def test_interrupted_reproduce_keeps_only_finished_runs(corpus, tmp_path, monkeypatch):
    from trailers12k_feats.training import train as train_mod

    real, count = train_mod.Trainer.fit, []

    def fit(self, *a, **k):
        if count:
            raise KeyboardInterrupt  # the second run is killed mid-training
        count.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(train_mod.Trainer, "fit", fit)
    out = tmp_path / "res"
    with pytest.raises(KeyboardInterrupt):
        reproduce(config(corpus, out, rows=("k_r2plus1d",), group=False), progress=False)  # runs one at a time
    assert [p.name for p in (out / "runs" / "k_r2plus1d").iterdir()] == ["split0"]
    assert len(read(out / "tst.csv")) == 1


def test_settings_change_is_refused(corpus, tmp_path):
    out = tmp_path / "res"
    reproduce(config(corpus, out, rows=("k_r2plus1d",), splits=(0,)), progress=False)
    with pytest.raises(T12kError, match=r"other training settings \(temporal\)"):
        reproduce(config(corpus, out, rows=("k_r2plus1d",), splits=(1,), train=TrainConfig(max_epochs=1, temporal="savg")),
                  progress=False)


def test_unknown_row(corpus, tmp_path):
    with pytest.raises(T12kError, match="unknown Table 6 row 'swin4d'; valid rows: i_shufflenet"):
        config(corpus, tmp_path, rows=("swin4d",))
    assert get_row("Swin-3D") is TABLE6["ik_swin"]


@pytest.fixture
def corpus_copy(corpus, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(corpus, dst)
    return dst


def test_missing_cache(corpus_copy, tmp_path):
    (corpus_copy / "k_r2plus1d.h5").unlink()
    with pytest.raises(T12kError, match="k_r2plus1d.h5 does not exist"):
        reproduce(config(corpus_copy, tmp_path / "res"), progress=False)
    assert not (tmp_path / "res" / "runs").exists()


def test_cache_with_wrong_dim(corpus_copy, tmp_path):
    shutil.copy(corpus_copy / "i_swin.h5", corpus_copy / "k_r2plus1d.h5")
    with pytest.raises(T12kError, match="has feature dim 768 but stream k_r2plus1d has dim 512"):
        reproduce(config(corpus_copy, tmp_path / "res"), progress=False)


def test_fusion_row_with_other_clips_is_refused_before_any_run(corpus_copy, tmp_path):
    with h5py.File(corpus_copy / "k_r2plus1d.h5", "r+") as h5:
        h5.attrs["segmentation"] = "fixed"
    with pytest.raises(T12kError, match="segmentation is shots in .*i_resnet.h5 but fixed in .*k_r2plus1d.h5"):
        reproduce(config(corpus_copy, tmp_path / "res", rows=("k_r2plus1d", "resnet_fusion")), progress=False)
    assert not (tmp_path / "res").exists()
    cfg = config(corpus_copy, tmp_path / "res", rows=("resnet_fusion",), splits=(0,), allow_mismatched_clips=True)
    reproduce(cfg, progress=False)
    # The flag is no training setting: the results folder records the same settings either way.
    assert "allow_mismatched_clips" not in (tmp_path / "res" / "reproduce_config.json").read_text()
    reproduce(dataclasses.replace(cfg, allow_mismatched_clips=False, splits=(0,)), progress=False)  # all done


def test_cache_with_foreign_ids(corpus_copy, tmp_path):
    meta = data.load_metadata(corpus_copy / "mtgc.csv")
    data.write_metadata(corpus_copy / "mtgc.csv", [f"x{t}" for t in meta.ids], meta.labels, meta.splits)
    with pytest.raises(T12kError, match="no trailer id of cache .* is in"):
        reproduce(config(corpus_copy, tmp_path / "res"), progress=False)


def test_cache_missing_some_trailers(corpus_copy, tmp_path):
    meta = data.load_metadata(corpus_copy / "mtgc.csv")
    ids = meta.ids[:-1] + ["tt9999999"]
    data.write_metadata(corpus_copy / "mtgc.csv", ids, meta.labels, meta.splits)
    with pytest.raises(T12kError, match="1 trailers of .* are missing from cache .*tt9999999.*--on-missing warn"):
        reproduce(config(corpus_copy, tmp_path / "res"), progress=False)
    reproduce(config(corpus_copy, tmp_path / "res", rows=("k_r2plus1d",), splits=(0,), on_missing="warn"),
              progress=False)


def test_nan_features(corpus_copy, tmp_path):
    with h5py.File(corpus_copy / "i_resnet.h5", "r+") as h5:
        h5["features"][10, 3] = np.nan
        del h5.attrs[cache.FINITE]  # no record that a writer checked the values: they are scanned before any run
    with pytest.raises(T12kError, match="i_resnet.h5: trailer tt.* has NaN or Inf"):
        reproduce(config(corpus_copy, tmp_path / "res"), progress=False)
    assert not (tmp_path / "res" / "runs").exists()


def test_empty_split(corpus_copy, tmp_path):
    meta = data.load_metadata(corpus_copy / "mtgc.csv")
    splits = meta.splits.copy()
    splits[splits[:, 1] == 1, 1] = 0
    data.write_metadata(corpus_copy / "mtgc.csv", meta.ids, meta.labels, splits)
    with pytest.raises(T12kError, match="the val set of split1 is empty"):
        reproduce(config(corpus_copy, tmp_path / "res"), progress=False)


def test_markdown_table_layout():
    lines = [{"run": run, "split": k, "epoch": 1, **{c: v + k for c in COLUMNS[3:]}}
             for run, v, n in (("ik_swin", 70.0, 2), ("mine", 50.5, 1)) for k in range(n)]
    assert format_table(summarise(lines)).splitlines() == [
        "Table 6 (test, mean ± sample std over splits, x100)",
        "",
        "| Row | splits | uAP ours | mAP ours | wAP ours | sAP ours | uAP paper | mAP paper | wAP paper | sAP paper |",
        "|---|---|---|---|---|---|---|---|---|---|",
        "| Swin-3D | 2 | 70.50±0.71 | 70.50±0.71 | 70.50±0.71 | 70.50±0.71 | 75.71±2.43 | 70.44±2.10 | 74.30±2.11 "
        "| 80.19±2.61 |",
        "| mine | 1 | 50.50      | 50.50      | 50.50      | 50.50      |  |  |  |  |",
    ]


def test_summarise_single_split_has_no_std():
    s = summarise([{"run": "a", "split": 0, "epoch": 1, **{k: 1.0 for k in ("uAP", "mAP", "wAP", "sAP", "act", "adv",
                                                                                "com", "cri", "dra", "fan", "hor",
                                                                                "rom", "sci", "thr")}}])
    assert s["a"]["uAP"][2] == 1 and np.isnan(s["a"]["uAP"][1])


def test_results_folder_records_its_data_and_refuses_other_data(corpus, tmp_path):
    import json

    from trailers12k_feats.sources.synthetic import SynthConfig, make_corpus

    out = tmp_path / "res"
    reproduce(config(corpus, out, rows=("k_r2plus1d",), splits=(0,)), progress=False)
    recorded = json.loads((out / "data.json").read_text())
    assert recorded["metadata"]["path"] == str((corpus / "mtgc.csv").resolve())
    k = recorded["caches"]["k_r2plus1d"]
    assert (k["trailers"], k["feature_dim"], k["dtype"]) == (300, 512, "float16") and len(k["sha256"]) == 64
    before = (out / "tst.csv").read_text()

    # Another corpus: the missing run would be trained on other data, so nothing runs.
    other = tmp_path / "other"
    make_corpus(other, SynthConfig(num_trailers=60, seed=7, streams=("k_r2plus1d",)), progress=False)
    with pytest.raises(T12kError, match=r"holds runs trained on other data: metadata .*other/mtgc.csv differs "
                                        r".*; cache .*other/k_r2plus1d.h5 of stream k_r2plus1d differs from the recorded .* in trailers \(300 -> 60\), .*"
                                        r"choose another --out or delete it"):
        reproduce(config(other, out, rows=("k_r2plus1d",), splits=(0, 1)), progress=False)
    assert not (out / "runs" / "k_r2plus1d" / "split1").exists() and (out / "tst.csv").read_text() == before

    # Same shape, other values: only the content fingerprint tells them apart.
    changed = tmp_path / "changed"
    changed.mkdir()
    for name in ("mtgc.csv", "k_r2plus1d.h5"):
        shutil.copy(corpus / name, changed / name)
    with h5py.File(changed / "k_r2plus1d.h5", "r+") as h5:
        h5["features"][0] = h5["features"][0] + 1
        for name in ("pool_mean", "pool_max"):  # summaries of the old values: a stale pair is refused on its own
            del h5[name]
    with pytest.raises(T12kError, match=r"stream k_r2plus1d differs .* content \(sha256 "):
        reproduce(config(changed, out, rows=("k_r2plus1d",), splits=(0, 1)), progress=False)

    # Other metadata with the same caches.
    meta = data.load_metadata(changed / "mtgc.csv")
    shutil.copy(corpus / "k_r2plus1d.h5", changed / "k_r2plus1d.h5")
    data.write_metadata(changed / "mtgc.csv", meta.ids, np.roll(meta.labels, 1, axis=0), meta.splits)
    with pytest.raises(T12kError, match=r"holds runs trained on other data: metadata .*changed/mtgc.csv differs "
                                        r"from the recorded .*corpus.*/mtgc.csv in content \(sha256 [0-9a-f]{12} -> "
                                        r"[0-9a-f]{12}\); point --data-dir .*choose another --out or delete it.$"):
        reproduce(config(changed, out, rows=("k_r2plus1d",), splits=(0, 1)), progress=False)
    assert not (out / "runs" / "k_r2plus1d" / "split1").exists()


@pytest.mark.slow
def test_same_data_elsewhere_is_accepted_and_old_folders_record_their_data(corpus, tmp_path, caplog):
    import json
    import logging

    out = tmp_path / "res"
    reproduce(config(corpus, out, rows=("k_r2plus1d",), splits=(0,)), progress=False)
    k = json.loads((out / "data.json").read_text())["caches"]["k_r2plus1d"]

    # The same data in another folder is the same data.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for name in ("mtgc.csv", "k_r2plus1d.h5"):
        shutil.copy(corpus / name, elsewhere / name)
    reproduce(config(elsewhere, out, rows=("k_r2plus1d",), splits=(0, 1)), progress=False)
    assert (out / "runs" / "k_r2plus1d" / "split1" / "metrics.json").exists()

    # Finished runs are re-tabulated without their data.
    reproduce(config(tmp_path / "gone", out, rows=("k_r2plus1d",), splits=(0, 1)), progress=False)

    (out / "data.json").write_text("[]")
    with pytest.raises(T12kError, match=r"data.json cannot be read \(not an object.*choose another --out or delete"):
        reproduce(config(corpus, out, rows=("k_r2plus1d",), splits=(2,)), progress=False)

    # A folder made before results folders recorded their data: recorded on the first rerun, with a log line.
    (out / "data.json").unlink()
    with caplog.at_level(logging.INFO):
        reproduce(config(corpus, out, rows=("k_r2plus1d",), splits=(0, 1, 2)), progress=False)
    assert "has no data.json" in caplog.text and "2 finished runs" in caplog.text
    assert json.loads((out / "data.json").read_text())["caches"]["k_r2plus1d"]["sha256"] == k["sha256"]


def test_unwritable_results_folder_is_refused_before_any_work(corpus, tmp_path, monkeypatch):
    from trailers12k_feats.training import reproduce as rep_mod

    monkeypatch.setattr(rep_mod, "_check_inputs", lambda *a: pytest.fail("inputs checked before the output"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(T12kError, match=r"output folder .*file/res cannot be created: it would be inside "
                                        r".*file, which is a regular file; choose another --out"):
        reproduce(config(corpus, tmp_path / "file" / "res"), progress=False)
    with pytest.raises(T12kError, match=r"output folder .*file cannot be created: .*file is a regular file"):
        reproduce(config(corpus, tmp_path / "file"), progress=False)


def test_auto_resumes_in_the_precision_of_the_runs_and_records_it(corpus, tmp_path, fake_probe):
    out = tmp_path / "res"
    reproduce(config(corpus, out, rows=("k_r2plus1d",), splits=(0,)), progress=False)
    assert json.loads((out / "reproduce_config.json").read_text())["precision"] == "fp32"
    run0 = json.loads((out / "runs" / "k_r2plus1d" / "split0" / "config.json").read_text())
    assert run0["config"]["precision"] == "fp32" and run0["precision"]["requested"] == "auto"
    assert "bf16 matmul 144 GFLOP/s vs fp32 259 GFLOP/s" in run0["precision"]["reason"]

    # The probe now favours bf16 (another machine, say): auto goes on in the runs' fp32...
    fake_probe.figures.update(bf16=2400.0)
    fake_probe.path.unlink()  # measured again
    reproduce(config(corpus, out, rows=("k_r2plus1d",), splits=(1,)), progress=False)
    run1 = json.loads((out / "runs" / "k_r2plus1d" / "split1" / "config.json").read_text())
    assert run1["config"]["precision"] == "fp32"
    assert run1["precision"]["reason"] == f"resuming the runs in {out}, made in fp32"
    # ...a fresh folder takes bf16, and asking for bf16 in the fp32 folder is refused.
    reproduce(config(corpus, tmp_path / "new", rows=("k_r2plus1d",), splits=(0,)), progress=False)
    assert json.loads((tmp_path / "new" / "reproduce_config.json").read_text())["precision"] == "bf16"
    with pytest.raises(T12kError, match=r"other training settings \(precision\)"):
        reproduce(config(corpus, out, rows=("k_r2plus1d",), splits=(2,), train=TrainConfig(max_epochs=1,
                                                                                           precision="bf16")),
                  progress=False)


def test_rows_in_parallel_processes_give_the_same_tables(corpus, tmp_path):
    train = TrainConfig(max_epochs=1, precision="fp32")
    one = reproduce(config(corpus, tmp_path / "one", train=train, jobs=1), progress=False)
    two = reproduce(config(corpus, tmp_path / "two", train=train, jobs=2), progress=False)
    assert one == two
    assert read(tmp_path / "one" / "tst.csv") == read(tmp_path / "two" / "tst.csv")
    assert json.loads((tmp_path / "two" / "data.json").read_text())["caches"].keys() == {
        "k_r2plus1d", *get_row("resnet_fusion").streams}


def test_rows_that_end_leave_their_cores_to_the_rows_still_training():
    from trailers12k_feats.training.processes import share_threads

    assert [share_threads(2, 2, left) for left in (8, 3, 2, 1)] == [1, 1, 1, 2]  # queued rows: a core each
    assert [share_threads(16, 3, left) for left in (5, 3, 2, 1)] == [5, 5, 8, 16]
    assert share_threads(1, 2, 2) == 1 and share_threads(4, 2, 0) == 4  # one at least; none left: all


def test_rows_at_once_follow_cores_memory_and_device(corpus, tmp_path, monkeypatch):
    from trailers12k_feats.training import reproduce as rep_mod

    rows = ("k_r2plus1d", "resnet_fusion", "i_swin")
    biggest = max(rep_mod._row_cost(config(corpus, tmp_path), r) for r in rows)  # resnet_fusion: two caches
    monkeypatch.setattr(rep_mod, "usable_cores", lambda: 16)
    monkeypatch.setattr(rep_mod, "available_memory", lambda: 100 * biggest)
    cpu = config(corpus, tmp_path, rows=rows, jobs=0, train=dataclasses.replace(FAST, precision="fp32"))
    assert rep_mod.job_count(cpu, rows) == 3  # a process per core, no more than the rows
    monkeypatch.setattr(rep_mod, "usable_cores", lambda: 4)
    assert rep_mod.job_count(cpu, rows) == 3
    monkeypatch.setattr(rep_mod, "available_memory", lambda: int(2.5 * biggest / rep_mod.MEMORY_SHARE))
    assert rep_mod.job_count(cpu, rows) == 2  # as many of the largest row's caches as fit in RAM
    for precision in ("bf16", "auto"):  # "auto" may pick bf16
        bf16 = config(corpus, tmp_path, rows=rows, jobs=0, train=dataclasses.replace(FAST, precision=precision))
        assert rep_mod.job_count(bf16, rows) == 1  # a group gathering centred clips holds its caches twice
        assert rep_mod.job_count(dataclasses.replace(bf16, group=False), rows) == 2
    monkeypatch.setattr(rep_mod, "available_memory", lambda: 0)
    assert rep_mod.job_count(cpu, rows) == 1  # one at least
    assert rep_mod.job_count(config(corpus, tmp_path, rows=rows, jobs=8), rows) == 3  # asked for: up to the rows
