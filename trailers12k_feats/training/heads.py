"""The DIViTA head (docs/paper.md): per stream BatchNorm -> Linear F->128 -> temporal module -> Linear 128->10.

Masks are bool (B, S), True for a real clip. Padding sits at the end of each row (windows
and snippets are left-aligned), every row has at least one real clip, and padded values
must be finite (the loader zero-fills them; their values are otherwise ignored). Nothing
checks these in forward, since a check would cost a pass or a sync per step. Padded clips
never reach attention keys, BatchNorm statistics or pooling, so a trailer shorter than the
window trains and predicts exactly as its real clips say. An all-true mask over zero
padding makes the zeros count as clips, as the authors' code does (training/protocols.py).
"""

from __future__ import annotations

import math
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

    On all-valid input it equals nn.BatchNorm1d applied to the (B*S, F) clips: outputs,
    input gradients, running statistics (momentum, unbiased running_var) and
    num_batches_tracked. Padded positions output 0. Parameter and buffer names are
    BatchNorm1d's own.
    """

    def centre(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x - mean (B, S, F), var (F,)): the real clips' batch statistics in training (updating
        the running ones), the running statistics in eval."""
        if not (self.training or self.running_mean is None):
            return x - self.running_mean, self.running_var  # (B, S, F), (F,)
        # Masked sums as mat-vecs over the flat clips: no masked gather/scatter copies, no host
        # sync. Statistics in fp32 whatever the autocast. Autograd records these only when x
        # needs a gradient, which data never does, so the usual step pays nothing for it.
        with torch.autocast(x.device.type, enabled=False):
            B, S, F_ = x.shape
            m = mask.reshape(B * S).float()  # (B*S,)
            n = m.sum()  # () real clips in the batch
            mean = (m @ x.reshape(B * S, F_).float()) / n  # (F,)
            xc = x - mean  # (B, S, F) reused by the caller, so the two-pass variance is free
            var = (m @ xc.reshape(B * S, F_).square()) / n  # (F,) biased: what BatchNorm normalises by
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                w = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked
                self.running_mean.lerp_(mean.detach(), w)
                # BatchNorm1d keeps the unbiased variance; n / (n - 1) guarded for a lone clip.
                self.running_var.lerp_(var.detach() * n / (n - 1).clamp(min=1), w)
        return xc, var

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        xc, var = self.centre(x, mask)  # (B, S, F), (F,)
        scale = torch.rsqrt(var + self.eps)  # (F,)
        if self.affine:
            scale = scale * self.weight  # (F,)
        y = xc * scale  # (B, S, F)
        if self.affine:
            y = y + self.bias  # (B, S, F)
        return y.masked_fill(~mask.unsqueeze(-1), 0.0)  # (B, S, F) padding -> 0

    def fold_into(self, linear: nn.Linear, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """linear(self(x, mask)) as one matmul on centred x, with the BatchNorm scale folded into
        the weights: W(s(x - mu) + beta) + b = (W s)(x - mu) + (W beta + b).

        It skips BatchNorm's elementwise output pass and, as x needs no gradient, the (B*S, F)
        input gradient of the projection; parameter gradients are unchanged. Padded rows hold
        finite junk (not 0): everything downstream masks them.
        """
        xc, var = self.centre(x, mask)  # (B, S, F), (F,)
        scale = torch.rsqrt(var + self.eps)  # (F,)
        weight, bias = linear.weight, linear.bias  # (D, F), (D,)
        if self.affine:
            scale = scale * self.weight  # (F,)
            shift = linear.weight @ self.bias  # (D,)
            bias = shift if bias is None else bias + shift  # (D,)
        return F.linear(xc, weight * scale, bias)  # (B, S, D)


def random_lanes(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Uniform random int16 values of `shape`, cut from 64-bit random words (into `out`, int64 words
    of at least a quarter of `shape`'s size, when given): four values per generator draw, where
    `torch.rand` makes one."""
    n = math.prod(shape)
    words = torch.empty(-(-n // 4), dtype=torch.int64, device=device) if out is None else out
    words.random_(-2**63, 2**63 - 1, generator=generator)  # every bit uniform (random_() leaves the top one 0)
    return words.view(torch.int16)[:n].view(shape)


def keep_threshold(p: float) -> int:
    """The int16 value at or above which a random lane keeps its unit: probability 1 - p, to 1/65536."""
    return round(p * 65536) - 32768


def keep_mask(lanes: torch.Tensor, p: float, dtype: torch.dtype) -> torch.Tensor:
    """(lanes >= keep_threshold(p)) as 1 and 0 in `dtype`, from int16 `lanes`.

    Taken as a clamp of the lanes to {t - 1, t} less t - 1, which stays in int16: converting a
    bool mask to bf16 measured several times slower on the CPU than int16 to bf16."""
    t = keep_threshold(p)
    if t == -32768:  # p = 0: every lane keeps (t - 1 is not an int16)
        return torch.ones(lanes.shape, dtype=dtype, device=lanes.device)
    return lanes.clamp(t - 1, t).sub_(t - 1).to(dtype)


class FastDropout(nn.Module):
    """Inverted dropout drawing its keep-mask from 16-bit random lanes (`random_lanes`): faster on
    the CPU than `bernoulli_`, which nn.Dropout uses, and than `torch.rand`.

    `generator` (None: torch's global one) is where the masks come from; a training run sets
    its own (set_dropout_generator), so it draws the same masks alone or in a group of runs."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self.generator: torch.Generator | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = keep_mask(random_lanes(x.shape, self.generator, x.device), self.p, x.dtype)  # (..., D)
        return x * keep * (1.0 / (1.0 - self.p))  # (..., D)


def set_dropout_generator(model: nn.Module, generator: torch.Generator | None) -> None:
    """Make every FastDropout of `model` draw its masks from `generator` (None: the global one)."""
    for m in model.modules():
        if isinstance(m, FastDropout):
            m.generator = generator


DROPOUT_AT = ("residual", "after_norm")  # where TransformerBlock drops: see its docstring


class TransformerBlock(nn.Module):
    """Post-norm block with bias-free attention; `dropout_at` says where dropout acts.

    "residual": x = LN(x + drop(MHA(x))); x = LN(x + drop(FF(x))), residual dropout on each
    sub-layer's output before its add (as in nn.TransformerEncoderLayer).
    "after_norm": x = drop(LN(x + MHA(x))); x = drop(LN(x + FF(x))), dropout on each
    LayerNorm's output, the block's output included (the authors' code, model/tsfm.py).
    Both have the same parameters; attention probabilities are never dropped.
    """

    def __init__(self, d: int = 128, heads: int = 4, ff: int = 768, dropout: float = 0.25,
                 dropout_at: str = "residual") -> None:
        super().__init__()
        if dropout_at not in DROPOUT_AT:
            raise ValueError(f"unknown dropout_at {dropout_at!r}; valid: {', '.join(DROPOUT_AT)}.")
        self.heads, self.dropout_at = heads, dropout_at
        self.qkv = nn.Linear(d, 3 * d, bias=False)  # q, k, v projections fused: same parameter count
        self.proj = nn.Linear(d, d, bias=False)
        self.ln1 = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, ff), nn.ReLU(), nn.Linear(ff, d))
        self.ln2 = nn.LayerNorm(d)
        self.drop = FastDropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, S, D = x.shape
        hd = D // self.heads
        q, k, v = self.qkv(x).view(B, S, 3, self.heads, hd).permute(2, 0, 3, 1, 4)  # 3x (B, H, S, hd)
        # Explicit attention equals F.scaled_dot_product_attention (tested) but at S=30 on CPU it
        # is faster: measured 1.5x faster for the bf16 training step. Softmax in fp32: faster than
        # bf16 softmax on CPU, and exact.
        scores = (q @ k.transpose(-1, -2)).float() * hd**-0.5  # (B, H, S, S)
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))  # padded keys get 0 weight
        att = scores.softmax(-1).to(v.dtype) @ v  # (B, H, S, hd); each row has a real key: no NaN
        att = att.transpose(1, 2).reshape(B, S, D)  # (B, S, D)
        if self.dropout_at == "after_norm":
            x = self.drop(self.ln1(x + self.proj(att)))  # (B, S, D)
            return self.drop(self.ln2(x + self.ff(x)))  # (B, S, D)
        x = self.ln1(x + self.drop(self.proj(att)))  # (B, S, D)
        return self.ln2(x + self.drop(self.ff(x)))  # (B, S, D)


class TsfmPool(nn.Module):
    """`tsfm`: one transformer block, then the mean over real clips."""

    def __init__(self, d: int, heads: int, ff: int, dropout: float, dropout_at: str = "residual") -> None:
        super().__init__()
        self.block = TransformerBlock(d, heads, ff, dropout, dropout_at)
        self.out_dim = d

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return masked_mean(self.block(x, mask), mask)  # (B, D)


class SavgPool(nn.Module):
    """`savg`: mean over real clips, then ReLU."""

    def __init__(self, d: int, heads: int, ff: int, dropout: float, dropout_at: str = "residual") -> None:
        super().__init__()  # no dropout here, so nothing to place
        self.out_dim = d

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return F.relu(masked_mean(x, mask))  # (B, D)


class GruPool(nn.Module):
    """`gru`: one GRU layer (hidden 115), ReLU, mean over real steps.

    Padding follows the real clips, so a unidirectional GRU's outputs at real steps never see
    it: no packing needed, and padded steps' outputs are dropped by the masked mean.
    """

    def __init__(self, d: int, heads: int, ff: int, dropout: float, hidden: int = 115,
                 dropout_at: str = "residual") -> None:
        super().__init__()
        self.gru = nn.GRU(d, hidden, num_layers=1, batch_first=True)
        self.out_dim = hidden

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h, _ = self.gru(x)  # (B, S, H)
        return masked_mean(F.relu(h), mask)  # (B, H)


class ConvPool(nn.Module):
    """`conv`: Conv1d kernel 3 (padding 1), ReLU, mean over real clips.

    Padded clips are zeroed before the conv, so the last real clip sees a zero neighbour,
    exactly as the conv's own zero padding at a sequence end: a short trailer padded to the
    window gives the same result as its real clips alone.
    """

    def __init__(self, d: int, heads: int, ff: int, dropout: float, dropout_at: str = "residual") -> None:
        super().__init__()
        self.conv = nn.Conv1d(d, d, kernel_size=3, padding=1)
        self.out_dim = d

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x.masked_fill(~mask.unsqueeze(-1), 0.0)  # (B, S, D) padding -> 0
        h = F.relu(self.conv(x.transpose(1, 2))).transpose(1, 2)  # (B, S, D)
        return masked_mean(h, mask)  # (B, D)


# name -> class(d, heads, ff, dropout) with attribute out_dim and forward(x (B, S, d), mask) -> (B, out_dim);
# it also gets dropout_at= (see TransformerBlock) when that is not "residual".
TEMPORAL: dict[str, Callable[..., nn.Module]] = {}


def register_temporal(name: str, cls: Callable[..., nn.Module]) -> None:
    """Add a temporal module class `cls(d, heads, ff, dropout)` under `name`."""
    if name in TEMPORAL:
        raise ValueError(f"temporal module {name!r} is already registered.")
    TEMPORAL[name] = cls


for _name, _cls in (("tsfm", TsfmPool), ("savg", SavgPool), ("gru", GruPool), ("conv", ConvPool)):
    register_temporal(_name, _cls)

FUSIONS = ("late", "early")


def _check_temporal(temporal: str) -> None:
    if temporal not in TEMPORAL:
        raise ValueError(f"unknown temporal module {temporal!r}; valid: {', '.join(TEMPORAL)}.")


class DivitaStream(nn.Module):
    """One stream: MaskedBatchNorm1d(F) -> Linear(F, 128) -> temporal -> Linear(D, classes).

    timm-style: `num_features` (D), `forward_features(x, mask) -> (B, D)`, `forward_head(feats) -> (B, C)`.
    """

    def __init__(self, in_dim: int, temporal: str = "tsfm", num_classes: int = NUM_GENRES, hidden: int = 128,
                 heads: int = 4, ff: int = 768, dropout: float = 0.25, dropout_at: str = "residual") -> None:
        super().__init__()
        _check_temporal(temporal)
        if dropout_at not in DROPOUT_AT:
            raise ValueError(f"unknown dropout_at {dropout_at!r}; valid: {', '.join(DROPOUT_AT)}.")
        self.norm = MaskedBatchNorm1d(in_dim)
        self.embed = nn.Linear(in_dim, hidden)  # no activation, no positional encoding
        place = {} if dropout_at == "residual" else {"dropout_at": dropout_at}  # registered modules may lack it
        self.temporal = TEMPORAL[temporal](hidden, heads, ff, dropout, **place)
        self.num_features: int = self.temporal.out_dim
        self.head = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.norm.fold_into(self.embed, x, mask)  # (B, S, 128) = embed(norm(x)) at real clips
        return self.temporal(x, mask)  # (B, D)

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(feats)  # (B, C)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, mask))  # (B, C)


class Divita(nn.Module):
    """An image stream, a video stream, or both fused late (logits averaged) or early (features
    concatenated into one stream, attribute `joint`). Build with `build_divita`."""

    def __init__(self, ix_dim: int | None, vx_dim: int | None, temporal: str = "tsfm", fusion: str = "late",
                 num_classes: int = NUM_GENRES, **kw) -> None:
        super().__init__()
        if ix_dim is None and vx_dim is None:
            raise ValueError("build_divita needs ix_dim (image stream), vx_dim (video stream) or both; got neither.")
        if fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {fusion!r}; valid: {', '.join(FUSIONS)}.")
        _check_temporal(temporal)
        self.streams = tuple(n for n, d in (("image", ix_dim), ("video", vx_dim)) if d is not None)
        self.fusion, self.temporal, self.num_classes = fusion, temporal, num_classes
        self.dims = {n: d for n, d in (("image", ix_dim), ("video", vx_dim)) if d is not None}
        if fusion == "early" and len(self.streams) == 2:
            self.joint = DivitaStream(ix_dim + vx_dim, temporal, num_classes, **kw)
        else:  # late fusion, or a single stream (where early fusion is just that stream)
            for name in self.streams:
                setattr(self, name, DivitaStream(self.dims[name], temporal, num_classes, **kw))

    def forward(self, ix: torch.Tensor | None = None, vx: torch.Tensor | None = None,
                ix_mask: torch.Tensor | None = None, vx_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, C) from ix (B, S, Fi) and/or vx (B, S', Fv) with their masks."""
        inputs = {"image": (ix, ix_mask), "video": (vx, vx_mask)}
        for name in self.streams:
            if inputs[name][0] is None or inputs[name][1] is None:
                raise ValueError(f"this model has a {name} stream: pass {name[0]}x and {name[0]}x_mask.")
        if hasattr(self, "joint"):
            if ix.shape[:2] != vx.shape[:2]:
                raise ValueError(f"early fusion needs aligned streams: ix {tuple(ix.shape[:2])} "
                                 f"vs vx {tuple(vx.shape[:2])} (batch, clips).")
            x = torch.cat([ix, vx], -1)  # (B, S, Fi + Fv); the caller aligns the clips
            return self.joint(x, ix_mask & vx_mask)  # (B, C)
        logits = [getattr(self, n)(*inputs[n]) for n in self.streams]  # each (B, C)
        return logits[0] if len(logits) == 1 else 0.5 * (logits[0] + logits[1])  # (B, C)

    def describe(self) -> dict:
        """Streams, their input dims, temporal module, fusion, classes and trainable parameters."""
        return {"streams": list(self.streams), "dims": dict(self.dims), "temporal": self.temporal,
                "fusion": self.fusion, "num_classes": self.num_classes, "params": count_params(self)}


def build_divita(ix_dim: int | None, vx_dim: int | None, temporal: str = "tsfm", fusion: str = "late",
                 num_classes: int = NUM_GENRES, **kw) -> Divita:
    """The DIViTA head for an image stream of dim `ix_dim` and/or a video stream of dim `vx_dim`.
    `kw` goes to each DivitaStream (hidden, heads, ff, dropout, dropout_at)."""
    return Divita(ix_dim, vx_dim, temporal, fusion, num_classes, **kw)


def count_params(model: nn.Module) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
