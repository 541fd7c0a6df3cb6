"""Fused parts (training/fused.py): the compiled block computes what the eager block does, each
compiled chain what its plain function does, a group using them what the group without them
does, and a group whose parts cannot compile says so and trains with the eager code."""

import logging

import numpy as np
import pytest
import torch

from trailers12k_feats.training import fused
from trailers12k_feats.training import grouped as grouped_mod
from trailers12k_feats.training.batched import GroupedDivita, RunTransformerBlock
from trailers12k_feats.training.data import load_metadata
from trailers12k_feats.training.heads import build_divita
from trailers12k_feats.training.train import TrainConfig, _split_data, load_streams


def grads(out, *tensors):
    return torch.autograd.grad(out.float().sum(), tensors)


def test_norm_chain_is_a_layer_norm_with_affine_and_dropout():
    torch.manual_seed(0)
    x, y = torch.randn(3, 4, 30, 16), torch.randn(3, 4, 30, 16)
    w, b = torch.randn(3, 16), torch.randn(3, 16)
    keep = (torch.rand(3, 4, 30, 16) > 0.25).float()

    def affine(h):
        return h * w[:, None, None] + b[:, None, None]

    no_dropout = affine(torch.nn.functional.layer_norm(x + y, (16,)))
    for after in (True, False):
        if after:  # dropout on the LayerNorm's output
            expect = no_dropout * keep * 4 / 3
        else:  # dropout on the branch y
            expect = affine(torch.nn.functional.layer_norm(x + y * keep * 4 / 3, (16,)))
        torch.testing.assert_close(fused._norm_chain(x, y, w, b, keep, 4 / 3, after), expect)
        torch.testing.assert_close(fused._norm_chain(x, y, w, b, None, 4 / 3, after), no_dropout)


# each case compiles a graph: both placements, both dtypes, masked clips and a subset of the runs, in four;
# the head's own sizes (128 wide, 4 heads, feed-forward 768, windows of 30), so the group tests reuse them
@pytest.mark.parametrize("dropout_at,masked,dtype", [("after_norm", False, torch.bfloat16),
                                                     ("after_norm", True, torch.float32),
                                                     ("residual", True, torch.bfloat16),
                                                     ("residual", False, torch.float32)])
def test_block_is_the_eager_block(dropout_at, masked, dtype):
    torch.manual_seed(0)
    blk = RunTransformerBlock(3, 128, 4, 768, 0.25, dropout_at)
    with torch.no_grad():
        for p in blk.parameters():
            p.normal_(0, 0.3)
    x0 = torch.randn(3, 5, 30, 128) * 2
    mask = torch.ones(3, 5, 30, dtype=torch.bool)
    mask[1, 2, 20:] = mask[0, 0, 3:] = False
    m, idx = (mask, torch.tensor([2, 0, 1])) if masked else (None, None)
    res = {}
    for name, dt, on in (("fp32", torch.float32, False), ("eager", dtype, False), ("compiled", dtype, True)):
        blk.fused = on
        x = x0.to(dt).requires_grad_()
        gens = [torch.Generator().manual_seed(j) for j in range(3)]  # the same dropout masks for each
        with torch.autocast("cpu", torch.bfloat16, enabled=dt == torch.bfloat16):
            out = blk(x, m, idx, gens)
        assert out.dtype == dt
        res[name] = [t.detach().float() for t in (out, *grads(out, x, *blk.parameters()))]
    names = ["output", "x grad"] + [f"{n} grad" for n, _ in blk.named_parameters()]
    for name, c, e, ref in zip(names, res["compiled"], res["eager"], res["fp32"]):
        err, eager_err = float((c - ref).norm() / ref.norm()), float((e - ref).norm() / ref.norm())
        if dtype == torch.float32:  # the same function, to fp32 rounding
            assert err <= 1e-5, (name, err)
        else:  # rounded once per chain where the eager code rounds after each operation, so no farther
            # from fp32 than the eager bf16 block is
            assert err <= 1.5 * eager_err + 1e-3, (name, err, eager_err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moments_and_fold_are_their_eager_functions(dtype):
    torch.manual_seed(0)
    x = torch.randn(3, 4, 30, 40).to(dtype)
    mask = torch.rand(3, 4, 30) > 0.3
    for m in (None, mask):
        real = x.double() if m is None else x.double() * m[..., None]
        s, sq = fused.moments(x, m)
        torch.testing.assert_close(s.double(), real.sum((1, 2)), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(sq.double(), (real * real).sum((1, 2)), rtol=1e-5, atol=1e-4)
    lin_w, lin_b = torch.randn(3, 8, 40, requires_grad=True), torch.randn(3, 8, requires_grad=True)
    bn_w, bn_b = torch.rand(3, 40, requires_grad=True), torch.randn(3, 40, requires_grad=True)
    mean, var = torch.randn(3, 1, 40), torch.rand(3, 1, 40) + 0.5
    wt, bias = fused.fold(lin_w.transpose(1, 2), lin_b, bn_w, bn_b, mean, var, 1e-5, dtype)  # weight (R, F, D)
    assert wt.shape == (3, 40, 8) and wt.dtype == dtype and bias.dtype == torch.float32
    # the folded Linear on x is the Linear on BatchNorm(x)
    xf = torch.randn(3, 50, 40)
    bn = (xf - mean) / torch.sqrt(var + 1e-5) * bn_w[:, None] + bn_b[:, None]  # (R, N, F)
    expect = bn @ lin_w.transpose(1, 2) + lin_b[:, None]  # (R, N, D)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(xf @ wt.float() + bias[:, None], expect, rtol=0, atol=tol * float(expect.detach().abs().max()))
    ref = fused._fold(lin_w.transpose(1, 2), lin_b, bn_w, bn_b, mean, var, 1e-5, dtype)
    for g, r in zip(grads(wt.float().sum() + bias.sum(), lin_w, lin_b, bn_w, bn_b),
                    grads(ref[0].float().sum() + ref[1].sum(), lin_w, lin_b, bn_w, bn_b)):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fusion,dropout_at", [("late", "after_norm"), ("early", "residual")])
def test_a_fused_group_computes_what_the_eager_group_does(fusion, dropout_at):
    # fp32: the chains change where values are rounded, not what is computed
    torch.manual_seed(0)
    models = [build_divita(12, 8, fusion=fusion, dropout_at=dropout_at) for _ in range(3)]
    eager, comp = GroupedDivita.from_models(models), GroupedDivita.from_models(models)
    comp.use_fused(True)
    ix, vx = torch.randn(3, 4, 30, 12) + 5, torch.randn(3, 4, 30, 8) - 2
    off = {"image": torch.linspace(3, 6, 12), "video": torch.full((8,), -2.0)}
    mask = torch.ones(3, 4, 30, dtype=torch.bool)
    mask[1, 2, 20:] = mask[0, 0, 3:] = False
    for m in (None, mask):
        outs = []
        for g in (eager, comp):
            gens = [torch.Generator().manual_seed(j) for j in range(3)]  # the same dropout masks for both
            outs.append(g(ix=ix - off["image"], vx=vx - off["video"], ix_mask=m, vx_mask=m, gens=gens, offsets=off))
            outs[-1].sum().backward()
        torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-5)
    for (name, p), q in zip(eager.named_parameters(), comp.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
    for k, v in eager.state_dict().items():
        torch.testing.assert_close(comp.state_dict()[k], v, rtol=0, atol=1e-5, msg=k)
    eager.eval(), comp.eval()
    idx = torch.tensor([2, 0])
    args = {"ix": (ix - off["image"])[idx], "vx": (vx - off["video"])[idx], "ix_mask": mask[idx],
            "vx_mask": mask[idx], "idx": idx, "offsets": off}
    torch.testing.assert_close(comp(**args), eager(**args), rtol=0, atol=1e-5)


def test_a_group_whose_chains_do_not_compile_says_so_and_trains_eager(tmp_path, toy_cache, toy_metadata,
                                                                       monkeypatch, caplog):
    ids = [f"tt{i:07d}" for i in range(40)]
    toy_cache(tmp_path / "img.h5", np.random.default_rng(0).integers(30, 60, 40), F=24, ids=ids, seed=1)
    meta = load_metadata(toy_metadata(tmp_path / "mtgc.csv", ids))
    sets, rows = load_streams(meta, {"image": tmp_path / "img.h5"})
    cfgs = [TrainConfig(split=s, seed=s, precision="bf16", batch_size=8, max_epochs=1) for s in (0, 1)]

    def no_compiler(name):
        def chain(*args):
            raise RuntimeError("Compiler: g++ not found\nmore detail")
        return chain

    monkeypatch.setattr(fused, "_chain", no_compiler)
    with caplog.at_level(logging.WARNING):
        group = grouped_mod.GroupTrainer(cfgs, [_split_data(meta, sets, rows, c.split) for c in cfgs], ["a", "b"])
    assert group.fused is False
    assert "a: the group's fused block and chains do not compile here (RuntimeError: Compiler: g++ not found)" in caplog.text
    assert "trains with the eager code, slower" in caplog.text
    assert all(np.isfinite(group.train_epoch(1)))  # trains without calling a chain
