"""Elementwise chains of a group's training step, each compiled into one pass (docs/speed.md).

On the CPU a group's step in bf16 is bound by passes over its activations, not by its matmuls:
in eager PyTorch every operation of a chain such as LayerNorm(x + y) * w + b followed by dropout
reads and writes the whole (R, B, S, D) tensor, and converts bf16 to fp32 and back. Here three
such chains are written once as plain functions and compiled by torch.compile (inductor), which
turns each into one C++ loop over the elements for the forward and one or two for the backward:

- `norm_chain`: residual add, LayerNorm, per-run affine and dropout, in either placement;
- `moments`: a batch's per-feature sums and sums of squares, for the BatchNorm statistics;
- `fold`: the BatchNorm scale and shift folded into the input projection's weight and bias.

Inside a chain everything is computed in fp32 and rounded once at its end, where the eager code
rounds after every operation. Only training steps use them (evaluation, without a backward
pass, measured no faster). Compiling needs a C++ compiler; `warm_up` compiles the chains before a
group's first step, and says why not where that fails, so that the group trains with the eager
code instead. Shapes are dynamic: a compiled graph serves any number of runs, windows, clips and
features above one (a step of one run, or of one window, gets a graph of its own when first met);
inductor keeps the graphs on disk, so later processes load them instead of compiling.
"""

from __future__ import annotations

import contextlib
import logging
import math

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


def _moments(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.float()  # (R', B, S, F)
    if mask is not None:
        xf = xf * mask.unsqueeze(-1).float()  # padding -> 0
    return xf.sum((1, 2)), (xf * xf).sum((1, 2))  # (R', F) each


def _fold(weight: torch.Tensor, bias: torch.Tensor, bn_weight: torch.Tensor, bn_bias: torch.Tensor,
          mean: torch.Tensor, var: torch.Tensor, eps: float,
          dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    scale = torch.rsqrt(var + eps) * bn_weight.unsqueeze(1)  # (R', 1, F)
    folded = weight * scale  # (R', D, F)
    shift = (weight * bn_bias.unsqueeze(1)).sum(2) - (folded * mean).sum(2)  # (R', D)
    return folded.transpose(1, 2).to(dtype), bias + shift  # (R', F, D), (R', D)


_compiled: dict[str, object] = {}
# Graphs a chain may need: one run or more, one window or more, with a mask or not. Past
# torch's default of 8, dynamo would run the chain uncompiled.
RECOMPILE_LIMIT = 32


def _chain(name: str):
    if name not in _compiled:
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        _compiled[name] = torch.compile({"norm": _norm_chain, "moments": _moments, "fold": _fold}[name],
                                        dynamic=True)
    return _compiled[name]


def _call(name: str, *args):
    """The compiled chain `name` on `args`, outside autocast (a chain sets its own dtypes) and with
    parameters passed as plain tensors, so that neither makes dynamo compile another graph."""
    args = tuple(a.view(a.shape) if isinstance(a, torch.nn.Parameter) else a for a in args)
    device = next(a for a in args if isinstance(a, torch.Tensor)).device.type
    with torch.autocast(device, enabled=False):
        return _chain(name)(*args)


def norm_chain(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
               keep: torch.Tensor | None, scale: float, after: bool, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm (`eps`) over the last dim of x + y (R', B, S, D), times `weight` plus `bias` (R', D) of
    each run, with dropout: `keep` (R', B, S, D) 1 or 0 (None: no dropout), kept units times
    `scale`, on the block's output when `after` ("after_norm") else on y ("residual"). In x's dtype."""
    return _call("norm", x, y, weight, bias, keep, scale, after, eps)


def moments(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, sum of squares) over the clips of x (R', B, S, F) whose mask (R', B, S) is True (all
    when None), each (R', F) in fp32."""
    return _call("moments", x, mask)


def fold(weight: torch.Tensor, bias: torch.Tensor, bn_weight: torch.Tensor, bn_bias: torch.Tensor,
         mean: torch.Tensor, var: torch.Tensor, eps: float,
         dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A Linear (weight (R', D, F), bias (R', D)) after a BatchNorm (bn_weight, bn_bias (R', F);
    batch or running mean and var (R', 1, F)) as one Linear: its weight transposed (R', F, D) in
    `dtype` and its bias (R', D) in fp32. W s (x - mean) + W beta + b with s = bn_weight /
    sqrt(var + eps) is (W s) x + (W beta - (W s) mean + b)."""
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


def warm_up(device: torch.device, dtype: torch.dtype, dims: list[int], after: bool | None,
            masked: bool) -> str | None:
    """Compile every chain a group's training steps call, forward and backward, on small tensors
    of `dtype`: the BatchNorm and projection of streams of `dims` features, with masked batches
    or not, and the blocks' norm chain with dropout after the norm (`after`) or on the branch
    (None: no block). So the first step waits for no compile and fails in none. None when all
    compiled and ran, else why not (the group then trains with the eager code)."""
    R, B, S, D = 2, 3, 5, 7  # sizes all different and above 1: dynamo assumes nothing of the real ones

    def param(*shape: int) -> torch.Tensor:
        return torch.nn.Parameter(torch.randn(*shape, device=device))

    try:
        with _quiet():
            x = torch.randn(R, B, S, D, device=device, dtype=dtype, requires_grad=True)
            y = torch.randn(R, B, S, D, device=device, dtype=dtype, requires_grad=True)
            keep = torch.ones(R, B, S, D, device=device, dtype=dtype)
            out = y.float().sum()
            if after is not None:
                out = out + norm_chain(x, y, param(R, D), param(R, D), keep, 2.0, after).float().sum()
            for f in sorted(set(dims)):
                clips = torch.randn(R, B, S, f, device=device, dtype=dtype)
                mask = torch.ones(R, B, S, dtype=torch.bool, device=device) if masked else None
                total, squares = moments(clips, mask)
                mean, var = torch.zeros(R, 1, f, device=device), torch.ones(R, 1, f, device=device)
                wt, b = fold(param(R, D, f), param(R, D), param(R, f), param(R, f), mean, var, 1e-5, dtype)
                out = out + total.sum() + squares.sum() + wt.float().sum() + b.sum()
            out.backward()
            if not math.isfinite(float(out.detach())):
                return "a compiled chain gave a non-finite result on finite inputs"
    except Exception as e:  # noqa: BLE001 (no C++ compiler, or inductor cannot compile here: the eager code trains)
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else 'no message'}"
    return None
