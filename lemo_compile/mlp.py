"""`lemo::swiglu_mlp`: a SwiGLU MLP, down(silu(gate(x)) * up(x)), computed in row segments.

Unfused, a Llama-style MLP keeps its intermediates for backward: gate(x), up(x), silu(gate(x)) and the
product, each (rows x intermediate), 3.5x the hidden size in Llama-3-8B; under gradient
checkpointing the layer's recompute brings them back at full length, and their gradients join them.
At 128K tokens that is 11 GB for the intermediates alone. The op keeps only x: the forward runs a
segment of rows at a time and discards the intermediates; the backward recomputes them segment by
segment, so no more than one segment's intermediates (and their gradients) exist at any time. The
price is the gate and up GEMMs once more in the backward.

Rounding follows the graph it replaces (HF's LlamaMLP in the model dtype): gate and up outputs in x's
dtype, silu and the product rounded to it, the backward's products and silu_backward in that dtype;
the weight gradients accumulate over segments in fp32 and are rounded once (the unfused GEMM over all
rows accumulates in fp32 too). Bias-free projections only (Llama, Mistral, Qwen2/3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .lm_loss import rows_for_budget


def segment_rows(inter: int, budget_bytes: int, itemsize: int) -> int:
    """Rows per segment so that one segment's temporaries fit in `budget_bytes`: about eight
    (rows x intermediate) tensors live at once in the backward (gate, up, their activation and
    product, and four gradients)."""
    return rows_for_budget(budget_bytes, 8 * inter * itemsize)


def _check(x: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, wd: torch.Tensor, rows: int) -> None:
    d = x.shape[-1]
    if wg.dim() != 2 or wg.shape != wu.shape or wg.shape[1] != d or wd.dim() != 2 or wd.shape[1] != wg.shape[0]:
        raise ValueError(f"lemo::swiglu_mlp: expected gate/up weights (inter, {d}) and down (d_out, inter); got "
                         f"x {tuple(x.shape)}, gate {tuple(wg.shape)}, up {tuple(wu.shape)}, down {tuple(wd.shape)}")
    if rows < 1:
        raise ValueError(f"lemo::swiglu_mlp: rows per segment must be >= 1, got {rows}")


def swiglu_mlp_torch(x: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, wd: torch.Tensor, rows: int) -> torch.Tensor:
    _check(x, wg, wu, wd, rows)
    x2 = x.reshape(-1, x.shape[-1])
    y = x2.new_empty(x2.shape[0], wd.shape[0])
    for s in range(0, x2.shape[0], rows):
        xs = x2[s:s + rows]
        p = F.silu(F.linear(xs, wg)) * F.linear(xs, wu)
        y[s:s + rows] = F.linear(p, wd)
    return y.reshape(*x.shape[:-1], wd.shape[0])


def swiglu_mlp_backward_torch(grad: torch.Tensor, x: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor,
                              wd: torch.Tensor, rows: int, need_x: bool,
                              need_w: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx | empty, dgate, dup, ddown | empty each): the gradients of swiglu_mlp for upstream `grad`,
    recomputing the intermediates one segment of rows at a time."""
    _check(x, wg, wu, wd, rows)
    x2 = x.reshape(-1, x.shape[-1])
    g2 = grad.reshape(-1, wd.shape[0])
    dx = torch.empty_like(x2) if need_x else x.new_empty(0)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    dwg, dwu, dwd = ((torch.zeros(w.shape, dtype=acc, device=w.device) for w in (wg, wu, wd)) if need_w
                     else (x.new_empty(0) for _ in range(3)))
    for s in range(0, x2.shape[0], rows):
        xs, gs = x2[s:s + rows], g2[s:s + rows]
        g = F.linear(xs, wg)
        u = F.linear(xs, wu)
        a = F.silu(g)
        dp = gs @ wd  # gradient of the product (rows, inter)
        if need_w:
            dwd += (gs.t() @ (a * u)).to(acc)
        du = dp * a
        dg = torch.ops.aten.silu_backward(dp * u, g)
        del a, u, dp
        if need_x:
            dx[s:s + rows] = dg @ wg + du @ wu
        if need_w:
            dwg += (dg.t() @ xs).to(acc)
            dwu += (du.t() @ xs).to(acc)
    if need_w:
        dwg, dwu, dwd = dwg.to(wg.dtype), dwu.to(wu.dtype), dwd.to(wd.dtype)
    return (dx.reshape(x.shape) if need_x else dx), dwg, dwu, dwd


@torch.library.custom_op("lemo::swiglu_mlp", mutates_args=())
def swiglu_mlp(x: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, wd: torch.Tensor, rows: int) -> torch.Tensor:
    return swiglu_mlp_torch(x, wg, wu, wd, rows)


@swiglu_mlp.register_fake
def _(x, wg, wu, wd, rows):
    return x.new_empty((*x.shape[:-1], wd.shape[0]))


@torch.library.custom_op("lemo::swiglu_mlp_backward", mutates_args=())
def swiglu_mlp_backward(grad: torch.Tensor, x: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, wd: torch.Tensor,
                        rows: int, need_x: bool,
                        need_w: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return swiglu_mlp_backward_torch(grad.contiguous(), x, wg, wu, wd, rows, need_x, need_w)


@swiglu_mlp_backward.register_fake
def _(grad, x, wg, wu, wd, rows, need_x, need_w):
    empty = x.new_empty(0)
    return (torch.empty_like(x) if need_x else empty, *((torch.empty_like(w) if need_w else empty)
                                                         for w in (wg, wu, wd)))


def _setup(ctx, inputs, output):
    x, wg, wu, wd, rows = inputs
    ctx.save_for_backward(x, wg, wu, wd)
    ctx.rows = rows


def _backward(ctx, grad):
    x, wg, wu, wd = ctx.saved_tensors
    need_x = ctx.needs_input_grad[0]
    need_w = any(ctx.needs_input_grad[1:4])
    if not (need_x or need_w):
        return None, None, None, None, None
    dx, dwg, dwu, dwd = torch.ops.lemo.swiglu_mlp_backward(grad, x, wg, wu, wd, ctx.rows, need_x, need_w)
    w = ctx.needs_input_grad
    return (dx if need_x else None, dwg if w[1] else None, dwu if w[2] else None, dwd if w[3] else None, None)


swiglu_mlp.register_autograd(_backward, setup_context=_setup)
