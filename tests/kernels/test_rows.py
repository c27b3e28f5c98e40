"""lemo::gather_rmsnorm and lemo::linear_scatter_add on CPU.

The twins against the unfused graph's plain ops (gather + HF RMSNorm; linear + scatter_add), gradcheck
through the custom ops in fp64, the Triton kernels run by the interpreter (TRITON_INTERPRET=1, set in
tests/conftest.py) against the twins, both ops under torch.compile, and input validation.

Tolerances follow the reference's own error: fp32 results are compared with an fp64 evaluation of the
plain ops, and may be at most 2x (plus a small floor) worse than the plain ops in fp32."""

import pytest
import torch
import torch.nn.functional as F

from lemo_compile import ops
from lemo_compile.kernels import rows
from lemo_compile.testing.tolerance import check_within_twice, max_err

EPS = 1e-6
# the Triton 3.6 interpreter converts 1-element arrays to scalars the way numpy deprecates
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
interpreted = pytest.mark.skipif(not rows.triton_interpreted(),
                                 reason="needs Triton kernels defined under TRITON_INTERPRET=1")

# (b, n, m, d, pad): pad = entries per batch row with ok False (idx clamped to n-1). With the layer's
# block of 64: m = 64 is one kept block, m = n keeps every row.
SHAPES = [
    (1, 100, 64, 40, 5),   # one kept block, d not a multiple of 64
    (2, 70, 70, 96, 0),    # all rows (m == n), batch 2
    (2, 150, 64, 96, 9),   # batch 2, clamped duplicates of n-1 next to a real row n-1
    (1, 9, 4, 5, 1),       # tiny
]


def make_index(b, n, m, pad):
    """Sorted idx (b, m) and ok (b, m); batch row 0 keeps row n-1 for real and pads with duplicates
    of it; the number of padded entries differs per batch row."""
    idx, ok = torch.empty(b, m, dtype=torch.long), torch.zeros(b, m, dtype=torch.bool)
    for bi in range(b):
        p = min(pad + bi, m - 1) if pad else 0
        real = m - p
        if real == n:
            sel = torch.arange(n)
        elif bi == 0:
            sel = torch.cat([torch.randperm(n - 1)[: real - 1], torch.tensor([n - 1])]).sort().values
        else:
            sel = torch.randperm(n)[:real].sort().values
        idx[bi] = torch.cat([sel, torch.full((p,), n - 1)])
        ok[bi, :real] = True
    return idx, ok


# --- the unfused graph, in plain ops ---------------------------------------------------------------


def plain_gather_rmsnorm(h, idx, weight, eps):
    x = torch.gather(h, 1, idx[..., None].expand(*idx.shape, h.shape[2]))
    xf = x.to(torch.promote_types(x.dtype, torch.float32))  # HF: .to(float32); fp64 stays fp64
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(h.dtype)


def plain_linear_scatter_add(h, x, w, bias, r, idx, ok):
    y = F.linear(x, w, bias)
    if r is not None:
        y = y + r
    return h.scatter_add(1, idx[..., None].expand(*idx.shape, h.shape[2]), (y * ok[..., None]).to(h.dtype))


def loop_linear_scatter_add(h, x, w, bias, r, idx, ok):
    """Row by row, independent of scatter_add."""
    out = h.clone()
    for bi in range(idx.shape[0]):
        for j in range(idx.shape[1]):
            if ok[bi, j]:
                row = x[bi, j] @ w.T + (bias if bias is not None else 0) + (r[bi, j] if r is not None else 0)
                out[bi, idx[bi, j]] += row
    return out


def norm_problem(b, n, m, d, pad, dtype=torch.float32):
    idx, ok = make_index(b, n, m, pad)
    h = torch.randn(b, n, d, dtype=dtype)
    weight = 1 + 0.5 * torch.randn(d, dtype=dtype)
    grad = torch.randn(b, m, d, dtype=dtype)
    return h, idx, ok, weight, grad


def gemm_problem(b, n, m, d, k, pad, bias, r, dtype=torch.float32):
    idx, ok = make_index(b, n, m, pad)
    h = torch.randn(b, n, d, dtype=dtype)
    x = torch.randn(b, m, k, dtype=dtype)
    w = torch.randn(d, k, dtype=dtype) / k ** 0.5
    bb = torch.randn(d, dtype=dtype) if bias else None
    rr = torch.randn(b, m, d, dtype=dtype) if r else None
    return h, x, w, bb, rr, idx, ok


def grads(fn, inputs, upstream):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None and t.is_floating_point() else t
              for t in inputs]
    out = fn(*leaves)
    out.backward(upstream)
    return out.detach(), [t.grad if t is not None and t.is_floating_point() else None for t in leaves]


# --- twins against the plain ops -----------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gather_rmsnorm_matches_plain_ops(shape, dtype):
    h, idx, ok, weight, grad = norm_problem(*shape)
    op = lambda h_, w_: ops.gather_rmsnorm(h_, idx, ok, w_, EPS)  # noqa: E731
    plain = lambda h_, w_: plain_gather_rmsnorm(h_, idx, w_, EPS)  # noqa: E731
    g = grad * ok[..., None]  # the op ignores rows with ok False; the plain graph gets them zeroed
    ref, ref_grads = grads(plain, (h.double(), weight.double()), g.double())
    out, op_grads = grads(op, (h.to(dtype), weight.to(dtype)), grad.to(dtype))
    if dtype == torch.float64:
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        for a, e in zip(op_grads, ref_grads):
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)
        return
    low, low_grads = grads(plain, (h, weight), g)
    check_within_twice("y", out, low, ref, 1e-6)
    check_within_twice("dh", op_grads[0], low_grads[0], ref_grads[0], 1e-5)
    check_within_twice("dweight", op_grads[1], low_grads[1], ref_grads[1], 1e-5)


@pytest.mark.parametrize("bias,r", [(False, False), (True, True), (True, False)])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_scatter_add_matches_plain_ops(shape, bias, r, dtype):
    b, n, m, d, pad = shape
    prob = gemm_problem(b, n, m, d, 24, pad, bias, r)
    upstream = torch.randn(b, n, d)
    op = lambda *a: torch.ops.lemo.linear_scatter_add(*a, prob[5], prob[6])  # noqa: E731
    plain = lambda *a: plain_linear_scatter_add(*a, prob[5], prob[6])  # noqa: E731
    dbl = [t.double() if t is not None else None for t in prob[:5]]
    ref, ref_grads = grads(plain, dbl, upstream.double())
    torch.testing.assert_close(ref, loop_linear_scatter_add(*dbl, prob[5], prob[6]))
    cast = [t.to(dtype) if t is not None else None for t in prob[:5]]
    out, op_grads = grads(op, cast, upstream.to(dtype))
    if dtype == torch.float64:
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        for a, e in zip(op_grads, ref_grads):
            if e is not None:
                torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)
        return
    low, low_grads = grads(plain, prob[:5], upstream)
    check_within_twice("out", out, low, ref, 1e-6)
    for name, a, lo, e in zip(["dh", "dx", "dw", "dbias", "dr"], op_grads, low_grads, ref_grads):
        if e is not None:
            check_within_twice(name, a, lo, e, 1e-5)


def test_gradcheck_gather_rmsnorm():
    h, idx, ok, weight, _ = norm_problem(2, 9, 5, 6, 1, torch.float64)
    mask = ok[..., None].double()

    def fn(h_, w_):  # the caller discards rows with ok False, as the op's gradient assumes
        return ops.gather_rmsnorm(h_, idx, ok, w_, EPS) * mask

    assert torch.autograd.gradcheck(fn, (h.requires_grad_(), weight.requires_grad_()))


def test_gradcheck_linear_scatter_add():
    h, x, w, bias, r, idx, ok = gemm_problem(2, 9, 5, 6, 4, 1, True, True, torch.float64)
    inputs = tuple(t.requires_grad_() for t in (h, x, w, bias, r))
    assert torch.autograd.gradcheck(
        lambda *a: torch.ops.lemo.linear_scatter_add(*a, idx, ok), inputs)


# --- Triton kernels in the interpreter -------------------------------------------------------------


@interpreted
@pytest.mark.parametrize("shape", SHAPES[:3])
def test_gather_rmsnorm_triton_matches_twin(shape):
    h, idx, ok, weight, grad = norm_problem(*shape)
    ref, ref_rows = rows.gather_rmsnorm_torch(h.double(), idx, ok, weight.double(), EPS)
    low, _ = rows.gather_rmsnorm_torch(h, idx, ok, weight, EPS)
    y, kept = rows.gather_rmsnorm_triton(h, idx, ok, weight, EPS)
    check_within_twice("y", y, low, ref, 1e-6)
    torch.testing.assert_close(kept, ref_rows.float(), rtol=0, atol=0)  # the gathered rows, exactly

    ref_dr, ref_dw = rows.gather_rmsnorm_backward_torch(grad.double(), h.double(), idx, ok, weight.double(),
                                                        EPS, True)
    low_dr, low_dw = rows.gather_rmsnorm_backward_torch(grad, h, idx, ok, weight, EPS, True)
    dr, dw = rows.gather_rmsnorm_backward_triton(grad, h, idx, ok, weight, EPS, True, programs=3)
    check_within_twice("drows", dr, low_dr, ref_dr, 1e-5)
    check_within_twice("dweight", dw, low_dw, ref_dw, 1e-5)
    assert (dr[~ok] == 0).all()
    dr2, dw2 = rows.gather_rmsnorm_backward_triton(grad, h, idx, ok, weight, EPS, False)
    assert torch.equal(dr2, dr) and (dw2 == 0).all()


@interpreted
@pytest.mark.parametrize("bias,r", [(False, False), (True, True)])
@pytest.mark.parametrize("shape,k", [(SHAPES[0], 24), (SHAPES[1], 48), (SHAPES[2], 16), (SHAPES[3], 7)])
def test_linear_scatter_add_triton_matches_twin(shape, k, bias, r):
    b, n, m, d, pad = shape
    prob = gemm_problem(b, n, m, d, k, pad, bias, r)
    h, x, w, bb, rr, idx, ok = prob
    cfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2)
    ref = rows.linear_scatter_add_torch(*[t.double() if t is not None else None for t in prob[:5]], idx, ok)
    low = rows.linear_scatter_add_torch(*prob)
    out = rows.linear_scatter_add_triton(*prob, config=cfg)
    check_within_twice("out", out, low, ref, 1e-6)
    untouched = torch.ones(b, n, dtype=torch.bool)
    for bi in range(b):
        untouched[bi, idx[bi][ok[bi]]] = False
    assert torch.equal(out[untouched], h[untouched])


@interpreted
@pytest.mark.parametrize("bias,r", [(False, False), (True, True)])
@pytest.mark.parametrize("shape,k", [(SHAPES[0], 24), (SHAPES[1], 48), (SHAPES[3], 7)])
def test_linear_scatter_add_rows_triton_matches_twin(shape, k, bias, r):
    b, n, m, d, pad = shape
    prob = gemm_problem(b, n, m, d, k, pad, bias, r)
    h, x, w, bb, rr, idx, ok = prob
    ref = rows.linear_scatter_add_torch(*[t.double() if t is not None else None for t in prob[:5]], idx, ok)
    low = rows.linear_scatter_add_torch(*prob)
    out = rows.linear_scatter_add_rows_triton(*prob)
    check_within_twice("out", out, low, ref, 1e-6)
    untouched = torch.ones(b, n, dtype=torch.bool)
    for bi in range(b):
        untouched[bi, idx[bi][ok[bi]]] = False
    assert torch.equal(out[untouched], h[untouched])


@interpreted
@pytest.mark.parametrize("launch", ["rows", "gemm"])
def test_linear_scatter_add_triton_fp32_branch(launch):
    """A low-precision h, x, w with an fp32 branch r (PEFT's fp32 adapters; fp16 here, as the
    interpreter's bf16 arithmetic is unreliable): both launchers round (y + r) once to h's dtype,
    like the twin, which is the graph's `(linear(x, w) + r).to(h.dtype)`."""
    h, x, w, bb, rr, idx, ok = gemm_problem(2, 150, 64, 96, 24, 9, True, True)
    low_args = [t.half() for t in (h, x, w, bb)]
    ref = rows.linear_scatter_add_torch(*[t.double() for t in (h, x, w, bb, rr)], idx, ok)
    low = rows.linear_scatter_add_torch(*low_args, rr, idx, ok)
    if launch == "rows":
        out = rows.linear_scatter_add_rows_triton(*low_args, rr, idx, ok)
    else:
        out = rows.linear_scatter_add_triton(*low_args, rr, idx, ok,
                                             config=dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2))
    assert out.dtype == torch.float16
    check_within_twice("out", out, low, ref, 1e-3)


# --- under torch.compile ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_gather_rmsnorm_compiles(backend):
    h, idx, ok, weight, grad = norm_problem(2, 40, 16, 24, 3)
    w_lin = torch.randn(24, 24)

    def block(h_, w_):  # residual + norm of kept rows, as in a sparse layer
        y = ops.gather_rmsnorm(h_, idx, ok, w_, EPS)
        return h_ * 2 + plain_linear_scatter_add(h_, y, w_lin, None, None, idx, ok)

    up = torch.randn(2, 40, 24)
    eager, eager_g = grads(block, (h, weight), up)
    comp, comp_g = grads(torch.compile(block, backend=backend, fullgraph=True), (h, weight), up)
    torch.testing.assert_close(comp, eager)
    for a, e in zip(comp_g, eager_g):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_linear_scatter_add_compiles(backend):
    prob = gemm_problem(2, 40, 16, 24, 12, 3, True, True)
    idx, ok = prob[5], prob[6]

    def block(h_, x_, w_, b_, r_):
        return torch.ops.lemo.linear_scatter_add(h_, torch.tanh(x_), w_, b_, r_ * 2, idx, ok).sin()

    up = torch.randn(2, 40, 24)
    eager, eager_g = grads(block, prob[:5], up)
    comp, comp_g = grads(torch.compile(block, backend=backend, fullgraph=True), prob[:5], up)
    torch.testing.assert_close(comp, eager)
    for a, e in zip(comp_g, eager_g):
        torch.testing.assert_close(a, e)


def test_frozen_weight_grads():
    """LoRA freezes the base weight: no dw, and x is not kept for it."""
    h, x, w, bias, r, idx, ok = gemm_problem(1, 20, 8, 12, 6, 2, False, True)
    h.requires_grad_()
    x.requires_grad_()
    out = torch.ops.lemo.linear_scatter_add(h, x, w, None, r, idx, ok)
    out.sum().backward()
    assert w.grad is None and x.grad is not None and h.grad is not None
    hn, idx, ok, weight, grad = norm_problem(1, 20, 8, 12, 2)
    hn.requires_grad_()
    ops.gather_rmsnorm(hn, idx, ok, weight, EPS).backward(grad)
    assert weight.grad is None and hn.grad is not None


# --- bad input -------------------------------------------------------------------------------------


def test_bad_input_names_the_tensor():
    h, idx, ok, weight, _ = norm_problem(1, 20, 8, 12, 2)
    gemm = gemm_problem(1, 20, 8, 12, 6, 2, True, False)
    with pytest.raises(ValueError, match="`idx`.*\\[0, 20\\)"):
        ops.gather_rmsnorm(h, idx + 1, ok, weight, EPS)
    bad = gemm[5].clone()
    bad[0, 0] = -1
    with pytest.raises(ValueError, match="`idx`.*min -1"):
        torch.ops.lemo.linear_scatter_add(*gemm[:5], bad, gemm[6])
    with pytest.raises(ValueError, match="`idx` must be int64"):
        ops.gather_rmsnorm(h, idx.int(), ok, weight, EPS)
    with pytest.raises(ValueError, match="`ok` must be bool"):
        ops.gather_rmsnorm(h, idx, ok.int(), weight, EPS)
    with pytest.raises(ValueError, match="`weight` must have `h`'s dtype"):
        ops.gather_rmsnorm(h, idx, ok, weight.double(), EPS)
    with pytest.raises(ValueError, match="`x` must have `h`'s dtype"):
        torch.ops.lemo.linear_scatter_add(gemm[0], gemm[1].double(), *gemm[2:])
    with pytest.raises(ValueError, match="`w` must be \\(d, k\\)"):
        torch.ops.lemo.linear_scatter_add(gemm[0], gemm[1], gemm[2].t(), *gemm[3:])
    # the branch r may be fp32 (PEFT's adapters) on a low-precision h, nothing else
    r16 = torch.randn(1, 8, 12, dtype=torch.float16)
    h16, x16, w16, b16 = (t.to(torch.bfloat16) for t in gemm[:4])
    with pytest.raises(ValueError, match="`r` must have `h`'s dtype"):
        torch.ops.lemo.linear_scatter_add(h16, x16, w16, b16, r16, *gemm[5:])


@interpreted
def test_triton_debug_checks_idx_range(monkeypatch):
    h, idx, ok, weight, _ = norm_problem(1, 20, 8, 12, 2)
    gemm = gemm_problem(1, 20, 8, 12, 6, 2, False, False)
    monkeypatch.setenv("LEMO_KERNEL_DEBUG", "1")
    with pytest.raises(ValueError, match="gather_rmsnorm: `idx`"):
        rows.gather_rmsnorm_triton(h, idx + 5, ok, weight, EPS)
    with pytest.raises(ValueError, match="linear_scatter_add: `idx`"):
        rows.linear_scatter_add_triton(*gemm[:5], gemm[5] + 5, gemm[6])
    with pytest.raises(ValueError, match="`idx` must be int64"):
        rows.gather_rmsnorm_triton(h, idx.int(), ok, weight, EPS)


def test_kernel_impl_env_is_checked(monkeypatch):
    monkeypatch.setenv("LEMO_KERNEL_IMPL", "cuda")
    h, idx, ok, weight, _ = norm_problem(1, 20, 8, 12, 2)
    with pytest.raises(ValueError, match="LEMO_KERNEL_IMPL"):
        ops.gather_rmsnorm(h, idx, ok, weight, EPS)
