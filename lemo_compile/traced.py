"""The traced helpers that lemo's graph passes insert into graphs (passes.sparsify, passes.masks,
passes.regions, passes.peak_cut).

Plain functions of torch ops: AOT autograd traces through them, so they work with symbolic sizes. They
compute keep sets, gather and scatter kept rows, gather or build attention masks, and carry the model's
mask as segment ids. The `lemo::` custom ops they work beside are in lemo_compile.ops.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Sequence

import torch

from . import predictors, selection


def token_valid_from_mask(mask: torch.Tensor | None, h: torch.Tensor) -> torch.Tensor:
    """(b, n) bool for the residual h (b, n, d): a token is real if it may attend to itself under
    the model's 4-D mask."""
    b, n = h.shape[0], h.shape[1]
    if mask is None:
        return torch.ones(b, n, dtype=torch.bool, device=h.device)
    diag = torch.diagonal(mask[:, 0], dim1=-2, dim2=-1)
    valid = diag if diag.dtype == torch.bool else diag == 0
    return valid.expand(b, n)


def keep_set(scores: torch.Tensor, token_valid: torch.Tensor, block: int, keep_num: int, keep_den: int,
             forced: Sequence[int], seg: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return selection.keep_set(scores, token_valid, block, Fraction(keep_num, keep_den), forced, seg)


def pooled_attention_block_scores(q: torch.Tensor, k: torch.Tensor, token_valid: torch.Tensor,
                                  block: int) -> torch.Tensor:
    return predictors.pooled_attention_scores(q, k, token_valid, block)


def pooled_block_scores(x: torch.Tensor, token_valid: torch.Tensor, w_q: torch.Tensor, b_q: torch.Tensor | None,
                        w_k: torch.Tensor, b_k: torch.Tensor | None, num_heads: int, num_kv_heads: int,
                        block: int) -> torch.Tensor:
    return predictors.pooled_qk_scores(x, token_valid, w_q, b_q, w_k, b_k, num_heads, num_kv_heads, block)


def gather_ranks(t: torch.Tensor, ranks: int, group: str, stride: int = 0) -> torch.Tensor:
    """Sequence parallelism: (b, m) on each of `ranks` ranks -> (b, ranks * m), rank r's entries at
    [r m, (r + 1) m), plus r * stride (the kept rows' positions in the global sequence when stride is the
    slice length). Bool in, bool out."""
    b, m = t.shape
    x = t.to(torch.int64).contiguous()
    x = torch.ops._c10d_functional.wait_tensor(torch.ops._c10d_functional.all_gather_into_tensor(x, ranks, group))
    x = x.view(ranks, b, m)
    if stride:
        x = x + (torch.arange(ranks, device=x.device) * stride).view(ranks, 1, 1)
    x = x.permute(1, 0, 2).reshape(b, ranks * m)
    return x != 0 if t.dtype == torch.bool else x.to(t.dtype)


def gather_seq(t: torch.Tensor, idx: torch.Tensor, axis: int) -> torch.Tensor:
    """Rows of `t` along `axis` at idx (b, m); t's batch dim (0) may be 1 and is broadcast to b."""
    b, m = idx.shape
    shape = list(t.shape)
    shape[0] = b
    t = t.expand(shape)
    view = [b] + [1] * (t.dim() - 1)
    view[axis] = m
    out_shape = list(shape)
    out_shape[axis] = m
    return torch.gather(t, axis, idx.reshape(view).expand(out_shape))


def gather_mask(mask: torch.Tensor, idx_q: torch.Tensor | None, idx_k: torch.Tensor,
                in_range_k: torch.Tensor) -> torch.Tensor:
    """A 4-D attention mask (B|1, H|1, nq, nk) restricted to query rows idx_q (None: all) and key
    columns idx_k, with out-of-range keys masked."""
    b, mk = idx_k.shape
    heads = mask.shape[1]
    mask = mask.expand(b, heads, mask.shape[2], mask.shape[3])
    if idx_q is not None:
        mask = torch.gather(mask, 2, idx_q[:, None, :, None].expand(b, heads, idx_q.shape[1], mask.shape[3]))
    mask = torch.gather(mask, 3, idx_k[:, None, None, :].expand(b, heads, mask.shape[2], mk))
    keep = in_range_k[:, None, None, :]
    if mask.dtype == torch.bool:
        return mask & keep
    return mask.masked_fill(~keep, float("-inf"))


def positions_like(idx: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """(b, n) original positions of every row of h."""
    return torch.arange(h.shape[1], device=idx.device).unsqueeze(0).expand(h.shape[0], h.shape[1])


def causal_positions_mask(q_pos: torch.Tensor, idx_k: torch.Tensor, in_range_k: torch.Tensor,
                          seg_q: torch.Tensor | None = None) -> torch.Tensor:
    """(b, 1, nq, mk) bool: query at position q_pos sees kept key idx_k if idx_k <= q_pos and the key is
    in range. With segments (docs/design.md §2.1) `in_range_k` is the keys' segment ids (int, 0 = none)
    and `seg_q` the queries': a query sees only keys of its own segment."""
    allowed = (idx_k[:, None, :] <= q_pos[:, :, None]) & (in_range_k[:, None, :] != 0)
    if seg_q is not None:
        allowed = allowed & (seg_q[:, :, None] == in_range_k[:, None, :])
    return allowed[:, None]


def scatter_add_rows(h: torch.Tensor, rows: torch.Tensor, idx: torch.Tensor, in_range: torch.Tensor) -> torch.Tensor:
    """h + rows placed at idx (b, m) along dim 1; out-of-range rows add exactly zero."""
    rows = rows * in_range.unsqueeze(-1).to(rows.dtype)
    return h.scatter_add(1, idx.unsqueeze(-1).expand(rows.shape), rows.to(h.dtype))


def add_rows(x_rows: torch.Tensor, rows: torch.Tensor, in_range: torch.Tensor) -> torch.Tensor:
    """x_rows + rows with scatter_add_rows' rounding: equals scatter_add_rows(h, rows, idx, in_range)
    read back at idx wherever in_range (x_rows = h at idx)."""
    rows = rows * in_range.unsqueeze(-1).to(rows.dtype)
    return x_rows + rows.to(x_rows.dtype)


def straight_through_rows(dense: torch.Tensor, rows: torch.Tensor, idx: torch.Tensor,
                          in_range: torch.Tensor) -> torch.Tensor:
    """Value: `dense` (no grad) exactly. Gradient: to `rows` only, read from the kept rows idx."""
    delta = (rows - rows.detach()) * in_range.unsqueeze(-1).to(rows.dtype)  # exactly +0.0
    return dense.detach().scatter_add(1, idx.unsqueeze(-1).expand(rows.shape), delta.to(dense.dtype))


# -- masks carried as segments (passes.masks; docs/design.md §2.1) -------------------------------------
# A (b, n) int tensor of segment ids stands for the model's causal mask: 0 = a padding token, k >= 1 =
# the k-th document of its row. Query i may attend key j iff seg_i == seg_j != 0 and j <= i. A padding
# query sees no key (its attention output is 0). No real token reads a padding row, and HF's loss reads
# one only where its next token is real: the last left pad, which sees no key in the model's mask either
# (SDPA gives 0 under a bool mask; float masks are not made segments, passes.masks.FLOAT_PADDING), and
# the last pad of a hole inside a row, which the model lets see earlier real keys: not exact (a batch
# with padding between real tokens; HF collators pad at one end).


def segments_from_padding(attention_mask: torch.Tensor) -> torch.Tensor:
    """(b, n) 2-D attention_mask -> segment ids: 1 for real tokens, 0 for padding."""
    return (attention_mask != 0).to(torch.int32)


def segments_from_positions(position_ids: torch.Tensor, b: int | None = None) -> torch.Tensor:
    """(b|1, n) packed position_ids -> (b, n) segment ids: a new document wherever the position does not
    follow the previous one (transformers' packed-sequence rule), numbered from 1 in each row."""
    pos = position_ids if b is None else position_ids.expand(b, position_ids.shape[-1])
    step = torch.diff(pos, dim=-1, prepend=pos[:, :1] - 1)
    return (torch.cumsum((step != 1).to(torch.int32), -1) + 1).to(torch.int32)


def segment_mask(seg: torch.Tensor) -> torch.Tensor:
    """The (b, 1, n, n) bool mask that segments `seg` (b, n) stand for. Only for paths that need a tensor
    (the `keys` mode, an attention passes.masks cannot lower): passes.masks lowers every attention
    that reads it to lemo::segment_attention, which never builds it."""
    n = seg.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=seg.device).tril()
    return ((seg[:, None, :, None] == seg[:, None, None, :]) & (seg != 0)[:, None, None, :] & causal)


def token_valid_from_segments(seg: torch.Tensor) -> torch.Tensor:
    """(b, n) bool: real tokens (segment id not 0)."""
    return seg != 0


def gather_segments(seg: torch.Tensor, idx: torch.Tensor, in_range: torch.Tensor) -> torch.Tensor:
    """Segment ids of kept rows idx (b, m); rows out of range get 0. Kept rows are sorted, so each
    document's kept rows stay contiguous and in order: causal order by position is compact order."""
    return torch.gather(seg, 1, idx) * in_range.to(seg.dtype)


def segment_mask_keys(seg: torch.Tensor, idx_k: torch.Tensor, in_range_k: torch.Tensor) -> torch.Tensor:
    """(b, 1, n, m) bool for the `keys` mode: every query, the kept keys idx_k, within a segment."""
    q_pos = torch.arange(seg.shape[1], device=seg.device).expand(seg.shape[0], seg.shape[1])
    return causal_positions_mask(q_pos, idx_k, gather_segments(seg, idx_k, in_range_k), seg_q=seg)


def empty_logits(hidden: torch.Tensor) -> torch.Tensor:
    """What a graph returns for logits under LemoConfig(logits="drop"): shape (..., 0), no memory, so
    any later use fails loudly instead of reading made-up values."""
    return hidden.new_empty((*hidden.shape[:-1], 0))
