"""Compiled parts of a group's steps, each chain of elementwise operations one C++ loop (docs/speed.md).

On the CPU a group's step in bf16 is bound by passes over its activations, not by its matmuls:
in eager PyTorch every operation of a chain such as LayerNorm(x + y) * w + b followed by dropout
reads and writes the whole (R, B, S, D) tensor, and converts bf16 to fp32 and back. Here three
parts are written once as plain functions and compiled by torch.compile (inductor), which fuses
each chain of elementwise operations into one loop for the forward and one or two for the
backward, and leaves the matmuls to the same batched kernels as the eager code:

- `block`: a transformer block of each run (heads.TransformerBlock), attention, feed-forward,
  residual adds, LayerNorms and dropout in either placement (`_norm_chain`);
- `moments`: a batch's per-feature sums and sums of squares, for the BatchNorm statistics;
- `fold`: the BatchNorm scale and shift folded into the input projection's weight and bias.

Inside a chain everything is computed in fp32 and rounded once at its end, where the eager code
rounds after every operation. Training steps use all three, evaluation the block (the other two
compute batch statistics). Compiling needs a C++ compiler; `warm_up` compiles the parts before a
group's first step, and says why not where that fails, so that the group trains with the eager
code instead. The block's graph is compiled for its width, heads and window, and serves any
number of runs and windows above one (warm_up also compiles the graphs of one run; a batch of
one window runs the eager code): its inner loops then run over sizes known when compiling,
which inductor vectorises fully, where loops compiled for any size ran markedly slower.
`moments` and `fold` serve any shape. Inductor keeps the graphs on disk, so later processes
load them instead of compiling.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _norm_chain(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                keep: torch.Tensor | None, scale: float, after: bool, eps: float = 1e-5) -> torch.Tensor:
    R, D = x.shape[0], x.shape[-1]
    w = weight.float().view(R, *([1] * (x.dim() - 2)), D)  # (R', 1, 1, D)
    b = bias.float().view(R, *([1] * (x.dim() - 2)), D)  # (R', 1, 1, D)
    y = y.float()  # (R', B, S, D)
    if keep is not None and not after:  # "residual": dropout on the branch
        y = y * keep.float() * scale
    h = F.layer_norm(x.float() + y, (D,), eps=eps) * w + b  # (R', B, S, D)
    if keep is not None and after:  # "after_norm": dropout on the block's output
        h = h * keep.float() * scale
    return h.to(x.dtype)


def _block(x: torch.Tensor, qkv: torch.Tensor, proj: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
           w2: torch.Tensor, b2: torch.Tensor, ln1_w: torch.Tensor, ln1_b: torch.Tensor, ln2_w: torch.Tensor,
           ln2_b: torch.Tensor, keep1: torch.Tensor | None, keep2: torch.Tensor | None, mask: torch.Tensor | None,
           heads: int, scale: float, after: bool, eps: float) -> torch.Tensor:
    R, B, S, D = x.shape
    hd = D // heads

    def linear(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        w = w.to(x.dtype)  # (R', in, out): each run's nn.Linear weight transposed, as autocast casts it
        return torch.bmm(h, w) if b is None else torch.baddbmm(b.to(x.dtype).unsqueeze(1), h, w)  # (R', N, out)

    # split, not one permuted view: the backward then writes each gradient into its slice, where a
    # view's unbind made inductor assemble all three in one loop that selects among them per element
    q, k, v = (t.reshape(R * B, S, heads, hd).transpose(1, 2)
               for t in linear(x.reshape(R, B * S, D), qkv).split(D, -1))  # 3x (R'B, H, S, hd)
    scores = (q @ k.transpose(-1, -2)).float() * hd**-0.5  # (R'B, H, S, S)
    if mask is not None:
        scores = scores.masked_fill(~mask.reshape(R * B, 1, 1, S), float("-inf"))
    att = (scores.softmax(-1).to(x.dtype) @ v).transpose(1, 2).reshape(R, B * S, D)  # (R', B*S, D)
    x = _norm_chain(x, linear(att, proj).view(R, B, S, D), ln1_w, ln1_b, keep1, scale, after, eps)  # (R', B, S, D)
    h = F.relu(linear(x.reshape(R, B * S, D), w1, b1))  # (R', B*S, FF)
    return _norm_chain(x, linear(h, w2, b2).view(R, B, S, D), ln2_w, ln2_b, keep2, scale, after, eps)


def _moments(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.float()  # (R', B, S, F)
    if mask is not None:
        xf = xf * mask.unsqueeze(-1).float()  # padding -> 0
    # each window's sums, then the windows': a window's S clips lie together, so the loop reads x
    # window by window, where one sum over (B, S) walked every feature down all B*S clips in turn
    return xf.sum(2).sum(1), (xf * xf).sum(2).sum(1)  # (R', F) each


def _fold(weight: torch.Tensor, bias: torch.Tensor, bn_weight: torch.Tensor, bn_bias: torch.Tensor,
          mean: torch.Tensor, var: torch.Tensor, eps: float,
          dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    scale = torch.rsqrt(var + eps) * bn_weight.unsqueeze(1)  # (R', 1, F)
    folded = weight * scale.transpose(1, 2)  # (R', F, D)
    shift = (weight * bn_bias.unsqueeze(2)).sum(1) - (folded * mean.transpose(1, 2)).sum(1)  # (R', D)
    return folded.to(dtype), bias + shift  # (R', F, D), (R', D)


_compiled: dict[str, object] = {}
# Graphs a chain may need: one run or more, one window or more, with a mask or not. Past
# torch's default of 8, dynamo would run the chain uncompiled.
RECOMPILE_LIMIT = 32


def _chain(name: str):
    if name not in _compiled:
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        # the block's sizes are static but for the dims block() marks: see the module's docstring
        _compiled[name] = torch.compile({"block": _block, "moments": _moments, "fold": _fold}[name],
                                        dynamic=name != "block")
    return _compiled[name]


def _plain(args: tuple) -> tuple:
    """Parameters as plain tensors (views), others as they are."""
    return tuple(a.view(a.shape) if isinstance(a, torch.nn.Parameter) else a for a in args)


def _call(name: str, *args):
    """The compiled chain `name` on `args`, outside autocast (a chain sets its own dtypes) and with
    parameters passed as plain tensors, so that neither makes dynamo compile another graph."""
    args = _plain(args)
    device = next(a for a in args if isinstance(a, torch.Tensor)).device.type
    with torch.autocast(device, enabled=False):
        return _chain(name)(*args)


def serves(x: torch.Tensor) -> bool:
    """Whether the compiled parts take x (R', B, ...): a batch of one window (B = 1, rare: a last
    batch of one) would make dynamo compile graphs of its own, so the eager code runs it."""
    return x.shape[1] > 1


def block(x: torch.Tensor, weights: Sequence[torch.Tensor], keep1: torch.Tensor | None, keep2: torch.Tensor | None,
          mask: torch.Tensor | None, heads: int, scale: float, after: bool, eps: float) -> torch.Tensor:
    """A heads.TransformerBlock of each run on x (R', B, S, D), its matmuls in x's dtype: `weights`
    are the runs' qkv, proj, ff.0 weight and bias, ff.2 weight and bias, ln1 weight and bias, ln2
    weight and bias, each (R', ...), the four Linear weights transposed, (R', in, out), as
    run_layers.RunLinear lays them out in memory (so contiguous); `mask` (R', B, S) hides padded
    keys (None: every clip real); each LayerNorm (`eps`) output, or with `after` False each
    sub-layer's branch, is dropped where keep1 (first) or keep2 (second) is 0 (R', B, S, D; None:
    no dropout), kept units times `scale`."""
    x, *weights, keep1, keep2, mask = _plain((x, *weights, keep1, keep2, mask))
    if not torch.is_grad_enabled():  # evaluation: one graph, whatever asks for gradients outside it
        x, weights = x.detach(), [w.detach() for w in weights]
    # the number of runs and of windows as sizes of any value above one; every other size static
    for t in (x, keep1, keep2, mask):
        if t is not None:
            torch._dynamo.maybe_mark_dynamic(t, 0)
            torch._dynamo.maybe_mark_dynamic(t, 1)
    for w in weights:
        torch._dynamo.maybe_mark_dynamic(w, 0)
    return _call("block", x, *weights, keep1, keep2, mask, heads, scale, after, eps)


def moments(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, sum of squares) over the clips of x (R', B, S, F) whose mask (R', B, S) is True (all
    when None), each (R', F) in fp32."""
    return _call("moments", x, mask)


def fold(weight: torch.Tensor, bias: torch.Tensor, bn_weight: torch.Tensor, bn_bias: torch.Tensor,
         mean: torch.Tensor, var: torch.Tensor, eps: float,
         dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A Linear (weight transposed (R', F, D), as run_layers.RunLinear lays it out; bias (R', D))
    after a BatchNorm (bn_weight, bn_bias (R', F); batch or running mean and var (R', 1, F)) as
    one Linear: its weight transposed (R', F, D) in `dtype` and its bias (R', D) in fp32.
    W s (x - mean) + W beta + b with s = bn_weight / sqrt(var + eps) is
    (W s) x + (W beta - (W s) mean + b)."""
    return _call("fold", weight, bias, bn_weight, bn_bias, mean, var, eps, dtype)


@contextlib.contextmanager
def _quiet():
    """Torch's C++ toolchain logs that it found no CUDA runtime on a CPU machine; nothing is wrong."""
    noisy = logging.getLogger("torch.utils.cpp_extension")
    level = noisy.level
    noisy.setLevel(logging.ERROR)
    try:
        yield
    finally:
        noisy.setLevel(level)


def _warm_up_runs(R: int, device: torch.device, dtype: torch.dtype, dims: list[int], like: torch.nn.Module | None,
                  window: int, masked: bool) -> torch.Tensor:
    """warm_up's calls for R runs, the backward included: the sum of their outputs."""
    B, S, D = 3, 5, 7  # sizes all different and above 1: dynamo assumes nothing of the real ones

    def param(*shape: int) -> torch.Tensor:
        return torch.nn.Parameter(torch.randn(*shape, device=device))

    out = torch.zeros((), device=device)
    mask = torch.ones(R, B, window, dtype=torch.bool, device=device) if masked else None
    if like is not None:  # the block's graphs for its real sizes and constants: dynamo specialises on them
        d, ff, p = like.ln1.normalized_shape[0], like.ff[0].out_features, like.drop.p
        x = torch.randn(R, B, window, d, device=device, dtype=dtype, requires_grad=True)
        # two tensors: dynamo guards on whether arguments alias
        keep = [torch.ones(R, B, window, d, device=device, dtype=dtype) if p > 0 else None for _ in range(2)]
        weights = [param(R, d, 3 * d), param(R, d, d), param(R, d, ff), param(R, ff), param(R, ff, d), param(R, d),
                   param(R, d), param(R, d), param(R, d), param(R, d)]  # Linear weights (R, in, out)
        args = (mask, like.heads, 1.0 / (1.0 - p), like.dropout_at == "after_norm", like.ln1.eps)
        out = out + block(x, weights, *keep, *args).float().sum()
        with torch.no_grad():  # evaluation's graph: no dropout, no backward
            out = out + block(x, weights, None, None, *args).float().sum()
    for f in sorted(set(dims)):
        clips = torch.randn(R, B, S, f, device=device, dtype=dtype)
        m = torch.ones(R, B, S, dtype=torch.bool, device=device) if masked else None
        total, squares = moments(clips, m)
        mean, var = torch.zeros(R, 1, f, device=device), torch.ones(R, 1, f, device=device)
        wt, b = fold(param(R, f, D), param(R, D), param(R, f), param(R, f), mean, var, 1e-5, dtype)
        out = out + total.sum() + squares.sum() + wt.float().sum() + b.sum()
    out.backward()
    return out.detach()


def warm_up(device: torch.device, dtype: torch.dtype, dims: list[int], like: torch.nn.Module | None, window: int,
            masked: bool) -> str | None:
    """Compile every part a group's training steps and evaluation call, forward and backward, on
    small tensors of `dtype`: the BatchNorm and projection of streams of `dims` features, with
    masked batches or not, and the block shaped as `like` (a heads.TransformerBlock; None: no
    block) on windows of `window` clips, for several runs and for one (the last run left in a
    group). So the first steps wait for no compile and fail in none; a step of some of the runs
    (each run's last batch of an epoch) compiles its graphs when first met. None when all
    compiled and ran, else why not (the group then trains with the eager code)."""
    try:
        with _quiet():
            out = sum(_warm_up_runs(R, device, dtype, dims, like, window, masked) for R in (2, 1))  # more runs, one
            if not math.isfinite(float(out.detach())):
                return "a compiled chain gave a non-finite result on finite inputs"
    except Exception as e:  # noqa: BLE001 (no C++ compiler, or inductor cannot compile here: the eager code trains)
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else 'no message'}"
    return None
