"""The per-run layers of a group's batched model (batched.py): every parameter has a leading
run dim R, and a call computes runs `idx` (R', all when None) of it.

`run_matmul` is each layer's one batched matmul over the runs; RunLinear, RunLayerNorm and
RunBatchNorm are nn.Linear, nn.LayerNorm and heads.MaskedBatchNorm1d for each run, with their
parameter and buffer names; run_dropout is heads.FastDropout for each run, each drawing its
keep-mask from its own generator.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from trailers12k_feats.training import fused
from trailers12k_feats.training.heads import keep_mask, random_lanes


def pick(t: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """The runs `idx` of a (R, ...) tensor in its memory layout, all of them when `idx` is None."""
    return t if idx is None else select_runs(t, idx)


class _PerRunMatmul(torch.autograd.Function):
    """x (R, N, in) @ w (R, in, out) (+ bias (R, out)) as one matmul per run, each written into
    its slice of one output, and likewise for the gradients (no stacking copies)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y = x.new_empty(x.shape[0], x.shape[1], w.shape[2])  # (R, N, out)
        for j in range(x.shape[0]):
            if bias is None:
                torch.mm(x[j], w[j], out=y[j])
            else:
                torch.addmm(bias[j], x[j], w[j], out=y[j])
        ctx.save_for_backward(x, w)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, w = ctx.saved_tensors
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = x.new_empty(x.shape)  # (R, N, in)
            for j in range(x.shape[0]):
                torch.mm(g[j], w[j].t(), out=gx[j])
        if ctx.needs_input_grad[1]:
            gw = w.new_empty(w.shape)  # (R, in, out)
            for j in range(x.shape[0]):
                torch.mm(x[j].t(), g[j], out=gw[j])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.sum(1)  # (R, out)
        return gx, gw, gb


def run_matmul(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (R', N, in) @ w (R', in, out) + bias (R', out) for each run: (R', N, out).

    One batched matmul, except in fp32 on the CPU, where MKL's batched sgemm measured up to
    1.5x slower than one sgemm per run, so each run gets its own (_PerRunMatmul)."""
    if x.device.type == "cpu" and not torch.is_autocast_enabled("cpu") and x.dtype == torch.float32:
        return _PerRunMatmul.apply(x, w, bias)
    if bias is None:
        return torch.bmm(x, w)
    return torch.baddbmm(bias.unsqueeze(1), x, w)


def _per_run(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(R', X) -> (R', 1, ..., 1, X), broadcasting over the middle dims of `like` (R', ..., X)."""
    return v.view(v.shape[0], *([1] * (like.dim() - 2)), v.shape[-1])


def linear_weight(runs: int, out_features: int, in_features: int,
                  device: torch.device | str | None = None) -> nn.Parameter:
    """A RunLinear weight: shape (R, out, in) as nn.Linear's, stored as (R, in, out), the layout
    in which the matmuls read it and in which the compiled block's backward (fused.block) and
    the batched matmul's give its gradient. Autograd then keeps a gradient as it comes; with the
    weight stored (R, out, in), it would copy every weight gradient into that layout each step."""
    return nn.Parameter(torch.empty(runs, in_features, out_features, device=device).transpose(1, 2))


def memory_order(t: torch.Tensor) -> list[int]:
    """The dims of a (R, ...) tensor, the run dim first and the others outermost in memory first:
    permuted so, a RunLinear weight (linear_weight) is contiguous, as any dense tensor whose
    run dim is outermost."""
    return [0, *sorted(range(1, t.dim()), key=lambda d: (-t.stride(d), d))]


def select_runs(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The runs `idx` of a (R, ...) tensor in t's memory layout (index_select gives a contiguous
    one): what GroupedDivita.keep keeps of each parameter and buffer."""
    order = memory_order(t)
    inverse = sorted(range(t.dim()), key=order.__getitem__)
    return t.permute(order).index_select(0, idx).permute(inverse)


def run_slice(p: torch.Tensor, j: int) -> torch.Tensor:
    """Run j's slice of a batched (R, ...) tensor with its dims in p's memory order: contiguous,
    as the fused AdamW kernel (run_optim) reads it without copying, where p is dense. A RunLinear weight is
    stored transposed (linear_weight), so its run slice is the weight transposed."""
    return p.permute(memory_order(p))[j]


class RunLinear(nn.Module):
    """R nn.Linear layers: weight (R, out, in) (stored as (R, in, out): linear_weight), bias
    (R, out); x (R', ..., in) -> (R', ..., out)."""

    def __init__(self, runs: int, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.weight = linear_weight(runs, out_features, in_features)
        self.bias = nn.Parameter(torch.empty(runs, out_features)) if bias else None

    def forward(self, x: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        R, *mid, n_in = x.shape
        flat = x.reshape(R, -1, n_in)  # (R', N, in)
        w = pick(self.weight, idx).transpose(1, 2)  # (R', in, out)
        y = run_matmul(flat, w, None if self.bias is None else pick(self.bias, idx))  # (R', N, out)
        return y.reshape(R, *mid, w.shape[-1])


class RunLayerNorm(nn.Module):
    """R nn.LayerNorm layers over the last dim: weight and bias (R, D)."""

    def __init__(self, runs: int, d: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(runs, d))
        self.bias = nn.Parameter(torch.zeros(runs, d))

    def forward(self, x: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        y = F.layer_norm(x, x.shape[-1:], eps=self.eps)  # (R', ..., D) in x's dtype, as nn.LayerNorm gives
        w, b = _per_run(pick(self.weight, idx), x), _per_run(pick(self.bias, idx), x)
        return torch.addcmul(b.to(y.dtype), y, w.to(y.dtype))  # (R', ..., D)


class RunBatchNorm(nn.Module):
    """R heads.MaskedBatchNorm1d layers: per-run batch statistics of real clips, running statistics
    (R, F) and num_batches_tracked (R,); parameter and buffer names are BatchNorm1d's own.
    `fused` (set by GroupedDivita.use_fused): in training, offset clips' statistics and the fold
    into the projection as compiled chains (fused.moments, fused.fold)."""

    fused = False

    def __init__(self, runs: int, num_features: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(runs, num_features))
        self.bias = nn.Parameter(torch.zeros(runs, num_features))
        self.register_buffer("running_mean", torch.zeros(runs, num_features))
        self.register_buffer("running_var", torch.ones(runs, num_features))
        self.register_buffer("num_batches_tracked", torch.zeros(runs, dtype=torch.long))

    def _update(self, name: str, value: torch.Tensor, idx: torch.Tensor | None) -> None:
        buf = getattr(self, name)
        if idx is None:
            buf.copy_(value)
        else:
            buf.index_copy_(0, idx, value)

    @torch.no_grad()
    def _track(self, mean: torch.Tensor, var: torch.Tensor, n: torch.Tensor, idx: torch.Tensor | None) -> None:
        """Fold a batch's mean (R', 1, F), biased var (R', 1, F) of n (R', 1, 1) clips into the
        running statistics, as BatchNorm1d does (momentum, unbiased variance)."""
        w = self.momentum
        self._update("num_batches_tracked", pick(self.num_batches_tracked, idx) + 1, idx)
        self._update("running_mean", pick(self.running_mean, idx).lerp(mean.squeeze(1), w), idx)
        unbiased = var * n / (n - 1).clamp(min=1)  # (R', 1, F)
        self._update("running_var", pick(self.running_var, idx).lerp(unbiased.squeeze(1), w), idx)

    def centre(self, x: torch.Tensor, mask: torch.Tensor | None,
               idx: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x - mean (R', B, S, F), var (R', 1, F)), as MaskedBatchNorm1d.centre for each run.
        The centred clips come in the autocast dtype, which is all the folded matmul reads."""
        R, B, S, F_ = x.shape
        dev = x.device.type
        out = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        if not self.training:
            mean, var = pick(self.running_mean, idx), pick(self.running_var, idx)  # (R', F)
            return (x - mean[:, None, None]).to(out), var.unsqueeze(1)  # (R', B, S, F), (R', 1, F)
        with torch.autocast(dev, enabled=False):  # statistics in fp32, as the single head
            flat = x.reshape(R, B * S, F_).float()  # (R', B*S, F)
            if mask is None:  # every clip real
                m = torch.ones(R, 1, B * S, device=x.device)  # (R', 1, B*S)
            else:
                m = mask.reshape(R, 1, B * S).float()  # (R', 1, B*S)
            n = m.sum(2, keepdim=True)  # (R', 1, 1) real clips of each run's batch
            mean = torch.bmm(m, flat) / n  # (R', 1, F)
            d = flat - mean  # (R', B*S, F)
            if out == d.dtype:
                xc, sq = d.view(R, B, S, F_), d * d  # (R', B, S, F), (R', B*S, F)
            else:  # the cast first, then d squared in place: one (R', B*S, F) buffer less to write and read
                xc, sq = d.view(R, B, S, F_).to(out), d.square_()
            var = torch.bmm(m, sq) / n  # (R', 1, F) biased
        self._track(mean.detach(), var.detach(), n, idx)
        return xc, var

    def offset_stats(self, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor | None,
                     idx: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean - offset (R', 1, F), var (R', 1, F)) of clips x + offset, x (R', B, S, F) being
        clips stored less `offset` (F,): the batch statistics of the real clips in training
        (updating the running ones in the clips' own coordinates), the running ones in eval.
        x is never converted whole: each window's sums (over its S clips) are taken in x's dtype,
        which accumulates in fp32 and rounds once, and the B windows' sums are added in fp32; with
        `fused`, one compiled pass sums every clip in fp32 (fused.moments)."""
        R, B, S, _ = x.shape
        if not self.training:
            mean, var = pick(self.running_mean, idx), pick(self.running_var, idx)  # (R', F)
            return (mean - offset).unsqueeze(1), var.unsqueeze(1)
        if mask is None:  # every clip real
            n = torch.full((R, 1, 1), float(B * S), device=x.device)  # (R', 1, 1)
        else:
            n = mask.sum((1, 2), dtype=torch.float32).view(R, 1, 1)  # (R', 1, 1) real clips of each run's batch
        # The clips are centred on the offset (their mean over the whole table), so the sum of
        # squares less n mean^2 cancels no leading digits.
        if self.fused and fused.serves(x):  # one pass over x, summing in fp32
            total, squares = fused.moments(x, mask)  # (R', F) each
            mean, sq = total.unsqueeze(1) / n, squares.unsqueeze(1) / n  # (R', 1, F) each
        else:
            real = x if mask is None else x * mask.unsqueeze(-1).to(x.dtype)  # (R', B, S, F) padding -> 0
            mean = real.sum(2).sum(1, keepdim=True, dtype=torch.float32) / n  # (R', 1, F)
            sq = real.square().sum(2).sum(1, keepdim=True, dtype=torch.float32) / n  # (R', 1, F)
        var = (sq - mean.square()).clamp_(min=0)  # (R', 1, F) biased
        self._track(mean + offset, var, n, idx)
        return mean, var

    def fold_into(self, linear: RunLinear, x: torch.Tensor, mask: torch.Tensor,
                  idx: torch.Tensor | None, offset: torch.Tensor | None = None) -> torch.Tensor:
        """linear(self(x, mask)) per run with the BatchNorm scale folded into the weights, as
        MaskedBatchNorm1d.fold_into: (R', B, S, F) -> (R', B, S, D).

        With `offset` (F,), x holds clips less `offset`, already in the matmul's dtype: the
        matmul reads x as it is and the centring moves into the bias, W s (x + offset - mu) =
        W s x - W s (mu - offset), so a step makes no pass over the clips but their statistics."""
        R, B, S, F_ = x.shape
        if offset is not None:
            with torch.autocast(x.device.type, enabled=False):
                mean, var = self.offset_stats(x, offset, mask, idx)  # (R', 1, F) each, fp32
                if self.fused and self.training and fused.serves(x):  # one compiled pass (fused.fold)
                    weight, bias = fused.fold(pick(linear.weight, idx).transpose(1, 2), pick(linear.bias, idx),
                                              pick(self.weight, idx), pick(self.bias, idx), mean, var, self.eps,
                                              x.dtype)  # (R', F, D), (R', D)
                else:
                    scale = torch.rsqrt(var + self.eps) * pick(self.weight, idx).unsqueeze(1)  # (R', 1, F)
                    folded = pick(linear.weight, idx) * scale  # (R', D, F)
                    shift = torch.bmm(pick(linear.weight, idx), pick(self.bias, idx).unsqueeze(2))  # (R', D, 1)
                    shift = shift - torch.bmm(folded, mean.transpose(1, 2))  # (R', D, 1)
                    weight, bias = folded.transpose(1, 2), pick(linear.bias, idx) + shift.squeeze(2)  # (R', F, D), (R', D)
            y = run_matmul(x.reshape(R, B * S, F_), weight, bias)  # (R', B*S, D)
            return y.reshape(R, B, S, -1)  # (R', B, S, D)
        xc, var = self.centre(x, mask, idx)  # (R', B, S, F) in the matmul's dtype, (R', 1, F)
        scale = torch.rsqrt(var + self.eps) * pick(self.weight, idx).unsqueeze(1)  # (R', 1, F)
        weight = pick(linear.weight, idx)  # (R', D, F)
        shift = torch.bmm(weight, pick(self.bias, idx).unsqueeze(2)).squeeze(2)  # (R', D)
        bias = pick(linear.bias, idx) + shift  # (R', D)
        y = run_matmul(xc.reshape(R, B * S, F_), (weight * scale).transpose(1, 2), bias)  # (R', B*S, D)
        return y.reshape(R, B, S, -1)  # (R', B, S, D)


def run_dropout(x: torch.Tensor, p: float, gens: list[torch.Generator] | None) -> torch.Tensor:
    """heads.FastDropout for each run: run j's keep-mask from `gens[j]`; identity when `gens` is
    None (evaluation) or p is 0."""
    keep = run_keep(x, p, gens)  # (R', ...)
    return x if keep is None else x * keep * (1.0 / (1.0 - p))


def run_keep(x: torch.Tensor, p: float, gens: list[torch.Generator] | None) -> torch.Tensor | None:
    """run_dropout's keep-mask for x (R', ...): 1 or 0 in x's dtype, None where it is the identity."""
    if gens is None or p == 0:
        return None
    n = math.prod(x.shape[1:])
    words = torch.empty(len(gens), -(-n // 4), dtype=torch.int64, device=x.device)  # (R', n/4)
    for j, g in enumerate(gens):  # run j's words, drawn as FastDropout draws them alone
        random_lanes(x.shape[1:], g, x.device, out=words[j])
    lanes = words.view(torch.int16)[:, :n].reshape(x.shape)  # (R', ...) a view when 4 divides n
    return keep_mask(lanes, p, x.dtype)


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of x (R', B, S, D) over the real clips of mask (R', B, S), all when None -> (R', B, D)."""
    if mask is None:
        return x.mean(2)  # (R', B, D)
    m = mask.unsqueeze(-1).to(x.dtype)  # (R', B, S, 1)
    return (x * m).sum(2) / m.sum(2).clamp(min=1)  # (R', B, D)
