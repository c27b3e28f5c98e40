"""The LM head and its cross-entropy loss computed in row segments: the implementation of
`lemo::linear_cross_entropy` (registered in lemo_compile.ops).

The unfused graph materializes the logits (N x vocab in the model dtype), an fp32 copy, the fp32
softmax of the backward and its cast: at 32K tokens and a 128K vocabulary that is 8.4 + 16.8 + 16.8
+ 8.4 GB. This op never holds more than one segment of rows. In training it computes the gradient
with respect to the hidden states (and the head's weight, when trainable) segment by segment during
the forward, so the backward is a scale by the incoming gradient of the scalar loss and the head's
matmul runs twice instead of three times (the same trick as Liger's fused linear cross entropy).
Per segment, the losses and the logits' gradient come from kernels.cross_entropy: on CUDA one Triton
kernel that writes the gradient over the logits (a segment holds only its logits), else its twin.

Rounding follows the graph it replaces: logits = linear(x, w, b) in x's dtype, upcast to fp32 when
the model upcasts, log-softmax in that dtype; the logits' gradient is cast back to x's dtype before
the matmuls, as the backward of `.float()` does. The gradient is formed for an upstream gradient of
1 and scaled afterwards, which differs from the unfused backward by one rounding of the logits'
gradient when the upstream gradient is not 1 (e.g. a loss divided by num_items_in_batch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cross_entropy

REDUCTIONS = ("mean", "sum")


def rows_for_budget(budget_bytes: int, per_row_bytes: int) -> int:
    """Rows whose temporaries fit in `budget_bytes` (at least one); above 128, a multiple of 128
    (whole GEMM tiles). Shared by the loss and MLP segmentations."""
    rows = max(1, budget_bytes // max(1, per_row_bytes))
    return rows - rows % 128 if rows > 128 else rows


def segment_rows(vocab: int, budget_bytes: int, upcast: bool, itemsize: int, fused: bool = False) -> int:
    """Rows per segment so that one segment's temporaries fit in `budget_bytes`: the logits in the
    model dtype, plus, unless the fused kernel runs (`fused`: kernels.cross_entropy.use_triton), the
    twin's copy in the compute dtype."""
    return rows_for_budget(budget_bytes, vocab * (itemsize + (0 if fused else 4 if upcast else itemsize)))


def linear_cross_entropy_torch(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                               ignore_index: int, reduction: str, upcast: bool, rows: int, grad_x: bool,
                               grad_w: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (N, d), w (V, d), bias (V,) | None, target (N,) int64.

    Returns (loss, dx (N, d) | empty, dw (V, d) | empty, dbias (V,) | empty): the loss of
    cross_entropy(linear(x, w, bias)[.float()], target, ignore_index, reduction) and its gradients for
    an upstream gradient of 1, each empty when not asked for."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if x.dim() != 2 or w.dim() != 2 or target.dim() != 1 or target.shape[0] != x.shape[0]:
        raise ValueError(f"linear_cross_entropy: expected x (N, d), w (V, d), target (N,); got x {tuple(x.shape)}, "
                         f"w {tuple(w.shape)}, target {tuple(target.shape)}")
    n, vocab = x.shape[0], w.shape[0]
    cdtype = torch.float32 if upcast else x.dtype
    valid = target != ignore_index
    bad = valid & ((target < 0) | (target >= vocab))
    if bool(bad.any()):
        raise ValueError(f"linear_cross_entropy: target holds class indices outside [0, {vocab}) "
                         f"other than ignore_index={ignore_index}")
    acc = torch.float64 if cdtype == torch.float64 else torch.float32  # accumulators
    count = valid.sum()
    # Gradient scale of the mean: 0, not inf, when every target is ignored (the gradient is then 0, as
    # cross_entropy's backward gives; the loss itself is 0 / 0 = NaN, as cross_entropy's is).
    scale = (torch.where(count > 0, 1.0 / count.to(acc), 0.0) if reduction == "mean"
             else torch.ones((), dtype=acc, device=x.device))
    total = torch.zeros((), dtype=acc, device=x.device)
    dx = torch.empty_like(x) if grad_x else x.new_empty(0)
    dw = torch.zeros(w.shape, dtype=acc, device=w.device) if grad_w else w.new_empty(0)
    db = torch.zeros(vocab, dtype=acc, device=w.device) if (grad_w and bias is not None) else w.new_empty(0)
    for s in range(0, n, rows):
        e = min(s + rows, n)
        xs = x[s:e]
        logits = F.linear(xs, w, bias)
        # per-row losses; with a gradient to form, the logits' gradient (softmax - onehot, scaled,
        # in x's dtype) overwrites the logits: a segment holds nothing else
        total += cross_entropy.ce_rows(logits, target[s:e], scale, ignore_index, grad_x or grad_w,
                                       upcast).sum(dtype=acc)
        if grad_x:
            torch.matmul(logits, w, out=dx[s:e])
        if grad_w:
            dw += (logits.t() @ xs).to(acc)
            if bias is not None:
                db += logits.to(acc).sum(0)
        del logits
    loss = torch.where(count > 0, total * scale, total / count) if reduction == "mean" else total
    return loss.to(cdtype), dx, dw.to(w.dtype) if grad_w else dw, db.to(w.dtype) if db.numel() else db
