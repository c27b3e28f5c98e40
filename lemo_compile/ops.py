"""The `lemo::` ops and the small traced helpers that `passes.sparsify` inserts into graphs.

Traced helpers (plain functions of torch ops; AOT autograd traces through them, so they work with
symbolic sizes): keep-set computation, row gathers, mask gathers, residual scatter-add.

Custom ops (opaque to the compiler, with a registered fake and autograd formula):
- `lemo::attention_lse`     dense attention forward returning the output and the log-sum-exp
                            (used under no-grad by the forward-exact `backward` mode).
- `lemo::attention_kept`    identity on the dense output of kept queries; its backward is the
                            dropped-term attention gradient over kept queries x kept keys, masked
                            by a gathered mask or, causally, by the kept rows' positions (no m x m
                            mask is ever held: the backward builds it a chunk of queries at a time).
- `lemo::segment_attention` causal attention within the segments of a padded or packed batch
                            (passes.masks), with its log-sum-exp; per segment the flash kernel on
                            CUDA, the twin elsewhere; its backward is attention_kept's with every row kept.
- `lemo::random_block_scores` the `random` predictor's scores (opaque: 64-bit hash arithmetic).
- `lemo::saved`             identity that marks a value for saving in a checkpointed layer.
On CPU (and with LEMO_ATTENTION_IMPL=torch) they are plain PyTorch, the oracle of every faster path.
On CUDA `attention_lse` calls PyTorch's flash attention kernel (its memory-efficient one under a
model mask), which returns the log-sum-exp; without a model mask the dropped-term backward is
PyTorch's flash attention backward on the compact kept rows (sorted by position, so the kernel's
causal mask is the positions' one). With a model mask the backward is plain PyTorch.
"""

from __future__ import annotations

import os
from fractions import Fraction
from typing import Any, Sequence

import torch

from . import predictors, selection

# -------------------------------------------------------------------------------------------------
# traced helpers
# -------------------------------------------------------------------------------------------------


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


@torch.library.custom_op("lemo::random_block_scores", mutates_args=())
def random_block_scores(x: torch.Tensor, layer: int, seed: int, block: int) -> torch.Tensor:
    """predictors.random_scores as an opaque op: its 64-bit hash constants must not reach Inductor, whose
    Triton code would compute them in 32-bit index arithmetic."""
    return predictors.random_scores(layer, seed, x.shape[0], selection.num_blocks(x.shape[1], block), x.device)


@random_block_scores.register_fake
def _(x, layer, seed, block):
    return x.new_empty((x.shape[0], (x.shape[1] + block - 1) // block), dtype=torch.float32)


def pooled_attention_block_scores(q: torch.Tensor, k: torch.Tensor, token_valid: torch.Tensor,
                                  block: int) -> torch.Tensor:
    return predictors.pooled_attention_scores(q, k, token_valid, block)


def pooled_block_scores(x: torch.Tensor, token_valid: torch.Tensor, w_q: torch.Tensor, b_q: torch.Tensor | None,
                        w_k: torch.Tensor, b_k: torch.Tensor | None, num_heads: int, num_kv_heads: int,
                        block: int) -> torch.Tensor:
    return predictors.pooled_qk_scores(x, token_valid, w_q, b_q, w_k, b_k, num_heads, num_kv_heads, block)


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
    in range. With segments (DESIGN 2 item 9) `in_range_k` is the keys' segment ids (int, 0 = none)
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


# -- masks carried as segments (passes.masks; DESIGN 2 item 9) -------------------------------------
# A (b, n) int tensor of segment ids stands for the model's causal mask: 0 = a padding token, k >= 1 =
# the k-th document of its row. Query i may attend key j iff seg_i == seg_j != 0 and j <= i. A padding
# query sees no key (its attention output is 0); the model's mask may let it see earlier real keys, but
# no real token reads a padding row and its label is ignore_index, so loss and gradients are the same.


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
# custom ops
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


@torch.library.custom_op("lemo::attention_lse", mutates_args=())
def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                  scale: float, is_causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if _use_cuda_kernels(q):
        out, lse = attention_lse_cuda(q, k, v, mask, scale, is_causal)
        return _strided_like(q, out), lse
    return attention_lse_torch(q, k, v, mask, scale, is_causal)


def _strided_like(q: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out in the layout of torch.empty_like(q), the layout the fake promises (a kernel may return
    another; the compiled graph then turns a reshape into a view that fails on the real strides)."""
    if torch.empty_like(q, device="meta").stride() == out.stride():  # the layout, without allocating
        return out
    return torch.empty_like(q).copy_(out)


@attention_lse.register_fake
def _(q, k, v, mask, scale, is_causal):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


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
    """Dropped-term attention gradient over kept queries x kept keys (DESIGN 2, attn_mode backward).

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
    if mask is None and pos is not None and _use_cuda_kernels(q) and _flash_supported(q):
        if valid.dtype == torch.bool:
            return attention_kept_backward_flash(grad_out, q, k, v, out, lse, valid, scale)
        return _kept_backward_flash_segments(grad_out, q, k, v, out, lse, valid, scale)
    # With a model mask the twin runs (a path through aten's memory-efficient attention backward gave
    # wrong gradients and an illegal memory access on torch 2.11).
    return attention_kept_backward_torch(grad_out, q, k, v, out, lse, mask, scale, pos=pos, valid=valid)


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


@torch.library.custom_op("lemo::segment_attention", mutates_args=())
def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: torch.Tensor,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """What SDPA computes under segment_mask(seg), for the rows of real tokens (padding rows: 0), and
    the log-sum-exp its backward reads (and the default mode's kept-rows backward, which calls it on
    detached inputs for the dense output). q (b, H, n, hd); k, v (b, H_kv, n, hd)."""
    return segment_attention_lse_impl(q, k, v, seg, scale)


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
