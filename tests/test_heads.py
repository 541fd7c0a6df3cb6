import pytest
import torch

from trailers12k_feats.heads import (TEMPORAL, MaskedBatchNorm1d, build_divita, count_params,
                                     register_temporal)

PAPER_PARAMS = {512: 331_530, 768: 364_810, 1024: 398_090, 2048: 531_210}


@pytest.mark.parametrize("dim,expected", PAPER_PARAMS.items())
def test_param_counts_match_paper(dim, expected):
    assert count_params(build_divita(dim, None)) == expected
    assert count_params(build_divita(None, dim)) == expected


def test_late_fusion_params_are_the_sum():
    assert count_params(build_divita(2048, 512)) == PAPER_PARAMS[2048] + PAPER_PARAMS[512]


def inputs(B=3, S=30, F=16, lengths=(30, 7, 1), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, S, F, generator=g)
    mask = torch.arange(S)[None] < torch.tensor(lengths)[:, None]  # (B, S)
    return x, mask


@pytest.mark.parametrize("temporal", list(TEMPORAL))
@pytest.mark.parametrize("fusion", ["late", "early"])
def test_shapes(temporal, fusion):
    x, mask = inputs()
    v = torch.randn(3, 30, 8)
    for ix, vx in ((16, None), (None, 8), (16, 8)):
        m = build_divita(ix, vx, temporal=temporal, fusion=fusion)
        out = m(ix=x if ix else None, vx=v if vx else None, ix_mask=mask, vx_mask=mask)
        assert out.shape == (3, 10) and torch.isfinite(out).all()
        out.sum().backward()


@pytest.mark.parametrize("temporal", list(TEMPORAL))
def test_padding_never_leaks(temporal):
    torch.manual_seed(0)
    m = build_divita(16, None, temporal=temporal).eval()
    x, mask = inputs(lengths=(30, 7, 3))
    junk1, junk2 = x.clone(), x.clone()
    junk1[~mask] = 1e4
    junk2[~mask] = -3.0
    with torch.no_grad():
        a = m(ix=junk1, ix_mask=mask)
        b = m(ix=junk2, ix_mask=mask)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        # A short trailer padded to 30 clips gives the same logits as its clips alone.
        for i, n in enumerate((30, 7, 3)):
            alone = m(ix=x[i:i + 1, :n], ix_mask=torch.ones(1, n, dtype=torch.bool))
            torch.testing.assert_close(a[i:i + 1], alone, rtol=0, atol=1e-5)


def test_padding_does_not_touch_batchnorm_statistics():
    x, mask = inputs(lengths=(30, 4, 2))
    stats = []
    for fill in (1e3, -7.0):
        bn = MaskedBatchNorm1d(16).train()
        junk = x.clone()
        junk[~mask] = fill
        bn(junk, mask)
        stats.append((bn.running_mean.clone(), bn.running_var.clone()))
    torch.testing.assert_close(stats[0], stats[1])
    # ... and they are the statistics of the real clips alone.
    ref = torch.nn.BatchNorm1d(16).train()
    ref(x[mask])
    torch.testing.assert_close(stats[0], (ref.running_mean, ref.running_var))


def test_masked_batchnorm_equals_batchnorm_on_full_input():
    x, _ = inputs(B=4, S=5, F=6, lengths=(5, 5, 5, 5))
    mask = torch.ones(4, 5, dtype=torch.bool)
    ours, ref = MaskedBatchNorm1d(6), torch.nn.BatchNorm1d(6)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 2), ours.bias.uniform_(-1, 1)
        ref.load_state_dict(ours.state_dict())
    for _ in range(3):
        torch.testing.assert_close(ours(x, mask), ref(x.reshape(20, 6)).reshape(4, 5, 6), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    assert ours.num_batches_tracked == ref.num_batches_tracked == 3
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x, mask), ref(x.reshape(20, 6)).reshape(4, 5, 6), atol=1e-5, rtol=1e-5)


def test_late_fusion_averages_stream_logits():
    m = build_divita(16, 8).eval()
    x, mask = inputs()
    v = torch.randn(3, 30, 8)
    with torch.no_grad():
        both = m(ix=x, vx=v, ix_mask=mask, vx_mask=mask)
        torch.testing.assert_close(both, 0.5 * (m.image(x, mask) + m.video(v, mask)))
    assert m.describe()["params"] == count_params(m)


def test_same_seed_same_model():
    x, mask = inputs()
    outs = []
    for _ in range(2):
        torch.manual_seed(0)
        outs.append(build_divita(16, None).train()(ix=x, ix_mask=mask))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_timm_style_interface():
    m = build_divita(16, None, temporal="gru")
    x, mask = inputs()
    assert m.image.num_features == 115
    assert m.image.forward_features(x, mask).shape == (3, 115)


def test_bad_arguments():
    with pytest.raises(ValueError, match="got neither"):
        build_divita(None, None)
    with pytest.raises(ValueError, match="valid: tsfm, savg, gru, conv"):
        build_divita(16, None, temporal="lstm")
    with pytest.raises(ValueError, match="valid: late, early"):
        build_divita(16, 8, fusion="middle")
    x, mask = inputs()
    with pytest.raises(ValueError, match="video stream: pass vx and vx_mask"):
        build_divita(16, 8)(ix=x, ix_mask=mask)
    with pytest.raises(ValueError, match="already registered"):
        register_temporal("tsfm", object)


@pytest.mark.parametrize("training", [True, False])
def test_folded_projection_equals_batchnorm_then_linear(training):
    x, mask = inputs(lengths=(30, 9, 2))
    bn, lin = MaskedBatchNorm1d(16), torch.nn.Linear(16, 8)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2), bn.bias.uniform_(-1, 1), bn.running_mean.uniform_(-1, 1)
    bn.train(training)
    state = {k: v.clone() for k, v in bn.state_dict().items()}
    ref = lin(bn(x, mask))[mask]
    ref.square().sum().backward()
    ref_grads = [p.grad.clone() for p in (*bn.parameters(), *lin.parameters())]
    for p in (*bn.parameters(), *lin.parameters()):
        p.grad = None
    bn.load_state_dict(state)
    out = bn.fold_into(lin, x, mask)[mask]
    out.square().sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for g, p in zip(ref_grads, (*bn.parameters(), *lin.parameters())):
        torch.testing.assert_close(p.grad, g, atol=1e-4, rtol=1e-4)
