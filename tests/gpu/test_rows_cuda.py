"""Triton paths of lemo::gather_rmsnorm and lemo::linear_scatter_add against their twins (needs CUDA).

Tolerance relative to the twin's own low-precision error: the Triton kernel and the twin in the same
dtype are both compared with the twin in fp64, and the kernel may be at most 2x (plus a small floor)
worse. Forward and backward, through the ops (CUDA fp16/bf16/fp32 dispatch to Triton; fp64 and
LEMO_KERNEL_IMPL=torch to the twin).

tests/conftest.py sets TRITON_INTERPRET=1 unless it is set already; the kernels here must be compiled,
so run this file with TRITON_INTERPRET=0."""

import math

import pytest
import torch

from lemo_compile import ops
from lemo_compile.kernels import rows
from lemo_compile.testing.tolerance import check_within_twice, max_err

_WHY = ("needs a CUDA device" if not torch.cuda.is_available() else
        "Triton kernels are interpreted: run with TRITON_INTERPRET=0" if rows.triton_interpreted() else "")
gpu = pytest.mark.skipif(bool(_WHY), reason=_WHY)
BLOCK = 64
KEEP = 0.4
EPS = 1e-5


def kept_rows(b, n, gen):
    """Keep 40% of the 64-token blocks of each batch row (always the short last block, so its rows
    past n are clamped to n-1 with ok False); idx (b, m) sorted, ok (b, m)."""
    nb = -(-n // BLOCK)
    kb = math.ceil(KEEP * nb)
    idx, ok = [], []
    for _ in range(b):
        blocks = torch.randperm(nb - 1, generator=gen, device="cuda")[: kb - 1]
        blocks = torch.cat([blocks, torch.tensor([nb - 1], device="cuda")]).sort().values
        raw = (blocks[:, None] * BLOCK + torch.arange(BLOCK, device="cuda")).flatten()
        idx.append(raw.clamp(max=n - 1))
        ok.append(raw < n)
    return torch.stack(idx), torch.stack(ok)


def kept_mask(n, idx, ok):
    """(b, n) bool: the rows written by ok entries."""
    kept = torch.zeros(idx.shape[0], n, dtype=torch.bool, device=idx.device)
    batch = torch.arange(idx.shape[0], device=idx.device)[:, None].expand(idx.shape)
    kept[batch[ok], idx[ok]] = True
    return kept


def run(fn, inputs, upstream):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in inputs]
    out = fn(*leaves)
    out.backward(upstream)
    return out.detach(), [t.grad if t is not None else None for t in leaves]


def floors(dtype):
    return (1e-5, 1e-4) if dtype == torch.float32 else (1e-3, 1e-2)  # (values, gradients)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("b,n,d", [(1, 3000, 2048), (2, 3000, 4096), (1, 1000, 5120), (1, 700, 576)])
def test_gather_rmsnorm_cuda(dtype, b, n, d, monkeypatch):
    gen = torch.Generator(device="cuda").manual_seed(0)
    idx, ok = kept_rows(b, n, gen)
    h = torch.randn(b, n, d, device="cuda", generator=gen)
    weight = 1 + 0.3 * torch.randn(d, device="cuda", generator=gen)
    up = torch.randn(*idx.shape, d, device="cuda", generator=gen)

    def fn(h_, w_):
        return ops.gather_rmsnorm(h_, idx, ok, w_, EPS)

    ref, ref_g = run(fn, (h.double(), weight.double()), up.double())  # fp64 runs the twin
    out, out_g = run(fn, (h.to(dtype), weight.to(dtype)), up.to(dtype))
    monkeypatch.setenv("LEMO_KERNEL_IMPL", "torch")
    low, low_g = run(fn, (h.to(dtype), weight.to(dtype)), up.to(dtype))
    vf, gf = floors(dtype)
    check_within_twice("y", out, low, ref, vf)
    check_within_twice("dh", out_g[0], low_g[0], ref_g[0], gf)
    check_within_twice("dweight", out_g[1], low_g[1], ref_g[1], gf)
    assert (out_g[0][~kept_mask(n, idx, ok)] == 0).all()  # rows not kept (padding included) get nothing


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("b,n,d,k,bias", [(1, 3000, 2048, 8192, False), (1, 3000, 4096, 14336, False),
                                          (2, 3000, 4096, 4096, True), (1, 1000, 576, 1536, True)])
@pytest.mark.parametrize("impl", ["library", "triton"])  # cuBLAS + row kernel | Triton GEMM epilogue
def test_linear_scatter_add_cuda(dtype, b, n, d, k, bias, impl, monkeypatch):
    monkeypatch.setenv("LEMO_SCATTER_GEMM", impl)
    gen = torch.Generator(device="cuda").manual_seed(0)
    idx, ok = kept_rows(b, n, gen)
    m = idx.shape[1]
    h = torch.randn(b, n, d, device="cuda", generator=gen)
    x = torch.randn(b, m, k, device="cuda", generator=gen)
    w = torch.randn(d, k, device="cuda", generator=gen) / k ** 0.5
    bb = torch.randn(d, device="cuda", generator=gen) if bias else None
    r = 0.1 * torch.randn(b, m, d, device="cuda", generator=gen)
    up = torch.randn(b, n, d, device="cuda", generator=gen)

    def fn(h_, x_, w_, b_, r_):
        return torch.ops.lemo.linear_scatter_add(h_, x_, w_, b_, r_, idx, ok)

    def cast(dt):
        return [t.to(dt) if t is not None else None for t in (h, x, w, bb, r)]

    ref, ref_g = run(fn, cast(torch.float64), up.double())
    out, out_g = run(fn, cast(dtype), up.to(dtype))
    monkeypatch.setenv("LEMO_KERNEL_IMPL", "torch")
    low, low_g = run(fn, cast(dtype), up.to(dtype))
    vf, gf = floors(dtype)
    # fp32 sums of k products: the accumulation order's error grows like sqrt(k), and the kernels
    # block the sum differently from cuBLAS
    vf, gf = vf * max(1.0, (k / 1024) ** 0.5), gf * max(1.0, (k / 1024) ** 0.5)
    check_within_twice("out", out, low, ref, vf)
    for name, a, lo, e in zip(["dh", "dx", "dw", "dbias", "dr"], out_g, low_g, ref_g):
        if e is not None:
            check_within_twice(name, a, lo, e, gf)

    untouched = ~kept_mask(n, idx, ok)
    assert torch.equal(out[untouched], cast(dtype)[0][untouched])
    # Relaunching (as autotuning does) gives the same result: h is read from the input, not the output.
    launch = rows.linear_scatter_add_triton if impl == "triton" else rows.linear_scatter_add_rows_triton
    again = launch(*cast(dtype), idx, ok)
    assert torch.equal(again, out)


@gpu
@pytest.mark.parametrize("impl", ["library", "triton"])
def test_linear_scatter_add_cuda_fp32_branch(impl, monkeypatch):
    """bf16 h, x, w with an fp32 LoRA branch r (PEFT's default adapters): (y + r) is rounded to bf16
    once, as `(linear(x, w) + r).to(bf16)` does; dr comes back in fp32."""
    monkeypatch.setenv("LEMO_SCATTER_GEMM", impl)
    gen = torch.Generator(device="cuda").manual_seed(2)
    b, n, d, k = 2, 2000, 4096, 4096
    idx, ok = kept_rows(b, n, gen)
    m = idx.shape[1]
    h = torch.randn(b, n, d, device="cuda", generator=gen)
    x = torch.randn(b, m, k, device="cuda", generator=gen)
    w = torch.randn(d, k, device="cuda", generator=gen) / k ** 0.5
    r = 0.1 * torch.randn(b, m, d, device="cuda", generator=gen)
    up = torch.randn(b, n, d, device="cuda", generator=gen)

    def fn(h_, x_, w_, r_):
        return torch.ops.lemo.linear_scatter_add(h_, x_, w_, None, r_, idx, ok)

    bf = [t.to(torch.bfloat16) for t in (h, x, w)]
    ref, ref_g = run(fn, [t.double() for t in (h, x, w, r)], up.double())
    out, out_g = run(fn, bf + [r], up.to(torch.bfloat16))
    monkeypatch.setenv("LEMO_KERNEL_IMPL", "torch")
    low, low_g = run(fn, bf + [r], up.to(torch.bfloat16))
    vf, gf = floors(torch.bfloat16)
    vf, gf = vf * 2.0, gf * 2.0  # k = 4096: see test_linear_scatter_add_cuda
    check_within_twice("out", out, low, ref, vf)
    assert out_g[3].dtype == torch.float32 == low_g[3].dtype
    for name, a, lo, e in zip(["dh", "dx", "dw", "dr"], out_g, low_g, ref_g):
        check_within_twice(name, a, lo, e, gf)


@gpu
def test_gather_rmsnorm_backward_kernel_without_dweight():
    gen = torch.Generator(device="cuda").manual_seed(1)
    idx, ok = kept_rows(2, 1000, gen)
    h = torch.randn(2, 1000, 4096, device="cuda", generator=gen, dtype=torch.bfloat16)
    w = torch.randn(4096, device="cuda", generator=gen, dtype=torch.bfloat16)
    g = torch.randn(*idx.shape, 4096, device="cuda", generator=gen, dtype=torch.bfloat16)
    dr, dw = rows.gather_rmsnorm_backward_triton(g, h, idx, ok, w, EPS, True)
    dr2, dw2 = rows.gather_rmsnorm_backward_triton(g, h, idx, ok, w, EPS, False)
    assert torch.equal(dr, dr2) and (dw2 == 0).all() and (dr[~ok] == 0).all()


@gpu
def test_debug_env_checks_idx_range(monkeypatch):
    h = torch.randn(1, 10, 64, device="cuda")
    idx = torch.arange(4, device="cuda")[None] * 3 + 1  # max 10
    ok = torch.ones_like(idx, dtype=torch.bool)
    monkeypatch.setenv("LEMO_KERNEL_DEBUG", "1")
    with pytest.raises(ValueError, match="`idx`"):
        ops.gather_rmsnorm(h, idx, ok, torch.ones(64, device="cuda"), EPS)
