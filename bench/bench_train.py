"""Training throughput of the DIViTA head against this machine's matmul peak, in one run.

Prints, for fp32 and bf16 autocast:
  * the matmul peak (best of several shapes, including the head's own),
  * the head's forward+backward GFLOP/s (FLOPs counted by torch's FlopCounterMode),
  * full training steps per second (batch gather from in-RAM features + fwd + bwd + AdamW),
and the ratio achieved / peak.

    python bench/bench_train.py [--dim 1024] [--steps 200] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from trailers12k_feats.training.heads import build_divita
from trailers12k_feats.utils import tune_malloc

SHAPES = [(2048, 2048, 2048), (4096, 1024, 1024), (960, 1024, 128), (960, 128, 768), (960, 768, 128)]


def timeit(fn, min_seconds: float = 1.0) -> float:
    """Seconds per call: warm up, then repeat for at least `min_seconds`."""
    for _ in range(3):
        fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_seconds:
        fn()
        n += 1
    return (time.perf_counter() - t0) / n


def matmul_peak(dtype: torch.dtype) -> tuple[float, tuple[int, int, int]]:
    best, where = 0.0, SHAPES[0]
    for m, k, n in SHAPES:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        gflops = 2 * m * k * n / timeit(lambda: a @ b, 0.5) / 1e9
        if gflops > best:
            best, where = gflops, (m, k, n)
    return best, where


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=1024, help="feature dim of the single-stream tsfm head")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--window", type=int, default=30)
    ap.add_argument("--clips", type=int, default=600_000, help="clips in the in-RAM feature bank")
    ap.add_argument("--seconds", type=float, default=5.0, help="timing per measurement")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tune_malloc()
    torch.manual_seed(0)
    B, S, D = args.batch, args.window, args.dim
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; head tsfm dim {D}, batch {B}x{S} clips")

    lengths = torch.randint(10, 110, (args.clips // 60,))  # clips per trailer
    starts = torch.cumsum(lengths, 0) - lengths
    bank = torch.randn(int(lengths.sum()), D).half()  # (N, F) in-RAM features, as the cache loader holds them
    y = (torch.rand(B, 10) < 0.25).float()
    gen = torch.Generator().manual_seed(0)

    rows = []
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        peak, shape = matmul_peak(dtype)
        model = build_divita(D, None)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, amsgrad=True, fused=True)
        x = torch.randn(B, S, D)
        mask = torch.ones(B, S, dtype=torch.bool)

        def fwd_bwd(x=x, mask=mask):
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                logits = model(ix=x, ix_mask=mask)
            F.binary_cross_entropy_with_logits(logits.float(), y).backward()

        with FlopCounterMode(display=False) as fc:
            fwd_bwd()
        flops = fc.get_total_flops()

        def step():
            r = torch.randint(len(lengths), (B,), generator=gen)
            first = (torch.rand(B, generator=gen) * (lengths[r] - S).clamp(min=0)).long()
            pos = first[:, None] + torch.arange(S)  # (B, S)
            m = pos < lengths[r, None]
            xb = bank[starts[r, None] + pos.clamp(max=lengths[r, None] - 1)].float()  # (B, S, F)
            opt.zero_grad(set_to_none=True)
            fwd_bwd(xb, m)
            opt.step()

        t_fb = timeit(fwd_bwd, args.seconds)
        t_step = timeit(step, args.seconds)
        rows.append((name, peak, shape, flops / t_fb / 1e9, B / t_step, flops / t_step / 1e9))

    print(f"\n{'':5} {'matmul peak':>12} {'(shape m,k,n)':>18} {'head fwd+bwd':>13} {'ratio':>6} "
          f"{'train ex/s':>11} {'step GFLOP/s':>13} {'ratio':>6}")
    for name, peak, shape, fb, exs, st in rows:
        print(f"{name:5} {peak:9.0f} GF/s {str(shape):>18} {fb:8.0f} GF/s {fb / peak:6.1%} {exs:11.0f} "
              f"{st:8.0f} GF/s {st / peak:6.1%}")
    print(f"\nbf16 / fp32 training speed: {rows[1][4] / rows[0][4]:.2f}x; "
          f"head FLOPs per step (fwd+bwd): {flops / 1e9:.2f} GFLOP")


if __name__ == "__main__":
    main()
