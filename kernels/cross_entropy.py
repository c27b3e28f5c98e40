"""Cross-entropy rows of one loss segment: per-row loss and, in place, the logits' gradient.

`lemo::linear_cross_entropy` (kernels.linear_cross_entropy) computes the LM head a segment of rows at a time;
for each segment it needs, from the logits L (rows, vocab) in the model dtype and the targets t,

    loss[i] = logsumexp(L[i].float()) - L[i, t[i]].float()          (0 where t[i] == ignore_index)
    grad[i] = (softmax(L[i].float()) - onehot(t[i])) * scale * valid[i], rounded to L's dtype

which is what HF's loss computes after upcasting the logits (`logits.float()`), with `scale` the
reduction's factor (1 / number of valid targets for "mean", 1 for "sum"). Unfused, that is a chain
of passes over (rows x vocab) fp32: the upcast copy, logsumexp, subtract, exp, scatter, scale, the
cast back. The kernel reads the row twice in the model dtype (an online max/sum, then the gradient)
and writes the gradient over the logits, so a segment holds nothing beyond its logits.

Layers (STYLE 7-8): the `@triton.jit` kernel, the launcher `ce_rows_triton` (validate, allocate,
launch), the twin `ce_rows_torch` with the same arguments (CPU implementation and oracle), and
`ce_rows`, which dispatches. Not a `torch.library` op: it runs inside `lemo::linear_cross_entropy`,
which is the op graphs see.
"""

from __future__ import annotations

import torch

from ._triton import TRITON_DTYPES as _TRITON_DTYPES, interpreted, kernel_impl, tl, triton

_BLOCK_V = 4096


if triton is not None:

    @triton.jit
    def _ce_rows_kernel(logits_ptr, stride_row, target_ptr, scale_ptr, loss_ptr, V, ignore_index,
                        WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride_row
        t = tl.load(target_ptr + row)
        valid = t != ignore_index
        tt = tl.where(valid, t, 0)
        cols0 = tl.arange(0, BLOCK_V)
        # pass 1: online max and sum of exp over the row, in fp32
        m = tl.max(tl.full([BLOCK_V], float("-inf"), tl.float32), 0)
        s = tl.sum(tl.zeros([BLOCK_V], tl.float32), 0)
        for off in range(0, V, BLOCK_V):
            cols = off + cols0
            x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, 0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
            m = m_new
        lse = m + tl.log(s)
        picked = tl.load(base + tt).to(tl.float32)  # read before pass 2 overwrites the row
        tl.store(loss_ptr + row, tl.where(valid, lse - picked, 0.0))
        if WRITE_GRAD:
            scale = tl.load(scale_ptr) * valid.to(tl.float32)
            for off in range(0, V, BLOCK_V):
                cols = off + cols0
                inside = cols < V
                x = tl.load(base + cols, mask=inside, other=0.0).to(tl.float32)
                p = tl.exp(x - lse)
                p = tl.where(cols == tt, p - 1.0, p) * scale
                tl.store(base + cols, p.to(logits_ptr.dtype.element_ty), mask=inside)


def triton_interpreted() -> bool:
    """Whether the kernel was defined under TRITON_INTERPRET=1 (runs on the host)."""
    return triton is not None and interpreted(_ce_rows_kernel)


def _check(logits: torch.Tensor, target: torch.Tensor, scale: torch.Tensor) -> None:
    def fail(msg):
        raise ValueError(f"lemo ce_rows: {msg}")
    if logits.dim() != 2 or logits.stride(1) != 1:
        fail(f"logits must be (rows, vocab) with unit stride along the vocabulary, got shape "
             f"{tuple(logits.shape)} strides {logits.stride()}")
    if target.dim() != 1 or target.shape[0] != logits.shape[0] or target.dtype != torch.int64:
        fail(f"target must be int64 (rows,) = ({logits.shape[0]},), got {target.dtype} {tuple(target.shape)}")
    if scale.numel() != 1:
        fail(f"scale must hold one value, got shape {tuple(scale.shape)}")
    if target.device != logits.device or scale.device != logits.device:
        fail(f"logits, target and scale must share a device, got {logits.device}, {target.device}, {scale.device}")


def ce_rows_triton(logits: torch.Tensor, target: torch.Tensor, scale: torch.Tensor, ignore_index: int,
                   write_grad: bool) -> torch.Tensor:
    """Per-row losses (rows,) fp32; with write_grad, the logits' gradient overwrites `logits`.
    Computes in fp32 whatever the logits' dtype (HF's upcast). Targets must lie in [0, vocab) or equal
    ignore_index (the caller checks)."""
    if triton is None:
        raise ValueError("lemo ce_rows: Triton is not installed; use ce_rows_torch")
    _check(logits, target, scale)
    if logits.dtype not in _TRITON_DTYPES:
        raise ValueError(f"lemo ce_rows: logits dtype {logits.dtype} is not one of {_TRITON_DTYPES}")
    rows, vocab = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        _ce_rows_kernel[(rows,)](logits, logits.stride(0), target, scale.to(torch.float32).reshape(1), loss,
                                 vocab, ignore_index, WRITE_GRAD=write_grad, BLOCK_V=_BLOCK_V, num_warps=8)
    return loss


def ce_rows_torch(logits: torch.Tensor, target: torch.Tensor, scale: torch.Tensor, ignore_index: int,
                  write_grad: bool, upcast: bool = True) -> torch.Tensor:
    """The twin of ce_rows_triton (upcast=True); upcast=False computes in the logits' own dtype, as a
    model that does not upcast does. Per-row losses in the compute dtype."""
    _check(logits, target, scale)
    cdtype = torch.float32 if upcast else logits.dtype
    valid = target != ignore_index
    tgt = torch.where(valid, target, torch.zeros_like(target))[:, None]
    lf = logits.to(cdtype) if upcast else logits.clone()
    lse = torch.logsumexp(lf, dim=-1)
    picked = lf.gather(1, tgt).squeeze(1)
    loss = torch.where(valid, lse - picked, torch.zeros_like(lse))
    if write_grad:  # softmax - onehot for an upstream gradient of 1, rows of ignored targets zero
        lf.sub_(lse.unsqueeze(1)).exp_()
        lf.scatter_add_(1, tgt, -torch.ones_like(picked).unsqueeze(1))
        lf.mul_((valid.to(cdtype) * scale.to(cdtype)).unsqueeze(1))
        logits.copy_(lf)
    return loss


def use_triton(device: torch.device, dtype: torch.dtype, upcast: bool) -> bool:
    """Whether ce_rows runs the kernel for logits of this device and dtype: CUDA, Triton installed,
    fp16/bf16/fp32, computing in fp32 (the model upcasts, or the logits are fp32), and
    LEMO_KERNEL_IMPL not 'torch' (read at call time)."""
    return (triton is not None and kernel_impl() == "triton" and torch.device(device).type == "cuda"
            and dtype in _TRITON_DTYPES and (upcast or dtype == torch.float32))


def ce_rows(logits: torch.Tensor, target: torch.Tensor, scale: torch.Tensor, ignore_index: int,
            write_grad: bool, upcast: bool) -> torch.Tensor:
    if use_triton(logits.device, logits.dtype, upcast):
        return ce_rows_triton(logits, target, scale, ignore_index, write_grad)
    return ce_rows_torch(logits, target, scale, ignore_index, write_grad, upcast)
