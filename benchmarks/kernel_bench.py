"""The fused row kernels (lemo::gather_rmsnorm, lemo::linear_scatter_add) on Llama-3-8B dims (GPU only).

A sparse layer runs its attention and MLP on m kept rows of the residual h (b=1, n, 4096), bf16, keep
0.4 (m = 0.4 n rounded up to 64-row blocks, random sorted unique rows). Its row traffic:

    attention input   gather h rows + RMSNorm          -> qkv GEMM   (m x 4096 @ 4096 x 6144)
    attention output  o_proj GEMM (m x 4096 @ 4096 x 4096) + scatter-add into h
    MLP input         gather h rows + RMSNorm          -> gate/up GEMM (m x 4096 @ 4096 x 28672)
    MLP output        down GEMM (m x 14336 @ 14336 x 4096) + scatter-add into h

Per n, each variant's total is 2 x norm + o_proj-with-scatter + down-with-scatter + qkv GEMM + gate/up
GEMM, and overhead_vs_gemm = (total - the four GEMMs alone) / the four GEMMs alone:

    gemm      the four GEMMs on compact rows (torch.matmul) - the floor
    naive     the unfused graph in eager: gather + HF RMSNorm; matmul + (rows * ok) + scatter_add (a clone)
    compiled  the same composite under torch.compile (inductor, static shapes) - the stronger baseline
    fused     the lemo ops (Triton)

Also: forward + backward of the norm (h requires grad, weight frozen as under LoRA), the backward kernel
alone, the achieved bandwidth of the gather_rmsnorm Triton kernel called directly (bytes read: m rows of h + weight; written: 2 x m rows, output and the copy kept for backward)
against the copy bandwidth measured in the same run (dst.copy_(src), 1 GiB bf16, bytes read+written),
and max |fused - naive| as a sanity check. Times: triton.testing.do_bench median, which flushes L2
before every repetition.

    python -m benchmarks.kernel_bench --out benchmarks/results/kernel_bench.json [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

D, INTER, QKV = 4096, 14336, 4096 + 1024 + 1024  # Llama-3-8B: hidden, intermediate, q+k+v out dims
BLOCK, KEEP, EPS = 64, 0.4, 1e-5


def bench(fn, grad_to_none=None) -> float | None:
    """Median ms, or None (with the error printed) if fn fails."""
    import triton.testing

    try:
        return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")
    except Exception:  # noqa: BLE001 - one failing variant should not lose the others
        traceback.print_exc()
        return None


def copy_bandwidth() -> dict:
    import torch

    src = torch.empty(1 << 29, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    nbytes = 2 * src.numel() * src.element_size()
    return {"bytes": nbytes, "ms": ms, "gb_per_s": nbytes / (ms * 1e-3) / 1e9}


def naive_norm(h, idx, weight):
    import torch

    x = torch.gather(h, 1, idx[..., None].expand(*idx.shape, h.shape[2]))
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)
    return weight * xf.to(h.dtype)


def naive_linear_scatter_add(h, x, w, idx, ok):
    import torch

    rows = torch.matmul(x, w.t())
    return h.scatter_add(1, idx[..., None].expand(*idx.shape, h.shape[2]), (rows * ok[..., None]).to(h.dtype))


def measure(n: int, compile_baseline: bool) -> dict:
    import torch

    from lemo_compile import ops  # registers torch.ops.lemo.*
    from lemo_compile.kernels import rows

    lemo = torch.ops.lemo
    torch.manual_seed(n)
    dev, dt = "cuda", torch.bfloat16
    m = math.ceil(KEEP * n / BLOCK) * BLOCK
    idx = torch.randperm(n, device=dev)[:m].sort().values[None]
    ok = torch.ones_like(idx, dtype=torch.bool)
    h = torch.randn(1, n, D, device=dev, dtype=dt)
    norm_w = (1 + 0.1 * torch.randn(D, device=dev)).to(dt)
    w_qkv = torch.randn(QKV, D, device=dev, dtype=dt) * D ** -0.5
    w_gu = torch.randn(2 * INTER, D, device=dev, dtype=dt) * D ** -0.5
    w_o = torch.randn(D, D, device=dev, dtype=dt) * D ** -0.5
    w_down = torch.randn(D, INTER, device=dev, dtype=dt) * INTER ** -0.5
    xn = torch.randn(1, m, D, device=dev, dtype=dt)
    attn = torch.randn(1, m, D, device=dev, dtype=dt)
    act = torch.randn(1, m, INTER, device=dev, dtype=dt)
    g_rows = torch.randn(1, m, D, device=dev, dtype=dt)

    t: dict[str, float | None] = {}
    t["gemm_qkv"] = bench(lambda: torch.matmul(xn, w_qkv.t()))
    t["gemm_gate_up"] = bench(lambda: torch.matmul(xn, w_gu.t()))
    t["gemm_o"] = bench(lambda: torch.matmul(attn, w_o.t()))
    t["gemm_down"] = bench(lambda: torch.matmul(act, w_down.t()))

    variants = {"naive": (naive_norm, naive_linear_scatter_add)}
    if compile_baseline:
        variants["compiled"] = (torch.compile(naive_norm, dynamic=False),
                                torch.compile(naive_linear_scatter_add, dynamic=False))
    variants["fused"] = (lambda h_, i_, w_: ops.gather_rmsnorm(h_, i_, ok, w_, EPS),
                         lambda h_, x_, w_, i_, ok_: lemo.linear_scatter_add(h_, x_, w_, None, None, i_, ok_))
    # the Triton GEMM with the scatter epilogue (the op's CUDA default is cuBLAS + a row kernel)
    variants["fused_tgemm"] = (variants["fused"][0],
                               lambda h_, x_, w_, i_, ok_: rows.linear_scatter_add_triton(h_, x_, w_, None, None, i_, ok_))
    hg = h.detach().requires_grad_(True)
    for name, (norm, lsa) in variants.items():
        t[f"{name}_norm"] = bench(lambda: norm(h, idx, norm_w))
        t[f"{name}_o_scatter"] = bench(lambda: lsa(h, attn, w_o, idx, ok))
        t[f"{name}_down_scatter"] = bench(lambda: lsa(h, act, w_down, idx, ok))
        t[f"{name}_norm_fwd_bwd"] = bench(lambda: norm(hg, idx, norm_w).backward(g_rows), grad_to_none=[hg])

    # the Triton forward kernel alone (no custom-op dispatch): the op's ~50 us at 16K is short enough
    # for Python dispatch overhead to show in do_bench, so bandwidth is judged on the kernel
    t["fused_norm_kernel"] = bench(lambda: rows.gather_rmsnorm_triton(h, idx, ok, norm_w, EPS))
    t["fused_norm_bwd_kernel"] = bench(
        lambda: rows.gather_rmsnorm_backward_triton(g_rows, h, idx, ok, norm_w, EPS, False))

    def total(v):
        parts = [t[f"{v}_norm"], t[f"{v}_norm"], t[f"{v}_o_scatter"], t[f"{v}_down_scatter"],
                 t["gemm_qkv"], t["gemm_gate_up"]]
        return None if None in parts else sum(parts)

    gemm_parts = [t["gemm_qkv"], t["gemm_gate_up"], t["gemm_o"], t["gemm_down"]]
    gemm_total = None if None in gemm_parts else sum(gemm_parts)
    res = {"n": n, "m": m, "times_ms": t, "gemm_total_ms": gemm_total}
    for v in variants:
        tot = total(v)
        res[f"{v}_total_ms"] = tot
        res[f"{v}_overhead_vs_gemm"] = (tot - gemm_total) / gemm_total if tot and gemm_total else None

    # read m rows of h + weight + idx; write the normalized rows and the kept copy for backward
    nbytes = (3 * m * D + D) * h.element_size() + m * idx.element_size()
    res["gather_rmsnorm_bytes"] = nbytes
    if t["fused_norm_kernel"]:
        res["gather_rmsnorm_gb_per_s"] = nbytes / (t["fused_norm_kernel"] * 1e-3) / 1e9
    if t["fused_norm"]:
        res["gather_rmsnorm_op_gb_per_s"] = nbytes / (t["fused_norm"] * 1e-3) / 1e9

    with torch.no_grad():
        res["max_abs_diff_norm"] = (ops.gather_rmsnorm(h, idx, ok, norm_w, EPS).float()
                                    - naive_norm(h, idx, norm_w).float()).abs().max().item()
        res["max_abs_diff_down_scatter"] = (
            lemo.linear_scatter_add(h, act, w_down, None, None, idx, ok).float()
            - naive_linear_scatter_add(h, act, w_down, idx, ok).float()).abs().max().item()
    return res


def fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def print_table(env: dict, copy: dict, results: list[dict]) -> None:
    print(f"\n{env.get('gpu')}  torch {env['torch']}  triton {env.get('triton')}  "
          f"copy {fmt(copy['gb_per_s'], '.0f')} GB/s   (times: ms, do_bench median)")
    variants = [v for v in ("naive", "compiled", "fused", "fused_tgemm") if f"{v}_total_ms" in results[0]]
    for r in results:
        t = r["times_ms"]
        print(f"\nn={r['n']} m={r['m']}: GEMMs alone qkv {fmt(t['gemm_qkv'])} gate/up {fmt(t['gemm_gate_up'])} "
              f"o {fmt(t['gemm_o'])} down {fmt(t['gemm_down'])} total {fmt(r['gemm_total_ms'])}")
        print(f"  {'variant':<11} {'norm':>7} {'o+scat':>7} {'down+scat':>9} {'norm f+b':>9} {'total':>8} "
              f"{'overhead vs GEMMs':>18}")
        for v in variants:
            ov = r[f"{v}_overhead_vs_gemm"]
            print(f"  {v:<11} {fmt(t[f'{v}_norm']):>7} {fmt(t[f'{v}_o_scatter']):>7} "
                  f"{fmt(t[f'{v}_down_scatter']):>9} {fmt(t[f'{v}_norm_fwd_bwd']):>9} "
                  f"{fmt(r[f'{v}_total_ms']):>8} {fmt(None if ov is None else 100 * ov, '.1f'):>17}%")
        frac = r.get("gather_rmsnorm_fraction_of_copy")
        print(f"  gather_rmsnorm {fmt(r.get('gather_rmsnorm_gb_per_s'), '.0f')} GB/s "
              f"({fmt(None if frac is None else 100 * frac, '.0f')}% of copy); "
              f"backward kernel {fmt(t['fused_norm_bwd_kernel'])}; max |fused - naive|: norm "
              f"{r['max_abs_diff_norm']:.3g}, down+scatter {r['max_abs_diff_down_scatter']:.3g}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--quick", action="store_true", help="one n (8K), for smoke tests")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--headline", default=None, help="merge kernel_overhead_vs_gemm_16k and "
                    "kernel_bandwidth_fraction (n=16K) into this headline.json")
    args = ap.parse_args()

    import torch

    if not torch.cuda.is_available():
        sys.exit("kernel_bench needs a CUDA device")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("unset TRITON_INTERPRET: the kernels would run in the interpreter")
    from benchmarks.common import environment

    env = environment()
    env["gpu_sm_count"] = torch.cuda.get_device_properties(0).multi_processor_count
    copy = copy_bandwidth()
    results = []
    for n in ([8192] if args.quick else [8192, 16384, 32768]):
        res = measure(n, not args.no_compile)
        if copy["ms"] and res.get("gather_rmsnorm_gb_per_s"):
            res["gather_rmsnorm_fraction_of_copy"] = res["gather_rmsnorm_gb_per_s"] / copy["gb_per_s"]
        results.append(res)
        torch._dynamo.reset()
        torch.cuda.empty_cache()

    out = {"environment": env, "config": {"d": D, "intermediate": INTER, "qkv_out": QKV, "keep": KEEP,
                                          "block": BLOCK, "dtype": "bfloat16", "batch": 1,
                                          "timing": "triton.testing.do_bench median (L2 flushed), ms"},
           "copy_bandwidth": copy, "results": results}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)

    print_table(env, copy, results)
    at16 = [r for r in results if r["n"] == 16384]
    if args.headline and at16:
        from benchmarks.common import merge_headline

        r = at16[0]
        command = "python -m benchmarks.kernel_bench " + " ".join(sys.argv[1:])
        src = "benchmarks/results/" + os.path.basename(args.out) if args.out else None
        when = env["when"][:10]
        merge_headline(args.headline, {
            "kernel_overhead_vs_gemm_16k": {"value": r["fused_overhead_vs_gemm"], "target": "<= 0.10",
                                            "source": src, "command": command, "when": when},
            "kernel_bandwidth_fraction": {"value": r.get("gather_rmsnorm_fraction_of_copy"), "target": ">= 0.70",
                                          "source": src, "command": command, "when": when}})


if __name__ == "__main__":
    main()
