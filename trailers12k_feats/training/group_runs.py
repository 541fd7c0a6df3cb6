"""Runs trained as one group into their run directories (train_group), as train.train_run trains a
run alone: the group itself is grouped.GroupTrainer."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Callable, Sequence

import numpy as np

from trailers12k_feats import cache as cache_mod
from trailers12k_feats.runtime import PrecisionChoice
from trailers12k_feats.training.data import Metadata
from trailers12k_feats.training.group_rules import group_problem
from trailers12k_feats.training.grouped import GroupTrainer, _Run
from trailers12k_feats.training.handoff import RunState
from trailers12k_feats.training.rundir import save_run
from trailers12k_feats.training.train import (
    RunResult,
    TrainConfig,
    _split_data,
    log_start,
    train_precision,
    train_run,
)
from trailers12k_feats.utils import T12kError

log = logging.getLogger(__name__)


def train_group(cfgs: Sequence[TrainConfig], meta: Metadata, sets: dict[str, cache_mod.FeatureSet],
                rows: np.ndarray, out_dirs: Sequence[str | os.PathLike | None] | None = None,
                progress: bool = True, descs: Sequence[str] | None = None,
                on_finish: Callable[[int, RunResult], None] | None = None,
                precision: PrecisionChoice | None = None,
                on_epoch: Callable[[int], None] | None = None, resume: Sequence[RunState] | None = None,
                hand_off: Callable[[], bool] | None = None,
                on_hand_off: Callable[[int, RunState], None] | None = None) -> list[RunResult | None]:
    """train_run for each of `cfgs` (each on its own split), trained as one group; each run's
    directory (out_dirs[j], None for none) is written as the run finishes, then
    `on_finish(j, result)` is called. Falls back to one run at a time, with a log line saying
    why, where the runs cannot form a group (group_problem). `precision`: the runs' shared
    `precision` resolved (here when None), as train_run takes it. `on_epoch(epoch)` is called as
    each epoch starts (each run's, where they train one at a time). `resume` (a state per run,
    handoff.py): runs handed off by another group, which go on from where they were, one run
    being a group too; `hand_off` and `on_hand_off`: see GroupTrainer.fit (the result of a run
    handed off is None)."""
    out_dirs = list(out_dirs) if out_dirs is not None else [None] * len(cfgs)
    descs = list(descs) if descs is not None else [f"split{c.split} seed{c.seed}" for c in cfgs]
    problem = group_problem(cfgs, least=1 if resume else 2)
    if problem:
        if len(cfgs) > 1:
            log.info("%s: %s; training these %d runs one at a time", ", ".join(descs), problem, len(cfgs))
        results = []
        for j, c in enumerate(cfgs):
            results.append(train_run(c, meta, sets, rows, out_dirs[j], progress=progress, desc=descs[j],
                                     precision=precision, on_epoch=on_epoch))
            if on_finish is not None:
                on_finish(j, results[-1])
        return results
    precision = precision or train_precision(cfgs[0])
    if precision.requested != cfgs[0].precision:
        raise T12kError(f"the precision choice is for --precision {precision.requested}, but the runs ask for "
                        f"{cfgs[0].precision}; resolve it with train_precision(cfg).")
    cfgs = [dataclasses.replace(c, precision=precision.precision) for c in cfgs]  # what the group runs in
    datas = [_split_data(meta, sets, rows, c.split) for c in cfgs]
    trainer = GroupTrainer(cfgs, datas, descs, resume=resume)
    if resume:
        log.info("%s: going on from epoch %d", ", ".join(descs), trainer.epoch + 1)
    else:
        for r in trainer.runs:
            log_start(r.desc, r.cfg, sets, r.data, trainer.n_params)
        log.info("training %d runs as one group: %s", len(cfgs), ", ".join(descs))

    def finished(j: int, run: _Run, out: tuple) -> None:
        result, model, val_p, test_p = out
        if out_dirs[j] is not None:
            save_run(out_dirs[j], run.cfg, meta, sets, run.data, run.left_out, model, result, val_p, test_p,
                     precision)
        if on_finish is not None:
            on_finish(j, result)

    return trainer.fit(progress=progress, desc=" + ".join(descs), on_finish=finished, on_epoch=on_epoch,
                       hand_off=hand_off, on_hand_off=on_hand_off)
