"""Each run's own AdamW over its slice of a group's batched parameters (grouped.py), the runs
stepped together.

A run of a group keeps a torch AdamW of its own, built as train.Trainer builds one, over views
of its slice of each batched parameter: its learning rate, weight decay and moments are its
own, and its ReduceLROnPlateau schedule acts on it. `step_runs` makes the step each run's
`AdamW(fused=True).step()` makes, with one call of torch's functional fused AdamW for all the
runs whose settings are equal, rather than one call per run.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.optim.adam import adam

from trailers12k_feats.training.run_layers import memory_order
from trailers12k_feats.training.train import TrainConfig, adamw


def run_adamw(views: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    """A run's AdamW over `views`, with the state AdamW creates at its first step: step_runs
    steps it, and the functional AdamW it calls creates none."""
    opt = adamw(views, cfg)  # as a run alone builds its own
    for v in views:
        opt.state[v] = {"step": torch.zeros((), dtype=torch.float32, device=v.device),
                        "exp_avg": torch.zeros_like(v), "exp_avg_sq": torch.zeros_like(v),
                        **({"max_exp_avg_sq": torch.zeros_like(v)} if cfg.amsgrad else {})}
    return opt


def step_runs(params: Sequence[torch.Tensor],
              runs: Sequence[tuple[int, Sequence[torch.nn.Parameter], torch.optim.AdamW]]) -> None:
    """For each (j, views, opt) of `runs`, the step opt.step() makes with views[i].grad being
    slice j of params[i].grad (params: the batched parameters, each (R, ...); views[i] is
    run_layers.run_slice(params[i], j), and the gradient is sliced alike): one fused AdamW call per set of
    runs with equal settings, their learning rates included."""
    # each gradient viewed in its parameter's memory order, as the views are
    grads_of = [p.grad.permute(memory_order(p)) for p in params]
    calls: dict[tuple, list[tuple[int, Sequence[torch.nn.Parameter], torch.optim.AdamW]]] = {}
    for run in runs:
        hp = run[2].param_groups[0]
        calls.setdefault((hp["lr"], hp["betas"], hp["eps"], hp["weight_decay"], hp["amsgrad"]), []).append(run)
    for (lr, (beta1, beta2), eps, weight_decay, amsgrad), same in calls.items():
        views, grads, avgs, sqs, maxes, steps = [], [], [], [], [], []
        for j, run_views, opt in same:
            for v, g in zip(run_views, grads_of):
                state = opt.state[v]
                views.append(v)
                grads.append(g[j])
                avgs.append(state["exp_avg"])
                sqs.append(state["exp_avg_sq"])
                steps.append(state["step"])
                if amsgrad:
                    maxes.append(state["max_exp_avg_sq"])
        adam(views, grads, avgs, sqs, maxes, steps, fused=True, decoupled_weight_decay=True, amsgrad=amsgrad,
             beta1=beta1, beta2=beta2, lr=lr, weight_decay=weight_decay, eps=eps, maximize=False)
