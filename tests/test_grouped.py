"""Grouped runs (training/grouped.py, training/batched.py): a run trained in a group is the run
trained alone, in fp32 up to the rounding of batched matmuls."""

import csv
import dataclasses
import itertools
import json
import logging

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cli import main
from trailers12k_feats.training import group_runs
from trailers12k_feats.training import grouped as grouped_mod
from trailers12k_feats.training import reproduce as rep_mod
from trailers12k_feats.training.batched import GroupedDivita
from trailers12k_feats.training.data import centred_table
from trailers12k_feats.training.group_rules import group_problem
from trailers12k_feats.training.group_runs import train_group
from trailers12k_feats.training.heads import build_divita, set_dropout_generator
from trailers12k_feats.training.reproduce import ReproduceConfig, reproduce
from trailers12k_feats.training.run_layers import RunBatchNorm, RunLinear
from trailers12k_feats.training.train import (
    TrainConfig,
    _split_data,
    load_streams,
    train_run,
)
from trailers12k_feats.utils import T12kError

TOL = 1e-4  # fp32: a grouped run's validation loss against the run alone
TOY = dict(precision="fp32", batch_size=8, eval_batch_size=16)  # small batches: several steps per epoch


@pytest.fixture
def toy(toy_group):
    return toy_group


def load(toy, fusion=True):
    meta, d = toy
    sets, rows = load_streams(meta, {"image": d / "img.h5", **({"video": d / "vid.h5"} if fusion else {})})
    return meta, sets, rows


def history(path):
    return list(csv.DictReader(open(path / "history.csv")))


HEADS = list(itertools.product(("tsfm", "savg", "conv"), ("late", "early"), ("residual", "after_norm")))


@pytest.mark.parametrize("temporal,fusion,dropout_at", HEADS)
def test_grouped_model_is_each_model(temporal, fusion, dropout_at):
    torch.manual_seed(0)
    models = [build_divita(12, 8, temporal=temporal, fusion=fusion, dropout_at=dropout_at) for _ in range(3)]
    group = GroupedDivita.from_models(models)
    for j, m in enumerate(models):
        set_dropout_generator(m, torch.Generator().manual_seed(j))
    gens = [torch.Generator().manual_seed(j) for j in range(3)]
    ix, vx = torch.randn(3, 4, 30, 12), torch.randn(3, 4, 30, 8)
    mask = torch.ones(3, 4, 30, dtype=torch.bool)
    mask[1, 2, 20:] = mask[0, 0, 3:] = False
    out = group(ix=ix, vx=vx, ix_mask=mask, vx_mask=mask, gens=gens)  # (3, 4, 10)
    out.sum().backward()
    for j, m in enumerate(models):
        alone = m(ix=ix[j], vx=vx[j], ix_mask=mask[j], vx_mask=mask[j])  # same dropout masks, own generator
        alone.sum().backward()
        torch.testing.assert_close(out[j], alone, rtol=0, atol=1e-5)
        for (name, p), gp in zip(m.named_parameters(), group.parameters(), strict=True):
            torch.testing.assert_close(gp.grad[j], p.grad, rtol=0, atol=1e-5, msg=name)
        state = group.run_state(j)  # running statistics updated as the single head's
        assert state.keys() == m.state_dict().keys()
        for k, v in m.state_dict().items():
            torch.testing.assert_close(state[k], v, rtol=0, atol=1e-6, msg=k)
    full = torch.ones(3, 4, 30, dtype=torch.bool)  # mask None: every clip real, no masking pass
    out = group(ix=ix, vx=vx, ix_mask=None, vx_mask=None, gens=gens)
    for j, m in enumerate(models):
        torch.testing.assert_close(out[j], m(ix=ix[j], vx=vx[j], ix_mask=full[j], vx_mask=full[j]), rtol=0, atol=1e-5)
    group.eval()
    idx = torch.tensor([2, 0])  # a subset of the runs, in any order
    out = group(ix=ix[idx], vx=vx[idx], ix_mask=mask[idx], vx_mask=mask[idx], idx=idx)
    for i, j in enumerate(idx.tolist()):
        torch.testing.assert_close(out[i], models[j].eval()(ix=ix[j], vx=vx[j], ix_mask=mask[j], vx_mask=mask[j]),
                                   rtol=0, atol=1e-5)
    layouts = {k: p.stride()[1:] for k, p in group.named_parameters()}
    linears = [m for m in group.modules() if isinstance(m, RunLinear)]
    assert linears and all(m.weight.stride(1) == 1 for m in linears)  # stored (R, in, out)
    group.keep(torch.tensor([1]))  # the others leave: every tensor shrinks to run 1's, laid out as before
    assert group.runs == 1 and all(t.shape[0] == 1 for t in group.state_dict().values())
    assert {k: p.stride()[1:] for k, p in group.named_parameters()} == layouts
    for k, v in models[1].state_dict().items():
        torch.testing.assert_close(group.run_state(0)[k], v, rtol=0, atol=1e-6, msg=k)


def test_grouped_model_under_bf16_autocast_is_each_model_up_to_rounding():
    torch.manual_seed(0)
    models = [build_divita(24, None, dropout=0.0) for _ in range(3)]  # training-mode BatchNorm, no dropout
    group = GroupedDivita.from_models(models)
    x = torch.randn(3, 8, 30, 24) + 3  # features off zero: the centring matters
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = group(ix=x, ix_mask=None).float()  # (3, 8, 10)
        for j, m in enumerate(models):
            alone = m(ix=x[j], ix_mask=torch.ones(8, 30, dtype=torch.bool)).float()
            torch.testing.assert_close(out[j], alone, rtol=0, atol=0.01)  # logits ~0.5: a bf16 rounding or two
    for k, v in models[2].state_dict().items():  # running statistics as the single head's
        torch.testing.assert_close(group.run_state(2)[k].to(v.dtype), v, rtol=1e-3, atol=1e-4, msg=k)


@pytest.mark.parametrize("fusion", ["late", "early"])
def test_clips_stored_less_an_offset_give_what_the_clips_give(fusion):
    # fp32: the offset moves into the BatchNorm-folded bias, so only rounding separates the two
    torch.manual_seed(0)
    models = [build_divita(12, 8, fusion=fusion, dropout=0.0) for _ in range(3)]
    plain, offset = GroupedDivita.from_models(models), GroupedDivita.from_models(models)
    ix, vx = torch.randn(3, 4, 30, 12) + 5, torch.randn(3, 4, 30, 8) - 2  # features off zero
    off = {"image": torch.linspace(3, 6, 12), "video": torch.full((8,), -2.0)}
    mask = torch.ones(3, 4, 30, dtype=torch.bool)
    mask[1, 2, 20:] = mask[0, 0, 3:] = False
    for m in (mask, None):
        a = plain(ix=ix, vx=vx, ix_mask=m, vx_mask=m)  # (3, 4, 10)
        b = offset(ix=ix - off["image"], vx=vx - off["video"], ix_mask=m, vx_mask=m, offsets=off)
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
        a.sum().backward()
        b.sum().backward()
        for (name, p), q in zip(plain.named_parameters(), offset.parameters(), strict=True):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
    for k, v in plain.state_dict().items():  # running statistics in the clips' own coordinates
        torch.testing.assert_close(offset.state_dict()[k], v, rtol=0, atol=1e-5, msg=k)
    plain.eval(), offset.eval()
    torch.testing.assert_close(offset(ix=ix - off["image"], vx=vx - off["video"], ix_mask=mask, vx_mask=mask,
                                      offsets=off),
                               plain(ix=ix, vx=vx, ix_mask=mask, vx_mask=mask), rtol=0, atol=1e-5)


def test_centred_batch_statistics_are_the_float32_ones_to_a_rounding():
    torch.manual_seed(0)
    raw = torch.relu(torch.randn(3, 32, 30, 256) * 1.5 + torch.randn(256))  # (R, B, S, F) ReLU-like features
    offset = raw.mean((0, 1, 2))  # (F,)
    x = (raw - offset).bfloat16()  # the stored clips
    mask = torch.rand(3, 32, 30) > 0.2
    for m in (None, mask):
        bn = RunBatchNorm(3, 256)
        mean, var = bn.offset_stats(x, offset, m, None)  # (R, 1, F) each
        w = torch.ones(3, 32, 30) if m is None else m.float()  # (R, B, S)
        n = w.sum((1, 2))[:, None]  # (R, 1)
        exact_mean = torch.einsum("rbs,rbsf->rf", w.double(), x.double()) / n  # (R, F)
        exact_var = torch.einsum("rbs,rbsf->rf", w.double(), (x.double() - exact_mean[:, None, None]) ** 2) / n
        sd = exact_var.sqrt()
        assert float(((mean.squeeze(1) - exact_mean).abs() / sd).max()) < 1e-3
        assert float(((var.squeeze(1) - exact_var).abs() / exact_var).max()) < 5e-3
        torch.testing.assert_close(bn.running_mean, 0.9 * 0 + 0.1 * (exact_mean + offset).float(), rtol=0, atol=1e-3)


def test_centred_table():
    features = torch.randn(1000, 6, dtype=torch.float64).half() + torch.arange(6).half() * 10  # (N, F)
    table, offset = centred_table(features, torch.bfloat16, chunk_rows=64)  # 1000 clips: every one in the mean
    assert table.dtype == torch.bfloat16 and table.shape == features.shape
    torch.testing.assert_close(offset, features.double().mean(0).float(), rtol=0, atol=1e-5)
    err = (table.float() + offset - features.float()).abs()  # (N, F) one bf16 rounding of the centred clip
    assert bool((err <= (features.float() - offset).abs() * 2**-8 + 1e-6).all())
    table, offset = centred_table(features, torch.bfloat16, sample=100)  # every 10th clip in the mean
    torch.testing.assert_close(offset, features[::10].double().mean(0).float(), rtol=0, atol=1e-5)
    assert float((offset - features.double().mean(0)).abs().max()) < 0.25  # near the mean of unit-variance clips
    torch.testing.assert_close(table.float(), features.float() - offset, rtol=2**-8, atol=1e-6)
    kept = features.float()  # float32 features are left as they are
    table, offset = centred_table(kept, torch.bfloat16, chunk_rows=64)
    assert torch.equal(kept, features.float()) and float(offset.abs().max()) > 1


@pytest.mark.parametrize("protocol", ["authors", "masked"])
def test_a_group_gathering_centred_clips_trains_as_one_gathering_the_clips(toy, protocol):
    meta, sets, rows = load(toy)
    for fs in sets.values():  # features off zero, as a backbone's are: a zero padding clip then shows
        fs.features += 4
    out = []
    # the clips in fp32; centred clips in bf16, with eager code and (the authors' protocol, which the
    # reproduction trains: each case compiles its graphs) with the fused block and chains
    cases = [("fp32", False, False), ("bf16", True, False)] + [("bf16", True, True)] * (protocol == "authors")
    for precision, centred, fused in cases:
        cfgs = [TrainConfig(split=s, seed=s, max_epochs=2, protocol=protocol, **{**TOY, "precision": precision})
                for s in (0, 1, 2)]
        group = grouped_mod.GroupTrainer(cfgs, [_split_data(meta, sets, rows, c.split) for c in cfgs],
                                         ["a", "b", "c"], centred=centred, fused=fused)
        assert (group.offsets is not None) == centred and group.fused == fused
        first = group.evaluate("val")  # before any step: the same head, the padding clips included
        losses = group.train_epoch(1)
        out.append((first, losses, group.evaluate("val"), group.model.state_dict()))
    first_a, loss_a, val_a, state_a = out[0]
    for first_b, loss_b, val_b, state_b in out[1:]:
        for j in range(3):
            torch.testing.assert_close(first_b[j][2], first_a[j][2], rtol=0, atol=1e-2)  # probabilities, bf16
            assert loss_b[j] == pytest.approx(loss_a[j], abs=3e-3)
            assert val_b[j][0] == pytest.approx(val_a[j][0], abs=3e-3)
        for k in ("image.norm.running_mean", "image.norm.running_var", "video.norm.running_mean"):
            torch.testing.assert_close(state_b[k], state_a[k], rtol=1e-2, atol=1e-2, msg=k)


def test_the_group_steps_its_runs_optimisers_and_drops_the_gradients(toy):
    meta, sets, rows = load(toy)
    cfgs = [TrainConfig(split=s, seed=s, **TOY) for s in (0, 1, 2)]
    group = grouped_mod.GroupTrainer(cfgs, [_split_data(meta, sets, rows, c.split) for c in cfgs], ["a", "b", "c"])
    params = list(group.model.parameters())
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.ones_like(p)
    group._opt_step([2, 0])  # a step of some of the runs (tests/test_run_optim.py: the step itself)
    assert all(p.grad is None for p in params)
    for p, b in zip(params, before):
        assert torch.equal(p.detach()[1], b[1])  # run 1 did not step
        assert not torch.equal(p.detach()[[0, 2]], b[[0, 2]])  # runs 0 and 2 did
    for j, r in enumerate(group.runs):  # each run's views are its slice of the batched parameters
        assert all(v.data_ptr() == p.data[j].data_ptr() for v, p in zip(r.views, params))
        assert int(r.opt.state[r.views[0]]["step"]) == (0 if j == 1 else 1)


def test_group_problem():
    base = TrainConfig()
    assert group_problem([base]) == "a group needs two runs or more"
    assert group_problem([base, dataclasses.replace(base, split=1, seed=3, lr=1e-3, weight_decay=0.1)]) is None
    assert "differ in batch_size" in group_problem([base, dataclasses.replace(base, batch_size=16)])
    assert "gru is not batched" in group_problem([TrainConfig(temporal="gru")] * 2)
    with pytest.raises(T12kError, match="cannot train as one group: the runs differ in temporal"):
        grouped_mod.GroupTrainer([base, dataclasses.replace(base, temporal="savg")], [{}, {}], ["a", "b"])


ON_CUDA = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("protocol,fusion,device", [("authors", False, "cpu"), ("authors", True, "cpu"),
                                                    ("masked", True, "cpu"),
                                                    pytest.param("masked", True, "cuda", marks=ON_CUDA)])
def test_a_run_in_a_group_is_the_run_alone(toy, tmp_path, protocol, fusion, device):
    meta, sets, rows = load(toy, fusion)
    cfgs = [TrainConfig(split=s, seed=s + 3, lr=lr, max_epochs=5, protocol=protocol, device=device, **TOY)
            for s, lr in zip((0, 1, 2), (1e-4, 3e-4, 1e-3), strict=True)]
    together = train_group(cfgs, meta, sets, rows, [tmp_path / f"g{j}" for j in range(3)], progress=False)
    for j, cfg in enumerate(cfgs):
        alone = train_run(cfg, meta, sets, rows, tmp_path / f"a{j}", progress=False)
        assert len(together[j].history) == len(alone.history) == 5
        for g, a in zip(together[j].history, alone.history, strict=True):
            assert abs(g["val_loss"] - a["val_loss"]) < TOL, (j, g["epoch"])
            assert abs(g["train_loss"] - a["train_loss"]) < TOL
            assert g["lr"] == a["lr"]
        assert together[j].best_epoch == alone.best_epoch
        for k in ("uAP", "mAP"):
            assert together[j].test[k] == pytest.approx(alone.test[k], abs=1e-2)
        # the same run directory: files, config, history columns
        g_dir, a_dir = tmp_path / f"g{j}", tmp_path / f"a{j}"
        assert sorted(p.name for p in g_dir.iterdir()) == sorted(p.name for p in a_dir.iterdir())
        assert json.loads((g_dir / "config.json").read_text()) == json.loads((a_dir / "config.json").read_text())
        assert list(history(g_dir)[0]) == list(history(a_dir)[0])


def test_a_stopped_run_leaves_the_group_as_it_would_end_alone(toy, tmp_path, monkeypatch):
    meta, sets, rows = load(toy)
    base = TrainConfig(max_epochs=5, protocol="authors", **TOY)
    cfgs = [dataclasses.replace(base, split=0, max_epochs=2),  # stops first, at its epoch limit
            dataclasses.replace(base, split=1, early_stop_patience=1, lr=3e-3),  # stops when it stops improving
            dataclasses.replace(base, split=2)]
    sizes = []
    real = grouped_mod.GroupTrainer.train_epoch
    monkeypatch.setattr(grouped_mod.GroupTrainer, "train_epoch",
                        lambda self, *a, **k: sizes.append(self.model.runs) or real(self, *a, **k))
    finished, started = [], []
    train_group(cfgs, meta, sets, rows, [tmp_path / f"g{j}" for j in range(3)], progress=False,
                on_finish=lambda j, res: finished.append((j, res.epochs)), on_epoch=started.append)
    assert finished[0] == (0, 2) and (tmp_path / "g0" / "metrics.json").exists()
    epochs = {j: n for j, n in finished}
    # after each epoch the runs that stopped leave: the model computes only the others
    assert sizes == [sum(n >= e for n in epochs.values()) for e in range(1, len(sizes) + 1)]
    assert sizes[2] < 3
    assert started == list(range(1, len(sizes) + 1))  # on_epoch as each epoch starts
    for j, cfg in enumerate(cfgs):
        alone = train_run(cfg, meta, sets, rows, tmp_path / f"a{j}", progress=False)
        g = json.loads((tmp_path / f"g{j}" / "metrics.json").read_text())
        a = json.loads((tmp_path / f"a{j}" / "metrics.json").read_text())
        assert (g["epochs"], g["best_epoch"]) == (a["epochs"], a["best_epoch"]) == (alone.epochs, alone.best_epoch)
        assert g["test"]["uAP"] == pytest.approx(a["test"]["uAP"], abs=1e-2)
        assert [r["epoch"] for r in history(tmp_path / f"g{j}")] == [r["epoch"] for r in history(tmp_path / f"a{j}")]


def test_a_temporal_module_that_is_not_batched_trains_alone(toy, caplog):
    meta, sets, rows = load(toy, fusion=False)
    cfgs = [TrainConfig(split=s, temporal="gru", max_epochs=1, **TOY) for s in (0, 1)]
    started = []
    with caplog.at_level(logging.INFO, logger="trailers12k_feats.training.group_runs"):
        results = train_group(cfgs, meta, sets, rows, progress=False, on_epoch=started.append)
    assert started == [1, 1]  # each run's epoch, the runs one at a time
    assert "temporal module gru is not batched" in caplog.text and "one at a time" in caplog.text
    assert results[1].history[0]["val_loss"] == train_run(cfgs[1], meta, sets, rows, progress=False).history[0][
        "val_loss"]


def rep_config(corpus, out, **kw):
    train = TrainConfig(max_epochs=3, precision="fp32")
    return ReproduceConfig(metadata=corpus / "mtgc.csv", cache_dir=corpus, out_dir=out, rows=("k_r2plus1d",),
                           train=train, **kw)


def table(out):
    return [(r["run"], r["split"], r["epoch"], *(round(float(r[k]), 2) for k in ("uAP", "mAP", "wAP", "sAP")))
            for r in csv.DictReader(open(out / "tst.csv"))]


def close(a, b):
    assert [r[:3] for r in a] == [r[:3] for r in b]
    np.testing.assert_allclose([r[3:] for r in a], [r[3:] for r in b], atol=0.02)


def test_reproduce_with_groups_gives_the_table_without(corpus, tmp_path, monkeypatch):
    groups = []
    real = grouped_mod.GroupTrainer.__init__
    monkeypatch.setattr(grouped_mod.GroupTrainer, "__init__",
                        lambda self, cfgs, *a, **k: groups.append([c.split for c in cfgs]) or real(self, cfgs, *a, **k))
    reproduce(rep_config(corpus, tmp_path / "single", group=False), progress=False)
    assert groups == []
    reproduce(rep_config(corpus, tmp_path / "grouped"), progress=False)
    assert groups == [[0, 1, 2]]
    close(table(tmp_path / "grouped"), table(tmp_path / "single"))

    # Resume a group cut short after its first run finished: the other two form the next group.
    out = tmp_path / "resumed"
    saved = []
    real_save = group_runs.save_run

    def save_then_stop(*a, **k):
        if saved:
            raise KeyboardInterrupt
        saved.append(real_save(*a, **k))

    monkeypatch.setattr(group_runs, "save_run", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        reproduce(rep_config(corpus, out), progress=False)
    assert len(list((out / "runs" / "k_r2plus1d").iterdir())) == 1 and len(table(out)) == 1
    monkeypatch.setattr(group_runs, "save_run", real_save)
    groups.clear()
    reproduce(rep_config(corpus, out), progress=False)
    assert len(groups) == 1 and len(groups[0]) == 2
    close(table(out), table(tmp_path / "single"))


def test_cli_group_option(corpus, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(rep_mod, "reproduce", lambda cfg, **k: seen.append(cfg.group) or "table")
    for flag, want in (([], True), (["--no-group"], False), (["--group"], True)):
        r = CliRunner().invoke(main, ["reproduce", "--data-dir", str(corpus), "--out", str(tmp_path), *flag])
        assert r.exit_code == 0, r.output
        assert seen[-1] is want


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_group_step_on_the_gpu_waits_for_nothing(toy):
    meta, sets, rows = load(toy)
    cfgs = [TrainConfig(split=s, seed=s, max_epochs=1, device="cuda", **TOY) for s in (0, 1)]
    trainer = grouped_mod.GroupTrainer(cfgs, [grouped_mod._split_data(meta, sets, rows, s) for s in (0, 1)],
                                       ["a", "b"])
    assert all(f.is_cuda for f in trainer.features.values())  # moved once, shared by both runs
    plans = [[t.cuda() for t in r.data["train"].epoch_windows(8, 30, r.gen)] for r in trainer.runs]
    trainer.model.train()
    trainer.step([0, 1], [o[:8] for o, _ in plans], [f[:8] for _, f in plans], False)  # warm-up: lazy inits
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for s in (8, 16):
            loss = trainer.step([0, 1], [o[s:s + 8] for o, _ in plans], [f[s:s + 8] for _, f in plans], False)
            trainer.step([1], [plans[1][0][s:s + 8]], [plans[1][1][s:s + 8]], False)  # a part of the group
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert loss.shape == (2,) and bool(torch.isfinite(loss).all())
