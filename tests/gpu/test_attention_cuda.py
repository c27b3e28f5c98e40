"""CUDA path of lemo::attention_lse against its plain-PyTorch twin (skipped without a GPU).

Tolerance relative to the twin's own low-precision error: both are compared with an fp64 evaluation of
the twin, and the CUDA path may be at most 2x (plus a small floor) worse than the bf16 twin."""

import pytest
import torch

from lemo_compile import ops

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
def test_attention_lse_matches_twin(dtype, b, h, kvh, n, hd):
    q, k, v, mask = problem(b, h, kvh, n, hd, dtype)
    scale = hd ** -0.5
    ref_o, ref_l = ops.attention_lse_torch(q.double(), k.double(), v.double(), mask, scale, False)
    low_o, low_l = ops.attention_lse_torch(q, k, v, mask, scale, False)
    o, l = ops.attention_lse_cuda(q, k, v, mask, scale, False)
    assert err(o, ref_o) <= 2 * err(low_o, ref_o) + 1e-5
    assert err(l, ref_l) <= 2 * err(low_l, ref_l) + 1e-4
