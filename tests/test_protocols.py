import csv
import json
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from cli import main
from trailers12k_feats import cache
from trailers12k_feats.apps import report as report_mod
from trailers12k_feats.apps.predict import load_head
from trailers12k_feats.training import data, evaluation, protocols
from trailers12k_feats.training.evaluation import snippet_probs
from trailers12k_feats.training.heads import build_divita
from trailers12k_feats.training.protocols import (
    authors_loss,
    average_probs,
    eval_rows,
    evaluate_snippets,
    masked_loss,
    snippet_logits,
    training_set,
)
from trailers12k_feats.training.reproduce import ReproduceConfig, reproduce
from trailers12k_feats.training.tables import COLUMNS, format_table, summarise
from trailers12k_feats.training.train import TrainConfig, load_streams, train_run
from trailers12k_feats.utils import T12kError

L3 = math.log(3)
# 3 trailers, 2 genres; trailer 0 has two snippets, 1 and 2 one each.
OWNER = torch.tensor([0, 0, 1, 2])
LOGITS = torch.tensor([[0.0, 0.0], [L3, L3], [L3, -L3], [0.0, L3]])
LABELS = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])


def test_authors_loss_by_hand():
    # BCE-with-logits: log(1 + e^-l) for a positive, log(1 + e^l) for a negative;
    # l = 0 -> ln 2, l = ln 3 -> ln 4/3 (positive) or ln 4 (negative), l = -ln 3 positive -> ln 4.
    ln2, ln43, ln4 = math.log(2), math.log(4 / 3), math.log(4)
    batch1 = (ln2 + ln2 + ln43 + ln4 + ln4 + ln4) / 6  # trailers 0 and 1: 3 snippets x 2 genres
    batch2 = (ln2 + ln43) / 2  # trailer 2 alone, the last and smaller batch
    assert authors_loss(OWNER, LOGITS, LABELS, group=2) == pytest.approx((batch1 + batch2) / 2, abs=1e-6)
    # One batch of all trailers: the plain mean over all snippets and genres.
    assert authors_loss(OWNER, LOGITS, LABELS, group=32) == pytest.approx(
        (2 * ln2 + ln43 + 3 * ln4 + ln2 + ln43) / 8, abs=1e-6)


def test_masked_loss_by_hand():
    probs = average_probs(OWNER, LOGITS, 3)
    # sigmoid(0) = 1/2, sigmoid(ln 3) = 3/4: trailer 0 averages (1/2, 1/2) and (3/4, 3/4).
    torch.testing.assert_close(probs, torch.tensor([[0.625, 0.625], [0.75, 0.25], [0.5, 0.75]]))
    want = -(math.log(0.625) + math.log(0.375) + math.log(0.25) + math.log(0.25) + math.log(0.5)
             + math.log(0.75)) / 6
    assert masked_loss(probs, LABELS) == pytest.approx(want, abs=1e-6)


@pytest.fixture(scope="module")
def swin(corpus):
    meta = data.load_metadata(corpus / "mtgc.csv")
    sets, rows = load_streams(meta, {"image": cache.stream_path(corpus, "i_swin")})
    return meta, sets, rows


def model_with_stats(dim, seed=0):
    """A random head in eval mode whose BatchNorm has non-trivial running statistics."""
    torch.manual_seed(seed)
    m = build_divita(dim, None)
    m.image.norm.running_mean.normal_()
    m.image.norm.running_var.uniform_(0.5, 2.0)
    return m.eval()


def test_authors_loss_is_the_mean_of_batch_losses_in_metadata_order(swin):
    meta, sets, rows = swin
    val = data.TrailerData.from_metadata(meta, sets, meta.subset(0, "val"))
    assert len(val) % 32  # a smaller last batch
    model = model_with_stats(768)
    loss, _ = evaluate_snippets(model, val, "authors", window=30, group=32)
    # The authors' validation_step, batch by batch: every snippet of 32 trailers, zero padding seen as clips.
    losses = []
    with torch.no_grad():
        for s in range(0, len(val), 32):
            owner, first = val.snippets(torch.arange(s, min(s + 32, len(val))), 30)
            b = val.gather(owner, first, 30, torch.float32)
            full = torch.ones_like(b.mask)
            losses.append(F.binary_cross_entropy_with_logits(model(ix=b.x["image"], ix_mask=full), b.y).item())
    assert loss == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    masked, probs = evaluate_snippets(model, val, "masked", window=30, group=32)
    assert masked == pytest.approx(masked_loss(probs, val.labels)) and masked != loss


def test_padded_snippet_leaks_in_authors_mode_only(swin):
    meta, sets, rows = swin
    d = data.TrailerData.from_metadata(meta, sets, rows)
    pick = [i for i, n in enumerate(d.lengths.tolist()) if n > 30 and n % 30][:3]  # last snippet padded
    pick += [i for i, n in enumerate(d.lengths.tolist()) if n < 30][:2]  # one padded snippet only
    d = d.subset(torch.tensor(pick))
    model = model_with_stats(768)
    real = d.lengths % 30  # (n,) real clips in each trailer's last snippet
    with torch.no_grad():  # each last snippet's real clips alone, without padding
        b = d.gather(torch.arange(len(d)), d.lengths - real, int(real.max()), torch.float32)
        alone = torch.stack([model(ix=b.x["image"][i:i + 1, :r], ix_mask=b.mask[i:i + 1, :r])[0]
                             for i, r in enumerate(real.tolist())])  # (n, 10)
    last = torch.cumsum((d.lengths + 29) // 30, 0) - 1  # (n,) index of each trailer's last snippet
    _, masked = snippet_logits(model, d, 30, "masked")
    torch.testing.assert_close(masked[last], alone, atol=1e-4, rtol=1e-4)
    _, authors = snippet_logits(model, d, 30, "authors")
    assert ((authors[last] - alone).abs().amax(1) > 1e-2).all()  # the zeros count as clips
    full = torch.ones(len(authors), dtype=torch.bool)
    full[last] = False  # snippets without padding are the same in both modes
    torch.testing.assert_close(authors[full], masked[full], atol=1e-5, rtol=1e-5)


def test_evaluation_passes_are_sized_by_bytes_on_the_cpu(swin, monkeypatch):
    meta, sets, rows = swin
    val = data.TrailerData.from_metadata(meta, sets, meta.subset(0, "val"))
    model = model_with_stats(768)
    owner, whole = snippet_logits(model, val, 30, "authors", eval_batch_size=4096)
    assert eval_rows(4096, val, 30) == protocols.EVAL_BLOCK_BYTES // (30 * 768 * 4)
    assert eval_rows(8, val, 30) == 8 and eval_rows(4096, val, 30, runs=3) == eval_rows(4096, val, 30) // 3
    monkeypatch.setattr(protocols, "EVAL_BLOCK_BYTES", 7 * 30 * 768 * 4)  # passes of 7 snippets
    assert eval_rows(4096, val, 30) == 7 and eval_rows(4096, val, 30, runs=8) == 1
    owner7, passes = snippet_logits(model, val, 30, "authors", eval_batch_size=4096)
    assert torch.equal(owner7, owner) and len(owner) > 7
    torch.testing.assert_close(passes, whole, atol=1e-5, rtol=1e-5)  # snippets are independent


def test_authors_mode_leaves_short_training_trailers_out(swin, caplog):
    meta, sets, rows = swin
    train = data.TrailerData.from_metadata(meta, sets, meta.subset(0, "train"))
    short = int((train.lengths < 30).sum())
    assert short > 0
    with caplog.at_level(logging.INFO):
        kept, n = training_set(train, "authors", 30)
    assert n == short and len(kept) == len(train) - short and bool((kept.lengths >= 30).all())
    assert f"{short} of {len(train)} training trailers have fewer than 30 clips and are left out" in caplog.text
    assert kept.ids == [t for t, k in zip(train.ids, (train.lengths >= 30).tolist()) if k]
    same, n = training_set(train, "masked", 30)
    assert same is train and n == 0
    with pytest.raises(T12kError, match="every training trailer has fewer than 500 clips.*--protocol masked"):
        training_set(train, "authors", 500)


@pytest.mark.parametrize("protocol", ["authors", "masked"])
def test_same_seed_same_history(swin, tmp_path, protocol):
    meta, sets, rows = swin
    cfg = TrainConfig(max_epochs=2, seed=5, protocol=protocol)
    a = train_run(cfg, meta, sets, rows, tmp_path / "run", progress=False)
    b = train_run(cfg, meta, sets, rows, progress=False)
    drop = ("seconds",)
    assert [{k: v for k, v in h.items() if k not in drop} for h in a.history] == \
           [{k: v for k, v in h.items() if k not in drop} for h in b.history]
    assert a.test == b.test
    info = json.loads((tmp_path / "run" / "config.json").read_text())
    n_train = len(meta.subset(0, "train"))
    left_out = int((data.TrailerData.from_metadata(meta, sets, meta.subset(0, "train")).lengths < 30).sum())
    assert info["config"]["protocol"] == protocol
    assert info["short_train_trailers_left_out"] == (left_out if protocol == "authors" else 0)
    assert info["trailers"]["train"] == n_train - info["short_train_trailers_left_out"]
    # A saved run predicts as it was evaluated: the protocol comes back from config.json.
    head = load_head(tmp_path / "run")
    assert head.train.protocol == protocol
    assert head.model.image.temporal.block.dropout_at == ("after_norm" if protocol == "authors" else "residual")
    preds = [r for r in csv.reader(open(tmp_path / "run" / "predictions.csv")) if r[0] == "test"]
    probs = snippet_probs(head.model, data.TrailerData([r[1] for r in preds], sets), head.train)  # (n, 10)
    torch.testing.assert_close(probs, torch.tensor([[float(v) for v in r[2:]] for r in preds]), rtol=0, atol=2e-6)


def test_protocols_differ(swin):
    meta, sets, rows = swin
    a = train_run(TrainConfig(max_epochs=1, protocol="authors"), meta, sets, rows, progress=False)
    m = train_run(TrainConfig(max_epochs=1, protocol="masked"), meta, sets, rows, progress=False)
    assert a.history[0]["val_loss"] != m.history[0]["val_loss"]


@pytest.mark.parametrize("protocol", ["authors", "masked"])
def test_non_finite_validation_loss(swin, monkeypatch, caplog, protocol):
    meta, sets, rows = swin
    real, calls = evaluation.evaluate_snippets, []

    def evaluate(*a, **k):
        loss, probs = real(*a, **k)
        calls.append(1)
        return (float("nan") if len(calls) == 2 else loss), probs

    monkeypatch.setattr(evaluation, "evaluate_snippets", evaluate)
    cfg = TrainConfig(max_epochs=5, protocol=protocol)
    if protocol == "masked":
        with pytest.raises(T12kError, match="validation loss is nan at epoch 2; training diverged"):
            train_run(cfg, meta, sets, rows, progress=False)
        return
    with caplog.at_level(logging.WARNING):
        res = train_run(cfg, meta, sets, rows, progress=False)  # stops, as the authors' EarlyStopping does
    assert res.epochs == 2 and res.best_epoch == 1 and "stopping and keeping epoch 1" in caplog.text


def test_bad_protocol():
    with pytest.raises(T12kError, match="unknown protocol 'paper'; valid: authors, masked"):
        TrainConfig(protocol="paper")


def rep(corpus, out, **kw):
    return ReproduceConfig(metadata=corpus / "mtgc.csv", cache_dir=corpus, out_dir=out, rows=("k_r2plus1d",),
                           train=TrainConfig(max_epochs=1), **kw)


def test_reproduce_defaults_to_the_authors_protocol(tmp_path):
    assert ReproduceConfig(tmp_path, tmp_path).train.protocol == "authors"
    assert ReproduceConfig(tmp_path, tmp_path, protocol="masked").train.protocol == "masked"
    assert TrainConfig().protocol == "masked"


def test_results_folder_keeps_one_protocol(corpus, tmp_path):
    out = tmp_path / "res"
    table = reproduce(rep(corpus, out, splits=(0,)), progress=False)
    assert json.loads((out / "reproduce_config.json").read_text())["protocol"] == "authors"
    assert "Protocol" not in table and "Protocol" not in (out / "summary.md").read_text()
    assert {r["protocol"] for r in csv.DictReader(open(out / "summary.csv"))} == {"authors"}
    info = json.loads((out / "runs" / "k_r2plus1d" / "split0" / "config.json").read_text())
    assert info["config"]["protocol"] == "authors"
    with pytest.raises(T12kError, match=r"other training settings \(protocol\)"):
        reproduce(rep(corpus, out, splits=(1,), protocol="masked"), progress=False)
    page = report_mod._metrics_html(report_mod.load(out))  # the report says which protocol
    assert "protocol authors." in page and "differs" not in page
    assert "protocol authors;" in report_mod._metrics_html(report_mod.load(out / "runs" / "k_r2plus1d" / "split0"))


def test_results_folder_without_protocol_is_masked(corpus, tmp_path):
    out = tmp_path / "res"
    reproduce(rep(corpus, out, splits=(0,), protocol="masked"), progress=False)
    path = out / "reproduce_config.json"
    settings = json.loads(path.read_text())
    del settings["protocol"]  # as written before the protocol was recorded
    path.write_text(json.dumps(settings))
    with pytest.raises(T12kError, match=r"other training settings \(protocol\)"):
        reproduce(rep(corpus, out, splits=(0, 1)), progress=False)
    table = reproduce(rep(corpus, out, splits=(0,), protocol="masked"), progress=False)  # resumes: all done
    assert table.splitlines()[2].startswith("Protocol masked: differs from the paper's")
    assert "protocol masked. Protocol masked: differs" in report_mod._metrics_html(report_mod.load(out))


def test_masked_table_says_its_protocol_differs():
    lines = [{"run": "ik_swin", "split": k, "epoch": 1, **{c: 70.0 + k for c in COLUMNS[3:]}} for k in range(2)]
    s = summarise(lines)
    assert format_table(s, protocol="authors") == format_table(s)  # the paper's protocol: today's table
    masked = format_table(s, protocol="masked").splitlines()
    assert masked[:4] == [format_table(s).splitlines()[0], "",
                          "Protocol masked: differs from the paper's (the authors' code, --protocol authors), so "
                          "the paper's numbers are not the same measurement.", ""]
    assert masked[4:] == format_table(s).splitlines()[2:]
    assert "75.71±2.43" in masked[-1]  # the paper's numbers still beside ours


def test_cli_protocol(corpus, tmp_path):
    runner = CliRunner()
    r = runner.invoke(main, ["reproduce", "--data-dir", str(corpus), "--rows", "k_r2plus1d", "--splits", "0",
                             "--max-epochs", "1", "--protocol", "masked", "--out", str(tmp_path / "res")])
    assert r.exit_code == 0, r.output
    assert "Protocol masked: differs from the paper's" in r.output and "71.76±2.72" in r.output
    r = runner.invoke(main, ["train", "--data-dir", str(corpus), "--row", "k_r2plus1d", "--max-epochs", "1",
                             "--protocol", "authors", "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "run" / "config.json").read_text())["config"]["protocol"] == "authors"
    r = runner.invoke(main, ["train", "--protocol", "paper", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "'paper' is not one of 'authors', 'masked'" in r.output
