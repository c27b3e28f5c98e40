"""The cross-entropy rows kernel of the segmented loss (kernels.cross_entropy) on CPU.

The twin against F.cross_entropy and its autograd gradient; the Triton kernel run by the interpreter
(TRITON_INTERPRET=1, set in tests/conftest.py) in fp32 against an fp64 evaluation of the plain ops, at
most 2x (plus a small floor) worse than the plain ops in fp32; lemo::linear_cross_entropy with the
kernel forced in against the op on its twin; input validation."""

import pytest
import torch
import torch.nn.functional as F

from lemo_compile.kernels import cross_entropy as ce, linear_cross_entropy as lce
from lemo_compile.testing.tolerance import check_within_twice

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
interpreted = pytest.mark.skipif(not ce.triton_interpreted(),
                                 reason="needs Triton kernels defined under TRITON_INTERPRET=1")
IGNORE = -100

# (rows, vocab, ignored rows): vocab below, at and above the kernel's block (4096), not powers of two
SHAPES = [(1, 5, 0), (7, 1000, 2), (5, 4096, 1), (3, 9000, 3), (4, 4097, 0)]


def make(rows, vocab, ignored, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 3).to(dtype)
    target = torch.randint(0, vocab, (rows,), generator=g)
    target[torch.randperm(rows, generator=g)[:ignored]] = IGNORE
    return logits, target


def plain(logits, target, scale):
    """Per-row losses and the gradient of sum(losses) * scale, by F.cross_entropy and autograd."""
    lf = logits.detach().clone().requires_grad_(True)
    rows = F.cross_entropy(lf, target, ignore_index=IGNORE, reduction="none")
    (rows.sum() * scale).backward()
    return rows.detach(), lf.grad


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_twin_matches_plain_ops(shape):
    logits, target = make(*shape, torch.float64)
    scale = torch.tensor(0.37, dtype=torch.float64)
    ref_loss, ref_grad = plain(logits, target, scale)
    got = logits.clone()
    loss = ce.ce_rows_torch(got, target, scale, IGNORE, True, upcast=False)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, ref_grad, rtol=1e-12, atol=1e-13)
    assert bool((got[target == IGNORE] == 0).all())
    untouched = logits.clone()
    ce.ce_rows_torch(untouched, target, scale, IGNORE, False, upcast=False)
    assert torch.equal(untouched, logits)  # without write_grad the logits stay as they were


@interpreted
@pytest.mark.parametrize("write_grad", [True, False], ids=["grad", "loss_only"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernel_matches_reference_fp32(shape, write_grad):
    logits, target = make(*shape, torch.float32, seed=1)
    scale = torch.tensor(0.25)
    ref_loss, ref_grad = plain(logits.double(), target, scale.double())
    low_loss, low_grad = plain(logits, target, scale)
    got = logits.clone()
    loss = ce.ce_rows_triton(got, target, scale, IGNORE, write_grad)
    assert loss.dtype == torch.float32 and loss.shape == (shape[0],)
    check_within_twice("loss", loss, low_loss, ref_loss, 1e-6)
    if write_grad:
        check_within_twice("grad", got, low_grad, ref_grad, 1e-7)
        assert bool((got[target == IGNORE] == 0).all())
    else:
        assert torch.equal(got, logits)


@interpreted
def test_kernel_on_a_strided_segment():
    """A segment is a row slice of a larger buffer: the kernel follows the row stride and leaves the
    rest alone."""
    logits, target = make(6, 300, 1, torch.float32, seed=2)
    wide = torch.randn(6, 320)
    wide[:, :300] = logits
    view = wide[:, :300]
    twin = logits.clone()
    scale = torch.tensor(1.0)
    loss = ce.ce_rows_triton(view, target, scale, IGNORE, True)
    torch.testing.assert_close(loss, ce.ce_rows_torch(twin, target, scale, IGNORE, True), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(view, twin, rtol=1e-5, atol=1e-7)


@interpreted
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_op_with_kernel_matches_op_on_twin(monkeypatch, reduction):
    """lemo::linear_cross_entropy with every segment on the kernel equals the op on its twin: loss and
    the hidden-state and head-weight gradients, segments of 3 rows over 10 (a short last one)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10, 24, generator=g)
    w = torch.randn(4500, 24, generator=g) * 0.3
    b = torch.randn(4500, generator=g) * 0.1
    t = torch.randint(0, 4500, (10,), generator=g)
    t[[2, 7]] = IGNORE
    args = (x, w, b, t, IGNORE, reduction, True, 3, True, True)
    ref = lce.linear_cross_entropy_torch(*args)
    monkeypatch.setattr(ce, "use_triton", lambda device, dtype, upcast: True)
    got = lce.linear_cross_entropy_torch(*args)
    for name, a, r in zip(("loss", "dx", "dw", "db"), got, ref):
        torch.testing.assert_close(a, r, rtol=2e-5, atol=1e-6, msg=name)


def test_validation():
    logits, target = make(3, 10, 0, torch.float32)
    one = torch.tensor(1.0)
    with pytest.raises(ValueError, match="target must be int64"):
        ce.ce_rows_torch(logits, target[:2], one, IGNORE, True)
    with pytest.raises(ValueError, match="target must be int64"):
        ce.ce_rows_torch(logits, target.int(), one, IGNORE, True)
    with pytest.raises(ValueError, match="unit stride"):
        ce.ce_rows_torch(logits.t(), target, one, IGNORE, True)
    with pytest.raises(ValueError, match="one value"):
        ce.ce_rows_torch(logits, target, torch.ones(2), IGNORE, True)


def test_dispatch():
    assert not ce.use_triton(torch.device("cpu"), torch.float32, True)
    if ce.triton is not None:
        assert ce.use_triton(torch.device("cuda"), torch.bfloat16, True)
        assert not ce.use_triton(torch.device("cuda"), torch.bfloat16, False)  # computes in bf16: the twin
        assert ce.use_triton(torch.device("cuda"), torch.float32, False)
        assert not ce.use_triton(torch.device("cuda"), torch.float64, True)
