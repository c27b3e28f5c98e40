"""torch.library.opcheck on every lemo:: custom op: schema, fake (meta) and autograd registrations agree
with the op on real inputs, also under AOT dispatch with dynamic shapes. Small CPU inputs (the twins)."""

import pytest
import torch

import lemo_compile  # noqa: F401  (registers the ops)
from lemo_compile import ops  # noqa: F401
from lemo_compile.kernels import attention

G = torch.Generator().manual_seed(0)


def _r(*shape, grad=False, dtype=torch.float32):
    t = torch.randn(*shape, generator=G, dtype=dtype)
    return t.requires_grad_() if grad else t


def _rows(b=2, n=11, m=6):
    idx = torch.stack([torch.sort(torch.randperm(n, generator=G)[:m]).values for _ in range(b)])
    ok = torch.ones(b, m, dtype=torch.bool)
    ok[1, -2:] = False
    return idx, ok


def _attention(grad):
    q = _r(2, 4, 9, 8, grad=grad)
    k, v = _r(2, 2, 9, 8, grad=grad), _r(2, 2, 9, 8, grad=grad)
    return q, k, v


def _kept_inputs():
    q, k, v = _attention(False)
    out, lse = attention.attention_lse_torch(q, k, v, None, 0.3, True)
    pos = torch.arange(9).expand(2, 9)
    valid = torch.ones(2, 9, dtype=torch.bool)
    return q, k, v, out, lse, pos, valid


def _lora(d=8, i=12, r=2):
    return _r(r, d, grad=True), _r(i, r, grad=True), _r(r, d, grad=True), _r(i, r, grad=True), \
        _r(r, i, grad=True), _r(d, r, grad=True)


CASES = {
    "saved": lambda: (torch.ops.lemo.saved.default, (_r(3, 5, grad=True),)),
    "random_block_scores": lambda: (torch.ops.lemo.random_block_scores.default, (_r(2, 130, 8), 3, 7, 64)),
    "attention_lse": lambda: (torch.ops.lemo.attention_lse.default, (*_attention(True), None, 0.3, True)),
    "attention_lse_masked": lambda: (torch.ops.lemo.attention_lse.default,
                                     (*_attention(False), torch.rand(2, 1, 9, 9, generator=G) > 0.3, 0.3, False)),
    "attention_kept": lambda: (torch.ops.lemo.attention_kept.default,
                               (*(t.requires_grad_() for t in _kept_inputs()[:3]), *_kept_inputs()[3:5], None,
                                *_kept_inputs()[5:], 0.3)),
    "attention_kept_backward": lambda: (torch.ops.lemo.attention_kept_backward.default,
                                        (_r(2, 4, 9, 8), *_kept_inputs()[:5], None, *_kept_inputs()[5:], 0.3)),
    "segment_attention": lambda: (torch.ops.lemo.segment_attention.default,
                                  (*_attention(False), torch.tensor([[1] * 4 + [2] * 5, [1] * 7 + [0] * 2],
                                                                    dtype=torch.int32), 0.3)),
    "swiglu_mlp": lambda: (torch.ops.lemo.swiglu_mlp.default,
                           (_r(2, 5, 8, grad=True), _r(12, 8), _r(12, 8), _r(8, 12), 3)),
    "swiglu_mlp_backward": lambda: (torch.ops.lemo.swiglu_mlp_backward.default,
                                    (_r(2, 5, 8), _r(2, 5, 8), _r(12, 8), _r(12, 8), _r(8, 12), 3, True, False)),
    "swiglu_lora_mlp": lambda: (torch.ops.lemo.swiglu_lora_mlp.default,
                                (_r(2, 5, 8, grad=True), _r(12, 8), _r(12, 8), _r(8, 12), *_lora(),
                                 [0.5, 2.0, 1.0], 4)),
    "swiglu_lora_mlp_backward": lambda: (torch.ops.lemo.swiglu_lora_mlp_backward.default,
                                         (_r(2, 5, 8), _r(2, 5, 8), _r(12, 8), _r(12, 8), _r(8, 12),
                                          *(t.detach() for t in _lora()), [0.5, 2.0, 1.0], 4, [True, False, False, False] + [True] * 6)),
    "linear_cross_entropy": lambda: (torch.ops.lemo.linear_cross_entropy.default,
                                     (_r(10, 8), _r(30, 8), None, torch.tensor([1, 4, -100, 7, 0, 29, 3, 3, 2, -100]),
                                      -100, "mean", True, 4, True, False)),
    "gather_rmsnorm_rows": lambda: (torch.ops.lemo.gather_rmsnorm_rows.default,
                                    (_r(2, 11, 8, grad=True), *_rows(), _r(8, grad=True), 1e-6)),
    "gather_rmsnorm_backward": lambda: (torch.ops.lemo.gather_rmsnorm_backward.default,
                                        (_r(2, 6, 8), _r(2, 11, 8), *_rows(), _r(8), 1e-6, True)),
    "linear_scatter_add": lambda: (torch.ops.lemo.linear_scatter_add.default,
                                   (_r(2, 11, 8, grad=True), _r(2, 6, 12, grad=True), _r(8, 12), None, None,
                                    *_rows())),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_opcheck(name):
    op, args = CASES[name]()
    torch.library.opcheck(op, args)


def test_every_op_is_checked():
    """A new lemo:: op needs a case here (calibrated_block_scores reads a predictor file: test_calibrate)."""
    registered = {name for name in dir(torch.ops.lemo) if not name.startswith("_")}
    registered = {n for n in registered if isinstance(getattr(torch.ops.lemo, n), torch._ops.OpOverloadPacket)}
    checked = {n.removesuffix("_masked") for n in CASES} | {"calibrated_block_scores"}
    assert registered <= checked, sorted(registered - checked)
