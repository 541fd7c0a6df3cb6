"""R DIViTA heads of one shape as one model: every parameter has a leading run dim R.

`GroupedDivita.from_models` stacks R `heads.Divita` models (same streams, dims, temporal
module, fusion, dropout placement) into one module whose state_dict keys are Divita's own,
each tensor with a leading (R, ...) dim, so `run_state(j)` is a Divita state_dict again.
Every layer is one batched matmul over the runs (`run_matmul`: torch.bmm / baddbmm; one
matmul per run in fp32 on the CPU), so R runs cost one set of kernel launches instead of R
and each kernel has R times the work to share among threads. Inputs are (R', B, S, F) with
masks (R', B, S), or mask None where every clip is real (the authors' protocol trains only
full windows): then no pass masks anything. `idx` (R',) picks the runs a call computes (all
when None), so runs whose batches differ in size can step apart. Dropout draws each run's
keep-mask from that run's own generator, in the order the run alone draws it
(heads.FastDropout with a generator), so a run computes in a group what it computes alone,
up to the rounding of the batched matmuls.

Batched here: the temporal modules tsfm, savg and conv, late and early fusion. gru is not
(grouped.py trains its runs one at a time).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from trailers12k_feats.training.heads import (
    Divita,
    DivitaStream,
    keep_mask,
    random_lanes,
)

BATCHED_TEMPORAL = ("tsfm", "savg", "conv")


def pick(t: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """The runs `idx` of a (R, ...) tensor, all of them when `idx` is None."""
    return t if idx is None else t.index_select(0, idx)


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


class RunLinear(nn.Module):
    """R nn.Linear layers: weight (R, out, in), bias (R, out); x (R', ..., in) -> (R', ..., out)."""

    def __init__(self, runs: int, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(runs, out_features, in_features))
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
    (R, F) and num_batches_tracked (R,); parameter and buffer names are BatchNorm1d's own."""

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
        which accumulates in fp32 and rounds once, and the B windows' sums are added in fp32."""
        R, B, S, _ = x.shape
        if not self.training:
            mean, var = pick(self.running_mean, idx), pick(self.running_var, idx)  # (R', F)
            return (mean - offset).unsqueeze(1), var.unsqueeze(1)
        if mask is None:  # every clip real
            n = torch.full((R, 1, 1), float(B * S), device=x.device)  # (R', 1, 1)
            real = x
        else:
            n = mask.sum((1, 2), dtype=torch.float32).view(R, 1, 1)  # (R', 1, 1) real clips of each run's batch
            real = x * mask.unsqueeze(-1).to(x.dtype)  # (R', B, S, F) padding -> 0
        # The clips are centred on the offset (their mean over the whole table), so the sum of
        # squares less n mean^2 cancels no leading digits.
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
                scale = torch.rsqrt(var + self.eps) * pick(self.weight, idx).unsqueeze(1)  # (R', 1, F)
                weight = pick(linear.weight, idx) * scale  # (R', D, F)
                shift = torch.bmm(pick(linear.weight, idx), pick(self.bias, idx).unsqueeze(2))  # (R', D, 1)
                shift = shift - torch.bmm(weight, mean.transpose(1, 2))  # (R', D, 1)
                bias = pick(linear.bias, idx) + shift.squeeze(2)  # (R', D)
            y = run_matmul(x.reshape(R, B * S, F_), weight.transpose(1, 2), bias)  # (R', B*S, D)
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
    if gens is None or p == 0:
        return x
    n = math.prod(x.shape[1:])
    words = torch.empty(len(gens), -(-n // 4), dtype=torch.int64, device=x.device)  # (R', n/4)
    for j, g in enumerate(gens):  # run j's words, drawn as FastDropout draws them alone
        random_lanes(x.shape[1:], g, x.device, out=words[j])
    lanes = words.view(torch.int16)[:, :n].reshape(x.shape)  # (R', ...) a view when 4 divides n
    return x * keep_mask(lanes, p, x.dtype) * (1.0 / (1.0 - p))


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of x (R', B, S, D) over the real clips of mask (R', B, S), all when None -> (R', B, D)."""
    if mask is None:
        return x.mean(2)  # (R', B, D)
    m = mask.unsqueeze(-1).to(x.dtype)  # (R', B, S, 1)
    return (x * m).sum(2) / m.sum(2).clamp(min=1)  # (R', B, D)


class RunTransformerBlock(nn.Module):
    """R heads.TransformerBlock layers (either dropout placement)."""

    def __init__(self, runs: int, d: int, heads: int, ff: int, dropout: float, dropout_at: str) -> None:
        super().__init__()
        self.heads, self.p, self.dropout_at = heads, dropout, dropout_at
        self.qkv = RunLinear(runs, d, 3 * d, bias=False)
        self.proj = RunLinear(runs, d, d, bias=False)
        self.ln1 = RunLayerNorm(runs, d)
        self.ff = nn.Sequential(RunLinear(runs, d, ff), nn.ReLU(), RunLinear(runs, ff, d))  # keys ff.0, ff.2
        self.ln2 = RunLayerNorm(runs, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, idx: torch.Tensor | None,
                gens: list[torch.Generator] | None) -> torch.Tensor:
        R, B, S, D = x.shape
        hd = D // self.heads
        qkv = self.qkv(x, idx).view(R * B, S, 3, self.heads, hd)  # runs and batch as one batch dim
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3x (R'B, H, S, hd)
        scores = (q @ k.transpose(-1, -2)).float() * hd**-0.5  # (R'B, H, S, S), fp32 softmax as the block
        if mask is not None:
            scores = scores.masked_fill(~mask.reshape(R * B, 1, 1, S), float("-inf"))
        att = scores.softmax(-1).to(v.dtype) @ v  # (R'B, H, S, hd)
        att = att.transpose(1, 2).reshape(R, B, S, D)  # (R', B, S, D)

        def ff(h: torch.Tensor) -> torch.Tensor:
            return self.ff[2](F.relu(self.ff[0](h, idx)), idx)  # (R', B, S, D)

        if self.dropout_at == "after_norm":
            x = run_dropout(self.ln1(x + self.proj(att, idx), idx), self.p, gens)
            return run_dropout(self.ln2(x + ff(x), idx), self.p, gens)
        x = self.ln1(x + run_dropout(self.proj(att, idx), self.p, gens), idx)
        return self.ln2(x + run_dropout(ff(x), self.p, gens), idx)  # (R', B, S, D)


class RunTsfm(nn.Module):
    def __init__(self, runs: int, d: int, heads: int, ff: int, dropout: float, dropout_at: str) -> None:
        super().__init__()
        self.block = RunTransformerBlock(runs, d, heads, ff, dropout, dropout_at)

    def forward(self, x, mask, idx, gens) -> torch.Tensor:
        return masked_mean(self.block(x, mask, idx, gens), mask)  # (R', B, D)


class RunSavg(nn.Module):
    def __init__(self, runs: int, d: int, *args) -> None:
        super().__init__()

    def forward(self, x, mask, idx, gens) -> torch.Tensor:
        return F.relu(masked_mean(x, mask))  # (R', B, D)


class RunConv(nn.Module):
    """R heads.ConvPool layers: Conv1d kernel 3 (padding 1) as one batched matmul over the three
    shifted copies of the padded-to-zero clips."""

    def __init__(self, runs: int, d: int, *args) -> None:
        super().__init__()
        self.conv = nn.Module()
        self.conv.weight = nn.Parameter(torch.empty(runs, d, d, 3))  # (R, out, in, k), Conv1d's layout
        self.conv.bias = nn.Parameter(torch.empty(runs, d))

    def forward(self, x, mask, idx, gens) -> torch.Tensor:
        R, B, S, D = x.shape
        if mask is not None:
            x = x.masked_fill(~mask.unsqueeze(-1), 0.0)  # (R', B, S, D)
        xp = F.pad(x, (0, 0, 1, 1))  # (R', B, S + 2, D)
        taps = torch.cat([xp[:, :, k:k + S] for k in range(3)], -1)  # (R', B, S, 3D), tap k sees clip t+k-1
        w = pick(self.conv.weight, idx).permute(0, 3, 2, 1).reshape(R, 3 * D, D)  # (R', 3D, D) in taps' order
        h = run_matmul(taps.reshape(R, B * S, 3 * D), w, pick(self.conv.bias, idx))  # (R', B*S, D)
        return masked_mean(F.relu(h.reshape(R, B, S, D)), mask)  # (R', B, D)


RUN_TEMPORAL = {"tsfm": RunTsfm, "savg": RunSavg, "conv": RunConv}


class RunStream(nn.Module):
    """R heads.DivitaStream layers."""

    def __init__(self, runs: int, like: DivitaStream, temporal: str) -> None:
        super().__init__()
        hidden = like.embed.out_features
        self.norm = RunBatchNorm(runs, like.norm.num_features, like.norm.eps, like.norm.momentum)
        self.embed = RunLinear(runs, like.norm.num_features, hidden)
        block = getattr(like.temporal, "block", None)
        heads, ff = (block.heads, block.ff[0].out_features) if block is not None else (0, 0)
        p = block.drop.p if block is not None else 0.0
        dropout_at = block.dropout_at if block is not None else "residual"
        self.temporal = RUN_TEMPORAL[temporal](runs, hidden, heads, ff, p, dropout_at)
        self.head = RunLinear(runs, like.num_features, like.head.out_features)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, idx: torch.Tensor | None,
                gens: list[torch.Generator] | None, offset: torch.Tensor | None = None) -> torch.Tensor:
        x = self.norm.fold_into(self.embed, x, mask, idx, offset)  # (R', B, S, 128)
        return self.head(self.temporal(x, mask, idx, gens), idx)  # (R', B, C)


class GroupedDivita(nn.Module):
    """R heads.Divita models of one shape as one; build with `from_models`."""

    def __init__(self, like: Divita, runs: int) -> None:
        super().__init__()
        if like.temporal not in RUN_TEMPORAL:
            raise ValueError(f"temporal module {like.temporal!r} is not batched; batched: {', '.join(RUN_TEMPORAL)}.")
        self.runs, self.streams, self.fusion = runs, like.streams, like.fusion
        names = ("joint",) if hasattr(like, "joint") else like.streams
        for name in names:
            setattr(self, name, RunStream(runs, getattr(like, name), like.temporal))

    @classmethod
    def from_models(cls, models: list[Divita]) -> GroupedDivita:
        """The models stacked into one: run j computes what models[j] computes."""
        out = cls(models[0], len(models)).to(next(models[0].parameters()).device)
        states = [m.state_dict() for m in models]
        out.load_state_dict({k: torch.stack([s[k] for s in states]) for k in states[0]})
        return out

    def run_state(self, j: int) -> dict[str, torch.Tensor]:
        """Run j's weights and buffers as a heads.Divita state_dict (copies)."""
        return {k: v[j].clone() for k, v in self.state_dict().items()}

    @torch.no_grad()
    def keep(self, idx: torch.Tensor) -> None:
        """Keep only runs `idx` (R',): every parameter and buffer shrinks to (R', ...)."""
        for module in self.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                setattr(module, name, nn.Parameter(p.index_select(0, idx), requires_grad=p.requires_grad))
            for name, b in list(module.named_buffers(recurse=False)):
                setattr(module, name, b.index_select(0, idx))
        self.runs = len(idx)

    def forward(self, ix: torch.Tensor | None = None, vx: torch.Tensor | None = None,
                ix_mask: torch.Tensor | None = None, vx_mask: torch.Tensor | None = None,
                idx: torch.Tensor | None = None, gens: list[torch.Generator] | None = None,
                offsets: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits (R', B, C) of runs `idx` (all when None) from ix (R', B, S, Fi) and/or vx
        (R', B, S', Fv) with their masks (None: every clip real); `gens` holds those runs'
        dropout generators (training). `offsets` ({"image": (Fi,), "video": (Fv,)}, see
        RunBatchNorm.fold_into): the inputs are the clips less these, in the matmuls' dtype."""
        off = offsets or {}
        if hasattr(self, "joint"):
            mask = ix_mask if vx_mask is None else vx_mask if ix_mask is None else ix_mask & vx_mask
            offset = torch.cat([off["image"], off["video"]]) if off else None  # (Fi + Fv,)
            return self.joint(torch.cat([ix, vx], -1), mask, idx, gens, offset)  # (R', B, C)
        inputs = {"image": (ix, ix_mask), "video": (vx, vx_mask)}
        logits = [getattr(self, n)(*inputs[n], idx, gens, off.get(n)) for n in self.streams]  # each (R', B, C)
        return logits[0] if len(logits) == 1 else 0.5 * (logits[0] + logits[1])  # (R', B, C)
