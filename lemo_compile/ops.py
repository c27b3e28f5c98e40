"""Every `lemo::` custom op, with its fake (meta) and autograd registrations beside it.

The ops are opaque to the compiler; lemo's graph passes insert them (`torch.ops.lemo.X`). Their
implementations (PyTorch twins, and CUDA/Triton paths where there are any) live in lemo_compile.kernels;
the plain traced helpers the passes insert beside them live in lemo_compile.traced.

Block scores (passes.sparsify):
- `lemo::random_block_scores`   the `random` predictor's scores (opaque: 64-bit hash arithmetic).
- `lemo::calibrated_block_scores` a calibrated low-rank predictor's scores (lemo_compile.calibrate).

Attention (kernels.attention):
- `lemo::attention_lse`     dense attention forward returning the output and the log-sum-exp
                            (used under no-grad by the forward-exact `backward` mode).
- `lemo::attention_kept`    identity on the dense output of kept queries; its backward is the
                            dropped-term attention gradient over kept queries x kept keys,
                            `lemo::attention_kept_backward`, masked by a gathered mask or, causally, by
                            the kept rows' positions.
- `lemo::segment_attention` causal attention within the segments of a padded or packed batch
                            (passes.masks), with its log-sum-exp; its backward is attention_kept's with
                            every row kept.

Checkpointing:
- `lemo::saved`             identity that marks a value for saving in a checkpointed layer.

The LM head's loss (kernels.linear_cross_entropy; passes.peak_cut):
- `lemo::linear_cross_entropy` the LM head and its cross-entropy loss in row segments, the gradients
                            formed during the forward; its backward scales them.

SwiGLU MLPs in row segments (kernels.swiglu; passes.mlp_segment):
- `lemo::swiglu_mlp`, `lemo::swiglu_lora_mlp` (with PEFT LoRA adapters), and their backward ops
  `lemo::swiglu_mlp_backward`, `lemo::swiglu_lora_mlp_backward`, which recompute the intermediates
  one segment of rows at a time.

Fused row kernels of a sparse layer (kernels.rows; passes.fuse):
- `lemo::gather_rmsnorm_rows` the RMSNorm of the kept rows read from the residual by index (and the
                            gathered rows, which its backward `lemo::gather_rmsnorm_backward` reads);
                            `gather_rmsnorm` is its differentiable entry.
- `lemo::linear_scatter_add` the output projection's rows added into the residual at the kept indices.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from . import predictors, selection
from .kernels import attention as attention_kernels, linear_cross_entropy as lce_kernels, rows as row_kernels
from .kernels import swiglu as swiglu_kernels


@torch.library.custom_op("lemo::random_block_scores", mutates_args=())
def random_block_scores(x: torch.Tensor, layer: int, seed: int, block: int) -> torch.Tensor:
    """predictors.random_scores as an opaque op: its 64-bit hash constants must not reach Inductor, whose
    Triton code would compute them in 32-bit index arithmetic."""
    return predictors.random_scores(layer, seed, x.shape[0], selection.num_blocks(x.shape[1], block), x.device)


@random_block_scores.register_fake
def _(x, layer, seed, block):
    return x.new_empty((x.shape[0], (x.shape[1] + block - 1) // block), dtype=torch.float32)


_PREDICTOR_FILES: dict[tuple[str, float], tuple[dict, dict]] = {}


def predictor_file(path: str) -> tuple[dict, dict]:
    """(metadata, {layer: (q factors, k factors)}) of a calibrated predictor file, cached per mtime."""
    from . import calibrate

    key = (path, os.path.getmtime(path))
    if key not in _PREDICTOR_FILES:
        _PREDICTOR_FILES.clear()
        _PREDICTOR_FILES[key] = calibrate.load(path)
    return _PREDICTOR_FILES[key]


_FACTORS_ON: dict[tuple[str, int, str], tuple] = {}  # -> (q, k, the host factors they came from)


def _factors_on(path: str, layer: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's fp32 factors on `device`, copied there once per predictor file (not once per step)."""
    factors = predictor_file(path)[1]
    key = (path, layer, str(device))
    if key not in _FACTORS_ON or _FACTORS_ON[key][2] is not factors:
        q, k = (t.to(device=device, dtype=torch.float32) for t in factors[layer])
        _FACTORS_ON[key] = (q, k, factors)
    return _FACTORS_ON[key][:2]


@torch.library.custom_op("lemo::calibrated_block_scores", mutates_args=())
def calibrated_block_scores(x: torch.Tensor, token_valid: torch.Tensor, path: str, layer: int,
                            block: int) -> torch.Tensor:
    """(b, nb) float32 scores of a calibrated low-rank predictor (lemo_compile.calibrate) for one layer."""
    meta = predictor_file(path)[0]
    q, k = _factors_on(path, layer, x.device)
    heads = meta["heads"]
    return predictors.pooled_qk_scores(x.float(), token_valid, q, None, k, None, heads, heads, block)


@calibrated_block_scores.register_fake
def _(x, token_valid, path, layer, block):
    return x.new_empty((x.shape[0], (x.shape[1] + block - 1) // block), dtype=torch.float32)


# -------------------------------------------------------------------------------------------------
# attention
# -------------------------------------------------------------------------------------------------


@torch.library.custom_op("lemo::attention_lse", mutates_args=())
def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                  scale: float, is_causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_kernels.attention_lse(q, k, v, mask, scale, is_causal)


@attention_lse.register_fake
def _(q, k, v, mask, scale, is_causal):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("lemo::attention_kept", mutates_args=())
def attention_kept(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                   mask: torch.Tensor | None, pos: torch.Tensor | None, valid: torch.Tensor | None,
                   scale: float) -> torch.Tensor:
    return out.clone()


@attention_kept.register_fake
def _(q, k, v, out, lse, mask, pos, valid, scale):
    return torch.empty_like(out)


def _kept_setup(ctx, inputs, output):
    q, k, v, out, lse, mask, pos, valid, scale = inputs
    ctx.save_for_backward(q, k, v, out, lse, mask, pos, valid)
    ctx.scale = scale


def _kept_backward(ctx, grad):
    q, k, v, out, lse, mask, pos, valid = ctx.saved_tensors
    dq, dk, dv = attention_kept_backward(grad.contiguous(), q, k, v, out, lse, mask, pos, valid, ctx.scale)
    return dq, dk, dv, None, None, None, None, None, None


@torch.library.custom_op("lemo::attention_kept_backward", mutates_args=())
def attention_kept_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            out: torch.Tensor, lse: torch.Tensor, mask: torch.Tensor | None,
                            pos: torch.Tensor | None, valid: torch.Tensor | None,
                            scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_kernels.attention_kept_backward(grad_out, q, k, v, out, lse, mask, pos, valid, scale)


@attention_kept_backward.register_fake
def _(grad_out, q, k, v, out, lse, mask, pos, valid, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


attention_kept.register_autograd(_kept_backward, setup_context=_kept_setup)


def _lse_setup(ctx, inputs, output):
    q, k, v, mask, scale, is_causal = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1])
    ctx.scale, ctx.plain_causal = scale, mask is None and is_causal


def _lse_backward(ctx, grad, _grad_lse):
    """Causal attention without a mask (what passes.regions puts in a shared layer body): the kept-rows
    backward with every row kept. attn_mode="backward" calls attention_lse on detached inputs only."""
    if not ctx.plain_causal:
        raise NotImplementedError("lemo::attention_lse is differentiable only as causal attention without a mask")
    q, k, v, out, lse = ctx.saved_tensors
    b, n = q.shape[0], q.shape[2]
    pos = torch.arange(n, device=q.device).expand(b, n)
    valid = torch.ones(b, n, dtype=torch.bool, device=q.device)
    dq, dk, dv = attention_kept_backward(grad.contiguous(), q, k, v, out, lse, None, pos, valid, ctx.scale)
    return dq, dk, dv, None, None, None


attention_lse.register_autograd(_lse_backward, setup_context=_lse_setup)


@torch.library.custom_op("lemo::segment_attention", mutates_args=())
def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: torch.Tensor,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """What SDPA computes under segment_mask(seg), for the rows of real tokens (padding rows: 0), and
    the log-sum-exp its backward reads (and the default mode's kept-rows backward, which calls it on
    detached inputs for the dense output). q (b, H, n, hd); k, v (b, H_kv, n, hd)."""
    return attention_kernels.segment_attention_lse_impl(q, k, v, seg, scale)


@segment_attention.register_fake
def _(q, k, v, seg, scale):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


def _segment_setup(ctx, inputs, output):
    q, k, v, seg, scale = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], seg)
    ctx.scale = scale


def _segment_backward(ctx, grad, _grad_lse):
    """The kept-rows backward with every row kept, causal by position within the segments: given the
    output and lse it is the full attention gradient (flash per segment on CUDA, the twin elsewhere)."""
    q, k, v, out, lse, seg = ctx.saved_tensors
    pos = torch.arange(seg.shape[1], device=seg.device).expand(seg.shape)
    dq, dk, dv = attention_kept_backward(grad.contiguous(), q, k, v, out, lse, None, pos, seg, ctx.scale)
    return dq, dk, dv, None, None


segment_attention.register_autograd(_segment_backward, setup_context=_segment_setup)


# -------------------------------------------------------------------------------------------------
# checkpointing
# -------------------------------------------------------------------------------------------------


@torch.library.custom_op("lemo::saved", mutates_args=())
def saved(t: torch.Tensor) -> torch.Tensor:
    """Identity (a copy) that marks a value to keep for backward inside an activation-checkpoint
    region: lemo's joint-graph pass tags it MUST_SAVE, so the partitioner recomputes from it instead
    of from the layer's full input (sparse checkpointing)."""
    return t.clone()


@saved.register_fake
def _(t):
    return torch.empty_like(t)


def _saved_backward(ctx, grad):
    return grad


saved.register_autograd(_saved_backward, setup_context=lambda ctx, inputs, output: None)


# -------------------------------------------------------------------------------------------------
# the LM head's loss
# -------------------------------------------------------------------------------------------------


@torch.library.custom_op("lemo::linear_cross_entropy", mutates_args=())
def linear_cross_entropy(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                         ignore_index: int, reduction: str, upcast: bool, rows: int, grad_x: bool,
                         grad_w: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return lce_kernels.linear_cross_entropy_torch(x.contiguous(), w, bias, target, ignore_index, reduction, upcast,
                                                  rows, grad_x, grad_w)


@linear_cross_entropy.register_fake
def _(x, w, bias, target, ignore_index, reduction, upcast, rows, grad_x, grad_w):
    dtype = torch.float32 if upcast else x.dtype
    db = w.new_empty(w.shape[0]) if (grad_w and bias is not None) else w.new_empty(0)
    return (x.new_empty((), dtype=dtype), torch.empty_like(x) if grad_x else x.new_empty(0),
            torch.empty_like(w) if grad_w else w.new_empty(0), db)


def _lce_setup(ctx, inputs, output):
    x, w, bias, target, ignore_index, reduction, upcast, rows, grad_x, grad_w = inputs
    _, dx, dw, db = output
    ctx.save_for_backward(dx, dw, db, target)
    ctx.flags = (grad_x, grad_w, bias is not None, ignore_index)


def _lce_backward(ctx, g_loss, *_unused):
    """Gradients scaled by the upstream gradient. Rows of ignored targets get exactly 0 whatever it is,
    as in cross_entropy's backward: a loss divided by num_items_in_batch = 0 (every label ignored) has
    an infinite upstream gradient, and 0 * inf would be NaN."""
    dx, dw, db, target = ctx.saved_tensors
    grad_x, grad_w, has_bias, ignore_index = ctx.flags
    valid = target != ignore_index
    gx = (dx * g_loss).masked_fill(~valid.unsqueeze(-1), 0).to(dx.dtype) if grad_x else None
    g_w = torch.where(valid.any(), g_loss, torch.zeros_like(g_loss))  # dw, db: sums over valid rows only
    gw = (dw * g_w).to(dw.dtype) if grad_w else None
    gb = (db * g_w).to(db.dtype) if (grad_w and has_bias) else None
    return gx, gw, gb, None, None, None, None, None, None, None


linear_cross_entropy.register_autograd(_lce_backward, setup_context=_lce_setup)


# -------------------------------------------------------------------------------------------------
# SwiGLU MLPs in row segments
# -------------------------------------------------------------------------------------------------


@torch.library.custom_op("lemo::swiglu_mlp", mutates_args=())
def swiglu_mlp(x: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, wd: torch.Tensor, rows: int) -> torch.Tensor:
    return swiglu_kernels.swiglu_mlp_torch(x, wg, wu, wd, rows)


@swiglu_mlp.register_fake
def _(x, wg, wu, wd, rows):
    return x.new_empty((*x.shape[:-1], wd.shape[0]))


@torch.library.custom_op("lemo::swiglu_mlp_backward", mutates_args=())
def swiglu_mlp_backward(grad: torch.Tensor, x: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, wd: torch.Tensor,
                        rows: int, need_x: bool,
                        need_w: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return swiglu_kernels.swiglu_mlp_backward_torch(grad.contiguous(), x, wg, wu, wd, rows, need_x, need_w)


@swiglu_mlp_backward.register_fake
def _(grad, x, wg, wu, wd, rows, need_x, need_w):
    return (torch.empty_like(x) if need_x else x.new_empty(0),  # one empty per output: outputs never alias
            *((torch.empty_like(w) if need_w else x.new_empty(0)) for w in (wg, wu, wd)))


def _swiglu_setup(ctx, inputs, output):
    x, wg, wu, wd, rows = inputs
    ctx.save_for_backward(x, wg, wu, wd)
    ctx.rows = rows


def _swiglu_backward(ctx, grad):
    x, wg, wu, wd = ctx.saved_tensors
    need_x = ctx.needs_input_grad[0]
    need_w = any(ctx.needs_input_grad[1:4])
    if not (need_x or need_w):
        return None, None, None, None, None
    dx, dwg, dwu, dwd = torch.ops.lemo.swiglu_mlp_backward(grad, x, wg, wu, wd, ctx.rows, need_x, need_w)
    w = ctx.needs_input_grad
    return (dx if need_x else None, dwg if w[1] else None, dwu if w[2] else None, dwd if w[3] else None, None)


swiglu_mlp.register_autograd(_swiglu_backward, setup_context=_swiglu_setup)


@torch.library.custom_op("lemo::swiglu_lora_mlp", mutates_args=())
def swiglu_lora_mlp(x: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, wd: torch.Tensor,
                    ag: Optional[torch.Tensor], bg: Optional[torch.Tensor], au: Optional[torch.Tensor],
                    bu: Optional[torch.Tensor], ad: Optional[torch.Tensor], bd: Optional[torch.Tensor],
                    scales: list[float], rows: int) -> torch.Tensor:
    return swiglu_kernels.swiglu_lora_mlp_torch(x, wg, wu, wd, (ag, bg, au, bu, ad, bd), scales, rows)


@swiglu_lora_mlp.register_fake
def _(x, wg, wu, wd, ag, bg, au, bu, ad, bd, scales, rows):
    return x.new_empty((*x.shape[:-1], wd.shape[0]))


@torch.library.custom_op("lemo::swiglu_lora_mlp_backward", mutates_args=())
def swiglu_lora_mlp_backward(grad: torch.Tensor, x: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor,
                             wd: torch.Tensor, ag: Optional[torch.Tensor], bg: Optional[torch.Tensor],
                             au: Optional[torch.Tensor], bu: Optional[torch.Tensor], ad: Optional[torch.Tensor],
                             bd: Optional[torch.Tensor], scales: list[float], rows: int,
                             need: list[bool]) -> list[torch.Tensor]:
    return swiglu_kernels.swiglu_lora_mlp_backward_torch(grad.contiguous(), x, wg, wu, wd, (ag, bg, au, bu, ad, bd),
                                                         scales, rows, need)


@swiglu_lora_mlp_backward.register_fake
def _(grad, x, wg, wu, wd, ag, bg, au, bu, ad, bd, scales, rows, need):
    return [torch.empty_like(t) if n and t is not None else x.new_empty(0)
            for n, t in zip(need, (x, wg, wu, wd, ag, bg, au, bu, ad, bd))]


def _swiglu_lora_setup(ctx, inputs, output):
    *tensors, scales, rows = inputs
    ctx.save_for_backward(*tensors)
    ctx.scales, ctx.rows = scales, rows


def _swiglu_lora_backward(ctx, grad):
    tensors = ctx.saved_tensors
    need = list(ctx.needs_input_grad[:10])
    if not any(need):
        return (None,) * 12
    out = torch.ops.lemo.swiglu_lora_mlp_backward(grad, *tensors, ctx.scales, ctx.rows, need)
    return (*(g if n else None for g, n in zip(out, need)), None, None)


swiglu_lora_mlp.register_autograd(_swiglu_lora_backward, setup_context=_swiglu_lora_setup)


# -------------------------------------------------------------------------------------------------
# fused row kernels of a sparse layer
# -------------------------------------------------------------------------------------------------


@torch.library.custom_op("lemo::gather_rmsnorm_rows", mutates_args=())
def gather_rmsnorm_rows(h: torch.Tensor, idx: torch.Tensor, ok: torch.Tensor, weight: torch.Tensor,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalized rows, gathered rows); see gather_rmsnorm."""
    return row_kernels.gather_rmsnorm_rows_impl(h, idx, ok, weight, eps)


@gather_rmsnorm_rows.register_fake
def _(h, idx, ok, weight, eps):
    shape = (idx.shape[0], idx.shape[1], h.shape[2])
    return h.new_empty(shape), h.new_empty(shape)


def gather_rmsnorm(h: torch.Tensor, idx: torch.Tensor, ok: torch.Tensor, weight: torch.Tensor,
                   eps: float) -> torch.Tensor:
    """RMSNorm of the rows of h at idx (b, m, d); differentiable in h and weight. The backward keeps
    the gathered rows (b, m, d), never all of h."""
    return torch.ops.lemo.gather_rmsnorm_rows(h, idx, ok, weight, eps)[0]


@torch.library.custom_op("lemo::gather_rmsnorm_backward", mutates_args=())
def gather_rmsnorm_backward(grad: torch.Tensor, h: torch.Tensor, idx: torch.Tensor, ok: torch.Tensor,
                            weight: torch.Tensor, eps: float,
                            compute_dweight: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return row_kernels.gather_rmsnorm_backward_impl(grad, h, idx, ok, weight, eps, compute_dweight)


@gather_rmsnorm_backward.register_fake
def _(grad, h, idx, ok, weight, eps, compute_dweight):
    return h.new_empty(idx.shape[0], idx.shape[1], h.shape[2]), torch.empty_like(weight)


def _gather_rmsnorm_setup(ctx, inputs, output):
    h, idx, ok, weight, eps = inputs
    ctx.save_for_backward(output[1], idx, ok, weight)  # the gathered rows, not h
    ctx.eps = eps
    ctx.h_shape = h.shape


def _gather_rmsnorm_bwd(ctx, grad, _grad_rows):
    rows, idx, ok, weight = ctx.saved_tensors
    need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
    # the rows are already gathered: read them in order (row j of batch i at index j)
    ident = torch.arange(rows.shape[1], device=idx.device).expand(idx.shape)
    drows, dweight = gather_rmsnorm_backward(grad, rows, ident, ok, weight, ctx.eps, need_w)
    dh = None
    if need_h:
        # Plain ops, so the compiler can fuse the scatter with the residual's gradient. drows is
        # zero where ok is False, so padded duplicates of n-1 add nothing.
        dh = drows.new_zeros(ctx.h_shape).scatter_add(1, idx.unsqueeze(-1).expand(drows.shape), drows)
    return dh, None, None, dweight if need_w else None, None


gather_rmsnorm_rows.register_autograd(_gather_rmsnorm_bwd, setup_context=_gather_rmsnorm_setup)


@torch.library.custom_op("lemo::linear_scatter_add", mutates_args=())
def linear_scatter_add(h: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
                       r: torch.Tensor | None, idx: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    return row_kernels.linear_scatter_add_impl(h, x, w, bias, r, idx, ok)


@linear_scatter_add.register_fake
def _(h, x, w, bias, r, idx, ok):
    return torch.empty_like(h, memory_format=torch.contiguous_format)


def _linear_scatter_add_setup(ctx, inputs, output):
    h, x, w, bias, r, idx, ok = inputs
    # x is needed only for dw, w only for dx (LoRA freezes w: x need not be kept for it).
    ctx.save_for_backward(x if w.requires_grad else None, w if x.requires_grad else None, idx, ok)
    ctx.r_dtype = r.dtype if r is not None else None


def _linear_scatter_add_bwd(ctx, grad):
    x, w, idx, ok = ctx.saved_tensors
    need_h, need_x, need_w, need_b, need_r = ctx.needs_input_grad[:5]
    drows = torch.gather(grad, 1, idx.unsqueeze(-1).expand(*idx.shape, grad.shape[2]))
    drows = drows * ok.unsqueeze(-1).to(drows.dtype)
    dx = torch.matmul(drows, w) if need_x else None
    dw = drows.flatten(0, 1).t().matmul(x.flatten(0, 1)) if need_w else None
    dbias = drows.sum((0, 1)) if need_b else None
    dr = drows.to(ctx.r_dtype) if need_r else None  # an fp32 branch gets its gradient in fp32
    return (grad if need_h else None, dx, dw, dbias, dr, None, None)


linear_scatter_add.register_autograd(_linear_scatter_add_bwd, setup_context=_linear_scatter_add_setup)
