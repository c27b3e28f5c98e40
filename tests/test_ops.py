"""The attention ops' PyTorch twins: the causal-by-positions path of the dropped-term backward against
the same computation with the explicit kept x kept mask (CPU, fp64)."""

import pytest
import torch

from lemo_compile import traced
from lemo_compile.kernels import attention


def _kept_problem(b, h, kvh, m, hd, seed):
    g = torch.Generator().manual_seed(seed)
    q, dout = (torch.randn(b, h, m, hd, generator=g, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(b, kvh, m, hd, generator=g, dtype=torch.float64) for _ in range(2))
    # kept positions: increasing, with gaps, different in every sequence; the second sequence's last 5
    # kept slots are out of range
    pos = torch.stack([torch.sort(torch.randperm(4 * m, generator=g)[:m]).values for _ in range(b)])
    valid = torch.ones(b, m, dtype=torch.bool)
    if b > 1 and m > 5:
        valid[1, -5:] = False
    mask = traced.causal_positions_mask(pos, pos, valid)
    out, lse = attention.attention_lse_torch(q, k, v, mask, hd ** -0.5, False)  # a stand-in for the dense O, lse
    return q, k, v, dout, out, lse, mask, pos, valid


@pytest.mark.parametrize("b,h,kvh,m,hd", [(1, 4, 2, 70, 16), (2, 4, 4, 129, 8), (2, 6, 1, 1, 16)])
@pytest.mark.parametrize("chunk_rows", [None, 7])
def test_kept_backward_positions_equal_explicit_mask(b, h, kvh, m, hd, chunk_rows, monkeypatch):
    q, k, v, dout, out, lse, mask, pos, valid = _kept_problem(b, h, kvh, m, hd, seed=m)
    scale = hd ** -0.5
    if chunk_rows is not None:  # several query chunks: each builds its own slice of the bias
        chunks = attention._chunks
        monkeypatch.setattr(attention, "_chunks", lambda n, per_row, budget=0: chunks(n, 1, chunk_rows))
    want = attention.attention_kept_backward_torch(dout, q, k, v, out, lse, mask, scale)
    got = attention.attention_kept_backward_torch(dout, q, k, v, out, lse, None, scale, pos=pos, valid=valid)
    assert got[2].abs().max() > 0  # (one kept row: dq = dk = 0 exactly, dv = dout)
    for g_, w in zip(got, want):
        torch.testing.assert_close(g_, w, rtol=1e-12, atol=1e-12)


def test_kept_op_autograd_uses_positions():
    q, k, v, dout, out, lse, mask, pos, valid = _kept_problem(2, 4, 2, 50, 16, seed=3)
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    y = torch.ops.lemo.attention_kept(q, k, v, out, lse, None, pos, valid, 0.25)
    assert torch.equal(y, out)
    y.backward(dout)
    want = attention.attention_kept_backward_torch(dout, q.detach(), k.detach(), v.detach(), out, lse, mask, 0.25)
    for t, w in zip((q, k, v), want):
        torch.testing.assert_close(t.grad, w, rtol=1e-12, atol=1e-12)


def test_kept_op_registration_opcheck():
    """Schema, fake and autograd registration of lemo::attention_kept with the positions arguments."""
    q, k, v, dout, out, lse, mask, pos, valid = _kept_problem(2, 4, 2, 24, 8, seed=4)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), out, lse, None, pos, valid, 0.3)
    torch.library.opcheck(torch.ops.lemo.attention_kept.default, args)


@pytest.mark.parametrize("b,h,kvh,m,hd", [(2, 4, 2, 70, 16), (2, 2, 1, 9, 8)])
def test_compact_causal_mask_is_the_positions_mask(b, h, kvh, m, hd):
    """What the CUDA flash path relies on (attention.attention_kept_backward_flash): kept rows sorted by position,
    rows out of range at the end with zero upstream gradient, so the plain causal mask of the compact
    sequence (key j <= query i) gives the same gradient as the positions mask."""
    q, k, v, dout, out, lse, _, pos, valid = _kept_problem(b, h, kvh, m, hd, seed=m + 1)
    dout = dout.masked_fill(~valid[:, None, :, None], 0)
    tril = torch.ones(m, m, dtype=torch.bool).tril()[None, None].expand(b, 1, m, m)
    want = attention.attention_kept_backward_torch(dout, q, k, v, out, lse, None, hd ** -0.5, pos=pos, valid=valid)
    got = attention.attention_kept_backward_torch(dout, q, k, v, out, lse, tril, hd ** -0.5)
    for g_, w in zip(got, want):
        assert w.abs().max() > 0
        torch.testing.assert_close(g_, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("b,h,kvh,n,hd", [(1, 4, 2, 70, 16), (2, 2, 1, 1, 8), (2, 4, 4, 129, 8)])
def test_attention_lse_autograd_equals_causal_sdpa(b, h, kvh, n, hd):
    """lemo::attention_lse as regional compilation uses it (causal, no mask): output and the gradients of
    q, k (GQA: summed over each group) and v equal SDPA's in fp64 to fp32 rounding (the twin computes in
    fp32); with a mask its backward refuses."""
    g = torch.Generator().manual_seed(n)
    q, dout = (torch.randn(b, h, n, hd, generator=g, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(b, kvh, n, hd, generator=g, dtype=torch.float64) for _ in range(2))
    scale = 0.3
    ins = [t.float().requires_grad_() for t in (q, k, v)]
    out, _ = torch.ops.lemo.attention_lse(*ins, None, scale, True)
    out.backward(dout.float())
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    want = torch.nn.functional.scaled_dot_product_attention(*ref, is_causal=True, scale=scale,
                                                            enable_gqa=kvh != h)
    want.backward(dout)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    for got_t, ref_t in zip(ins, ref):
        assert ref_t.grad.abs().max() > 0 or n == 1
        torch.testing.assert_close(got_t.grad.double(), ref_t.grad, rtol=1e-4, atol=1e-5)
    mask = torch.ones(1, 1, n, n, dtype=torch.bool).tril()
    out, _ = torch.ops.lemo.attention_lse(*[t.clone().requires_grad_() for t in (q, k, v)], mask, scale, False)
    with pytest.raises(NotImplementedError, match="causal attention without a mask"):
        out.backward(dout)
