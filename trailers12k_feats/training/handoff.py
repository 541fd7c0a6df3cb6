"""A run of a training group handed to another process between two epochs (docs/speed.md).

A run's numbers do not depend on the group it trains in, nor on how many threads compute it:
it draws its own windows and dropout masks, steps its own optimiser, and every batched
operation computes each run's slice as that run alone would (tests/test_handoff.py holds a
handed-off run bit for bit to the same run left in its group). So where `t12k reproduce` has
a process with nothing left to start while another still trains a group of several runs, that
group gives one run away at the end of an epoch: `capture` takes all the run holds into a
`RunState`, the group drops it, and a `GroupTrainer` built with `resume` in the idle process
goes on from the next epoch, writing the run's directory when it ends, as the group would have.
"""

from __future__ import annotations

import copy
import io
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # grouped.py imports this module
    from trailers12k_feats.training.grouped import GroupTrainer


@dataclass
class RunState:
    """Everything a run of a group holds between two epochs."""

    epoch: int  # epochs finished
    seconds: float  # time trained so far
    weights: dict[str, torch.Tensor]  # its heads.Divita state_dict (parameters and buffers)
    opt: dict  # its AdamW's state_dict
    sched: dict  # its ReduceLROnPlateau's state_dict
    gen: torch.Tensor  # the state of its window generator
    dropout: torch.Tensor  # the state of its dropout generator
    history: list[dict]  # its EpochLog
    best_loss: float
    best_epoch: int
    best_state: dict[str, torch.Tensor] | None  # the weights of its best epoch

    def to_bytes(self) -> bytes:
        """The state serialised, to send to another process."""
        buf = io.BytesIO()
        torch.save(self, buf)
        return buf.getvalue()

    @staticmethod
    def from_bytes(data: bytes) -> RunState:
        return torch.load(io.BytesIO(data), weights_only=False)


def capture(group: GroupTrainer, j: int, epoch: int, seconds: float) -> RunState:
    """Run j (its position in group.runs) as it stands after `epoch` epochs (copies)."""
    r = group.runs[j]
    return RunState(epoch, seconds, group.model.run_state(j),
                    copy.deepcopy(r.opt.state_dict()),  # its tensors are the live moments
                    r.sched.state_dict(), r.gen.get_state(), r.dropout.get_state(),
                    [dict(h) for h in r.epochs.history], r.epochs.best_loss, r.epochs.best_epoch, r.best_state)


def restore(group: GroupTrainer, j: int, state: RunState) -> None:
    """Make run j of `group` (freshly built, at epoch 0) the run `state` holds."""
    r = group.runs[j]
    with torch.no_grad():
        for k, v in group.model.state_dict().items():  # each batched tensor's slice j, in place
            v[j].copy_(state.weights[k])
    r.opt.load_state_dict(state.opt)
    r.sched.load_state_dict(state.sched)
    r.gen.set_state(state.gen)
    r.dropout.set_state(state.dropout)
    r.epochs.history, r.epochs.best_loss, r.epochs.best_epoch = [dict(h) for h in state.history], \
        state.best_loss, state.best_epoch
    r.best_state = state.best_state

