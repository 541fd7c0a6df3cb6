"""Which runs may train as one group (grouped.GroupTrainer), and how a group trains by default:
the settings-level rules that reproduce and the group itself ask."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from trailers12k_feats.training.batched import BATCHED_TEMPORAL
from trailers12k_feats.training.train import TrainConfig

# TrainConfig fields that may differ between the runs of a group; all others must be equal.
PER_RUN = ("split", "seed", "lr", "weight_decay", "max_epochs", "plateau_factor", "plateau_patience",
           "early_stop_patience")


def group_problem(cfgs: Sequence[TrainConfig], least: int = 2) -> str | None:
    """Why runs `cfgs` cannot train as one group of `least` runs or more, or None when they can.
    (A group of one is a run handed off by another group: handoff.py.)"""
    if len(cfgs) < least:
        return "a group needs two runs or more" if least == 2 else f"a group needs {least} run(s) or more"
    if cfgs[0].temporal not in BATCHED_TEMPORAL:
        return f"temporal module {cfgs[0].temporal} is not batched (batched: {', '.join(BATCHED_TEMPORAL)})"
    shared = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in PER_RUN]
    differ = [n for n in shared if len({getattr(c, n) for c in cfgs}) > 1]
    return f"the runs differ in {', '.join(differ)}" if differ else None


def centres_clips(device: torch.device | str, precision: str) -> bool:
    """Whether a group on `device` in `precision` gathers its clips centred (GroupTrainer's
    default): in bf16 on the CPU, where a step is bound by moving the clips. "auto" counts, as it
    picks bf16 where the CPU is fast in it; fp16 does not (a clip's square could overflow it)."""
    return torch.device(device).type == "cpu" and precision in ("bf16", "auto")


def hands_off_runs(device: torch.device | str, precision: str, protocol: str) -> bool:
    """Whether a group of these settings may hand a run to another process (handoff.py), its
    clips centred and its chains compiled as by default: where a run computes bit for bit alike
    in any group, with any number of threads (tests/test_handoff.py), in bf16 on the CPU and in
    the authors' protocol. Not in the masked one, where whether a batch of several runs is masked
    depends on all of them; nor in fp32 on the CPU, whose matmuls sum a run's products in an order
    that depends on the batch it shares. reproduce.jobs_for and GroupTrainer both ask this."""
    return centres_clips(device, precision) and protocol == "authors"
