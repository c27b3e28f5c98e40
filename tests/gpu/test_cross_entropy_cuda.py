"""The compiled cross-entropy rows kernel (kernels.cross_entropy) against its twin on CUDA (needs CUDA).

bf16 and fp32 logits, Llama-3's vocabulary (128256) and odd ones, one row to several hundred, ignored
targets. Both the kernel and the twin are compared with an fp64 evaluation of the same logits; the
kernel may be at most 2x (plus a small floor) worse than the twin. Then lemo::linear_cross_entropy with
the kernel against the op on its twin (LEMO_KERNEL_IMPL=torch), loss and gradients.

Run with TRITON_INTERPRET=0 (tests/conftest.py sets the interpreter unless it is set already)."""

import pytest
import torch
import torch.nn.functional as F

from lemo_compile.kernels import cross_entropy as ce, linear_cross_entropy as lce
from lemo_compile.testing.tolerance import check_within_twice

_WHY = ("needs a CUDA device" if not torch.cuda.is_available() else
        "Triton kernels are interpreted: run with TRITON_INTERPRET=0" if ce.triton_interpreted() else "")
gpu = pytest.mark.skipif(bool(_WHY), reason=_WHY)
IGNORE = -100


def make(rows, vocab, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=g, device="cuda") * 4).to(dtype)
    target = torch.randint(0, vocab, (rows,), generator=g, device="cuda")
    target[::5] = IGNORE
    return logits, target


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("rows,vocab", [(1, 128256), (37, 128256), (513, 32000), (9, 4097), (64, 151936)])
def test_kernel_against_twin(rows, vocab, dtype):
    logits, target = make(rows, vocab, dtype, seed=rows)
    scale = torch.tensor(1.0 / 50, device="cuda")
    ref = logits.double()
    ref_loss = ce.ce_rows_torch(ref, target, scale.double(), IGNORE, True, upcast=False)
    twin = logits.clone()
    twin_loss = ce.ce_rows_torch(twin, target, scale, IGNORE, True)
    got = logits.clone()
    loss = ce.ce_rows_triton(got, target, scale, IGNORE, True)
    check_within_twice("loss", loss, twin_loss, ref_loss, 1e-5)
    check_within_twice("grad", got, twin, ref, 1e-8)
    assert bool((got[target == IGNORE] == 0).all())
    loss_only = logits.clone()
    torch.testing.assert_close(ce.ce_rows_triton(loss_only, target, scale, IGNORE, False), loss, rtol=0, atol=0)
    assert torch.equal(loss_only, logits)


@gpu
def test_op_with_kernel_against_op_on_twin(monkeypatch):
    torch.manual_seed(0)
    x = (torch.randn(1000, 512, device="cuda") * 0.5).to(torch.bfloat16)
    w = (torch.randn(32003, 512, device="cuda") * 0.05).to(torch.bfloat16)
    t = torch.randint(0, 32003, (1000,), device="cuda")
    t[:17] = IGNORE
    args = (x, w, None, t, IGNORE, "mean", True, 256, True, True)
    got = lce.linear_cross_entropy_torch(*args)
    monkeypatch.setenv("LEMO_KERNEL_IMPL", "torch")
    ref = lce.linear_cross_entropy_torch(*args)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=0)
    for name, a, r in zip(("dx", "dw"), got[1:3], ref[1:3]):
        # the same bf16 roundings of the logits' gradient, up to exp's last fp32 bits
        torch.testing.assert_close(a.float(), r.float(), rtol=2e-2, atol=1e-3 * r.float().abs().max().item(),
                                   msg=name)
    full = F.cross_entropy(F.linear(x, w).float(), t, ignore_index=IGNORE)
    torch.testing.assert_close(got[0], full, rtol=1e-5, atol=0)
