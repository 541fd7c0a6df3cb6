import pytest
import torch
import torch.nn.functional as F

from trailers12k_feats.training.heads import (
    TEMPORAL,
    MaskedBatchNorm1d,
    TransformerBlock,
    build_divita,
    count_params,
    keep_mask,
    keep_threshold,
    random_lanes,
    register_temporal,
)

PAPER_PARAMS = {512: 331_530, 768: 364_810, 1024: 398_090, 2048: 531_210}
FUSIONS = ("late", "early")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: a second OpenMP thread only adds sync, and when another process
    keeps a core busy, the GRU's per-step parallel regions stall (seconds per backward)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("dim,expected", PAPER_PARAMS.items())
def test_param_counts_match_paper(dim, expected):
    assert count_params(build_divita(dim, None)) == expected == 130 * dim + 264_970
    assert count_params(build_divita(None, dim)) == expected


def test_late_fusion_params_are_the_sum():
    m = build_divita(2048, 512)
    assert count_params(m) == PAPER_PARAMS[2048] + PAPER_PARAMS[512]
    assert m.describe() == {"streams": ["image", "video"], "dims": {"image": 2048, "video": 512}, "temporal": "tsfm",
                            "fusion": "late", "num_classes": 10, "params": PAPER_PARAMS[2048] + PAPER_PARAMS[512]}


def inputs(B=3, S=30, F=16, lengths=(30, 7, 1), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, S, F, generator=g)  # (B, S, F)
    mask = torch.arange(S)[None] < torch.tensor(lengths)[:, None]  # (B, S)
    return x, mask


def with_junk(x, mask, seed, scale=1e4):
    """x with random large values at the padded positions."""
    g = torch.Generator().manual_seed(seed)
    junk = torch.randn(x.shape, generator=g) * scale
    return torch.where(mask[..., None], x, junk)


@pytest.mark.parametrize("temporal", list(TEMPORAL))
@pytest.mark.parametrize("fusion", FUSIONS)
def test_shapes(temporal, fusion):
    x, mask = inputs()
    v = torch.randn(3, 30, 8)
    for ix, vx in ((16, None), (None, 8), (16, 8)):
        m = build_divita(ix, vx, temporal=temporal, fusion=fusion)
        assert m.streams == tuple(n for n, d in (("image", ix), ("video", vx)) if d)
        out = m(ix=x if ix else None, vx=v if vx else None, ix_mask=mask, vx_mask=mask)
        assert out.shape == (3, 10) and torch.isfinite(out).all()
        out.sum().backward()
    assert hasattr(m, "joint") == (fusion == "early")


@pytest.mark.parametrize("temporal", list(TEMPORAL))
def test_bf16_autocast_runs(temporal):
    x, mask = inputs()
    m = build_divita(16, 8, temporal=temporal)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(ix=x, vx=x[..., :8], ix_mask=mask, vx_mask=mask)
    assert out.shape == (3, 10) and torch.isfinite(out).all()
    out.float().sum().backward()


@pytest.mark.parametrize("temporal", list(TEMPORAL))
def test_padding_never_leaks(temporal):
    torch.manual_seed(0)
    m = build_divita(16, None, temporal=temporal)
    m.train()(ix=inputs(seed=1)[0], ix_mask=torch.ones(3, 30, dtype=torch.bool))  # non-trivial running stats
    m.eval()
    lengths = (30, 7, 3)
    x, mask = inputs(lengths=lengths)
    with torch.no_grad():
        a = m(ix=with_junk(x, mask, 1), ix_mask=mask)
        b = m(ix=with_junk(x, mask, 2, scale=-50.0), ix_mask=mask)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        # A short trailer padded to 30 clips gives the same logits as its clips alone (S = k).
        for i, n in enumerate(lengths):
            alone = m(ix=x[i:i + 1, :n], ix_mask=torch.ones(1, n, dtype=torch.bool))
            torch.testing.assert_close(a[i:i + 1], alone, rtol=0, atol=1e-5)


@pytest.mark.parametrize("temporal", list(TEMPORAL))
def test_padding_does_not_touch_training_statistics(temporal):
    x, mask = inputs(lengths=(30, 4, 2))
    runs = []
    for seed in (1, 2):
        torch.manual_seed(0)
        m = build_divita(16, None, temporal=temporal).train()
        m(ix=with_junk(x, mask, seed), ix_mask=mask).sum().backward()
        runs.append((m.image.norm.running_mean, m.image.norm.running_var, m.image.embed.weight.grad))
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-5, atol=1e-5)


def test_masked_batchnorm_statistics_are_those_of_real_clips():
    x, mask = inputs(lengths=(30, 4, 2))
    stats = []
    for seed in (1, 2):
        bn = MaskedBatchNorm1d(16).train()
        out = bn(with_junk(x, mask, seed), mask)
        assert (out[~mask] == 0).all()  # padding -> 0
        stats.append((bn.running_mean.clone(), bn.running_var.clone(), out))
    torch.testing.assert_close(stats[0], stats[1])
    ref = torch.nn.BatchNorm1d(16).train()
    ref_out = ref(x[mask])
    torch.testing.assert_close(stats[0][:2], (ref.running_mean, ref.running_var))
    torch.testing.assert_close(stats[0][2][mask], ref_out)
    bn.eval()
    assert (bn(with_junk(x, mask, 3), mask)[~mask] == 0).all()


# A large mean must not cancel the variance (E[x^2] - E[x]^2 would be off by ~0.05 here).
@pytest.mark.parametrize("offset,tol", [(0.0, 1e-5), (1e3, 1e-3)])
def test_masked_batchnorm_equals_batchnorm_on_full_input(offset, tol):
    x, _ = inputs(B=4, S=5, F=6, lengths=(5, 5, 5, 5))
    x = x + offset
    mask = torch.ones(4, 5, dtype=torch.bool)
    ours, ref = MaskedBatchNorm1d(6), torch.nn.BatchNorm1d(6)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 2), ours.bias.uniform_(-1, 1)
        ref.load_state_dict(ours.state_dict())
    assert list(ours.state_dict()) == list(ref.state_dict())
    for _ in range(3):
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        a, b = ours(xa, mask), ref(xb.reshape(20, 6)).reshape(4, 5, 6)
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)
        (a.square() * torch.arange(6)).sum().backward()
        (b.square() * torch.arange(6)).sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad, atol=10 * tol, rtol=10 * tol)
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad, atol=10 * tol, rtol=10 * tol)
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var, atol=1e-5, rtol=1e-4)
    assert ours.num_batches_tracked == ref.num_batches_tracked == 3
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x, mask), ref(x.reshape(20, 6)).reshape(4, 5, 6), atol=tol, rtol=tol)


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
    ref_state = {k: v.clone() for k, v in bn.state_dict().items()}
    for p in (*bn.parameters(), *lin.parameters()):
        p.grad = None
    bn.load_state_dict(state)
    out = bn.fold_into(lin, x, mask)[mask]
    out.square().sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bn.state_dict(), ref_state)
    for g, p in zip(ref_grads, (*bn.parameters(), *lin.parameters())):
        torch.testing.assert_close(p.grad, g, atol=1e-4, rtol=1e-4)


def test_attention_equals_sdpa_with_key_padding_mask():
    torch.manual_seed(0)
    blk = TransformerBlock(d=32, heads=4, ff=64).eval()
    x, mask = inputs(F=32, lengths=(30, 7, 1))
    with torch.no_grad():
        q, k, v = blk.qkv(x).view(3, 30, 3, 4, 8).permute(2, 0, 3, 1, 4)  # 3x (B, H, S, hd)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])  # (B, H, S, hd)
        h = blk.ln1(x + blk.proj(att.transpose(1, 2).reshape(3, 30, 32)))
        torch.testing.assert_close(blk(x, mask), blk.ln2(h + blk.ff(h)), atol=1e-5, rtol=1e-5)


class Half(torch.nn.Module):
    """A stand-in for dropout that halves its input, so where dropout acts shows in the output."""

    def forward(self, x):
        return 0.5 * x


@pytest.mark.parametrize("dropout_at", ["residual", "after_norm"])
def test_dropout_placement(dropout_at):
    torch.manual_seed(0)
    blk = TransformerBlock(d=32, heads=4, ff=64, dropout_at=dropout_at).eval()
    blk.drop = Half()
    x, mask = inputs(F=32, lengths=(30, 30, 30))
    with torch.no_grad():
        q, k, v = blk.qkv(x).view(3, 30, 3, 4, 8).permute(2, 0, 3, 1, 4)  # 3x (B, H, S, hd)
        a = blk.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(3, 30, 32))  # (B, S, D)
        if dropout_at == "residual":  # LN(x + drop(f(x))), ours
            h = blk.ln1(x + 0.5 * a)
            ref = blk.ln2(h + 0.5 * blk.ff(h))
        else:  # drop(LN(x + f(x))) after each LayerNorm, the block output included: the authors' tsfm.py
            h = 0.5 * blk.ln1(x + a)
            ref = 0.5 * blk.ln2(h + blk.ff(h))
        torch.testing.assert_close(blk(x, mask), ref, atol=1e-5, rtol=1e-5)


def test_dropout_placement_changes_no_parameter():
    a, b = build_divita(16, 8), build_divita(16, 8, dropout_at="after_norm")
    assert [(k, v.shape) for k, v in a.state_dict().items()] == [(k, v.shape) for k, v in b.state_dict().items()]
    b.load_state_dict(a.state_dict())
    x, mask = inputs()
    with torch.no_grad():  # dropout acts only in training, so in eval the two are one model
        torch.testing.assert_close(a.eval()(ix=x, vx=x[..., :8], ix_mask=mask, vx_mask=mask),
                                   b.eval()(ix=x, vx=x[..., :8], ix_mask=mask, vx_mask=mask))
    assert b.image.temporal.block.dropout_at == "after_norm"
    out = b.train().image.temporal.block(torch.randn(4, 30, 128), torch.ones(4, 30, dtype=torch.bool))
    assert 0.15 < (out == 0).float().mean() < 0.35  # dropout 0.25 on the block's output
    for temporal in ("savg", "gru", "conv"):  # modules without dropout take the setting and ignore it
        build_divita(16, None, temporal=temporal, dropout_at="after_norm")
    with pytest.raises(ValueError, match="unknown dropout_at 'middle'; valid: residual, after_norm"):
        build_divita(16, None, dropout_at="middle")


def test_dropout_lanes_keep_at_the_rate_asked():
    g = torch.Generator().manual_seed(0)
    lanes = random_lanes((250_000, 4), g, "cpu")  # each row: the four 16-bit lanes of one 64-bit word
    assert lanes.dtype == torch.int16 and lanes.shape == (250_000, 4)
    for p in (0.1, 0.25, 0.5):
        kept = (lanes >= keep_threshold(p)).float().mean(0)  # (4,) each lane alike, the top one too
        assert ((kept - (1 - p)).abs() < 0.005).all(), (p, kept)
    assert keep_threshold(0.0) == -32768  # p = 0 keeps every value
    again = random_lanes((250_000, 4), torch.Generator().manual_seed(0), "cpu")
    assert torch.equal(lanes, again)  # seeded: the same masks


def test_keep_mask_is_the_lanes_compared_with_the_threshold():
    lanes = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)  # every int16 value
    for p in (0.0, 1 / 65536, 0.1, 0.25, 0.5, 0.999):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            mask = keep_mask(lanes, p, dtype)
            assert mask.dtype == dtype
            assert torch.equal(mask, (lanes >= keep_threshold(p)).to(dtype)), (p, dtype)


def test_short_trailer_trains():
    m = build_divita(16, 8, temporal="tsfm").train()
    x, mask = inputs(B=2, S=3, lengths=(3, 2))
    out = m(ix=x, vx=x[..., :8], ix_mask=mask, vx_mask=mask)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.sum().backward()


def test_late_fusion_averages_stream_logits():
    m = build_divita(16, 8).eval()
    x, mask = inputs()
    v = torch.randn(3, 30, 8)
    with torch.no_grad():
        both = m(ix=x, vx=v, ix_mask=mask, vx_mask=mask)
        torch.testing.assert_close(both, 0.5 * (m.image(x, mask) + m.video(v, mask)))
    assert m.describe()["params"] == count_params(m)


def test_early_fusion_is_one_stream_on_concatenated_features():
    m = build_divita(16, 8, fusion="early").eval()
    assert count_params(m) == count_params(build_divita(24, None))
    x, mask = inputs()
    v, vmask = torch.randn(3, 30, 8), mask.clone()
    vmask[0, 20:] = False
    with torch.no_grad():
        torch.testing.assert_close(m(ix=x, vx=v, ix_mask=mask, vx_mask=vmask),
                                   m.joint(torch.cat([x, v], -1), mask & vmask))
    single = build_divita(16, None, fusion="early")
    assert single.streams == ("image",) and hasattr(single, "image")


def test_same_seed_same_model():
    x, mask = inputs()
    outs = []
    for _ in range(2):
        torch.manual_seed(0)
        outs.append(build_divita(16, 8).train()(ix=x, vx=x[..., :8], ix_mask=mask, vx_mask=mask))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_timm_style_interface():
    m = build_divita(16, None, temporal="gru")
    x, mask = inputs()
    assert m.image.num_features == 115
    feats = m.image.forward_features(x, mask)
    assert feats.shape == (3, 115)
    assert m.image.forward_head(feats).shape == (3, 10)


def test_bad_arguments():
    with pytest.raises(ValueError, match="ix_dim .* vx_dim .* got neither"):
        build_divita(None, None)
    with pytest.raises(ValueError, match="'lstm'; valid: tsfm, savg, gru, conv"):
        build_divita(16, None, temporal="lstm")
    with pytest.raises(ValueError, match="'middle'; valid: late, early"):
        build_divita(16, 8, fusion="middle")
    x, mask = inputs()
    with pytest.raises(ValueError, match="video stream: pass vx and vx_mask"):
        build_divita(16, 8)(ix=x, ix_mask=mask)
    with pytest.raises(ValueError, match="image stream: pass ix and ix_mask"):
        build_divita(16, None)(vx=x, vx_mask=mask)
    with pytest.raises(ValueError, match="image stream: pass ix and ix_mask"):
        build_divita(16, None)(ix=x)
    with pytest.raises(ValueError, match="early fusion needs aligned streams"):
        build_divita(16, 8, fusion="early")(ix=x, vx=x[:, :20, :8], ix_mask=mask, vx_mask=mask[:, :20])
    with pytest.raises(ValueError, match="already registered"):
        register_temporal("tsfm", object)
