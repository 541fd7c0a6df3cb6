import pytest
import torch

from trailers12k_feats.training.run_layers import linear_weight, run_slice
from trailers12k_feats.training.run_optim import run_adamw, step_runs
from trailers12k_feats.training.train import TrainConfig


@pytest.mark.parametrize("amsgrad", [False, True])
def test_the_runs_step_as_each_ones_own_adamw_does(amsgrad):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, *shape, generator=gen)) for shape in ((5, 4), (5,), (2, 3, 2))]
    params.append(linear_weight(3, 6, 4))  # a RunLinear weight, stored transposed
    with torch.no_grad():
        params[-1].normal_(generator=gen)
    cfgs = [TrainConfig(split=s, seed=s, amsgrad=amsgrad, weight_decay=0.01 * (s + 1)) for s in (0, 1, 2)]
    views = [[torch.nn.Parameter(run_slice(p.data, j)) for p in params] for j in range(3)]  # each run's slice
    assert all(v.is_contiguous() for vs in views for v in vs)  # as the fused kernel reads them without copies
    opts = [run_adamw(v, c) for v, c in zip(views, cfgs)]
    refs = [[p.detach()[j].clone().requires_grad_() for p in params] for j in range(3)]
    ref_opts = [torch.optim.AdamW(ref, lr=c.lr, weight_decay=c.weight_decay, fused=True, amsgrad=amsgrad)
                for ref, c in zip(refs, cfgs)]
    for step in range(4):
        if step == 2:  # runs 0 and 2 share a learning rate, run 1 has its own: two calls
            opts[1].param_groups[0]["lr"] = ref_opts[1].param_groups[0]["lr"] = 1e-2
        js = [0, 1, 2] if step != 3 else [2, 0]  # a step of some of the runs
        for p in params:
            p.grad = torch.empty_like(p).copy_(torch.randn(p.shape, generator=gen))  # the parameter's layout
        for j in js:
            for ref, p in zip(refs[j], params):
                ref.grad = p.grad[j].clone()
            ref_opts[j].step()
        step_runs(params, [(j, views[j], opts[j]) for j in js])
        for j in range(3):
            for ref, p in zip(refs[j], params):
                assert torch.equal(p.detach()[j], ref.detach())  # bit for bit, in the batched tensors
    for j in range(3):  # and the state a run carries on with (in its view's dims: the weight's transposed)
        for v, ref, p in zip(views[j], refs[j], params):
            assert opts[j].state[v].keys() == ref_opts[j].state[ref].keys()
            for k, t in ref_opts[j].state[ref].items():
                mine = opts[j].state[v][k]
                if mine.dim() == p.dim() - 1 and mine.shape != t.shape:
                    mine = mine.transpose(0, 1)
                assert torch.equal(mine, t), k
