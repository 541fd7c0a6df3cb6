"""The DIViTA head (PAPER.md): per stream BatchNorm -> Linear F->128 -> temporal module -> Linear 128->10.

Masks are bool (B, S), True for a real clip. Padding sits at the end of each row (windows
and snippets are left-aligned) and every row has at least one real clip. Padded clips
never reach attention keys, BatchNorm statistics or pooling, so a trailer shorter than
the window trains and predicts exactly as its real clips say.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from trailers12k_feats import NUM_GENRES


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x (B, S, D) over the real clips of mask (B, S) -> (B, D)."""
    m = mask.unsqueeze(-1).to(x.dtype)  # (B, S, 1)
    return (x * m).sum(1) / m.sum(1).clamp(min=1)  # (B, D)


class MaskedBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d over the feature dim of (B, S, F), with batch statistics from real clips only.

    On all-valid input it equals nn.BatchNorm1d applied to the (B*S, F) clips, running
    statistics included. Outputs at padded positions are meaningless and must stay masked.
    """

    def statistics(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, var) to normalise with: of the real clips in training (updating the running
        statistics), the running ones in eval. Inputs carry no gradient, so neither do these."""
        if not self.training:
            return self.running_mean, self.running_var
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):  # statistics in fp32
            B, S, F_ = x.shape
            flat = x.reshape(B * S, F_).float()  # (B*S, F)
            m = mask.reshape(B * S).float()  # (B*S,)
            n = m.sum()  # real clips in the batch
            # Masked sums as mat-vecs: one pass over x each, no masked copies.
            mean = (m @ flat) / n  # (F,)
            var = ((m @ (flat * flat)) / n - mean * mean).clamp(min=0)  # (F,) biased, used to normalise
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * n / (n - 1).clamp(min=1), self.momentum)  # unbiased, as BatchNorm1d
        return mean, var

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        mean, var = self.statistics(x, mask)
        scale = self.weight * torch.rsqrt(var + self.eps)  # (F,)
        # Padded positions get arbitrary values here; every later step masks them out.
        return torch.addcmul(self.bias - mean * scale, x.float(), scale)  # (B, S, F)

    def fold_into(self, linear: nn.Linear, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """linear(self(x, mask)) computed as one matmul on centred x, with BatchNorm's affine folded
        into the weights: W(s(x - mu) + beta) + b = (W s)(x - mu) + (W beta + b).

        Because x needs no gradient, this skips BatchNorm's elementwise passes and the
        (clips x F) input gradient of the projection; the parameters' gradients are unchanged.
        """
        mean, var = self.statistics(x, mask)
        scale = self.weight * torch.rsqrt(var + self.eps)  # (F,)
        weight = linear.weight * scale  # (D, F)
        bias = torch.addmv(linear.bias, linear.weight, self.bias)  # (D,)
        return F.linear(x - mean, weight, bias)  # (B, S, D)


class Dropout(nn.Module):
    """Inverted dropout drawing its mask with `torch.rand` (3x faster on CPU than `bernoulli_`)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = torch.rand(x.shape, device=x.device) >= self.p  # (..., D)
        return x * keep.to(x.dtype) * (1.0 / (1.0 - self.p))


class TransformerBlock(nn.Module):
    """Post-norm block: x = LN(x + drop(MHA(x))); x = LN(x + drop(FF(x))), bias-free attention."""

    def __init__(self, d: int = 128, heads: int = 4, ff: int = 768, dropout: float = 0.25) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d, bias=False)  # q, k, v projections fused: same parameters
        self.proj = nn.Linear(d, d, bias=False)
        self.ln1 = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, ff), nn.ReLU(), nn.Linear(ff, d))
        self.ln2 = nn.LayerNorm(d)
        self.drop = Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, S, D = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3x (B, H, S, d)
        # Explicit attention: at S=30 plain bmm beats the fused CPU kernels, above all in bf16.
        scores = (q @ k.transpose(-1, -2)) * (D // self.heads) ** -0.5  # (B, H, S, S)
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))  # padded keys get no weight
        att = scores.softmax(-1) @ v  # (B, H, S, d)
        att = att.transpose(1, 2).reshape(B, S, D)  # (B, S, D)
        x = self.ln1(x + self.drop(self.proj(att)))  # (B, S, D)
        return self.ln2(x + self.drop(self.ff(x)))  # (B, S, D)


class TsfmPool(nn.Module):
    """`tsfm`: one transformer block, then the mean over real clips."""

    def __init__(self, d: int, heads: int, ff: int, dropout: float) -> None:
        super().__init__()
        self.block = TransformerBlock(d, heads, ff, dropout)
        self.out_dim = d

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return masked_mean(self.block(x, mask), mask)  # (B, D)


class SavgPool(nn.Module):
    """`savg`: mean over real clips, then ReLU."""

    def __init__(self, d: int, heads: int, ff: int, dropout: float) -> None:
        super().__init__()
        self.out_dim = d

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return F.relu(masked_mean(x, mask))  # (B, D)


class GruPool(nn.Module):
    """`gru`: one GRU layer (hidden 115), ReLU, mean over real steps.

    Padding follows the real clips, so a unidirectional GRU's real outputs never see it.
    """

    def __init__(self, d: int, heads: int, ff: int, dropout: float, hidden: int = 115) -> None:
        super().__init__()
        self.gru = nn.GRU(d, hidden, batch_first=True)
        self.out_dim = hidden

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h, _ = self.gru(x)  # (B, S, H)
        return masked_mean(F.relu(h), mask)  # (B, H)


class ConvPool(nn.Module):
    """`conv`: Conv1d kernel 3 (padding 1), ReLU, mean over real clips.

    Padded clips are zero, so the last real clip sees a zero neighbour exactly as at a
    sequence boundary.
    """

    def __init__(self, d: int, heads: int, ff: int, dropout: float) -> None:
        super().__init__()
        self.conv = nn.Conv1d(d, d, kernel_size=3, padding=1)
        self.out_dim = d

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x * mask.unsqueeze(-1).to(x.dtype)  # (B, S, D) padding -> 0
        h = F.relu(self.conv(x.transpose(1, 2))).transpose(1, 2)  # (B, S, D)
        return masked_mean(h, mask)  # (B, D)


TEMPORAL: dict[str, Callable[..., nn.Module]] = {}


def register_temporal(name: str, cls: Callable[..., nn.Module]) -> None:
    """Add a temporal module class `cls(d, heads, ff, dropout)` under `name`."""
    if name in TEMPORAL:
        raise ValueError(f"temporal module {name!r} is already registered.")
    TEMPORAL[name] = cls


for _name, _cls in (("tsfm", TsfmPool), ("savg", SavgPool), ("gru", GruPool), ("conv", ConvPool)):
    register_temporal(_name, _cls)

FUSIONS = ("late", "early")


class DivitaStream(nn.Module):
    """One stream: MaskedBatchNorm1d(F) -> Linear(F, 128) -> temporal -> Linear(D, classes).

    timm-style: `num_features`, `forward_features(x, mask)`, `forward_head(feats)`.
    """

    def __init__(self, in_dim: int, temporal: str = "tsfm", num_classes: int = NUM_GENRES, hidden: int = 128,
                 heads: int = 4, ff: int = 768, dropout: float = 0.25) -> None:
        super().__init__()
        if temporal not in TEMPORAL:
            raise ValueError(f"unknown temporal module {temporal!r}; valid: {', '.join(TEMPORAL)}.")
        self.norm = MaskedBatchNorm1d(in_dim)
        self.embed = nn.Linear(in_dim, hidden)  # no activation, no positional encoding
        self.temporal = TEMPORAL[temporal](hidden, heads, ff, dropout)
        self.num_features = self.temporal.out_dim
        self.head = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.norm.fold_into(self.embed, x, mask)  # (B, S, 128) = embed(norm(x))
        return self.temporal(x, mask)  # (B, D)

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(feats)  # (B, C)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, mask))  # (B, C)


class Divita(nn.Module):
    """An image stream, a video stream, or both fused late (logits averaged) or early (features concatenated)."""

    def __init__(self, ix_dim: int | None, vx_dim: int | None, temporal: str = "tsfm", fusion: str = "late",
                 num_classes: int = NUM_GENRES, **kw) -> None:
        super().__init__()
        if ix_dim is None and vx_dim is None:
            raise ValueError("build_divita needs ix_dim (image stream), vx_dim (video stream) or both; got neither.")
        if fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {fusion!r}; valid: {', '.join(FUSIONS)}.")
        if temporal not in TEMPORAL:
            raise ValueError(f"unknown temporal module {temporal!r}; valid: {', '.join(TEMPORAL)}.")
        self.streams = tuple(n for n, d in (("image", ix_dim), ("video", vx_dim)) if d is not None)
        self.fusion, self.temporal, self.dims = fusion, temporal, {"image": ix_dim, "video": vx_dim}
        if fusion == "early" and len(self.streams) == 2:
            self.joint = DivitaStream(ix_dim + vx_dim, temporal, num_classes, **kw)
        else:
            for name in self.streams:
                setattr(self, name, DivitaStream(self.dims[name], temporal, num_classes, **kw))

    def forward(self, ix: torch.Tensor | None = None, vx: torch.Tensor | None = None,
                ix_mask: torch.Tensor | None = None, vx_mask: torch.Tensor | None = None) -> torch.Tensor:
        inputs = {"image": (ix, ix_mask), "video": (vx, vx_mask)}
        for name in self.streams:
            if inputs[name][0] is None or inputs[name][1] is None:
                raise ValueError(f"this model has a {name} stream: pass {name[0]}x and {name[0]}x_mask.")
        if hasattr(self, "joint"):
            x = torch.cat([ix, vx], -1)  # (B, S, Fi + Fv); the caller aligns the clips
            return self.joint(x, ix_mask & vx_mask)  # (B, C)
        logits = [getattr(self, n)(*inputs[n]) for n in self.streams]  # each (B, C)
        return logits[0] if len(logits) == 1 else 0.5 * (logits[0] + logits[1])

    def describe(self) -> dict:
        return {"streams": list(self.streams), "dims": {n: self.dims[n] for n in self.streams},
                "temporal": self.temporal, "fusion": self.fusion, "params": count_params(self)}


def build_divita(ix_dim: int | None, vx_dim: int | None, temporal: str = "tsfm", fusion: str = "late",
                 num_classes: int = NUM_GENRES, **kw) -> Divita:
    """The DIViTA head for an image stream of dim `ix_dim` and/or a video stream of dim `vx_dim`."""
    return Divita(ix_dim, vx_dim, temporal, fusion, num_classes, **kw)


def count_params(model: nn.Module) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
