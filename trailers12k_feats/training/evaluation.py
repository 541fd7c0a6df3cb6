"""A head evaluated as training evaluates it: snippet-averaged probabilities, the validation loss
of the config's protocol (protocols.py) and the metrics; train.py, grouped.py and apps/predict.py use it."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from trailers12k_feats.training.data import TrailerData
from trailers12k_feats.training.metrics import (
    AP_KEYS,
    metric_columns,
    multilabel_metrics,
)
from trailers12k_feats.training.protocols import (
    average_probs,
    evaluate_snippets,
    snippet_logits,
)

if TYPE_CHECKING:  # train.py imports this module
    from trailers12k_feats.training.train import TrainConfig


def snippet_probs(model: torch.nn.Module, d: TrailerData, cfg: TrainConfig) -> torch.Tensor:
    """The evaluation of `cfg.protocol`: each trailer cut into `cfg.window`-clip snippets (the last
    zero-padded), sigmoid probabilities averaged over its snippets. (n, 10)."""
    owner, logits = snippet_logits(model, d, cfg.window, cfg.protocol, cfg.precision, cfg.eval_batch_size)
    return average_probs(owner, logits, len(d), cfg.eval_batch_size)  # (n, 10)


def evaluate_model(model: torch.nn.Module, d: TrailerData, cfg: TrainConfig) -> tuple[float, dict[str, float],
                                                                                  torch.Tensor]:
    """(validation loss of `cfg.protocol`, metrics, snippet-averaged probabilities (n, 10)) of a
    model on labelled trailers; NaN loss and metrics for a diverged model."""
    loss, p = evaluate_snippets(model, d, cfg.protocol, cfg.window, cfg.batch_size, cfg.precision,
                                cfg.eval_batch_size)
    return scored(d, loss, p)


def scored(d: TrailerData, loss: float, p: torch.Tensor) -> tuple[float, dict[str, float], torch.Tensor]:
    """(loss, metrics, p) of snippet-averaged probabilities p (n, 10) of labelled trailers `d`."""
    if not bool(torch.isfinite(p).all()):  # a diverged model: NaN loss and metrics, for fit to report
        return math.nan, dict.fromkeys((*metric_columns(), *AP_KEYS), math.nan), p
    return loss, multilabel_metrics(d.labels.cpu().numpy(), p.numpy()), p
