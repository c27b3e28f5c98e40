"""The attention ops' PyTorch twins: the causal-by-positions path of the dropped-term backward against
the same computation with the explicit kept x kept mask (CPU, fp64)."""

import pytest
import torch

from lemo_compile import ops


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
    mask = ops.causal_positions_mask(pos, pos, valid)
    out, lse = ops.attention_lse_torch(q, k, v, mask, hd ** -0.5, False)  # a stand-in for the dense O, lse
    return q, k, v, dout, out, lse, mask, pos, valid


@pytest.mark.parametrize("b,h,kvh,m,hd", [(1, 4, 2, 70, 16), (2, 4, 4, 129, 8), (2, 6, 1, 1, 16)])
@pytest.mark.parametrize("chunk_rows", [None, 7])
def test_kept_backward_positions_equal_explicit_mask(b, h, kvh, m, hd, chunk_rows, monkeypatch):
    q, k, v, dout, out, lse, mask, pos, valid = _kept_problem(b, h, kvh, m, hd, seed=m)
    scale = hd ** -0.5
    if chunk_rows is not None:  # several query chunks: each builds its own slice of the bias
        chunks = ops._chunks
        monkeypatch.setattr(ops, "_chunks", lambda n, per_row, budget=0: chunks(n, 1, chunk_rows))
    want = ops.attention_kept_backward_torch(dout, q, k, v, out, lse, mask, scale)
    got = ops.attention_kept_backward_torch(dout, q, k, v, out, lse, None, scale, pos=pos, valid=valid)
    assert got[2].abs().max() > 0  # (one kept row: dq = dk = 0 exactly, dv = dout)
    for g_, w in zip(got, want):
        torch.testing.assert_close(g_, w, rtol=1e-12, atol=1e-12)


def test_kept_op_autograd_uses_positions():
    q, k, v, dout, out, lse, mask, pos, valid = _kept_problem(2, 4, 2, 50, 16, seed=3)
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    y = torch.ops.lemo.attention_kept(q, k, v, out, lse, None, pos, valid, 0.25)
    assert torch.equal(y, out)
    y.backward(dout)
    want = ops.attention_kept_backward_torch(dout, q.detach(), k.detach(), v.detach(), out, lse, mask, 0.25)
    for t, w in zip((q, k, v), want):
        torch.testing.assert_close(t.grad, w, rtol=1e-12, atol=1e-12)


def test_kept_op_registration_opcheck():
    """Schema, fake and autograd registration of lemo::attention_kept with the positions arguments."""
    q, k, v, dout, out, lse, mask, pos, valid = _kept_problem(2, 4, 2, 24, 8, seed=4)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), out, lse, None, pos, valid, 0.3)
    torch.library.opcheck(torch.ops.lemo.attention_kept.default, args)


@pytest.mark.parametrize("b,h,kvh,m,hd", [(2, 4, 2, 70, 16), (2, 2, 1, 9, 8)])
def test_compact_causal_mask_is_the_positions_mask(b, h, kvh, m, hd):
    """What the CUDA flash path relies on (ops.attention_kept_backward_flash): kept rows sorted by position,
    rows out of range at the end with zero upstream gradient, so the plain causal mask of the compact
    sequence (key j <= query i) gives the same gradient as the positions mask."""
    q, k, v, dout, out, lse, _, pos, valid = _kept_problem(b, h, kvh, m, hd, seed=m + 1)
    dout = dout.masked_fill(~valid[:, None, :, None], 0)
    tril = torch.ones(m, m, dtype=torch.bool).tril()[None, None].expand(b, 1, m, m)
    want = ops.attention_kept_backward_torch(dout, q, k, v, out, lse, None, hd ** -0.5, pos=pos, valid=valid)
    got = ops.attention_kept_backward_torch(dout, q, k, v, out, lse, tril, hd ** -0.5)
    for g_, w in zip(got, want):
        assert w.abs().max() > 0
        torch.testing.assert_close(g_, w, rtol=1e-12, atol=1e-12)
