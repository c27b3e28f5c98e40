"""Time and peak of one Llama-3-8B-shaped SwiGLU MLP, forward + backward, segmented by lemo versus the
unsegmented graph under Inductor: how the rows per segment set the segmented op's cost.

The op runs its segments eagerly (about 40 kernels per segment, more with LoRA), so few rows per
segment mean many small GEMMs and many launches; many rows mean more temporary memory. This measures
that trade on the GPU at one length, with and without PEFT-style LoRA adapters (fp32, rank 16) on the
three projections, bf16 model weights, x requiring grad (as inside a model).

    python benchmarks/diag/mlp_segment_speed.py --out benchmarks/results/mlp_segment_speed_8b_16k.json

Rows: `rows` per segment of lemo::swiglu_lora_mlp; `compiled` is the plain PEFT arithmetic under
torch.compile (Inductor), the graph the op replaces. Median of --iters forward + backward passes
(CUDA events), after warm-up; peak is the allocator's peak above what the inputs hold.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq", type=int, default=16384)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=14336)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rows", default="256,512,1024,2048,4096,8192")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    from lemo_compile import ops  # noqa: F401  (registers lemo::swiglu_lora_mlp)
    from lemo_compile.kernels import swiglu
    from benchmarks.common import environment

    dev, bf = ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)  # cpu: a check
    gen = torch.Generator(device=dev).manual_seed(0)
    d, inter, r, n = args.hidden, args.inter, args.rank, args.seq

    def rand(*shape, dtype=bf, scale=1.0):
        return (scale * torch.randn(*shape, device=dev, generator=gen)).to(dtype)

    x0 = rand(1, n, d)
    wg, wu, wd = rand(inter, d, scale=d ** -0.5), rand(inter, d, scale=d ** -0.5), rand(d, inter, scale=inter ** -0.5)
    up = rand(1, n, d)

    def adapters(lora: bool):
        if not lora:
            return [None] * 6
        shapes = [(r, d), (inter, r), (r, d), (inter, r), (r, inter), (d, r)]
        return [rand(*s, dtype=torch.float32, scale=0.02).requires_grad_() for s in shapes]

    def plain(x, ag, bg, au, bu, ad, bd, scales):  # PEFT's arithmetic, whole length: kernels.swiglu._proj
        p = F.silu(swiglu._proj(x, wg, ag, bg, scales[0])[0]) * swiglu._proj(x, wu, au, bu, scales[1])[0]
        return swiglu._proj(p, wd, ad, bd, scales[2])[0]

    compiled = torch.compile(plain)
    scales = [2.0, 2.0, 2.0]

    def timed(fn, ads):
        x = x0.detach().requires_grad_()
        for _ in range(2):
            fn(x, *ads).backward(up)
        if dev == "cpu":
            t = time.perf_counter()
            fn(x, *ads).backward(up)
            return {"ms": (time.perf_counter() - t) * 1e3, "peak_gb": None}
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(x, *ads).backward(up)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return {"ms": statistics.median(times), "peak_gb": (torch.cuda.max_memory_allocated() - base) / 1e9}

    results = []
    for lora in (False, True):
        ads = adapters(lora)
        res = {"lora": lora, "compiled": timed(lambda x, *a: compiled(x, *a, scales), ads)}
        print(f"lora={lora} compiled {res['compiled']}", flush=True)
        for rows in map(int, args.rows.split(",")):
            def op(x, *a, rows=rows):
                return torch.ops.lemo.swiglu_lora_mlp(x, wg, wu, wd, *a, scales, rows)
            res[f"rows={rows}"] = timed(op, ads)
            print(f"lora={lora} rows={rows} {res[f'rows={rows}']}", flush=True)
        results.append(res)

    doc = {"benchmark": "mlp_segment_speed", "command": "python " + " ".join(sys.argv), "env": environment(),
           "config": {"seq": n, "hidden": d, "inter": inter, "rank": r, "dtype": "bfloat16",
                      "adapters": "fp32 on gate/up/down when lora", "iters": args.iters},
           "results": results}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=2)


if __name__ == "__main__":
    main()
