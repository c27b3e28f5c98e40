"""Attention implementations behind the `lemo::` attention ops (registered in lemo_compile.ops).

- `attention_lse`: dense attention forward with its log-sum-exp. `attention_lse_torch` is the twin
  (plain PyTorch, fp32 scores, in query chunks), the CPU implementation and the oracle of every faster
  path; `attention_lse_cuda` calls PyTorch's flash attention kernel (its memory-efficient one under a
  model mask), which returns the log-sum-exp.
- `attention_kept_backward`: the dropped-term attention gradient over kept queries x kept keys, masked by
  a gathered mask or, causally, by the kept rows' positions (no m x m mask is ever held: the twin builds
  it a chunk of queries at a time). Without a model mask on CUDA it is PyTorch's flash attention
  backward on the compact kept rows (sorted by position, so the kernel's causal mask is the positions'
  one), per segment where the rows carry segment ids; with a model mask it is the twin.
- `segment_attention_lse_impl`: causal attention within the segments of a padded or packed batch
  (passes.masks), per group of equal-length segments the flash kernel on CUDA, the twin elsewhere.

The twins run on CPU, and everywhere with LEMO_ATTENTION_IMPL=torch (read at call time).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..traced import causal_positions_mask


def _segment_groups(seg: torch.Tensor) -> list[tuple[Any, Any]]:
    """The segments of seg (b, n) (ids > 0; 0 = no segment), grouped by length so that each group is one
    batched kernel call: (row, slice) for a group that is one contiguous segment (a view, no copy), else
    (rows, cols), two (k, L) index tensors for the group's k segments of L tokens, positions ascending.
    A packed row of thousands of one-token documents (TRL pads with them) is one call, not thousands;
    there are at most sqrt(2 n) distinct lengths. One device-to-host copy, O(n log n) on the host."""
    b, n = seg.shape
    flat = seg.detach().reshape(-1).to("cpu", torch.int64)
    pos = torch.nonzero(flat != 0).flatten()
    if pos.numel() == 0:
        return []
    key = (pos // n) * (int(flat.max()) + 1) + flat[pos]  # one key per (row, segment id)
    key, order = torch.sort(key, stable=True)  # stable: positions stay ascending within a segment
    pos = pos[order]
    counts = torch.unique_consecutive(key, return_counts=True)[1]
    starts = torch.cumsum(counts, 0) - counts
    groups: list[tuple[Any, Any]] = []
    for length in torch.unique(counts).tolist():
        which = torch.nonzero(counts == length).flatten()
        idx = pos[starts[which, None] + torch.arange(length)]
        rows, cols = idx // n, idx % n
        if which.numel() == 1 and int(cols[0, -1] - cols[0, 0]) == length - 1:
            lo = int(cols[0, 0])
            groups.append((int(rows[0, 0]), slice(lo, lo + length)))
        else:
            groups.append((rows.to(seg.device), cols.to(seg.device)))
    return groups


FLASH_MIN_SEGMENT = 128  # one tile of PyTorch's flash kernels; shorter segments run the twin


def _segment_calls(seg: torch.Tensor, heads: int, budget: int = 1 << 27):
    """(group, flash) for each kernel call over the segments of seg: groups of _segment_groups, flash
    True where the segments are at least FLASH_MIN_SEGMENT long. Shorter ones run the fp32 twin, split
    so that one call's scores (k, heads, L, L) stay within budget elements: the flash kernels pad every
    segment to a whole tile, and their backward's fp32 accumulator for a batch of thousands of one-token
    documents (TRL pads a packed row with them) asked for 58 GiB at 8B/32K."""
    for group in _segment_groups(seg):
        rows, cols = group
        if isinstance(cols, slice):
            yield group, cols.stop - cols.start >= FLASH_MIN_SEGMENT
            continue
        k, length = cols.shape
        if length >= FLASH_MIN_SEGMENT:
            yield group, True
            continue
        step = max(1, budget // (heads * length * length))
        for s in range(0, k, step):
            yield (rows[s:s + step], cols[s:s + step]), False


def _take(t: torch.Tensor, group: tuple[Any, Any]) -> torch.Tensor:
    """The group's tokens of t (b, H, n, d) or (b, H, n), as (k, H, L, d) or (k, H, L)."""
    rows, cols = group
    if isinstance(cols, slice):
        return t[rows:rows + 1, :, cols]
    return t.transpose(1, 2)[rows, cols].transpose(1, 2)


def _put(dst: torch.Tensor, group: tuple[Any, Any], src: torch.Tensor) -> None:
    rows, cols = group
    if isinstance(cols, slice):
        dst[rows:rows + 1, :, cols] = src
    else:
        dst.transpose(1, 2)[rows, cols] = src.transpose(1, 2)


# -------------------------------------------------------------------------------------------------
# dense attention with its log-sum-exp
# -------------------------------------------------------------------------------------------------


def _expand_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    return k, v


def _bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.to(dtype)


def _chunks(n: int, elems_per_row: int, budget: int = 1 << 27):
    step = max(1, min(n, budget // max(1, elems_per_row)))
    return range(0, n, step), step


def _finite_lse(lse: torch.Tensor) -> torch.Tensor:
    """lse with the -inf of a query that sees no key (every key masked: left padding, padding past a
    sliding window, a fully padded row) replaced by 0. Such a row's scores are all -inf, so
    exp(score - 0) is exactly 0 where exp(score - lse) would be NaN: its output and every gradient
    term it takes part in are 0, as in SDPA (which returns 0 for such rows)."""
    return lse.masked_fill(lse == float("-inf"), 0.0)


def _zero_keyless_rows(out: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A kernel's (out, lse) with the rows that saw no key (lse -inf, or NaN from a kernel that divides
    0 by 0) set to out 0, lse -inf: SDPA's value for a fully masked row, never NaN."""
    keyless = ~(lse > float("-inf"))
    return out.masked_fill(keyless.unsqueeze(-1), 0), lse.masked_fill(keyless, float("-inf"))


def attention_lse_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                        scale: float, is_causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention (b, H, nq, hd) with its log-sum-exp (b, H, nq) in fp32, in query chunks.
    A query whose every key is masked gets output 0 and lse -inf (SDPA's convention), not NaN."""
    k, v = _expand_kv(q, k, v)
    b, h, nq, _ = q.shape
    nk = k.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty(b, h, nq, dtype=torch.float32, device=q.device)
    bias = _bias(mask, torch.float32)
    starts, step = _chunks(nq, b * h * nk)
    kf, vf = k.float(), v.float()
    for s in starts:
        e = min(s + step, nq)
        sc = torch.matmul(q[:, :, s:e].float(), kf.transpose(-1, -2)) * scale
        if bias is not None:
            sc = sc + bias[:, :, s:e].float()
        if is_causal:
            qi = torch.arange(s, e, device=q.device)[:, None] + (nk - nq)
            sc = sc.masked_fill(torch.arange(nk, device=q.device)[None, :] > qi, float("-inf"))
        l = torch.logsumexp(sc, dim=-1)
        p = torch.exp(sc - _finite_lse(l).unsqueeze(-1))
        out[:, :, s:e] = torch.matmul(p, vf).to(q.dtype)
        lse[:, :, s:e] = l
    return out, lse


def _use_cuda_kernels(t: torch.Tensor) -> bool:
    return t.is_cuda and os.environ.get("LEMO_ATTENTION_IMPL", "aten") != "torch"


def _dense_bias(mask: torch.Tensor | None, q: torch.Tensor, nk: int) -> torch.Tensor | None:
    """Additive bias (b, H, nq, nk) in q's dtype for the memory-efficient kernel: a broadcast view of
    a buffer whose rows are padded to 16 elements (the kernel needs aligned row strides)."""
    if mask is None:
        return None
    nq = mask.shape[2]
    padded = -(-nk // 16) * 16
    buf = torch.zeros(mask.shape[0], mask.shape[1], nq, padded, dtype=q.dtype, device=q.device)
    bias = buf[..., :nk]
    if mask.dtype == torch.bool:
        bias.masked_fill_(~mask, float("-inf"))
    else:
        bias.copy_(mask)
    return bias.expand(q.shape[0], q.shape[1], q.shape[2], nk)


def _flash_supported(q: torch.Tensor) -> bool:
    """The shapes and dtypes PyTorch's flash attention kernels take."""
    return q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256


def attention_lse_cuda(q, k, v, mask, scale, is_causal):
    """CUDA: PyTorch's flash attention kernel without a mask, its memory-efficient kernel with one;
    both return the log-sum-exp."""
    k, v = _expand_kv(q, k, v)
    if mask is None and _flash_supported(q):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, is_causal, False,
                                                                       scale=scale)[:2]
        return out, lse[..., : q.shape[2]].float().contiguous()
    bias = _dense_bias(mask, q, k.shape[2])
    out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, bias, True, 0.0, is_causal, scale=scale)
    return _zero_keyless_rows(out, lse[..., : q.shape[2]].float().contiguous())


def _strided_like(q: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out in the layout of torch.empty_like(q), the layout the fake promises (a kernel may return
    another; the compiled graph then turns a reshape into a view that fails on the real strides)."""
    if torch.empty_like(q, device="meta").stride() == out.stride():  # the layout, without allocating
        return out
    return torch.empty_like(q).copy_(out)


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                  scale: float, is_causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward of lemo::attention_lse: the CUDA kernels where they apply (output in q's layout),
    else the twin."""
    if _use_cuda_kernels(q):
        out, lse = attention_lse_cuda(q, k, v, mask, scale, is_causal)
        return _strided_like(q, out), lse
    return attention_lse_torch(q, k, v, mask, scale, is_causal)


# -------------------------------------------------------------------------------------------------
# the dropped-term backward over kept rows
# -------------------------------------------------------------------------------------------------


def _sum_kv_groups(dk: torch.Tensor, dv: torch.Tensor, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of K/V expanded to every query head (b, H, m, hd), summed back over each GQA group."""
    b, h = dk.shape[:2]
    if kv_heads == h:
        return dk, dv
    return (dk.view(b, kv_heads, h // kv_heads, *dk.shape[2:]).sum(2),
            dv.view(b, kv_heads, h // kv_heads, *dv.shape[2:]).sum(2))


def _contiguous(*ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Gradients in a fixed (contiguous) layout, whatever the inputs' strides: the fake says so."""
    return tuple(t.contiguous() for t in ts)


def attention_kept_backward_torch(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  out: torch.Tensor, lse: torch.Tensor, mask: torch.Tensor | None,
                                  scale: float, *, pos: torch.Tensor | None = None,
                                  valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dropped-term attention gradient over kept queries x kept keys (docs/design.md §2, attn_mode backward).

    P_ij = exp(scale q_i.k_j + bias_ij - lse_i) with the dense lse; D_i = dO_i . O_i with the dense O;
    dS = P (dO v^T - D); dq = scale dS k; dk = scale dS^T q; dv = P^T dO. Shapes (b, H, m, hd); k/v may
    have fewer (GQA) heads, their gradients are summed over each group. The bias comes from `mask`
    (b|1, H|1, m, m) or, when it is None and `pos` (b, m) is given, causally from the kept rows'
    positions and `valid` (b, m), one chunk of queries at a time. `valid` may hold segment ids (int,
    0 = none; passes.masks): then a query sees only the keys of its own segment."""
    if (pos is None) != (valid is None):
        raise ValueError("attention_kept_backward_torch: pos and valid go together")
    kv_heads = k.shape[1]
    ke, ve = _expand_kv(q, k, v)
    b, h, m, _ = q.shape
    bias = _bias(mask, torch.float32)
    go, qf, kf, vf = grad_out.float(), q.float(), ke.float(), ve.float()
    d = (go * out.float()).sum(-1)
    dq = torch.zeros_like(qf)
    dk = torch.zeros_like(kf)
    dv = torch.zeros_like(vf)
    starts, step = _chunks(m, b * h * ke.shape[2])
    for s in starts:
        e = min(s + step, m)
        sc = torch.matmul(qf[:, :, s:e], kf.transpose(-1, -2)) * scale
        if bias is not None:
            sc = sc + bias[:, :, s:e]
        elif pos is not None:  # queries s:e of causal_positions_mask(pos, pos, valid)
            seg_q = None if valid.dtype == torch.bool else valid[:, s:e]
            sc = sc + _bias(causal_positions_mask(pos[:, s:e], pos, valid, seg_q), torch.float32)
        p = torch.exp(sc - _finite_lse(lse[:, :, s:e]).unsqueeze(-1))
        dv += torch.matmul(p.transpose(-1, -2), go[:, :, s:e])
        dp = torch.matmul(go[:, :, s:e], vf.transpose(-1, -2))
        ds = p * (dp - d[:, :, s:e].unsqueeze(-1))
        dq[:, :, s:e] = torch.matmul(ds, kf) * scale
        dk += torch.matmul(ds.transpose(-1, -2), qf[:, :, s:e]) * scale
    dk, dv = _sum_kv_groups(dk, dv, kv_heads)
    return _contiguous(dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype))


def attention_kept_backward_flash(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  out: torch.Tensor, lse: torch.Tensor, valid: torch.Tensor,
                                  scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CUDA, causal by the kept rows' positions: PyTorch's flash attention backward on the compact rows.

    Kept rows are sorted by position, so "kept key j is at or before kept query i" is j <= i in compact
    order, the kernel's causal mask; given the dense O and lse, the kernel's backward is exactly the
    dropped-term gradient of `attention_kept_backward_torch`. Rows out of range sit at the end (no valid
    query sees them); their upstream gradient is zeroed (the residual scatter already drops it), which
    makes every term they take part in zero."""
    m = q.shape[2]
    ke, ve = _expand_kv(q, k, v)
    go = grad_out.masked_fill(~valid[:, None, :, None], 0)
    seed = torch.zeros(2, dtype=torch.uint64, device=q.device)  # dropout 0: the kernel reads neither
    offset = torch.zeros((), dtype=torch.uint64, device=q.device)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
        go.contiguous(), q.contiguous(), ke.contiguous(), ve.contiguous(), out.contiguous(),
        lse.float().contiguous(), None, None, m, m, 0.0, True, seed, offset, scale=scale)
    dk, dv = _sum_kv_groups(dk, dv, k.shape[1])
    return _contiguous(dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype))


def _kept_backward_flash_segments(grad_out, q, k, v, out, lse, seg, scale):
    """attention_kept_backward_flash over the segments, one call per group of equal-length segments (kept
    rows of one document are contiguous in compact order, and sorted), the twin for short ones
    (_segment_calls); rows of segment 0 (out of range, padding) get zero gradients."""
    ke, ve = _expand_kv(q, k, v)
    dq, dke, dve = torch.zeros_like(q), torch.zeros_like(ke), torch.zeros_like(ve)
    for group, flash in _segment_calls(seg, q.shape[1]):
        parts = [_take(t, group) for t in (grad_out, q, ke, ve, out, lse)]
        count, length = parts[1].shape[0], parts[1].shape[2]
        valid = torch.ones(count, length, dtype=torch.bool, device=q.device)
        if flash:
            grads = attention_kept_backward_flash(*parts, valid, scale)
        else:
            pos = torch.arange(length, device=q.device).expand(count, length)
            grads = attention_kept_backward_torch(*parts, None, scale, pos=pos, valid=valid)
        for dst, src in zip((dq, dke, dve), grads):
            _put(dst, group, src.to(dst.dtype))
    dk, dv = _sum_kv_groups(dke, dve, k.shape[1])
    return _contiguous(dq, dk, dv)


def attention_kept_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            out: torch.Tensor, lse: torch.Tensor, mask: torch.Tensor | None,
                            pos: torch.Tensor | None, valid: torch.Tensor | None,
                            scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The body of lemo::attention_kept_backward: the flash backward where it applies (CUDA, causal by
    positions, no model mask), else the twin."""
    if mask is None and pos is not None and _use_cuda_kernels(q) and _flash_supported(q):
        if valid.dtype == torch.bool:
            return attention_kept_backward_flash(grad_out, q, k, v, out, lse, valid, scale)
        return _kept_backward_flash_segments(grad_out, q, k, v, out, lse, valid, scale)
    # With a model mask the twin runs (a path through aten's memory-efficient attention backward gave
    # wrong gradients and an illegal memory access on torch 2.11).
    return attention_kept_backward_torch(grad_out, q, k, v, out, lse, mask, scale, pos=pos, valid=valid)


# -- attention over segments ----------------------------------------------------------------------


def segment_attention_lse_impl(q, k, v, seg, scale):
    """(out, lse) of causal attention within each segment of seg (b, n): each segment's rows run the
    causal kernel of attention_lse (flash on CUDA for segments of a tile or more, the twin elsewhere) on
    their own, segments of equal length batched into one call; padding rows get out 0, lse -inf. Never an n x n mask."""
    out = torch.zeros_like(q)
    lse = torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)
    cuda = _use_cuda_kernels(q)
    for group, flash in _segment_calls(seg, q.shape[1]):
        impl = attention_lse_cuda if cuda and flash else attention_lse_torch
        o, l = impl(_take(q, group), _take(k, group), _take(v, group), None, scale, True)
        _put(out, group, o.to(q.dtype))
        _put(lse, group, l.float())
    return out, lse
