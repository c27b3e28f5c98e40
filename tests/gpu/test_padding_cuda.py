"""Padded batches on CUDA (skipped without a GPU): the default modes, where attention with a model
mask runs PyTorch's memory-efficient kernel, never give NaN and match their oracle, in fp32 and bf16,
under Inductor and the eager inner compiler (the CPU matrix is tests/test_padding.py)."""

import pytest
import torch

from lemo_compile.testing.padding import KINDS, run_case

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
INDUCTOR = {("llama", "left"), ("gemma3", "right")}  # Inductor compiles are slow: two cells get it


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_default_modes(arch, kind, dtype):
    inner = "inductor" if (arch, kind) in INDUCTOR else "eager"
    case = run_case(arch, kind, "backward", "backward", inner=inner, keep=0.5, device="cuda", dtype=dtype)
    assert case.finite and not case.error, case
    if dtype == torch.float32:
        assert case.matches, case
    else:  # bf16: the oracle runs other kernels at 8 bits; gradients are compared in fp32 above
        assert case.loss_err <= 2e-2, case


@cuda
def test_keep_everything_is_dense():
    case = run_case("gemma3", "right", "backward", "backward", inner="eager", keep=1.0, device="cuda")
    assert case.finite and case.matches, case


@cuda
@pytest.mark.parametrize("kv_heads", [8, 2])
def test_segment_attention_bf16_flash_per_segment(kv_heads):
    """lemo::segment_attention on CUDA (PyTorch's flash kernels, one call per group of equal-length segments)
    against SDPA under the mask the segments stand for, in fp64: at most twice the error of bf16 SDPA
    itself, forward and backward; padding rows 0. Row 2 is padded the way TRL pads a packed row: 200
    one-token documents, and four documents of 50 tokens."""
    from lemo_compile import traced

    g = torch.Generator(device="cuda").manual_seed(0)
    b, h, n, d = 3, 8, 700, 128
    seg = torch.zeros(b, n, dtype=torch.int32, device="cuda")
    seg[0, 37:] = 1
    seg[1, :300], seg[1, 300], seg[1, 301:650] = 1, 2, 3
    seg[2, :200] = torch.arange(1, 201)
    seg[2, 200:400] = torch.arange(201, 205).repeat_interleave(50)
    q = torch.randn(b, h, n, d, device="cuda", generator=g)
    k, v = (torch.randn(b, kv_heads, n, d, device="cuda", generator=g) for _ in range(2))
    dout = torch.randn(b, h, n, d, device="cuda", generator=g)
    real = (seg != 0)[:, None, :, None]

    def sdpa(dt):
        qq, kk, vv = (t.to(dt).requires_grad_() for t in (q, k, v))
        rep = h // kv_heads
        y = torch.nn.functional.scaled_dot_product_attention(
            qq, kk.repeat_interleave(rep, 1), vv.repeat_interleave(rep, 1), attn_mask=traced.segment_mask(seg))
        y = torch.where(real, y, 0)
        y.backward(dout.to(dt))
        return y, qq.grad, kk.grad, vv.grad

    ref, low = sdpa(torch.float64), sdpa(torch.bfloat16)
    qq, kk, vv = (t.bfloat16().requires_grad_() for t in (q, k, v))
    out, lse = torch.ops.lemo.segment_attention(qq, kk, vv, seg, d ** -0.5)
    out.backward(dout.bfloat16())
    got = (out, qq.grad, kk.grad, vv.grad)
    for name, a, lo, r in zip(("out", "dq", "dk", "dv"), got, low, ref):
        assert torch.isfinite(a).all(), name
        err = (a.double() - r).abs().max().item()
        assert err <= 2 * (lo.double() - r).abs().max().item() + 1e-3 * r.abs().max().item(), name
    assert (out[~real.expand_as(out)] == 0).all()


@cuda
def test_segment_attention_thousands_of_one_token_documents():
    """The 8B/32K TRL row: a document of 3,000 tokens, then 29,000 one-token documents (TRL's padding).
    Flash padded each one-token segment to a 128-row tile (58 GiB asked at 8B); short segments now run the
    twin. Forward and backward finite; a one-token document's output is its own value row, the long one
    equals SDPA on its slice."""
    g = torch.Generator(device="cuda").manual_seed(0)
    h, kvh, d, long_len, ones = 32, 8, 128, 3000, 29000
    n = long_len + ones
    seg = torch.ones(1, n, dtype=torch.int32, device="cuda")
    seg[0, long_len:] = torch.arange(2, ones + 2, device="cuda")
    q = torch.randn(1, h, n, d, device="cuda", generator=g, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, kvh, n, d, device="cuda", generator=g, dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    torch.cuda.reset_peak_memory_stats()
    out, lse = torch.ops.lemo.segment_attention(q, k, v, seg, d ** -0.5)
    out.float().square().sum().backward()
    assert torch.cuda.max_memory_allocated() < 8 * 2**30
    assert all(torch.isfinite(t).all() for t in (out, lse, q.grad, k.grad, v.grad))
    ve = v.detach().repeat_interleave(h // kvh, 1)
    torch.testing.assert_close(out[:, :, long_len:], ve[:, :, long_len:])
    ke = k.detach().repeat_interleave(h // kvh, 1)
    want = torch.nn.functional.scaled_dot_product_attention(
        q.detach()[:, :, :long_len], ke[:, :, :long_len], ve[:, :, :long_len], is_causal=True)
    torch.testing.assert_close(out[:, :, :long_len], want, atol=2e-2, rtol=2e-2)
