"""A SwiGLU MLP, down(silu(gate(x)) * up(x)), computed in row segments: the implementations of
`lemo::swiglu_mlp` and `lemo::swiglu_lora_mlp` and their backward ops (registered in lemo_compile.ops).

Unfused, a Llama-style MLP keeps its intermediates for backward: gate(x), up(x), silu(gate(x)) and the
product, each (rows x intermediate), 3.5x the hidden size in Llama-3-8B; under gradient
checkpointing the layer's recompute brings them back at full length, and their gradients join them.
At 128K tokens that is 11 GB for the intermediates alone. The op keeps only x: the forward runs a
segment of rows at a time and discards the intermediates; the backward recomputes them segment by
segment, so no more than one segment's intermediates (and their gradients) exist at any time. The
price is the gate and up GEMMs once more in the backward.

`lemo::swiglu_lora_mlp` is the same MLP with an optional LoRA adapter on each projection, in PEFT's
arithmetic (`peft.tuners.lora.Linear` with no dropout):

    proj(z) = (linear(z, W) + linear(linear(z.to(A.dtype), A), B) * scale).to(z.dtype)

With adapters in fp32 on a bf16 model (PEFT's default), the unsegmented graph also holds fp32
(rows x intermediate) adapter outputs and fp32 (rows x hidden) input gradients; segmented, one
segment's worth.

Rounding follows the graph it replaces (HF's LlamaMLP in the model dtype, PEFT's casts): gate and up
outputs in x's dtype, silu and the product rounded to it, the backward's products and silu_backward in
that dtype, an adapter's gradients in its own dtype; the weight gradients accumulate over segments in
fp32 (fp64 for fp64 weights) and are rounded once (the unfused GEMM over all rows accumulates in fp32
too). Bias-free projections only (Llama, Mistral, Qwen2/3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .linear_cross_entropy import rows_for_budget

NO_ADAPTERS = (None,) * 6


def segment_rows(inter: int, budget_bytes: int, itemsize: int, adapter_itemsize: int = 0) -> int:
    """Rows per segment so that one segment's temporaries fit in `budget_bytes`: about eight
    (rows x intermediate) tensors live at once in the backward (gate, up, their activation and
    product, and four gradients), plus, with adapters of `adapter_itemsize` bytes, about four more in
    the adapters' dtype (their outputs, the product cast for the down adapter, its gradient)."""
    return rows_for_budget(budget_bytes, inter * (8 * itemsize + 4 * adapter_itemsize))


def _check(x: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, wd: torch.Tensor, rows: int,
           adapters: tuple = NO_ADAPTERS) -> None:
    d = x.shape[-1]
    if wg.dim() != 2 or wg.shape != wu.shape or wg.shape[1] != d or wd.dim() != 2 or wd.shape[1] != wg.shape[0]:
        raise ValueError(f"lemo::swiglu_mlp: expected gate/up weights (inter, {d}) and down (d_out, inter); got "
                         f"x {tuple(x.shape)}, gate {tuple(wg.shape)}, up {tuple(wu.shape)}, down {tuple(wd.shape)}")
    if rows < 1:
        raise ValueError(f"lemo::swiglu_mlp: rows per segment must be >= 1, got {rows}")
    for name, w, (a, b) in zip(("gate", "up", "down"), (wg, wu, wd), zip(adapters[::2], adapters[1::2])):
        if (a is None) != (b is None):
            raise ValueError(f"lemo::swiglu_lora_mlp: the {name} adapter needs both A and B (got one)")
        if a is not None and (a.dim() != 2 or b.dim() != 2 or a.shape[1] != w.shape[1] or b.shape[0] != w.shape[0]
                              or b.shape[1] != a.shape[0] or a.dtype != b.dtype):
            raise ValueError(f"lemo::swiglu_lora_mlp: the {name} adapter's A {tuple(a.shape)} / B {tuple(b.shape)} "
                             f"do not fit its weight {tuple(w.shape)} (A: (r, in), B: (out, r), one dtype)")


def _proj(z: torch.Tensor, w: torch.Tensor, a: torch.Tensor | None, b: torch.Tensor | None, scale: float):
    """(output, the adapter's cast input or None, the adapter's rank-r activation or None)."""
    base = F.linear(z, w)
    if a is None:
        return base, None, None
    zc = z.to(a.dtype)
    la = F.linear(zc, a)
    return (base + F.linear(la, b) * scale).to(z.dtype), zc, la


def _proj_backward(dout: torch.Tensor, z: torch.Tensor, zc, la, w, a, b, scale: float, need_z: bool,
                   grads: list, slots: tuple[int, int, int], need: list[bool]) -> torch.Tensor | None:
    """Gradient of _proj for `dout`: accumulates the weight (slot 0) and adapter (1: A, 2: B)
    gradients into `grads` where `need` says so; returns dz (None unless need_z)."""
    iw, ia, ib = slots
    if need[iw]:
        grads[iw] += (dout.t() @ z).to(grads[iw].dtype)
    dz = dout @ w if need_z else None
    if a is None:
        return dz
    # autograd of (base + lb * s).to(z.dtype): the cast's gradient goes back to the sum's dtype; base
    # gets it cast back to z's dtype, which is `dout` exactly (the sum's dtype is z's or wider)
    dlb = dout.to(la.dtype) * scale
    if need[ib]:
        grads[ib] += (dlb.t() @ la).to(grads[ib].dtype)
    if need_z or need[ia]:
        dla = dlb @ b
        if need[ia]:
            grads[ia] += (dla.t() @ zc).to(grads[ia].dtype)
        if need_z:
            dz = dz + (dla @ a).to(z.dtype)
    return dz


def swiglu_lora_mlp_torch(x: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, wd: torch.Tensor,
                          adapters: tuple, scales: list[float], rows: int) -> torch.Tensor:
    """The op's forward: `adapters` = (A_gate, B_gate, A_up, B_up, A_down, B_down), None where a
    projection has none; `scales` the three adapters' scales."""
    _check(x, wg, wu, wd, rows, adapters)
    ag, bg, au, bu, ad, bd = adapters
    x2 = x.reshape(-1, x.shape[-1])
    y = x2.new_empty(x2.shape[0], wd.shape[0])
    for s in range(0, x2.shape[0], rows):
        xs = x2[s:s + rows]
        p = F.silu(_proj(xs, wg, ag, bg, scales[0])[0]) * _proj(xs, wu, au, bu, scales[1])[0]
        y[s:s + rows] = _proj(p, wd, ad, bd, scales[2])[0]
    return y.reshape(*x.shape[:-1], wd.shape[0])


def swiglu_lora_mlp_backward_torch(grad: torch.Tensor, x: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor,
                                   wd: torch.Tensor, adapters: tuple, scales: list[float], rows: int,
                                   need: list[bool]) -> list[torch.Tensor]:
    """Gradients of swiglu_lora_mlp for upstream `grad`, in input order (x, W_gate, W_up, W_down,
    A_gate, B_gate, A_up, B_up, A_down, B_down); an empty tensor where `need` is False or there is no
    adapter. Recomputes the intermediates one segment of rows at a time."""
    _check(x, wg, wu, wd, rows, adapters)
    ag, bg, au, bu, ad, bd = adapters
    tensors = (x, wg, wu, wd, *adapters)
    need = [bool(n) and t is not None for n, t in zip(need, tensors)]
    x2 = x.reshape(-1, x.shape[-1])
    g2 = grad.reshape(-1, wd.shape[0])
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    grads = [None if not n or i == 0 else torch.zeros(t.shape, dtype=torch.promote_types(acc, t.dtype),
                                                      device=t.device)
             for i, (n, t) in enumerate(zip(need, tensors))]
    dx = torch.empty_like(x2) if need[0] else None
    for s in range(0, x2.shape[0], rows):
        xs, gs = x2[s:s + rows], g2[s:s + rows]
        g, gc, gla = _proj(xs, wg, ag, bg, scales[0])
        u, uc, ula = _proj(xs, wu, au, bu, scales[1])
        a = F.silu(g)
        p = a * u
        pc = pla = None
        if ad is not None and (need[8] or need[9]):  # the down adapter's own input and activation
            pc = p.to(ad.dtype)
            pla = F.linear(pc, ad)
        dp = _proj_backward(gs, p, pc, pla, wd, ad, bd, scales[2], True, grads, (3, 8, 9), need)
        del p, pc, pla
        du = dp * a
        dg = torch.ops.aten.silu_backward(dp * u, g)
        del a, u, dp
        dxg = _proj_backward(dg, xs, gc, gla, wg, ag, bg, scales[0], need[0], grads, (1, 4, 5), need)
        dxu = _proj_backward(du, xs, uc, ula, wu, au, bu, scales[1], need[0], grads, (2, 6, 7), need)
        if need[0]:
            dx[s:s + rows] = dxg + dxu
    out = [dx.reshape(x.shape) if need[0] else x.new_empty(0)]
    out += [gr.to(t.dtype) if n and i else x.new_empty(0) for i, (n, gr, t) in enumerate(zip(need, grads, tensors))
            if i]
    return out


def swiglu_mlp_torch(x: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, wd: torch.Tensor, rows: int) -> torch.Tensor:
    return swiglu_lora_mlp_torch(x, wg, wu, wd, NO_ADAPTERS, [1.0, 1.0, 1.0], rows)


def swiglu_mlp_backward_torch(grad: torch.Tensor, x: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor,
                              wd: torch.Tensor, rows: int, need_x: bool,
                              need_w: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx | empty, dgate, dup, ddown | empty each): the gradients of swiglu_mlp for upstream `grad`,
    recomputing the intermediates one segment of rows at a time."""
    out = swiglu_lora_mlp_backward_torch(grad, x, wg, wu, wd, NO_ADAPTERS, [1.0, 1.0, 1.0], rows,
                                         [need_x, need_w, need_w, need_w] + [False] * 6)
    return tuple(out[:4])


