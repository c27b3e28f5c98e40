"""Fused row kernels of a sparse decoder layer: read kept rows of the residual by index, write them back.

In a sparse layer only the kept token rows `idx` (b, m) int64 (sorted per batch row, values in [0, n))
go through the attention/MLP block; `ok` (b, m) bool marks the real entries, the others are padding
whose idx was clamped to n-1 (so idx may repeat n-1 where ok is False). The unfused graph is

    x   = torch.gather(h, 1, idx[..., None].expand(b, m, d))          # copy 1
    y   = rmsnorm(x) * weight                                          # HF Llama/Mistral/Qwen RMSNorm
    ...
    out = h.scatter_add(1, idx[..., None].expand(b, m, d),             # copy 2 (h.clone) + scatter
                        ((F.linear(z, w, bias) + r) * ok[..., None]).to(h.dtype))

and these ops fuse its two ends:

- `lemo::gather_rmsnorm(h, idx, ok, weight, eps)` (b, m, d): the norm of the gathered rows, read from h
  by index, with HF's rounding (fp32 statistics, normalized rows rounded to h's dtype, then times weight
  in that dtype). Its gradient IGNORES rows with ok False (they add exactly zero to dh and dweight):
  callers discard those rows' outputs. The backward is a custom op returning compact row gradients
  (b, m, d) and dweight; the scatter of the rows into the full (b, n, d) gradient is plain torch ops in
  the registered backward, so Inductor can fuse it with the residual's own gradient.
- `lemo::linear_scatter_add(h, x, w, bias, r, idx, ok)` (b, n, d): h + rows of (x @ w.T + bias + r)
  added at idx for ok rows, each row rounded as in the unfused graph (linear output in x's dtype, + r
  rounded, + h in h's dtype). On CUDA: one copy of h, the library GEMM, and one Triton pass adding the
  rows into the copy at idx (ok rows have unique idx, so no atomics). A Triton GEMM whose epilogue does
  the adding (LEMO_SCATTER_GEMM=triton) exists too; cuBLAS is faster than it on the H200. Backward is
  plain torch ops.

Layers, each in one place (STYLE 7-8): `@triton.jit` kernels; launchers `*_triton` (validate, allocate,
launch); pure-PyTorch twins `*_torch` with the same arguments (the CPU implementation and the oracle);
the dispatchers that the `lemo::` ops call (the ops, their fakes and autograd registrations are in
lemo_compile.ops).

Dispatch: CUDA tensors in fp16/bf16/fp32 run the Triton kernels unless LEMO_KERNEL_IMPL=torch (read at
call time); everything else (CPU, fp64) runs the twin. The twins always check idx's range (one
min/max); the Triton launchers check it only with LEMO_KERNEL_DEBUG=1, as that costs a device sync.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ._triton import fail as _fail, interpreted
from ._triton import require_triton as _require_triton, tl, triton, use_triton as _use_triton


# -------------------------------------------------------------------------------------------------
# Triton kernels
# -------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _gather_rmsnorm_fwd_kernel(
        # pointers
        out_ptr, rows_ptr, h_ptr, idx_ptr, w_ptr,
        # sizes
        N_TOK, M_PER_B, D,
        # strides (rows; columns are contiguous)
        stride_h_row, stride_out_row,
        # scalars and meta-parameters
        eps,
        BLOCK_D: tl.constexpr,
    ):
        # One program per kept row R of the flattened (b*m) rows; it reads row idx[R] of its batch.
        row = tl.program_id(0).to(tl.int64)
        tok = tl.load(idx_ptr + row)
        src = (row // M_PER_B) * N_TOK + tok
        cols = tl.arange(0, BLOCK_D)
        cmask = cols < D
        xr = tl.load(h_ptr + src * stride_h_row + cols, mask=cmask, other=0.0)
        tl.store(rows_ptr + row * stride_out_row + cols, xr, mask=cmask)  # kept for the backward
        x = xr.to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(x * x, axis=0) / D + eps)
        # HF: (x * rstd) rounded to h's dtype, then weight * that in the weight's (== h's) dtype.
        xn = (x * rstd).to(h_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        y = (w * xn).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + row * stride_out_row + cols, y, mask=cmask)

    @triton.jit
    def _gather_rmsnorm_bwd_kernel(
        # pointers
        drows_ptr, dw_partial_ptr, grad_ptr, h_ptr, idx_ptr, ok_ptr, w_ptr,
        # sizes
        M, N_TOK, M_PER_B, D,
        # strides (rows; columns are contiguous)
        stride_h_row, stride_grad_row, stride_drows_row,
        # scalars and meta-parameters
        eps,
        BLOCK_D: tl.constexpr, COMPUTE_DW: tl.constexpr,
    ):
        # A fixed grid of programs strides over the rows, so the partial dweight buffer is
        # (programs, d) rather than (rows, d).
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_D)
        cmask = cols < D
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        dw_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for r in range(pid, M, tl.num_programs(0)):
            row = tl.cast(r, tl.int64)
            tok = tl.load(idx_ptr + row)
            keep = tl.load(ok_ptr + row) != 0
            src = (row // M_PER_B) * N_TOK + tok
            x = tl.load(h_ptr + src * stride_h_row + cols, mask=cmask, other=0.0).to(tl.float32)
            g = tl.load(grad_ptr + row * stride_grad_row + cols, mask=cmask, other=0.0).to(tl.float32)
            g = tl.where(keep, g, 0.0)
            rstd = tl.math.rsqrt(tl.sum(x * x, axis=0) / D + eps)
            xhat = x * rstd
            dxn = g * w
            dx = rstd * (dxn - xhat * (tl.sum(dxn * xhat, axis=0) / D))
            dx = tl.where(keep, dx, 0.0)
            tl.store(drows_ptr + row * stride_drows_row + cols, dx.to(drows_ptr.dtype.element_ty), mask=cmask)
            if COMPUTE_DW:
                dw_acc += g * xhat.to(h_ptr.dtype.element_ty).to(tl.float32)
        if COMPUTE_DW:
            tl.store(dw_partial_ptr + pid.to(tl.int64) * D + cols, dw_acc, mask=cmask)

    @triton.jit
    def _linear_scatter_add_kernel(
        # pointers
        out_ptr, h_ptr, x_ptr, w_ptr, bias_ptr, r_ptr, idx_ptr, ok_ptr,
        # sizes
        M, N_TOK, M_PER_B, D, K,
        # strides (rows; columns are contiguous, which the GEMM's vectorized, pipelined loads rely on)
        stride_x_row, stride_w_row, stride_h_row, stride_r_row,
        # meta-parameters
        HAS_BIAS: tl.constexpr, HAS_R: tl.constexpr, DOT_PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        # Tile (pid_m, pid_n) of x @ w.T over the flattened (b*m) kept rows; GROUP_M row tiles share
        # their column tiles in L2 before moving on.
        pid = tl.program_id(0)
        tiles_m = tl.cdiv(M, BLOCK_M)
        tiles_n = tl.cdiv(D, BLOCK_N)
        per_group = GROUP_M * tiles_n
        first_m = (pid // per_group) * GROUP_M
        group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_rows
        pid_n = (pid % per_group) // group_rows

        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        row_in = rows < M
        col_in = cols < D
        x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_x_row + ks[None, :]
        w_ptrs = w_ptr + cols.to(tl.int64)[None, :] * stride_w_row + ks[:, None]  # (BK, BN): w transposed
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                a = tl.load(x_ptrs, mask=row_in[:, None], other=0.0)
                b = tl.load(w_ptrs, mask=col_in[None, :], other=0.0)
            else:
                k_in = (k0 + ks) < K
                a = tl.load(x_ptrs, mask=row_in[:, None] & k_in[None, :], other=0.0)
                b = tl.load(w_ptrs, mask=k_in[:, None] & col_in[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K

        # Epilogue: round like the unfused graph (linear output in x's dtype, then + r rounded to x's
        # dtype, then + h in h's dtype) and store into out at the kept rows.
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_in, other=0.0).to(tl.float32)[None, :]
        y = acc.to(x_ptr.dtype.element_ty).to(tl.float32)
        rows64 = rows.to(tl.int64)
        if HAS_R:
            rv = tl.load(r_ptr + rows64[:, None] * stride_r_row + cols[None, :],
                         mask=row_in[:, None] & col_in[None, :], other=0.0)
            y = (y + rv.to(tl.float32)).to(x_ptr.dtype.element_ty).to(tl.float32)
        keep = (tl.load(ok_ptr + rows64, mask=row_in, other=0) != 0) & row_in
        tok = tl.load(idx_ptr + rows64, mask=keep, other=0)
        dest = (rows64 // M_PER_B) * N_TOK + tok
        smask = keep[:, None] & col_in[None, :]
        offs = dest[:, None] * stride_h_row + cols[None, :]
        # h is read from the input, never from out: a relaunch (autotuning) rewrites the same values.
        hv = tl.load(h_ptr + offs, mask=smask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, (hv + y).to(out_ptr.dtype.element_ty), mask=smask)

    @triton.jit
    def _add_rows_kernel(
        # pointers
        out_ptr, h_ptr, y_ptr, r_ptr, idx_ptr, ok_ptr,
        # sizes
        N_TOK, M_PER_B, D,
        # strides (rows; columns are contiguous)
        stride_h_row, stride_y_row, stride_r_row,
        # meta-parameters
        HAS_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # One program per kept row: out[idx] = h[idx] + (y [+ r], rounded like the unfused graph).
        row = tl.program_id(0).to(tl.int64)
        keep = tl.load(ok_ptr + row) != 0
        if keep:
            dest = (row // M_PER_B) * N_TOK + tl.load(idx_ptr + row)
            for c0 in range(0, D, BLOCK_D):
                cols = c0 + tl.arange(0, BLOCK_D)
                cmask = cols < D
                y = tl.load(y_ptr + row * stride_y_row + cols, mask=cmask, other=0.0).to(tl.float32)
                if HAS_R:
                    rv = tl.load(r_ptr + row * stride_r_row + cols, mask=cmask, other=0.0).to(tl.float32)
                    y = (y + rv).to(y_ptr.dtype.element_ty).to(tl.float32)
                hv = tl.load(h_ptr + dest * stride_h_row + cols, mask=cmask, other=0.0).to(tl.float32)
                tl.store(out_ptr + dest * stride_h_row + cols, (hv + y).to(out_ptr.dtype.element_ty), mask=cmask)

    def _even_k(args):
        return args["K"] % args["BLOCK_K"] == 0

    _linear_scatter_add_untuned = triton.heuristics({"EVEN_K": _even_k})(_linear_scatter_add_kernel)

    # Autotune keys on the model dims (K, D) and the epilogue flags only, never on M = b*m: the kept
    # token count changes every step and would re-run the tuning each time.
    _linear_scatter_add_tuned = triton.autotune(
        configs=[
            triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8), num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in [
                (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
                (128, 128, 32, 4, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 5),
                (64, 64, 32, 2, 5),
            ]
        ],
        key=["K", "D", "HAS_BIAS", "HAS_R"],
    )(_linear_scatter_add_untuned)


def triton_interpreted() -> bool:
    """Whether this module's Triton kernels were defined under TRITON_INTERPRET=1 (run on the host)."""
    return triton is not None and interpreted(_gather_rmsnorm_fwd_kernel)


# -------------------------------------------------------------------------------------------------
# validation
# -------------------------------------------------------------------------------------------------


def _check_rows_index(op: str, h: torch.Tensor, idx: torch.Tensor, ok: torch.Tensor) -> None:
    if h.dim() != 3:
        _fail(op, f"`h` must be (b, n, d), got shape {tuple(h.shape)}")
    if idx.dtype != torch.int64:
        _fail(op, f"`idx` must be int64, got {idx.dtype}")
    if idx.dim() != 2 or idx.shape[0] != h.shape[0]:
        _fail(op, f"`idx` must be (b, m) with b = {h.shape[0]}, got shape {tuple(idx.shape)}")
    if ok.dtype != torch.bool:
        _fail(op, f"`ok` must be bool, got {ok.dtype}")
    if ok.shape != idx.shape:
        _fail(op, f"`ok` must have idx's shape {tuple(idx.shape)}, got {tuple(ok.shape)}")
    for name, t in (("idx", idx), ("ok", ok)):
        if t.device != h.device:
            _fail(op, f"`{name}` is on {t.device}, `h` on {h.device}")


def _check_idx_range(op: str, idx: torch.Tensor, n: int) -> None:
    if idx.numel() == 0:
        return
    lo, hi = torch.stack([idx.min(), idx.max()]).tolist()
    if lo < 0 or hi >= n:
        _fail(op, f"`idx` values must lie in [0, {n}), got min {lo}, max {hi}")


def _debug() -> bool:
    return os.environ.get("LEMO_KERNEL_DEBUG", "0") not in ("", "0")


def _check_same(op: str, ref_name: str, ref: torch.Tensor, name: str, t: torch.Tensor | None,
                also: torch.dtype | None = None) -> None:
    """t (if any) on ref's device with ref's dtype, or with `also`."""
    if t is None:
        return
    if t.dtype not in (ref.dtype, also):
        _fail(op, f"`{name}` must have `{ref_name}`'s dtype {ref.dtype}, got {t.dtype}")
    if t.device != ref.device:
        _fail(op, f"`{name}` is on {t.device}, `{ref_name}` on {ref.device}")


def _check_gather_rmsnorm(h, idx, ok, weight) -> None:
    op = "gather_rmsnorm"
    _check_rows_index(op, h, idx, ok)
    if not h.is_floating_point():
        _fail(op, f"`h` must be floating point, got {h.dtype}")
    _check_same(op, "h", h, "weight", weight)
    if weight.shape != (h.shape[2],):
        _fail(op, f"`weight` must be ({h.shape[2]},), got shape {tuple(weight.shape)}")


def _check_gather_rmsnorm_grad(grad, h, idx) -> None:
    op = "gather_rmsnorm_backward"
    _check_same(op, "h", h, "grad", grad)
    if grad.shape != (*idx.shape, h.shape[2]):
        _fail(op, f"`grad` must be {(*idx.shape, h.shape[2])}, got shape {tuple(grad.shape)}")


def _check_linear_scatter_add(h, x, w, bias, r, idx, ok) -> None:
    op = "linear_scatter_add"
    _check_rows_index(op, h, idx, ok)
    if not h.is_floating_point():
        _fail(op, f"`h` must be floating point, got {h.dtype}")
    for name, t in (("x", x), ("w", w), ("bias", bias)):
        _check_same(op, "h", h, name, t)
    _check_same(op, "h", h, "r", r, also=torch.float32)  # PEFT's default adapters are fp32 on a bf16 model
    b, m = idx.shape
    d = h.shape[2]
    if x.dim() != 3 or x.shape[:2] != idx.shape:
        _fail(op, f"`x` must be (b, m, k) with (b, m) = {tuple(idx.shape)}, got shape {tuple(x.shape)}")
    if w.shape != (d, x.shape[2]):
        _fail(op, f"`w` must be (d, k) = {(d, x.shape[2])}, got shape {tuple(w.shape)}")
    if bias is not None and bias.shape != (d,):
        _fail(op, f"`bias` must be ({d},), got shape {tuple(bias.shape)}")
    if r is not None and r.shape != (b, m, d):
        _fail(op, f"`r` must be {(b, m, d)}, got shape {tuple(r.shape)}")


# -------------------------------------------------------------------------------------------------
# launchers (Triton) and twins (PyTorch)
# -------------------------------------------------------------------------------------------------


_MAX_ROW_BLOCK = 32768  # a whole row lives in registers; wider rows would spill


def _row_block(op: str, d: int) -> int:
    block_d = triton.next_power_of_2(d)
    if block_d > _MAX_ROW_BLOCK:
        _fail(op, f"rows of d = {d} are wider than the row kernel supports ({_MAX_ROW_BLOCK}); use the twin")
    return block_d


def _row_warps(block_d: int) -> int:
    return 4 if block_d <= 1024 else 8 if block_d <= 4096 else 16


def gather_rmsnorm_triton(h: torch.Tensor, idx: torch.Tensor, ok: torch.Tensor, weight: torch.Tensor,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of the rows of h at idx, read by index.

    h (b, n, d) float; idx (b, m) int64 in [0, n); ok (b, m) bool (unused by the forward: every row is
    computed); weight (d,) in h's dtype. Returns the normalized rows (b, m, d) in h's dtype and the
    gathered rows themselves (b, m, d), which the backward reads instead of all of h."""
    _require_triton("gather_rmsnorm")
    _check_gather_rmsnorm(h, idx, ok, weight)
    b, n, d = h.shape
    m = idx.shape[1]
    if _debug():
        _check_idx_range("gather_rmsnorm", idx, n)
    h, idx, weight = h.contiguous(), idx.contiguous(), weight.contiguous()
    out = h.new_empty(b, m, d)
    rows = h.new_empty(b, m, d)
    if b * m == 0 or d == 0:
        return out, rows
    block_d = _row_block("gather_rmsnorm", d)
    _gather_rmsnorm_fwd_kernel[(b * m,)](
        out, rows, h, idx, weight,
        n, m, d,
        d, d,
        float(eps),
        BLOCK_D=block_d, num_warps=_row_warps(block_d),
    )
    return out, rows


def _bwd_programs(t: torch.Tensor, rows: int) -> int:
    if t.is_cuda:
        return max(1, min(rows, 4 * torch.cuda.get_device_properties(t.device).multi_processor_count))
    return max(1, min(rows, 8))


def gather_rmsnorm_backward_triton(grad: torch.Tensor, h: torch.Tensor, idx: torch.Tensor, ok: torch.Tensor,
                                   weight: torch.Tensor, eps: float, compute_dweight: bool,
                                   programs: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Compact row gradients of gather_rmsnorm; rows with ok False get exactly zero.

    grad (b, m, d) in h's dtype; h (b, n, d); idx (b, m) int64; ok (b, m) bool; weight (d,).
    Returns drows (b, m, d) in h's dtype and dweight (d,) in weight's dtype (zeros unless
    compute_dweight). `programs` overrides the grid size (default: 4 per SM, or 8 off CUDA)."""
    _require_triton("gather_rmsnorm_backward")
    _check_gather_rmsnorm(h, idx, ok, weight)
    _check_gather_rmsnorm_grad(grad, h, idx)
    b, n, d = h.shape
    m = idx.shape[1]
    if _debug():
        _check_idx_range("gather_rmsnorm_backward", idx, n)
    grad, h, idx, weight = grad.contiguous(), h.contiguous(), idx.contiguous(), weight.contiguous()
    ok = ok.contiguous().view(torch.uint8)
    drows = h.new_empty(b, m, d)
    rows = b * m
    if rows == 0 or d == 0:
        return drows, weight.new_zeros(d)
    grid = programs if programs is not None else _bwd_programs(h, rows)
    partial = torch.empty(grid if compute_dweight else 1, d, dtype=torch.float32, device=h.device)
    block_d = _row_block("gather_rmsnorm_backward", d)
    _gather_rmsnorm_bwd_kernel[(grid,)](
        drows, partial, grad, h, idx, ok, weight,
        rows, n, m, d,
        d, d, d,
        float(eps),
        BLOCK_D=block_d, COMPUTE_DW=bool(compute_dweight), num_warps=_row_warps(block_d),
    )
    dweight = partial.sum(0).to(weight.dtype) if compute_dweight else weight.new_zeros(d)
    return drows, dweight


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp32 statistics as HF does; fp64 inputs (tests, gradcheck) keep fp64.
    return torch.promote_types(dtype, torch.float32)


def _gather(h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return torch.gather(h, 1, idx.unsqueeze(-1).expand(*idx.shape, h.shape[2]))


def gather_rmsnorm_torch(h: torch.Tensor, idx: torch.Tensor, ok: torch.Tensor, weight: torch.Tensor,
                         eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Twin of gather_rmsnorm_triton: gather, then HF RMSNorm with torch ops."""
    _check_gather_rmsnorm(h, idx, ok, weight)
    _check_idx_range("gather_rmsnorm", idx, h.shape[1])
    rows = _gather(h, idx)
    xf = rows.to(_compute_dtype(h.dtype))
    xn = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xn.to(h.dtype), rows


def gather_rmsnorm_backward_torch(grad: torch.Tensor, h: torch.Tensor, idx: torch.Tensor, ok: torch.Tensor,
                                  weight: torch.Tensor, eps: float,
                                  compute_dweight: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Twin of gather_rmsnorm_backward_triton (same formula, same compute dtype)."""
    _check_gather_rmsnorm(h, idx, ok, weight)
    _check_gather_rmsnorm_grad(grad, h, idx)
    _check_idx_range("gather_rmsnorm_backward", idx, h.shape[1])
    ct = _compute_dtype(h.dtype)
    xf = _gather(h, idx).to(ct)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    xhat = xf * rstd
    keep = ok.unsqueeze(-1)
    g = torch.where(keep, grad.to(ct), 0.0)
    dxn = g * weight.to(ct)
    dx = rstd * (dxn - xhat * (dxn * xhat).mean(-1, keepdim=True))
    drows = torch.where(keep, dx, 0.0).to(h.dtype)
    if compute_dweight:
        dweight = (g * xhat.to(h.dtype).to(ct)).sum((0, 1)).to(weight.dtype)
    else:
        dweight = weight.new_zeros(weight.shape)
    return drows, dweight


def linear_scatter_add_triton(h: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
                              r: torch.Tensor | None, idx: torch.Tensor, ok: torch.Tensor,
                              config: dict | None = None) -> torch.Tensor:
    """h + (x @ w.T + bias + r) added at the rows idx where ok, by a GEMM with a scatter epilogue.

    h (b, n, d); x (b, m, k); w (d, k); bias (d,) or None; r (b, m, d) or None; idx (b, m) int64 in
    [0, n), unique where ok; ok (b, m) bool. All float tensors share h's dtype, except that r may be
    fp32 (PEFT's adapters on a bf16 model): y + r is then added in fp32 and rounded to h's dtype, as
    `(y + r).to(h.dtype)` does. Returns (b, n, d).
    `config` (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M[, num_warps, num_stages]) skips autotuning."""
    _require_triton("linear_scatter_add")
    _check_linear_scatter_add(h, x, w, bias, r, idx, ok)
    b, n, d = h.shape
    m, k = idx.shape[1], x.shape[2]
    if _debug():
        _check_idx_range("linear_scatter_add", idx, n)
    h, x, w, idx = h.contiguous(), x.contiguous(), w.contiguous(), idx.contiguous()
    bias = bias.contiguous() if bias is not None else None
    r = r.contiguous() if r is not None else None
    ok = ok.contiguous().view(torch.uint8)
    out = h.clone()
    rows = b * m
    if rows == 0 or d == 0:
        return out
    if k == 0:  # an empty GEMM: the rows are bias + r
        return linear_scatter_add_torch(h, x, w, bias, r, idx, ok.view(torch.bool))
    # fp32 follows torch's own matmul setting (tf32 only where torch would use it too).
    precision = "tf32" if x.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"
    args = (out, h, x, w, bias if bias is not None else x, r if r is not None else x, idx, ok,
            rows, n, m, d, k,
            x.stride(1), w.stride(0), h.stride(1), d)
    flags = dict(HAS_BIAS=bias is not None, HAS_R=r is not None, DOT_PRECISION=precision)
    if config is None:
        def grid(meta):
            return (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(d, meta["BLOCK_N"]),)
        _linear_scatter_add_tuned[grid](*args, **flags)
    else:
        cfg = dict(config)
        grid = (triton.cdiv(rows, cfg["BLOCK_M"]) * triton.cdiv(d, cfg["BLOCK_N"]),)
        _linear_scatter_add_untuned[grid](*args, **flags, **cfg)
    return out


def linear_scatter_add_rows_triton(h: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
                                   r: torch.Tensor | None, idx: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """The CUDA default of linear_scatter_add: the library GEMM (cuBLAS) for the kept rows, then one
    Triton pass that adds them into a copy of h at idx. On the H200 cuBLAS beats the Triton GEMM with
    the scatter epilogue (linear_scatter_add_triton) by more than the epilogue saves
    (benchmarks/results/kernel_bench_8b.json); LEMO_SCATTER_GEMM=triton selects that one instead.

    Same arguments, shapes and rounding as linear_scatter_add_triton."""
    _require_triton("linear_scatter_add")
    _check_linear_scatter_add(h, x, w, bias, r, idx, ok)
    b, n, d = h.shape
    m = idx.shape[1]
    if _debug():
        _check_idx_range("linear_scatter_add", idx, n)
    y = F.linear(x, w, bias).contiguous()
    h, idx = h.contiguous(), idx.contiguous()
    r = r.contiguous() if r is not None else None
    ok = ok.contiguous().view(torch.uint8)
    out = h.clone()
    if b * m == 0 or d == 0:
        return out
    block_d = min(triton.next_power_of_2(d), 2048)
    _add_rows_kernel[(b * m,)](
        out, h, y, r if r is not None else y, idx, ok,
        n, m, d,
        d, d, d,
        HAS_R=r is not None, BLOCK_D=block_d, num_warps=_row_warps(block_d),
    )
    return out


def linear_scatter_add_torch(h: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
                             r: torch.Tensor | None, idx: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """Twin of linear_scatter_add_triton: the unfused graph's ops."""
    _check_linear_scatter_add(h, x, w, bias, r, idx, ok)
    _check_idx_range("linear_scatter_add", idx, h.shape[1])
    y = F.linear(x, w, bias)
    if r is not None:
        y = y + r
    rows = y * ok.unsqueeze(-1).to(y.dtype)
    return h.scatter_add(1, idx.unsqueeze(-1).expand(rows.shape), rows.to(h.dtype))


def gather_rmsnorm_rows_impl(h: torch.Tensor, idx: torch.Tensor, ok: torch.Tensor, weight: torch.Tensor,
                             eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The body of lemo::gather_rmsnorm_rows: the Triton kernel where it applies (_use_triton), else the twin."""
    if _use_triton(h):
        return gather_rmsnorm_triton(h, idx, ok, weight, eps)
    return gather_rmsnorm_torch(h, idx, ok, weight, eps)


def gather_rmsnorm_backward_impl(grad: torch.Tensor, h: torch.Tensor, idx: torch.Tensor, ok: torch.Tensor,
                                 weight: torch.Tensor, eps: float,
                                 compute_dweight: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The body of lemo::gather_rmsnorm_backward: the Triton kernel where it applies, else the twin."""
    if _use_triton(h):
        return gather_rmsnorm_backward_triton(grad, h, idx, ok, weight, eps, compute_dweight)
    return gather_rmsnorm_backward_torch(grad, h, idx, ok, weight, eps, compute_dweight)


def linear_scatter_add_impl(h: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
                            r: torch.Tensor | None, idx: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """The body of lemo::linear_scatter_add: where Triton applies, the library GEMM and the Triton
    row pass (the Triton GEMM with the scatter epilogue under LEMO_SCATTER_GEMM=triton), else the twin."""
    if _use_triton(h):
        if os.environ.get("LEMO_SCATTER_GEMM", "library") == "triton":
            return linear_scatter_add_triton(h, x, w, bias, r, idx, ok)
        return linear_scatter_add_rows_triton(h, x, w, bias, r, idx, ok)
    return linear_scatter_add_torch(h, x, w, bias, r, idx, ok)


if __name__ == "__main__":
    # A tiny CPU run against the unfused ops (python -m lemo_compile.kernels.rows).
    from lemo_compile import ops

    torch.manual_seed(0)
    b, n, m, d, k = 2, 10, 4, 8, 6
    h = torch.randn(b, n, d)
    idx = torch.tensor([[1, 4, 9, 9], [0, 2, 3, 5]])
    ok = torch.tensor([[True, True, True, False], [True, True, True, True]])
    wn = torch.randn(d)
    x = _gather(h, idx).float()
    ref = wn * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    print("gather_rmsnorm max |diff|:", (ops.gather_rmsnorm(h, idx, ok, wn, 1e-6) - ref).abs().max().item())
    z, w = torch.randn(b, m, k), torch.randn(d, k)
    ref = h.scatter_add(1, idx[..., None].expand(b, m, d), (z @ w.T) * ok[..., None])
    out = torch.ops.lemo.linear_scatter_add(h, z, w, None, None, idx, ok)
    print("linear_scatter_add max |diff|:", (out - ref).abs().max().item())
