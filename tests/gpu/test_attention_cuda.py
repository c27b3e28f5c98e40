"""CUDA paths of the lemo attention ops against their plain-PyTorch twins (skipped without a GPU).

Tolerance relative to the twin's own low-precision error: both are compared with an fp64 evaluation of
the twin, and the CUDA path may be at most 2x (plus a small floor) worse than the bf16 twin."""

import pytest
import torch

from lemo_compile import ops

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def problem(b, h, kvh, n, hd, m, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, h, n, hd, device="cuda", generator=g).to(dtype)
    k = torch.randn(b, kvh, n, hd, device="cuda", generator=g).to(dtype)
    v = torch.randn(b, kvh, n, hd, device="cuda", generator=g).to(dtype)
    mask = torch.ones(n, n, dtype=torch.bool, device="cuda").tril()[None, None].expand(b, 1, n, n).clone()
    mask[-1, :, :, n - 7:] = False  # right padding: the last sequence's final 7 keys are masked
    rest = torch.randperm(n - 1, generator=torch.Generator().manual_seed(seed))[: m - 1] + 1
    idx = torch.sort(torch.cat([torch.zeros(1, dtype=torch.int64), rest])).values.cuda()  # block 0 kept
    idx = idx[None].expand(b, m).contiguous()
    return q, k, v, mask, idx


def err(a, b):
    return (a.double() - b.double()).abs().max().item()


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("b,h,kvh,n,hd,m", [(1, 4, 2, 200, 64, 64), (2, 8, 8, 256, 128, 128), (1, 4, 1, 130, 64, 128)])
def test_attention_lse_matches_twin(dtype, b, h, kvh, n, hd, m):
    q, k, v, mask, _ = problem(b, h, kvh, n, hd, m, dtype)
    scale = hd ** -0.5
    ref_o, ref_l = ops.attention_lse_torch(q.double(), k.double(), v.double(), mask, scale, False)
    low_o, low_l = ops.attention_lse_torch(q, k, v, mask, scale, False)
    o, l = ops.attention_lse_cuda(q, k, v, mask, scale, False)
    assert err(o, ref_o) <= 2 * err(low_o, ref_o) + 1e-5
    assert err(l, ref_l) <= 2 * err(low_l, ref_l) + 1e-4


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("b,h,kvh,n,hd,m", [(1, 4, 2, 200, 64, 64), (2, 8, 8, 256, 128, 128), (1, 4, 1, 130, 64, 128)])
def test_attention_kept_backward_matches_twin(dtype, b, h, kvh, n, hd, m):
    m = min(m, n)
    q, k, v, mask, idx = problem(b, h, kvh, n, hd, m, dtype)
    scale = hd ** -0.5
    out, lse = ops.attention_lse_torch(q.double(), k.double(), v.double(), mask, scale, False)
    in_range = torch.ones_like(idx, dtype=torch.bool)
    g = lambda t, ax: ops.gather_seq(t, idx, ax)  # noqa: E731
    qc, kc, vc = g(q, 2), g(k, 2), g(v, 2)
    oc, lc = g(out, 2), g(lse, 2)
    mc = ops.gather_mask(mask, idx, idx, in_range)
    go = torch.randn_like(qc)
    ref = ops.attention_kept_backward_torch(go.double(), qc.double(), kc.double(), vc.double(), oc, lc, mc, scale)
    low = ops.attention_kept_backward_torch(go, qc, kc, vc, oc.to(dtype), lc.float(), mc, scale)
    got = ops.attention_kept_backward_cuda(go, qc, kc, vc, oc.to(dtype), lc.float(), mc, scale)
    for name, r, lo, x in zip("qkv", ref, low, got):
        assert x.shape == r.shape
        assert err(x, r) <= 2 * err(lo, r) + 1e-4, (name, err(x, r), err(lo, r))
