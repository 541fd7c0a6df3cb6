"""A run handed from one training group to another process between two epochs (training/handoff.py)
goes on exactly as in its group: same losses, learning rates, stopping epoch and weights, bit for bit."""

import csv
import dataclasses
import json
import logging

import pytest
import torch

from trailers12k_feats.training.group_rules import hands_off_runs
from trailers12k_feats.training.group_runs import train_group
from trailers12k_feats.training.handoff import RunState
from trailers12k_feats.training.reproduce import ReproduceConfig, reproduce
from trailers12k_feats.training.train import TrainConfig, load_streams


@pytest.fixture
def toy(toy_group):
    """The toy image and video streams of conftest's toy_group: (Metadata, FeatureSets, rows)."""
    meta, d = toy_group
    sets, rows = load_streams(meta, {"image": d / "img.h5", "video": d / "vid.h5"})
    return meta, sets, rows


def same(a, b) -> bool:
    """Equal, tensors bit for bit, through nested dicts."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def outcome(d):
    """What a run directory holds but the times."""
    history = [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(open(d / "history.csv"))]
    metrics = {k: v for k, v in json.loads((d / "metrics.json").read_text()).items() if k != "seconds"}
    return history, metrics, torch.load(d / "best.pt", weights_only=True)


@pytest.mark.parametrize("threads", [1, 2])
def test_a_handed_off_run_ends_as_in_its_group(toy, tmp_path, threads):
    meta, sets, rows = toy
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        run_handoff(meta, sets, rows, tmp_path)
    finally:
        torch.set_num_threads(old)


def run_handoff(meta, sets, rows, tmp_path):
    # bf16 on the CPU: groups gather centred clips and run the compiled chains, where runs hand off
    base = TrainConfig(max_epochs=4, precision="bf16", batch_size=8, eval_batch_size=16, protocol="authors")
    cfgs = [dataclasses.replace(base, split=0, lr=1e-3), dataclasses.replace(base, split=1, lr=3e-3,
                                                                              early_stop_patience=1),
            dataclasses.replace(base, split=2, seed=5)]
    dirs = [tmp_path / f"g{j}" for j in range(3)]
    together = train_group(cfgs, meta, sets, rows, dirs, progress=False)

    asked, given = [], []
    # ask after each epoch; hand off after the first: the last run going on leaves
    handed = train_group(cfgs, meta, sets, rows, [tmp_path / f"h{j}" for j in range(3)], progress=False,
                         hand_off=lambda: not asked.append(1) and len(asked) == 1,
                         on_hand_off=lambda j, state: given.append((j, state.to_bytes())))
    assert len(given) == 1 and given[0][0] == 2 and handed[2] is None
    j, data = given[0]
    state = RunState.from_bytes(data)  # as another process receives it
    assert state.epoch == 1 and len(state.history) == 1
    started = []
    alone = train_group([cfgs[j]], meta, sets, rows, [tmp_path / f"h{j}"], progress=False, resume=[state],
                        on_epoch=started.append)
    assert started == list(range(2, together[j].epochs + 1))  # from the epoch after the handoff
    assert alone[0].epochs == together[j].epochs and alone[0].best_epoch == together[j].best_epoch
    for k in range(3):
        (h_a, m_a, w_a), (h_b, m_b, w_b) = outcome(dirs[k]), outcome(tmp_path / f"h{k}")
        assert h_a == h_b and m_a == m_b, k
        assert same(w_a, w_b), k


def test_runs_hand_off_only_where_they_compute_alike_in_any_group(toy):
    meta, sets, rows = toy
    cfgs = [TrainConfig(split=s, max_epochs=2, batch_size=8, eval_batch_size=16) for s in (0, 1)]
    for precision, protocol in (("fp32", "authors"), ("bf16", "masked")):
        given = []
        run = [dataclasses.replace(c, precision=precision, protocol=protocol) for c in cfgs]
        results = train_group(run, meta, sets, rows, progress=False, hand_off=lambda: True,
                              on_hand_off=lambda j, s: given.append(j))
        assert given == [] and all(r is not None and r.epochs == 2 for r in results), (precision, protocol)
        assert not hands_off_runs("cpu", precision, protocol)  # the rule reproduce.jobs_for asks too
    assert hands_off_runs("cpu", "bf16", "authors") and not hands_off_runs("cuda", "bf16", "authors")
    with pytest.raises(ValueError, match="a state per run"):
        train_group(cfgs, meta, sets, rows, progress=False, resume=[RunState(1, 0.0, {}, {}, {}, torch.zeros(1),
                                                                                torch.zeros(1), [], 0.0, 0, None)])


@pytest.mark.slow
def test_reproduce_hands_runs_to_idle_processes_and_gets_the_same_runs(corpus, tmp_path, capfd, caplog):
    """One row on two processes: the second has nothing to start, so the row's group hands it a run
    after the first epoch. Every run ends as it does with one process, bit for bit."""
    train = TrainConfig(max_epochs=3, precision="bf16", batch_size=16)

    def run(out, jobs):
        cfg = ReproduceConfig(metadata=corpus / "mtgc.csv", cache_dir=corpus, out_dir=out, rows=("k_r2plus1d",),
                              train=train, jobs=jobs)
        return reproduce(cfg, progress=False)

    one = run(tmp_path / "one", 1)
    capfd.readouterr()
    caplog.set_level(logging.INFO)  # the workers log at the level of this process
    two = run(tmp_path / "two", 2)
    err = capfd.readouterr().err  # the workers' log lines
    assert "k_r2plus1d split2: handed to another process after epoch 1" in err
    assert "k_r2plus1d split2: going on from epoch 2" in err
    assert one == two
    for split in (0, 1, 2):
        a, b = (outcome(tmp_path / o / "runs" / "k_r2plus1d" / f"split{split}") for o in ("one", "two"))
        assert a[:2] == b[:2] and same(a[2], b[2]), split
