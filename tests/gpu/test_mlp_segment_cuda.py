"""lemo::swiglu_mlp on CUDA in bf16 at Llama-3-8B dimensions (needs CUDA).

The segmented op and the plain bf16 MLP are both compared with the plain MLP in fp64 on the same
inputs; the op may be at most 2x (plus a small floor) worse, for the output and every gradient; rows
not a multiple of the segment, batch 2. Then its peak memory: the backward of the op never holds more
than one segment's intermediates. The LoRA twin (lemo::swiglu_lora_mlp) likewise, with PEFT's default
on a bf16 model: fp32 adapters of rank 16 on all three projections, casts in and out."""

import pytest
import torch
import torch.nn.functional as F

from lemo_compile import ops  # noqa: F401  (registers the ops)
from lemo_compile.testing.tolerance import check_within_twice

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def plain_mlp(x, wg, wu, wd):
    return F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)


def _inputs(shape, d, inter, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(*shape, d, generator=g, device="cuda")
    ws = [torch.randn(o, i, generator=g, device="cuda") / i ** 0.5 for o, i in ((inter, d), (inter, d), (d, inter))]
    gy = torch.randn(*shape, d, generator=g, device="cuda")
    return [t.to(torch.bfloat16).requires_grad_() for t in (x, *ws)], gy.to(torch.bfloat16)


def _grads(fn, leaves, gy):
    y = fn(*leaves)
    return (y.detach(), *torch.autograd.grad(y, leaves, gy))


@gpu
@pytest.mark.parametrize("shape,rows", [((2, 1500), 512), ((3001,), 1024), ((1, 77), 128)], ids=str)
def test_bf16_within_twice_the_plain_rounding(shape, rows):
    leaves, gy = _inputs(shape, 4096, 14336, seed=shape[-1])
    low = _grads(plain_mlp, leaves, gy)
    got = _grads(lambda *a: torch.ops.lemo.swiglu_mlp(*a, rows), leaves, gy)
    ref = _grads(plain_mlp, [t.detach().double().requires_grad_() for t in leaves], gy.double())
    for name, a, lo, r in zip(("y", "dx", "dgate", "dup", "ddown"), got, low, ref):
        check_within_twice(name, a, lo, r, 1e-3 * r.abs().max().item())


@gpu
def test_backward_peak_is_one_segment():
    """Frozen weights (LoRA elsewhere), 16K rows: the op's backward allocates the input gradient plus
    about one segment's intermediates; the plain MLP's backward holds (rows x 14336) tensors."""
    leaves, gy = _inputs((1, 16384), 4096, 14336, seed=1)
    x, ws = leaves[0], [w.detach() for w in leaves[1:]]

    def peak(fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        y = fn(x, *ws)
        (dx,) = torch.autograd.grad(y, [x], gy)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    seg = peak(lambda *a: torch.ops.lemo.swiglu_mlp(*a, 512))
    full = peak(plain_mlp)
    inter_full = 16384 * 14336 * 2  # one (rows x intermediate) bf16 tensor
    assert seg < 2 * 16384 * 4096 * 2 + 16 * 512 * 14336 * 2, seg  # y, dx, one segment (+ cuBLAS workspace)
    assert full > 3 * inter_full, full


SCALES = [2.0, 2.0, 2.0]


def peft_proj(z, w, a, b, scale):
    return (F.linear(z, w) + F.linear(F.linear(z.to(a.dtype), a), b) * scale).to(z.dtype)


def peft_mlp(x, wg, wu, wd, ag, bg, au, bu, ad, bd):
    p = F.silu(peft_proj(x, wg, ag, bg, SCALES[0])) * peft_proj(x, wu, au, bu, SCALES[1])
    return peft_proj(p, wd, ad, bd, SCALES[2])


def _adapters(d, inter, r, seed):
    g = torch.Generator(device="cuda").manual_seed(seed + 100)
    out = []
    for o, k in ((inter, d), (inter, d), (d, inter)):
        out += [torch.randn(r, k, generator=g, device="cuda") / k ** 0.5,
                torch.randn(o, r, generator=g, device="cuda") / r ** 0.5 / 4]
    return [t.requires_grad_() for t in out]


@gpu
@pytest.mark.parametrize("shape,rows", [((2, 1500), 512), ((1, 77), 128)], ids=str)
def test_lora_bf16_within_twice_the_peft_rounding(shape, rows):
    """Output, input gradient and the six adapter gradients (base weights frozen, as in LoRA training)."""
    leaves, gy = _inputs(shape, 4096, 14336, seed=shape[-1] + 7)
    x, ws = leaves[0], [w.detach() for w in leaves[1:]]
    ad = _adapters(4096, 14336, 16, seed=shape[-1])

    def grads(fn, x, ws, ad, gy):
        y = fn(x, *ws, *ad)
        return (y.detach(), *torch.autograd.grad(y, [x, *ad], gy))

    low = grads(peft_mlp, x, ws, ad, gy)
    got = grads(lambda *a: torch.ops.lemo.swiglu_lora_mlp(*a, SCALES, rows), x, ws, ad, gy)
    hi = [t.detach().double() for t in ad]
    ref = grads(peft_mlp, x.detach().double().requires_grad_(), [w.double() for w in ws],
                [t.requires_grad_() for t in hi], gy.double())
    assert got[0].dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in got[2:])
    names = ("y", "dx", "dA_gate", "dB_gate", "dA_up", "dB_up", "dA_down", "dB_down")
    for name, a, lo, r in zip(names, got, low, ref):
        check_within_twice(name, a, lo, r, 1e-3 * r.abs().max().item())
