"""First end-to-end numbers of token elimination (issue: token elimination in the graph).

Llama-3.2-1B architecture built from config (random weights, random tokens: cost does not depend on
values at a fixed keep ratio), LoRA r=16 on q/k/v/o, bf16, batch 1. Variants, each in a fresh
subprocess, alternating in one invocation:

    eager_dense      HF eager (SDPA)
    inductor_dense   torch.compile(backend="inductor")
    lemo_tokens      lemo, attn_mode=tokens,   mlp_mode=backward   (inner: inductor)
    lemo_fwd_exact   lemo, attn_mode=backward, mlp_mode=backward   (forward-exact)
    lemo_keys        lemo, attn_mode=keys,     mlp_mode=backward
    lemo_tokens_eager  lemo_tokens with inner="eager" (AOT autograd, ATen graphs run eagerly)
    lemo_tokens_fused    lemo_tokens with the fused row kernels (LemoConfig(fused_kernels=True); by
                     default they run with the eager inner compiler only)
    lemo_tokens_unfused  lemo_tokens without the fused row kernels (LemoConfig(fused_kernels=False))
    lemo_tokens_eager_unfused  lemo_tokens_eager without them (what the fused kernels save when no
                     compiler fuses the gather/norm/scatter chain)
    lemo_dense       lemo with every layer dense and no loss rewrite: with "+causal", passes.causal alone
    preset_memory, preset_speed   lemo_compile.presets.get("memory" | "speed")

Any lemo variant name with the suffix "+causal" runs with LemoConfig(causal_mask=True) (passes.causal:
the provably causal n x n mask HF builds under torch.compile becomes SDPA is_causal=True).

One step = forward + backward + AdamW step on the LoRA parameters. Timing: compile/first step, 2
warm-up steps, then the median of --steps timed steps (device synchronised). Memory: peak allocated
and reserved over the timed steps (expandable segments for every variant).

    python benchmarks/sparsify_bench.py --seq 16384 --out benchmarks/results/sparsify_1b_16k.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import build_model, environment, merge_headline, on_gpus, run_variant_subprocess  # noqa: E402

VARIANTS = {
    "eager_dense": None,
    "inductor_dense": "inductor",
    "lemo_tokens": dict(attn_mode="tokens", mlp_mode="backward"),
    "lemo_fwd_exact": dict(attn_mode="backward", mlp_mode="backward"),
    "lemo_keys": dict(attn_mode="keys", mlp_mode="backward"),
    # the same rewrite, ATen graphs run eagerly (no Inductor): eager kernels for attention and GEMMs
    "lemo_tokens_eager": dict(attn_mode="tokens", mlp_mode="backward", inner="eager"),
    # lemo_tokens with and without the fused row kernels (passes.fuse): without, Inductor compiles the
    # gather/scatter
    "lemo_tokens_fused": dict(attn_mode="tokens", mlp_mode="backward", fused_kernels=True),
    "lemo_tokens_unfused": dict(attn_mode="tokens", mlp_mode="backward", fused_kernels=False),
    "lemo_tokens_eager_unfused": dict(attn_mode="tokens", mlp_mode="backward", inner="eager", fused_kernels=False),
    # with --ckpt: checkpointed sparse layers keep their full input (plain lemo + checkpointing)
    "lemo_tokens_plainckpt": dict(attn_mode="tokens", mlp_mode="backward", sparse_checkpoint=False),
    # lemo_tokens with the MLPs in row segments (LemoConfig.segment_mlp): the MLP keeps only its input
    "lemo_tokens_mlpseg": dict(attn_mode="tokens", mlp_mode="backward", segment_mlp=True),
    # every layer dense: only the segmented loss (dense + chunked loss)
    "lemo_loss_only": dict(dense_layers="all"),
    # every layer dense, no loss rewrite: the baseline for "lemo_dense+causal" (passes.causal alone)
    "lemo_dense": dict(dense_layers="all", peak_cut=False),
    # the two documented presets (lemo_compile.presets)
    "preset_memory": "preset:memory",
    "preset_speed": "preset:speed",
    "preset_fidelity": "preset:fidelity",
}


def variant_spec(name: str):
    base, _, suffix = name.partition("+")
    if base not in VARIANTS or suffix not in ("", "causal") or (suffix and not isinstance(VARIANTS[base], dict)):
        # (presets already turn causal_mask on: it is the default)
        raise SystemExit(f"unknown variant {name!r}: one of {', '.join(VARIANTS)}, lemo ones optionally +causal")
    spec = VARIANTS[base]
    return dict(spec, causal_mask=True) if suffix else spec


def worker(args) -> dict:
    import torch
    import lemo_compile
    from lemo_compile import LemoConfig

    variant = args.worker
    import faulthandler  # a variant about to time out prints where it is (captured in log_tail)
    faulthandler.dump_traceback_later(max(args.timeout - 15, 5), exit=False)
    model = build_model(args.arch, args.seq, args.lora_r, ("q_proj", "k_proj", "v_proj", "o_proj"))
    if args.ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    spec = variant_spec(variant)
    if spec == "inductor":
        step_model = torch.compile(model, backend="inductor")
    elif isinstance(spec, str) and spec.startswith("preset:"):
        cfg = lemo_compile.presets.get(spec.split(":", 1)[1], keep_ratio=args.keep)
        step_model = torch.compile(model, backend=lemo_compile.backend(cfg))
    elif isinstance(spec, dict):
        spec = dict(spec)
        if spec.get("dense_layers") == "all":
            spec["dense_layers"] = tuple(range(model.config.num_hidden_layers))
        cfg = LemoConfig(keep_ratio=args.keep, logits=args.logits, **{"inner": "inductor", **spec})
        step_model = torch.compile(model, backend=lemo_compile.backend(cfg))
    else:
        step_model = model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, args.seq), device="cuda", generator=gen)

    def step():
        out = step_model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.detach()

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    try:
        loss0 = step()
    except torch.OutOfMemoryError as e:
        return {"variant": variant, "oom": True, "error": "CUDA out of memory at the first step",
                "detail": str(e)[:300], "peak_allocated_gb": torch.cuda.max_memory_allocated() / 1e9}
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    print(f"[{variant}] first step {first:.1f} s, loss {float(loss0):.4f}", file=sys.stderr, flush=True)
    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        print(f"[{variant}] step {times[-1]:.2f} s", file=sys.stderr, flush=True)
    med = statistics.median(times)
    profile = _profile_step(step) if args.profile else None
    res = {"variant": variant, "loss_first_step": float(loss0), "median_step_s": med, "step_times_s": times,
           "first_step_s": first, "compile_s": first - med,
           "peak_allocated_gb": torch.cuda.max_memory_allocated() / 1e9,
           "peak_reserved_gb": torch.cuda.max_memory_reserved() / 1e9}
    if profile is not None:
        res["profile"] = profile
    if variant.startswith(("lemo", "preset")):
        recs = [r for r in lemo_compile.records() if r.sparsify is not None]
        res["sparse_layers"] = sum(r.sparsify.counters["sparse_layers"] for r in recs)
        res["saved_for_recompute"] = sum(r.saved_for_recompute for r in lemo_compile.records())
        res["saved_bytes"] = sum(v.nbytes for r in lemo_compile.records() for v in r.saved)
        ests = [r.memory for r in lemo_compile.records() if r.memory is not None]
        if ests:
            res["estimated_peak_gb"] = max(e.peak_hint for e in ests) / 1e9
        res["lemo_skips"] = [str(s) for r in recs for s in r.sparsify.skips]
        res["graphs"] = len(lemo_compile.records())
        res["fused"] = dict(sum((r.fuse.counters for r in recs if r.fuse is not None), collections.Counter()))
        res["losses_segmented"] = sum(r.peak_cut.counters["losses_segmented"] for r in lemo_compile.records()
                                      if r.peak_cut)
        res["sdpa_made_causal"] = sum(r.causal.counters["sdpa_made_causal"] for r in lemo_compile.records()
                                      if r.causal is not None)
        res["causal_skips"] = sorted({str(s) for r in lemo_compile.records() if r.causal is not None
                                      for s in r.causal.skips})
    return res


def _profile_step(step, top: int = 40) -> dict:
    """One more step under torch.profiler: the GPU kernels by total time (ms), the top `top` of them."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None)
        if t is None:
            t = getattr(e, "cuda_time_total", 0)
        if t > 0:
            rows.append({"name": e.key[:160], "ms": t / 1e3, "calls": e.count})
    rows.sort(key=lambda r: -r["ms"])
    return {"gpu_ms_total": sum(r["ms"] for r in rows), "kernels": len(rows), "top": rows[:top]}


def run_variants(variants: list[str], extra: list[str], timeout: int, gpus: str | None):
    """Yield each variant's result as it finishes: one after another, or with `gpus` one variant per GPU at
    a time (CUDA_VISIBLE_DEVICES), in the order they finish."""
    script = os.path.abspath(__file__)
    yield from on_gpus(variants, lambda v, env: run_variant_subprocess(script, v, extra, timeout, env=env), gpus)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="llama-1b")
    ap.add_argument("--seq", type=int, default=16384)
    ap.add_argument("--keep", type=float, default=0.4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps after the first (compiling) one")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--ckpt", action="store_true", help="HF gradient checkpointing (use_reentrant=False)")
    ap.add_argument("--logits", default="keep", choices=("keep", "drop"), help="LemoConfig.logits for lemo")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", action="store_true",
                    help="profile one extra step per variant: top GPU kernels into the result")
    ap.add_argument("--headline", default=None, help="write figures into this headline.json")
    ap.add_argument("--worker", default=None)
    ap.add_argument("--timeout", type=int, default=400)
    ap.add_argument("--gpus", default=None, help="e.g. 0,1: run variants concurrently, one per GPU of this host "
                                                 "(identical GPUs; each variant still has its GPU to itself)")
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    extra = ["--arch", args.arch, "--seq", str(args.seq), "--keep", str(args.keep), "--steps", str(args.steps),
             "--warmup", str(args.warmup), "--timeout", str(args.timeout),
             "--lora-r", str(args.lora_r), "--logits", args.logits] + (["--ckpt"] if args.ckpt else [])
    extra += ["--profile"] if args.profile else []
    for v in args.variants.split(","):
        variant_spec(v)  # fail before any run
    results = []
    for r in run_variants(args.variants.split(","), extra, args.timeout, args.gpus):
        print(json.dumps({k: r.get(k) for k in ("variant", "median_step_s", "peak_allocated_gb", "compile_s",
                                                  "sparse_layers", "sdpa_made_causal", "error", "gpu")}), flush=True)
        results.append(r)
        doc = summarize(args, results)
        if args.out:  # after every variant: a run cut short by a time limit keeps what it measured
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(doc, f, indent=2)
    print("\nvariant                    step s   peak GB  reserved GB  compile s")
    for r in results:
        if "error" in r:
            print(f"{r['variant']:<26} ERROR {r['error']}")
        else:
            print(f"{r['variant']:<26} {r['median_step_s']:7.3f} {r['peak_allocated_gb']:8.1f} "
                  f"{r['peak_reserved_gb']:11.1f} {r['compile_s']:9.1f}")
    for key in ("fused_step_ratio", "fused_step_ratio_eager_inner", "sparse_ckpt_peak_ratio_vs_ckpt_chunked"):
        if key in doc:
            print(f"{key}: {doc[key]:.3f}")
    if args.headline:
        merge_headline(args.headline, doc["headline"])


def summarize(args, results: list[dict]) -> dict:
    command = "python " + " ".join(sys.argv)
    doc = {"benchmark": "sparsify", "command": command, "env": environment(),
           "config": {"arch": args.arch, "seq": args.seq, "keep_ratio": args.keep, "lora": f"r={args.lora_r} q/k/v/o",
                      "dtype": "bfloat16", "batch": 1, "steps": args.steps, "checkpointing": args.ckpt,
                      "lemo_logits": args.logits, "concurrent_gpus": args.gpus}, "results": results, "headline": {}}
    ok = {r["variant"]: r for r in results if "error" not in r}
    tag = f"{args.arch.split('-')[1]}_{args.seq // 1024}k"
    src = "benchmarks/results/" + os.path.basename(args.out) if args.out else None
    fig = dict(source=src, command=command, when=doc["env"]["when"][:10])
    # lemo_dense = Inductor with only passes.causal: the fair compiled dense baseline (plain Inductor
    # keeps HF's n x n mask and runs the masked attention kernel)
    dense = [ok[v] for v in ("eager_dense", "inductor_dense", "lemo_dense") if v in ok]
    if dense:
        best_t = min(d["median_step_s"] for d in dense)
        best_m = min(d["peak_allocated_gb"] for d in dense)
        doc["ratios_vs_best_dense"] = {v: {"step": ok[v]["median_step_s"] / best_t,
                                           "peak": ok[v]["peak_allocated_gb"] / best_m}
                                       for v in ok if v.startswith(("lemo", "preset")) and v != "lemo_dense"}
        ratios = doc["ratios_vs_best_dense"]
        for v, name in (("preset_memory", "e2e_mem_preset"), ("preset_speed", "e2e_speed_preset")):
            if v in ratios and not args.ckpt:
                doc["headline"][f"{name}_peak_ratio_{tag}"] = dict(value=ratios[v]["peak"], versus="best dense", **fig)
                doc["headline"][f"{name}_step_ratio_{tag}"] = dict(value=ratios[v]["step"], versus="best dense", **fig)
        if args.ckpt and "lemo_tokens" in ratios:
            doc["headline"][f"e2e_ckpt_step_ratio_{tag}"] = dict(
                value=ratios["lemo_tokens"]["step"], peak_ratio=ratios["lemo_tokens"]["peak"],
                versus="best dense with checkpointing", **fig)
        if "lemo_tokens" in doc["ratios_vs_best_dense"] and not args.ckpt:
            rt = doc["ratios_vs_best_dense"]["lemo_tokens"]
            doc["headline"][f"sparsify_peak_ratio_{tag}"] = dict(value=rt["peak"], **fig)
            doc["headline"][f"sparsify_step_ratio_{tag}"] = dict(value=rt["step"], **fig)
    if "lemo_tokens" in ok and "lemo_tokens_unfused" in ok:
        doc["fused_step_ratio"] = ok["lemo_tokens"]["median_step_s"] / ok["lemo_tokens_unfused"]["median_step_s"]
        doc["headline"][f"fused_step_ratio_{tag}"] = dict(value=doc["fused_step_ratio"],
                                                          target="< 1.0 (fused faster)", **fig)
    if "lemo_tokens_eager" in ok and "lemo_tokens_eager_unfused" in ok:
        doc["fused_step_ratio_eager_inner"] = (ok["lemo_tokens_eager"]["median_step_s"]
                                               / ok["lemo_tokens_eager_unfused"]["median_step_s"])
        doc["headline"][f"fused_step_ratio_{tag}_eager_inner"] = dict(
            value=doc["fused_step_ratio_eager_inner"], target="none (inner='eager': no compiler fusion)", **fig)
    if args.ckpt and "lemo_tokens" in ok and "lemo_loss_only" in ok:
        ratio = ok["lemo_tokens"]["peak_allocated_gb"] / ok["lemo_loss_only"]["peak_allocated_gb"]
        doc["sparse_ckpt_peak_ratio_vs_ckpt_chunked"] = ratio
        doc["headline"][f"sparse_ckpt_peak_ratio_{tag}"] = dict(
            value=ratio, target="vs dense + checkpointing + chunked loss (lemo's, logits dropped)", **fig)
    return doc

if __name__ == "__main__":
    main()
