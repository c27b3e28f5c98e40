"""CUDA path of lemo::attention_lse against its plain-PyTorch twin (skipped without a GPU).

Tolerance relative to the twin's own low-precision error: both are compared with an fp64 evaluation of
the twin, and the CUDA path may be at most 2x (plus a small floor) worse than the bf16 twin."""

import pytest
import torch

from lemo_compile import traced
from lemo_compile.kernels import attention

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def problem(b, h, kvh, n, hd, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, h, n, hd, device="cuda", generator=g).to(dtype)
    k = torch.randn(b, kvh, n, hd, device="cuda", generator=g).to(dtype)
    v = torch.randn(b, kvh, n, hd, device="cuda", generator=g).to(dtype)
    mask = torch.ones(n, n, dtype=torch.bool, device="cuda").tril()[None, None].expand(b, 1, n, n).clone()
    mask[-1, :, :, n - 7:] = False  # right padding: the last sequence's final 7 keys are masked
    return q, k, v, mask


def err(a, b):
    return (a.double() - b.double()).abs().max().item()


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("b,h,kvh,n,hd", [(1, 4, 2, 200, 64), (2, 8, 8, 256, 128), (1, 4, 1, 130, 64)])
@pytest.mark.parametrize("masked", [True, False], ids=["mask", "causal"])
def test_attention_lse_matches_twin(dtype, b, h, kvh, n, hd, masked):
    """With a mask: the memory-efficient kernel. Without (causal): flash in bf16, memory-efficient in fp32."""
    q, k, v, mask = problem(b, h, kvh, n, hd, dtype)
    mask, causal = (mask, False) if masked else (None, True)
    scale = hd ** -0.5
    ref_o, ref_l = attention.attention_lse_torch(q.double(), k.double(), v.double(), mask, scale, causal)
    low_o, low_l = attention.attention_lse_torch(q, k, v, mask, scale, causal)
    o, l = attention.attention_lse_cuda(q, k, v, mask, scale, causal)
    assert err(o, ref_o) <= 2 * err(low_o, ref_o) + 1e-5
    assert err(l, ref_l) <= 2 * err(low_l, ref_l) + 1e-4


def kept_problem(b, h, kvh, m, hd, seed):
    """Kept rows of a longer sequence: sorted positions with gaps, different per sequence; in the second
    sequence the last 5 slots are out of range (clamped to the last position, as selection does) and
    their upstream gradient is zero (the residual scatter drops them)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, dout = (torch.randn(b, h, m, hd, device="cuda", generator=g).bfloat16() for _ in range(2))
    k, v = (torch.randn(b, kvh, m, hd, device="cuda", generator=g).bfloat16() for _ in range(2))
    pos = torch.stack([torch.sort(torch.randperm(3 * m, device="cuda", generator=g)[:m]).values for _ in range(b)])
    valid = torch.ones(b, m, dtype=torch.bool, device="cuda")
    if b > 1 and m > 5:
        valid[1, -5:] = False
        pos[1, -5:] = pos[1, -6]
    dout = dout.masked_fill(~valid[:, None, :, None], 0)
    # a stand-in for the dense O and lse: attention over the kept keys plus 40 extra keys per query
    extra_k, extra_v = (torch.randn(b, kvh, 40, hd, device="cuda", generator=g).bfloat16() for _ in range(2))
    mask = torch.cat([torch.ones(b, 1, m, 40, dtype=torch.bool, device="cuda"),
                      traced.causal_positions_mask(pos, pos, valid)], dim=-1)
    out, lse = attention.attention_lse_torch(q.double(), torch.cat([extra_k, k], 2).double(),
                                       torch.cat([extra_v, v], 2).double(), mask, hd ** -0.5, False)
    return q, k, v, dout, out.bfloat16(), lse.float(), pos, valid


@cuda
@pytest.mark.parametrize("b,h,kvh,m,hd", [(1, 4, 2, 200, 64), (2, 8, 8, 256, 128), (2, 4, 1, 130, 64),
                                          (2, 2, 2, 64, 64)])
def test_kept_backward_flash_matches_twin(b, h, kvh, m, hd):
    """Against the twin in fp32 on the same bf16 inputs (non-contiguous, as the graph passes them); the
    allowed error is twice that of PyTorch's own bf16 SDPA backward (the same kernel) on the dense causal
    problem of these shapes, plus a floor."""
    q, k, v, dout, out, lse, pos, valid = kept_problem(b, h, kvh, m, hd, seed=m)
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))  # (b, m, H, hd) storage
    scale = hd ** -0.5
    got = attention.attention_kept_backward_flash(dout, q, k, v, out, lse, valid, scale)
    assert all(g_.is_contiguous() for g_ in got)  # what the op's fake promises
    ref = attention.attention_kept_backward_torch(dout.float(), q.float(), k.float(), v.float(), out.float(),
                                            lse, None, scale, pos=pos, valid=valid)
    # the kernel's own rounding: bf16 vs fp64 autograd of dense causal SDPA on q, k, v
    grads = []
    for dt in (torch.bfloat16, torch.float64):
        qq, kk, vv = (t.detach().to(dt).contiguous().requires_grad_() for t in (q, k, v))
        y = torch.nn.functional.scaled_dot_product_attention(qq, kk.repeat_interleave(h // kvh, 1),
                                                             vv.repeat_interleave(h // kvh, 1), is_causal=True,
                                                             scale=scale)
        y.backward(dout.to(dt))
        grads.append((qq.grad, kk.grad, vv.grad))
    for name, g_, r, lo, hi in zip("qkv", got, ref, *grads):
        assert g_.dtype == torch.bfloat16 and r.abs().max() > 0
        assert torch.isfinite(g_).all()
        assert err(g_, r) <= 2 * err(lo, hi) + 1e-3 * r.abs().max().item(), name


@cuda
def test_kept_backward_flash_with_every_row_kept_is_the_sdpa_backward():
    """All rows kept, positions 0..m-1, the dense forward's O and lse: the dropped-term gradient is the
    ordinary attention gradient."""
    b, h, kvh, m, hd = 2, 4, 2, 300, 64
    g = torch.Generator(device="cuda").manual_seed(5)
    q = torch.randn(b, h, m, hd, device="cuda", generator=g).bfloat16().requires_grad_()
    k, v = (torch.randn(b, kvh, m, hd, device="cuda", generator=g).bfloat16().requires_grad_() for _ in range(2))
    dout = torch.randn(b, h, m, hd, device="cuda", generator=g).bfloat16()
    y = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                         is_causal=True)
    y.backward(dout)
    out, lse = attention.attention_lse_cuda(q.detach(), k.detach(), v.detach(), None, hd ** -0.5, True)
    pos = torch.arange(m, device="cuda").expand(b, m)
    valid = torch.ones(b, m, dtype=torch.bool, device="cuda")
    dq, dk, dv = torch.ops.lemo.attention_kept_backward(dout, q.detach(), k.detach(), v.detach(), out, lse,
                                                        None, pos, valid, hd ** -0.5)
    for got, want in ((dq, q.grad), (dk, k.grad), (dv, v.grad)):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_keyless_rows_are_zero_not_nan(dtype):
    """Left padding: the first 9 queries of the second sequence see no key (every key of theirs is
    padding). The memory-efficient kernel and the twin give those rows 0 and lse -inf, never NaN, the
    other rows are as before, and the kept-rows backward through them is finite and zero there. (lse of
    such a row: -inf from the twin; the memory-efficient kernel leaves 0 there, which is as good: every
    score of the row is -inf, so exp(score - lse) is 0 either way.)"""
    b, h, kvh, n, hd = 2, 4, 2, 200, 64
    q, k, v, mask = problem(b, h, kvh, n, hd, dtype, seed=3)
    mask[1, :, :, :9] = False
    scale = hd ** -0.5
    o, l = attention.attention_lse_cuda(q, k, v, mask, scale, False)
    ref_o, ref_l = attention.attention_lse_torch(q.double(), k.double(), v.double(), mask, scale, False)
    assert torch.isfinite(o).all() and (o[1, :, :9] == 0).all() and not torch.isnan(l).any()
    assert (l[1, :, :9] < float("inf")).all()
    assert torch.isfinite(ref_o).all() and (ref_o[1, :, :9] == 0).all()
    low_o, _ = attention.attention_lse_torch(q, k, v, mask, scale, False)
    assert err(o, ref_o) <= 2 * err(low_o, ref_o) + 1e-5
    dout = torch.randn_like(q)
    grads = torch.ops.lemo.attention_kept_backward(dout, q, k, v, o, l, mask, None, None, scale)
    assert all(torch.isfinite(g_).all() for g_ in grads)
    assert (grads[0][1, :, :9] == 0).all()  # dq of a keyless query
