"""R DIViTA heads of one shape as one model: every parameter has a leading run dim R.

`GroupedDivita.from_models` stacks R `heads.Divita` models (same streams, dims, temporal
module, fusion, dropout placement) into one module whose state_dict keys are Divita's own,
each tensor with a leading (R, ...) dim, so `run_state(j)` is a Divita state_dict again.
Every layer is one batched matmul over the runs (run_layers.run_matmul: torch.bmm / baddbmm; one
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

import torch
import torch.nn as nn
import torch.nn.functional as F

from trailers12k_feats.training import fused
from trailers12k_feats.training.heads import Divita, DivitaStream
from trailers12k_feats.training.run_layers import (
    RunBatchNorm,
    RunLayerNorm,
    RunLinear,
    masked_mean,
    pick,
    run_dropout,
    run_keep,
    run_matmul,
    select_runs,
)

BATCHED_TEMPORAL = ("tsfm", "savg", "conv")


class RunTransformerBlock(nn.Module):
    """R heads.TransformerBlock layers (either dropout placement). `fused` (set by
    GroupedDivita.use_fused): the whole block as one compiled graph (fused.block), its dropout
    masks in training drawn as run_dropout draws them."""

    fused = False

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
        if self.fused and fused.serves(x):
            # both masks drawn first: nothing else draws from the runs' generators in between
            keep1, keep2 = run_keep(x, self.p, gens), run_keep(x, self.p, gens)  # (R', B, S, D) each, None in eval
            # each Linear's weight as it lies in memory, (R', in, out): run_layers.linear_weight
            lin = [pick(m.weight, idx).transpose(1, 2) for m in (self.qkv, self.proj, self.ff[0], self.ff[2])]
            weights = [lin[0], lin[1], lin[2], pick(self.ff[0].bias, idx), lin[3], pick(self.ff[2].bias, idx),
                       *(pick(w, idx) for w in (self.ln1.weight, self.ln1.bias, self.ln2.weight, self.ln2.bias))]
            return fused.block(x, weights, keep1, keep2, mask, self.heads, 1.0 / (1.0 - self.p),
                               self.dropout_at == "after_norm", self.ln1.eps)  # (R', B, S, D)
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

        x = self.add_norm(x, self.proj(att, idx), self.ln1, idx, gens)  # (R', B, S, D)
        return self.add_norm(x, ff(x), self.ln2, idx, gens)  # (R', B, S, D)

    def add_norm(self, x: torch.Tensor, y: torch.Tensor, ln: RunLayerNorm, idx: torch.Tensor | None,
                 gens: list[torch.Generator] | None) -> torch.Tensor:
        """ln(x + y) with the block's dropout, after the norm or on y: (R', B, S, D)."""
        if self.dropout_at == "after_norm":
            return run_dropout(ln(x + y, idx), self.p, gens)
        return ln(x + run_dropout(y, self.p, gens), idx)


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

    def use_fused(self, on: bool) -> None:
        """Compute each transformer block, and in training the BatchNorm statistics and fold, as
        compiled code (training/fused.py; fused.warm_up compiles it first) or as eager code."""
        for m in self.modules():
            if isinstance(m, (RunBatchNorm, RunTransformerBlock)):
                m.fused = on

    @torch.no_grad()
    def keep(self, idx: torch.Tensor) -> None:
        """Keep only runs `idx` (R',): every parameter and buffer shrinks to (R', ...)."""
        for module in self.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                setattr(module, name, nn.Parameter(select_runs(p, idx), requires_grad=p.requires_grad))
            for name, b in list(module.named_buffers(recurse=False)):
                setattr(module, name, select_runs(b, idx))
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
