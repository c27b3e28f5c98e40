"""Oracle of block informativeness for one decoder layer (docs/design.md §3; issue: predictors and calibration).

For calibration and evaluation of the block predictors only, never in the training step. From a layer's
queries q (b, hq, n, d) and keys k (b, hkv, n, d) (GQA: query head h reads key head h // (hq // hkv)),
causal (token i sees j <= i), blocks of `block` tokens (nb = ceil(n / block), the last one partial):

- `block_max_scores(q, k, block)` (b, nb, nb) fp32: M[b, m, c] = max over pairs (i in block m, j in
  block c, j <= i) of (1/hq) * sum_h relu(q_i^h . k_j^g(h)), unscaled; the head average is taken per
  pair before the max. 0 where c > m.
- `block_attention_mass(q, k, block, scale)` (b, nb, nb) fp32: A[b, m, c] = (1/hq) * sum_h sum_{i in m}
  sum_{j in c, j <= i} softmax_j(scale * q_i^h . k_j^g(h)): the causal attention mass the queries of
  block m put on the keys of block c. Row-block m sums to its number of real tokens.

Neither holds an n x n matrix. The Triton kernels take one query tile (block rows) per program and
stream key tiles (block columns) with the head loop inside, all in fp32: O(b*hq*n*d*n/2) time per
pass (like an attention forward's QK^T); extra memory is the (b, nb, nb) output plus, for the mass,
the per-row log-sum-exp (b, hq, n) of a first pass (flash-style: pass 1 lse, pass 2 sum of
exp(s - lse) per key block). The PyTorch twins `*_torch` (same arguments; the CPU path and the
oracle of the tests) do the same math on chunks of query rows, O(chunk * n) memory.

Dispatch: Triton when the tensors are fp16/bf16/fp32 and on CUDA, unless LEMO_KERNEL_IMPL=torch (read
at call time); the twin otherwise (CPU tensors; tests run the Triton kernels in the interpreter by
calling `*_triton` directly).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._triton import TRITON_DTYPES as _TRITON_DTYPES, fail as _fail, interpreted
from ._triton import require_triton as _require_triton, tl, triton, use_triton as _use_triton
_LOG2E = 1.4426950408889634
# Query rows per chunk of the twins (rounded down to a multiple of the block): memory is O(chunk * n).
_CHUNK_ROWS = 512


# -------------------------------------------------------------------------------------------------
# Triton kernels
# -------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _block_max_scores_kernel(
        # pointers
        out_ptr, q_ptr, k_ptr,
        # sizes
        N, NB, HQ, GROUP, D,
        # strides (the last dimension is contiguous)
        stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_ob, stride_om,
        # meta-parameters
        BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        # Program (query block m, batch row): for each key block c <= m, the head sum of relu(scores)
        # over the (BLOCK, BLOCK) tile, then its max over the causal pairs. Later (heavier) query
        # blocks are launched first.
        m = NB - 1 - tl.program_id(0)
        bi = tl.program_id(1).to(tl.int64)
        rows = m * BLOCK + tl.arange(0, BLOCK)
        offs = tl.arange(0, BLOCK)
        ds = tl.arange(0, BLOCK_D)
        row_in = rows < N
        d_in = ds < D
        q_tile = q_ptr + bi * stride_qb + rows.to(tl.int64)[:, None] * stride_qn + ds[None, :]
        q_mask = row_in[:, None] & d_in[None, :]
        for c in range(0, m + 1):
            cols = c * BLOCK + offs
            col_in = cols < N
            k_tile = k_ptr + bi * stride_kb + cols.to(tl.int64)[:, None] * stride_kn + ds[None, :]
            k_mask = col_in[:, None] & d_in[None, :]
            acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
            for h in range(0, HQ):
                qt = tl.load(q_tile + h * stride_qh, mask=q_mask, other=0.0)
                kt = tl.load(k_tile + (h // GROUP) * stride_kh, mask=k_mask, other=0.0)
                s = tl.dot(qt, tl.trans(kt), input_precision=DOT_PRECISION)
                acc += tl.maximum(s, 0.0)
            # Every valid value is >= 0 and the tile has a valid pair (c <= m), so 0 is a neutral fill.
            valid = row_in[:, None] & col_in[None, :] & (cols[None, :] <= rows[:, None])
            best = tl.max(tl.max(tl.where(valid, acc, 0.0), axis=1), axis=0)
            tl.store(out_ptr + bi * stride_ob + m * stride_om + c, best / HQ)

    @triton.jit
    def _row_lse_kernel(
        # pointers
        lse_ptr, q_ptr, k_ptr,
        # sizes
        N, NB, HQ, GROUP, D,
        # strides (the last dimension is contiguous; lse is contiguous (b, hq, n))
        stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
        # scalars and meta-parameters
        scale_log2,
        BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        # Pass 1 of the mass. Program (query block m, batch row * hq + head): the causal log2-sum-exp2
        # of scale * q_i . k_j over j <= i, streamed over key blocks with a running max.
        m = NB - 1 - tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        bi = bh // HQ
        h = bh % HQ
        rows = m * BLOCK + tl.arange(0, BLOCK)
        offs = tl.arange(0, BLOCK)
        ds = tl.arange(0, BLOCK_D)
        row_in = rows < N
        d_in = ds < D
        q_rows = q_ptr + bi * stride_qb + h * stride_qh + rows.to(tl.int64)[:, None] * stride_qn
        qt = tl.load(q_rows + ds[None, :],
                     mask=row_in[:, None] & d_in[None, :], other=0.0)
        k_head = k_ptr + bi * stride_kb + (h // GROUP) * stride_kh
        run_max = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
        run_sum = tl.zeros([BLOCK], dtype=tl.float32)
        # Key block 0 holds key 0, which every row sees: run_max is finite after the first step.
        for c in range(0, m + 1):
            cols = c * BLOCK + offs
            col_in = cols < N
            kt = tl.load(k_head + cols.to(tl.int64)[:, None] * stride_kn + ds[None, :],
                         mask=col_in[:, None] & d_in[None, :], other=0.0)
            s = tl.dot(qt, tl.trans(kt), input_precision=DOT_PRECISION) * scale_log2
            s = tl.where(col_in[None, :] & (cols[None, :] <= rows[:, None]), s, float("-inf"))
            new_max = tl.maximum(run_max, tl.max(s, axis=1))
            run_sum = (run_sum * tl.math.exp2(run_max - new_max)
                       + tl.sum(tl.math.exp2(s - new_max[:, None]), axis=1))
            run_max = new_max
        tl.store(lse_ptr + bh * N + rows, run_max + tl.math.log2(run_sum), mask=row_in)

    @triton.jit
    def _block_mass_kernel(
        # pointers
        out_ptr, lse_ptr, q_ptr, k_ptr,
        # sizes
        N, NB, HQ, GROUP, D,
        # strides (the last dimension is contiguous; lse is contiguous (b, hq, n))
        stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_ob, stride_om,
        # scalars and meta-parameters
        scale_log2,
        BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        # Pass 2. Program (query block m, batch row): for each key block c <= m, the sum over heads and
        # causal pairs of exp2(s - lse2), i.e. the softmax probabilities, written once per (m, c).
        m = NB - 1 - tl.program_id(0)
        bi = tl.program_id(1).to(tl.int64)
        rows = m * BLOCK + tl.arange(0, BLOCK)
        offs = tl.arange(0, BLOCK)
        ds = tl.arange(0, BLOCK_D)
        row_in = rows < N
        d_in = ds < D
        q_tile = q_ptr + bi * stride_qb + rows.to(tl.int64)[:, None] * stride_qn + ds[None, :]
        q_mask = row_in[:, None] & d_in[None, :]
        lse_rows = lse_ptr + bi * HQ * N + rows
        for c in range(0, m + 1):
            cols = c * BLOCK + offs
            col_in = cols < N
            k_tile = k_ptr + bi * stride_kb + cols.to(tl.int64)[:, None] * stride_kn + ds[None, :]
            k_mask = col_in[:, None] & d_in[None, :]
            valid = row_in[:, None] & col_in[None, :] & (cols[None, :] <= rows[:, None])
            acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
            for h in range(0, HQ):
                qt = tl.load(q_tile + h * stride_qh, mask=q_mask, other=0.0)
                kt = tl.load(k_tile + (h // GROUP) * stride_kh, mask=k_mask, other=0.0)
                s = tl.dot(qt, tl.trans(kt), input_precision=DOT_PRECISION) * scale_log2
                s = tl.where(valid, s, float("-inf"))  # hidden pairs may exceed the lse: mask before exp2
                lse = tl.load(lse_rows + h * N, mask=row_in, other=0.0)
                acc += tl.math.exp2(s - lse[:, None])
            total = tl.sum(tl.sum(acc, axis=1), axis=0)
            tl.store(out_ptr + bi * stride_ob + m * stride_om + c, total / HQ)


def triton_interpreted() -> bool:
    """Whether this module's Triton kernels were defined under TRITON_INTERPRET=1 (run on the host)."""
    return triton is not None and interpreted(_block_max_scores_kernel)


# -------------------------------------------------------------------------------------------------
# validation
# -------------------------------------------------------------------------------------------------


def _check_qk(op: str, q: torch.Tensor, k: torch.Tensor, block: int) -> None:
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        _fail(op, f"`q` must be a (b, hq, n, d) tensor, got {_describe(q)}")
    if not isinstance(k, torch.Tensor) or k.dim() != 4:
        _fail(op, f"`k` must be a (b, hkv, n, d) tensor, got {_describe(k)}")
    if not q.is_floating_point():
        _fail(op, f"`q` must be floating point, got {q.dtype}")
    if k.dtype != q.dtype:
        _fail(op, f"`k` must have `q`'s dtype {q.dtype}, got {k.dtype}")
    if k.device != q.device:
        _fail(op, f"`k` is on {k.device}, `q` on {q.device}")
    b, hq, n, d = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (b, n, d):
        _fail(op, f"`k` must be (b, hkv, n, d) with (b, n, d) = {(b, n, d)} of `q`, got shape {tuple(k.shape)}")
    hkv = k.shape[1]
    if hq == 0 or hkv == 0 or hq % hkv != 0:
        _fail(op, f"`q`'s heads ({hq}) must be a positive multiple of `k`'s heads ({hkv})")
    if isinstance(block, bool) or not isinstance(block, int) or block < 1 or block & (block - 1):
        _fail(op, f"`block` must be a power of two, got {block!r}")


def _check_scale(op: str, scale: float) -> None:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        _fail(op, f"`scale` must be a finite number, got {scale!r}")


def _describe(t) -> str:
    return f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


# -------------------------------------------------------------------------------------------------
# launchers (Triton) and twins (PyTorch)
# -------------------------------------------------------------------------------------------------


_MAX_TRITON_BLOCK = 128  # query and key tiles are block x block fp32 in registers
_MAX_TRITON_D = 256


def _triton_setup(op: str, q: torch.Tensor, k: torch.Tensor, block: int):
    """Checks for the Triton path; returns contiguous q, k, the padded head dim, dot precision, warps."""
    _require_triton(op)
    if q.dtype not in _TRITON_DTYPES:
        _fail(op, f"the Triton kernel takes fp16/bf16/fp32 `q`, got {q.dtype}; use the *_torch twin")
    if not 16 <= block <= _MAX_TRITON_BLOCK:
        _fail(op, f"the Triton kernel takes `block` in [16, {_MAX_TRITON_BLOCK}], got {block}; "
                  "use the *_torch twin")
    d = q.shape[3]
    if d > _MAX_TRITON_D:
        _fail(op, f"the Triton kernel takes head dim d <= {_MAX_TRITON_D}, got {d}; use the *_torch twin")
    block_d = max(16, triton.next_power_of_2(d))
    # An oracle: exact fp32 products (no tf32), whatever torch's matmul setting.
    return q.contiguous(), k.contiguous(), block_d, "ieee", 4 if block <= 64 else 8


def block_max_scores_triton(q: torch.Tensor, k: torch.Tensor, block: int) -> torch.Tensor:
    """Block max of the head-averaged positive causal scores, one Triton pass.

    q (b, hq, n, d) and k (b, hkv, n, d) in one of fp16/bf16/fp32, hq a multiple of hkv; block a
    power of two in [16, 128]. Returns M (b, nb, nb) fp32, nb = ceil(n / block), 0 above the diagonal."""
    op = "block_max_scores"
    _check_qk(op, q, k, block)
    q, k, block_d, precision, warps = _triton_setup(op, q, k, block)
    b, hq, n, d = q.shape
    nb = triton.cdiv(n, block)
    out = torch.zeros(b, nb, nb, dtype=torch.float32, device=q.device)
    if b * nb == 0:
        return out
    _block_max_scores_kernel[(nb, b)](
        out, q, k,
        n, nb, hq, hq // k.shape[1], d,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        out.stride(0), out.stride(1),
        BLOCK=block, BLOCK_D=block_d, DOT_PRECISION=precision, num_warps=warps,
    )
    return out


def block_attention_mass_triton(q: torch.Tensor, k: torch.Tensor, block: int, scale: float) -> torch.Tensor:
    """Causal softmax mass per (query block, key block), head-averaged; two Triton passes (row lse, then
    the sums of probabilities per key block).

    q (b, hq, n, d) and k (b, hkv, n, d) in one of fp16/bf16/fp32, hq a multiple of hkv; block a power
    of two in [16, 128]; scale the softmax scale (usually d ** -0.5). Returns A (b, nb, nb) fp32, 0 above
    the diagonal; row m sums to the number of real tokens of block m. Scratch: lse (b, hq, n) fp32."""
    op = "block_attention_mass"
    _check_qk(op, q, k, block)
    _check_scale(op, scale)
    q, k, block_d, precision, warps = _triton_setup(op, q, k, block)
    b, hq, n, d = q.shape
    nb = triton.cdiv(n, block)
    out = torch.zeros(b, nb, nb, dtype=torch.float32, device=q.device)
    if b * nb == 0:
        return out
    group = hq // k.shape[1]
    lse = torch.empty(b, hq, n, dtype=torch.float32, device=q.device)
    sizes = (n, nb, hq, group, d)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2))
    meta = dict(BLOCK=block, BLOCK_D=block_d, DOT_PRECISION=precision, num_warps=warps)
    scale_log2 = float(scale) * _LOG2E  # exp(x) = exp2(x * log2(e)); lse is kept in log2 units
    _row_lse_kernel[(nb, b * hq)](lse, q, k, *sizes, *strides, scale_log2, **meta)
    _block_mass_kernel[(nb, b)](out, lse, q, k, *sizes, *strides, out.stride(0), out.stride(1), scale_log2,
                                **meta)
    return out


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp32 accumulation; fp64 inputs (tests) keep fp64.
    return torch.promote_types(dtype, torch.float32)


def _query_chunks(n: int, block: int):
    """(start, stop) of the twins' query chunks, each a whole number of blocks (the last may be partial)."""
    rows = max(block, _CHUNK_ROWS // block * block)
    return [(r0, min(r0 + rows, n)) for r0 in range(0, n, rows)]


def _block_reduce(x: torch.Tensor, block: int, reduce: str) -> torch.Tensor:
    """(b, r, c) -> (b, ceil(r / block), ceil(c / block)) by amax or sum over block x block tiles,
    zero-padding the partial ones (a neutral fill for both: every value here is >= 0)."""
    b, r, c = x.shape
    x = F.pad(x, (0, -c % block, 0, -r % block))
    x = x.view(b, x.shape[1] // block, block, x.shape[2] // block, block)
    return x.amax(dim=(2, 4)) if reduce == "amax" else x.sum(dim=(2, 4))


def _causal(r0: int, r1: int, device: torch.device) -> torch.Tensor:
    """(r1 - r0, r1) bool: key j is visible to query i = r0 + row."""
    return torch.arange(r1, device=device)[None, :] <= torch.arange(r0, r1, device=device)[:, None]


def block_max_scores_torch(q: torch.Tensor, k: torch.Tensor, block: int) -> torch.Tensor:
    """Twin of block_max_scores_triton: the same sums over chunks of query rows (keys up to the chunk's
    last row), then the block max. Any float dtype; any power-of-two block."""
    _check_qk("block_max_scores", q, k, block)
    b, hq, n, d = q.shape
    group = hq // k.shape[1]
    nb = -(-n // block)
    ct = _compute_dtype(q.dtype)
    out = torch.zeros(b, nb, nb, dtype=torch.float32, device=q.device)
    for r0, r1 in _query_chunks(n, block):
        acc = torch.zeros(b, r1 - r0, r1, dtype=ct, device=q.device)
        for h in range(hq):
            s = torch.matmul(q[:, h, r0:r1].to(ct), k[:, h // group, :r1].to(ct).transpose(-1, -2))
            acc += s.clamp_min_(0)
        acc.masked_fill_(~_causal(r0, r1, q.device), 0)
        top = -(-r1 // block)
        out[:, r0 // block: top, :top] = (_block_reduce(acc, block, "amax") / hq).float()
    return out


def block_attention_mass_torch(q: torch.Tensor, k: torch.Tensor, block: int, scale: float) -> torch.Tensor:
    """Twin of block_attention_mass_triton: causal softmax per head over chunks of query rows, summed
    over heads and then over block x block tiles. Any float dtype; any power-of-two block."""
    _check_qk("block_attention_mass", q, k, block)
    _check_scale("block_attention_mass", scale)
    b, hq, n, d = q.shape
    group = hq // k.shape[1]
    nb = -(-n // block)
    ct = _compute_dtype(q.dtype)
    out = torch.zeros(b, nb, nb, dtype=torch.float32, device=q.device)
    for r0, r1 in _query_chunks(n, block):
        hidden = ~_causal(r0, r1, q.device)
        acc = torch.zeros(b, r1 - r0, r1, dtype=ct, device=q.device)
        for h in range(hq):
            s = torch.matmul(q[:, h, r0:r1].to(ct), k[:, h // group, :r1].to(ct).transpose(-1, -2)) * scale
            acc += torch.softmax(s.masked_fill_(hidden, float("-inf")), dim=-1)
        top = -(-r1 // block)
        out[:, r0 // block: top, :top] = (_block_reduce(acc, block, "sum") / hq).float()
    return out


def block_max_scores(q: torch.Tensor, k: torch.Tensor, block: int) -> torch.Tensor:
    """M (b, nb, nb) fp32 of q (b, hq, n, d), k (b, hkv, n, d): see the module docstring."""
    if isinstance(q, torch.Tensor) and _use_triton(q):
        return block_max_scores_triton(q, k, block)
    return block_max_scores_torch(q, k, block)


def block_attention_mass(q: torch.Tensor, k: torch.Tensor, block: int, scale: float) -> torch.Tensor:
    """A (b, nb, nb) fp32 of q (b, hq, n, d), k (b, hkv, n, d): see the module docstring."""
    if isinstance(q, torch.Tensor) and _use_triton(q):
        return block_attention_mass_triton(q, k, block, scale)
    return block_attention_mass_torch(q, k, block, scale)


if __name__ == "__main__":
    # A tiny CPU run (python -m lemo_compile.kernels.oracle): 2 query heads share 1 key head.
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 10, 8), torch.randn(1, 1, 10, 8)
    torch.set_printoptions(precision=3)
    print("block_max_scores, block 4:\n", block_max_scores(q, k, 4))
    mass = block_attention_mass(q, k, 4, 8 ** -0.5)
    print("block_attention_mass, block 4:\n", mass, "\nrow sums:", mass.sum(-1))
