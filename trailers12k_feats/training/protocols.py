"""The two training protocols (docs/paper.md): what evaluation sees and which loss picks the checkpoint.

`authors` runs the paper's protocol as the authors' code (richardtml/DIViTA) does:

- evaluation snippets are zero-padded and the padding is *not* masked: BatchNorm (running
  statistics), attention and the mean pooling see the zero clips as clips;
- the validation loss is BCE-with-logits of every snippet's logits against its trailer's
  labels, averaged over the snippets of each batch of `batch_size` trailers (in the
  metadata's order), then the plain mean of those batch losses;
- training windows are always 30 real clips, so training trailers shorter than the window
  (on which the authors' code fails) are left out of training, with a logged count;
- the transformer block drops out after each LayerNorm (heads.TransformerBlock, "after_norm").

`masked` masks padding everywhere, trains short trailers padded and masked, and uses the BCE of
the snippet-averaged probabilities (the quantity that is evaluated) as validation loss.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as Fn

from trailers12k_feats import NUM_GENRES
from trailers12k_feats.runtime import PRECISIONS, autocast
from trailers12k_feats.training.data import Batch, TrailerData
from trailers12k_feats.utils import T12kError

log = logging.getLogger(__name__)

PROTOCOLS = ("authors", "masked")
DROPOUT_AT = {"authors": "after_norm", "masked": "residual"}  # heads.TransformerBlock's dropout placement


def check_protocol(protocol: str) -> None:
    """Stop on an unknown protocol name, listing the valid ones."""
    if protocol not in PROTOCOLS:
        raise T12kError(f"unknown protocol {protocol!r}; valid: {', '.join(PROTOCOLS)} "
                        f"(authors: the authors' code; masked: padding masked everywhere).")


def head_options(protocol: str) -> dict:
    """build_divita keyword arguments that a protocol fixes."""
    check_protocol(protocol)
    return {"dropout_at": DROPOUT_AT[protocol]}


def batch_logits(model: torch.nn.Module, batch: Batch, dev: torch.device, dtype: torch.dtype,
                 mask_padding: bool = True) -> torch.Tensor:
    """(B, 10) float32 logits of a Batch, moved to `dev`, under autocast to `dtype`. Without
    `mask_padding` every position counts as a clip, zero padding included."""
    x = {k: v.to(dev, non_blocking=True) for k, v in batch.x.items()}
    mask = batch.mask if mask_padding else torch.ones_like(batch.mask)  # (B, W)
    mask = mask.to(dev, non_blocking=True)
    with autocast(dev.type, dtype):
        logits = model(ix=x.get("image"), vx=x.get("video"), ix_mask=mask, vx_mask=mask)
    return logits.float()


# Clips one evaluation forward pass gathers on the CPU, in float32 bytes: a larger block is served
# fresh pages by the OS at every pass (above glibc's mmap threshold), which made evaluating a
# 2048-dim stream 1.5x slower than blocks of this size, with the same logits (bench/bench_epoch.py).
EVAL_BLOCK_BYTES = 16 << 20


def eval_rows(limit: int, d: TrailerData, window: int, runs: int = 1) -> int:
    """Snippets of each of `runs` runs that one evaluation forward pass takes: `limit`, and where
    `d`'s features are on the CPU no more than keep the gathered clips within EVAL_BLOCK_BYTES."""
    if d.device.type != "cpu":
        return limit
    per_snippet = runs * window * sum(d.dims().values()) * 4  # float32 bytes of one snippet of every run
    return max(1, min(limit, EVAL_BLOCK_BYTES // per_snippet))


@torch.no_grad()
def snippet_logits(model: torch.nn.Module, d: TrailerData, window: int, protocol: str = "masked",
                   precision: str = "fp32", eval_batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(owner (S,), logits (S, 10)), on the CPU, of every `window`-clip snippet of every trailer of
    `d`, in trailer order; the last snippet of a trailer zero-padded, and masked unless `protocol`
    is authors. Snippets are gathered where `d`'s features are, and the logits stay on the model's
    device until the last batch (one host synchronisation per call)."""
    check_protocol(protocol)
    model.eval()
    dev = next(model.parameters()).device
    dtype = PRECISIONS[precision]
    owner, first = d.snippets(torch.arange(len(d), device=d.lengths.device), window)  # (S,), (S,)
    out = torch.empty(len(owner), NUM_GENRES, device=dev)  # (S, 10)
    step = eval_rows(eval_batch_size, d, window)  # each snippet is scored alone, whatever the pass size
    for s in range(0, len(owner), step):
        batch = d.gather(owner[s:s + step], first[s:s + step], window, torch.float32)
        out[s:s + step] = batch_logits(model, batch, dev, dtype, protocol == "masked")
    return owner.cpu(), out.cpu()


def average_probs(owner: torch.Tensor, logits: torch.Tensor, n: int, chunk: int = 512) -> torch.Tensor:
    """Each trailer's sigmoid probabilities averaged over its snippets: (n, 10).

    Summed in chunks of `chunk` snippets, in order: the float sums of the evaluation batches."""
    probs = torch.zeros(n, logits.shape[1])  # (n, 10)
    for s in range(0, len(owner), chunk):
        probs.index_add_(0, owner[s:s + chunk], torch.sigmoid(logits[s:s + chunk]))
    counts = torch.bincount(owner, minlength=n).clamp(min=1)  # (n,)
    return probs / counts[:, None]  # (n, 10)


def masked_loss(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """`masked`: BCE of the snippet-averaged probabilities (n, 10), clamped to [1e-7, 1 - 1e-7],
    averaged over trailers and genres."""
    return float(Fn.binary_cross_entropy(probs.clamp(1e-7, 1 - 1e-7), labels))


def authors_loss(owner: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, group: int) -> float:
    """`authors`: BCE-with-logits of each snippet (S, 10) against its trailer's labels (n, 10), a
    mean over the snippets and genres of each run of `group` consecutive trailers, then the plain
    mean of those group means (a last, smaller group weighs as much as a full one)."""
    per_snippet = Fn.binary_cross_entropy_with_logits(logits.double(), labels[owner].double(),
                                                      reduction="none").sum(1)  # (S,)
    g = torch.div(owner, group, rounding_mode="floor")  # (S,) group of each snippet
    n_groups = (len(labels) + group - 1) // group
    sums = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, g, per_snippet)  # (G,)
    counts = torch.bincount(g, minlength=n_groups) * logits.shape[1]  # (G,) values averaged per group
    return float((sums / counts).mean())


def evaluate_snippets(model: torch.nn.Module, d: TrailerData, protocol: str, window: int, group: int,
                      precision: str = "fp32", eval_batch_size: int = 512) -> tuple[float | None, torch.Tensor]:
    """(validation loss of `protocol` or None without labels, snippet-averaged probabilities (n, 10))."""
    owner, logits = snippet_logits(model, d, window, protocol, precision, eval_batch_size)
    return snippet_loss(owner, logits, d, protocol, group, eval_batch_size)


def snippet_loss(owner: torch.Tensor, logits: torch.Tensor, d: TrailerData, protocol: str, group: int,
                 chunk: int = 512) -> tuple[float | None, torch.Tensor]:
    """evaluate_snippets from the snippets' (owner (S,), logits (S, 10)) of snippet_logits."""
    probs = average_probs(owner, logits, len(d), chunk)
    if d.labels is None:
        return None, probs
    if not bool(torch.isfinite(probs).all()):
        return math.nan, probs  # a diverged model: the caller reports it
    labels = d.labels.cpu()  # (n, 10): the sums run on the CPU, in a fixed order
    loss = authors_loss(owner, logits, labels, group) if protocol == "authors" else masked_loss(probs, labels)
    return loss, probs


def training_set(d: TrailerData, protocol: str, window: int) -> tuple[TrailerData, int]:
    """The trailers a protocol trains on and how many it leaves out.

    `masked` trains every trailer (shorter ones padded and masked). `authors` leaves out the
    trailers with fewer than `window` clips: the authors' code draws a window start with
    random.randint(0, clips - window), which fails on them, so the closest run of their code
    is one without them.
    """
    check_protocol(protocol)
    short = d.lengths < window  # (n,)
    n_short = int(short.sum())
    if protocol == "masked":
        log.info("%d of %d training trailers have fewer than %d clips; trained padded and masked",
                 n_short, len(d), window)
        return d, 0
    if n_short == len(d):
        raise T12kError(f"every training trailer has fewer than {window} clips, and --protocol authors trains "
                        f"only on full {window}-clip windows; use --protocol masked.")
    (log.warning if n_short else log.info)(
        "authors protocol: %d of %d training trailers have fewer than %d clips and are left out of training "
        "(the authors' code fails on them)", n_short, len(d), window)
    return (d.subset(~short) if n_short else d), n_short
