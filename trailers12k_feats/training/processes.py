"""The processes of `t12k reproduce` that train several rows at once (reproduce.reproduce).

Each row's unfinished splits are a unit, trained in a worker process (spawned: CUDA cannot be
forked) as one group. Units start as processes come free, the longest first. Once none is
left to start, a process with nothing to do is counted idle, and a group still training several
runs hands one of them over at the end of an epoch (handoff.py): it goes on in the idle
process, bit for bit as in its group, so that no core waits while another trains a group. A
process's threads follow the units left (share_threads): one per core while every core has a
unit, more for the last ones.
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from trailers12k_feats.runtime import PrecisionChoice, usable_cores
from trailers12k_feats.training.handoff import RunState
from trailers12k_feats.utils import setup_logging

if TYPE_CHECKING:  # reproduce.py imports this module
    from trailers12k_feats.training.reproduce import Plan, ReproduceConfig

log = logging.getLogger(__name__)


def share_threads(cores: int, jobs: int, left: int) -> int:
    """CPU threads for each process of `reproduce` still training when `left` of its units (queued
    or training) are unfinished: the cores shared among min(jobs, left) processes. Once the queue
    is empty, a process that ends leaves its cores to the others, which run each epoch's many
    small operations faster with more threads (docs/speed.md)."""
    return max(1, cores // max(1, min(jobs, left)))


# In a worker of `reproduce`, shared with the others (multiprocessing.Value): the units not
# finished, the processes with nothing to do and the runs handed off; and the queue that takes
# the runs handed off to `reproduce`.
_LEFT = _IDLE = _SENT = _HANDOFFS = None


def _init_worker(left, idle, sent, handoffs) -> None:
    global _LEFT, _IDLE, _SENT, _HANDOFFS
    _LEFT, _IDLE, _SENT, _HANDOFFS = left, idle, sent, handoffs


def _claim_idle() -> bool:
    """Take one of the processes with nothing to do for a run handed off, if there is one."""
    with _IDLE.get_lock():
        if _IDLE.value <= 0:
            return False
        _IDLE.value -= 1
    with _LEFT.get_lock():
        _LEFT.value += 1  # the run handed off is a unit of its own
    return True


def _unit_job(cfg: ReproduceConfig, row: str, splits: tuple[int, ...], precision: PrecisionChoice, cores: int,
              jobs: int, level: int, resume: bytes | None = None) -> str:
    """train_unit in a worker process of `reproduce` (its log lines at `level`), with the threads
    share_threads gives it, looked at again as each epoch starts; a run of its group goes to
    `reproduce` (handoff.py) while another process has nothing to do. `resume`: a run handed
    off (RunState.to_bytes)."""
    from trailers12k_feats.training.reproduce import (
        train_unit,  # imported by now: it imports this module
    )

    setup_logging(level <= logging.DEBUG)
    logging.getLogger().setLevel(level)

    def rethread(epoch: int) -> None:
        threads = share_threads(cores, jobs, _LEFT.value)
        if threads != torch.get_num_threads():
            log.info("%s: rows still training: %d; %d CPU threads for this one from epoch %d", row, _LEFT.value,
                     threads, epoch)
            torch.set_num_threads(threads)

    def hand_over(j: int, state: RunState) -> None:
        with _SENT.get_lock():
            _SENT.value += 1
        _HANDOFFS.put((row, splits[j], state.to_bytes()))

    torch.set_num_threads(share_threads(cores, jobs, _LEFT.value))
    try:
        train_unit(cfg, row, splits, precision, progress=False, on_epoch=rethread,
                   resume=None if resume is None else RunState.from_bytes(resume), hand_off=_claim_idle,
                   on_hand_off=hand_over)
    finally:
        with _LEFT.get_lock():
            _LEFT.value -= 1
    return row


def train_at_once(cfg: ReproduceConfig, plan: Plan, work: list[tuple[str, tuple[int, ...]]], jobs: int,
                  record: Callable[[str], object], progress: bool = True) -> None:
    """Train `work`'s units (row, splits), in this order, in `jobs` processes; `record(row)` as
    each unit ends."""
    ctx = multiprocessing.get_context("spawn")
    # shared with the workers: units not finished, processes with nothing to do, runs handed off
    left, idle, sent, handoffs = ctx.Value("i", len(work)), ctx.Value("i", 0), ctx.Value("i", 0), ctx.Queue()
    with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker,
                             initargs=(left, idle, sent, handoffs)) as pool:
        _run_units(cfg, plan, work, pool, jobs, record, idle, sent, handoffs, progress)


def _run_units(cfg: ReproduceConfig, plan: Plan, work: list[tuple[str, tuple[int, ...]]], pool: ProcessPoolExecutor,
               jobs: int, record: Callable[[str], object], idle, sent, handoffs, progress: bool) -> None:
    """Start `work`'s units on `pool` as its processes come free, then each run handed off: a
    process left with nothing to start counts itself in `idle` for the groups still training to
    claim (_claim_idle); they put the run's state on `handoffs`, counted in `sent`."""
    cores, level, queued, running, received = usable_cores(), logging.getLogger().getEffectiveLevel(), list(work), {}, 0

    def start(row: str, splits: tuple[int, ...], state: bytes | None = None) -> None:
        running[pool.submit(_unit_job, cfg, row, splits, plan.precision, cores, jobs, level, state)] = row

    while queued and len(running) < jobs:
        start(*queued.pop(0))
    with idle.get_lock():
        idle.value = jobs - len(running)
    bar = tqdm(total=len(work), desc="rows", unit="unit", disable=not progress)
    try:
        while running or received < sent.value:  # a run handed off may still be on its way
            done, _ = wait(running, timeout=0.2, return_when=FIRST_COMPLETED) if running else ((), ())
            for fut in done:
                record(fut.result())
                del running[fut]
                bar.update()
                if queued:
                    start(*queued.pop(0))
                else:
                    with idle.get_lock():
                        idle.value += 1
            while True:
                try:
                    row, split, state = handoffs.get(timeout=0 if running else 0.2)
                except queue.Empty:
                    break
                received += 1
                bar.total += 1
                start(row, (split,), state)  # the process it claimed takes it
    except BaseException:
        for f in running:
            f.cancel()
        raise
    finally:
        bar.close()
