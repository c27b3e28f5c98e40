"""Sequence parallelism (issue 32): lemo against the same Ulysses engine dense, one sequence over P ranks.

Every variant runs in fresh processes, one per rank (NCCL on GPUs, gloo with --tiny on the CPU), with
`lemo_compile.sequence_parallel` (Ulysses all-to-all around attention), LoRA r=8 q/k/v/o, HF checkpointing
and AdamW on the adapters; each rank holds seq / P tokens of one sequence:

    dense          the same engine compiled by Inductor, no lemo rewrite (LemoConfig(enabled=False))
    lemo           lemo's default modes (attn backward / mlp backward, keep 0.4), logits dropped
    lemo_tokens    attn_mode="tokens" (the paper's mode: kept rows only, also in the forward exchange)

Per variant: median step time, peak allocated memory (max over ranks), and the bytes one rank hands to the
all-to-alls per step (`CompileRecord.exchanged`, from the compiled graphs). With --lengths, each variant
climbs the lengths until one fails (out of memory, or the timeout) and reports the longest that ran.

Figures (GPU, llama-8b): sp_step_ratio_vs_dense_sp_4gpu_128k (lemo / dense step, 4 ranks, 131072 tokens),
sp_comm_bytes_ratio_4gpu (lemo / dense exchanged bytes, same run), sp_max_context_tokens_8b_{4,8}gpu (lemo,
--lengths).

    python3 benchmarks/sequence_parallel.py --arch llama-8b --ranks 4 --seq 131072 \\
        --out $OUT/sp_8b_4gpu_128k.json --headline $OUT/headline.json
    python3 benchmarks/sequence_parallel.py --arch llama-8b --ranks 8 --variants lemo \\
        --lengths 1048576,2097152,3145728,4194304 --out $OUT/sp_8b_8gpu_max.json --headline $OUT/headline.json
    python benchmarks/sequence_parallel.py --tiny --ranks 2 --seq 320 --out /tmp/sp_tiny.json   # CPU, ~2 min
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import LORA_PRESETS, build_model, environment, publish_figures  # noqa: E402
from lemo_compile.testing.sp_check import free_port  # noqa: E402

VARIANTS = ("dense", "lemo", "lemo_tokens")


def _config(variant: str, tiny: bool):
    import lemo_compile

    extra = {"inner": "eager", "block_size": 16, "dense_layers": (0,)} if tiny else {}
    if variant == "dense":
        return lemo_compile.LemoConfig(enabled=False, **({"inner": "eager"} if tiny else {}))
    if variant == "lemo":
        return lemo_compile.LemoConfig(logits="drop", **extra)
    if variant == "lemo_tokens":
        return lemo_compile.LemoConfig(logits="drop", attn_mode="tokens", **extra)
    raise ValueError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")


def _rank(rank: int, args, port: int, variant: str, seq: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    import lemo_compile
    from lemo_compile import sequence_parallel as sp

    dev = "cpu" if args.tiny else f"cuda:{rank}"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if not args.tiny:
        torch.cuda.set_device(rank)
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    dist.init_process_group("gloo" if args.tiny else "nccl", rank=rank, world_size=args.ranks)
    result: dict = {"variant": variant, "seq": seq, "ranks": args.ranks}
    try:
        if args.tiny:
            from lemo_compile.testing.models import tiny_model
            torch.set_num_threads(1)
            torch.manual_seed(0)
            model = tiny_model("llama", lora=True).train()
        else:
            r, targets = LORA_PRESETS["r8-qkvo"]
            model = build_model(args.arch, seq, r, targets, device=dev)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.get_base_model().disable_input_require_grads()
        model.set_attn_implementation(sp.register())
        step_model = torch.compile(model, backend=lemo_compile.backend(_config(variant, args.tiny)))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        gen = torch.Generator().manual_seed(1)  # every rank draws the same sequence, then takes its slice
        vocab = model.config.vocab_size
        times, losses = [], []
        if not args.tiny:
            torch.cuda.reset_peak_memory_stats()
        for _ in range(args.warmup + args.steps):
            ids = torch.randint(3, vocab, (1, seq), generator=gen).to(dev)
            batch = sp.shard_batch(ids, ids)
            dist.barrier()
            t0 = time.perf_counter()
            loss = step_model(**batch).loss
            loss.backward()
            sp.all_reduce_grads(model)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if not args.tiny:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            total = loss.detach().float().clone()
            dist.all_reduce(total)
            losses.append(total.item())
        recs = lemo_compile.records()
        result.update(first_step_s=times[0], median_step_s=statistics.median(times[args.warmup:]),
                      step_times_s=times, losses=losses,
                      exchanged_bytes=sum(sum(r.exchanged.values()) for r in recs),
                      sparse_layers=sorted({d["layer"] for r in recs if r.sparsify for d in r.sparsify.layers}),
                      skips=sorted({str(s) for r in recs for s in r.skips})[:10])
        peak = torch.tensor([torch.cuda.max_memory_allocated() / 1e9 if not args.tiny else 0.0], device=dev)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        result["peak_allocated_gb"] = peak.item() if not args.tiny else None
    except Exception as e:  # noqa: BLE001 - an out-of-memory (or any failure) ends this length
        result["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        result["oom"] = "out of memory" in str(e).lower() or type(e).__name__ == "OutOfMemoryError"
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - a failed collective may leave the group unusable
        pass


def run_variant(args, variant: str, seq: int) -> dict:
    """One variant at one length in P fresh processes; a timeout or a crash is a result, not an exception."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.json")
        ctx = mp.start_processes(_rank, args=(args, free_port(), variant, seq, out), nprocs=args.ranks,
                                 join=False, start_method="spawn")
        t0 = time.perf_counter()
        try:
            while not ctx.join(timeout=5):
                if time.perf_counter() - t0 > args.timeout:
                    for p in ctx.processes:
                        p.kill()
                    return {"variant": variant, "seq": seq, "ranks": args.ranks,
                            "error": f"timed out after {args.timeout} s"}
        except mp.ProcessRaisedException as e:
            return {"variant": variant, "seq": seq, "ranks": args.ranks, "error": str(e)[-600:]}
        except mp.ProcessExitedException as e:
            return {"variant": variant, "seq": seq, "ranks": args.ranks, "error": f"a rank died: {e}"}
        if not os.path.exists(out):
            return {"variant": variant, "seq": seq, "ranks": args.ranks, "error": "rank 0 wrote no result"}
        with open(out) as f:
            return json.load(f)


def figures(doc: dict, src: str | None) -> tuple[dict, list[str]]:
    cfg = doc["config"]
    if cfg["tiny"] or cfg["arch"] != "llama-8b":
        return {}, ["sequence-parallel figures: only from llama-8b on GPUs"]
    base = {"source": src, "command": doc["command"], "when": doc["env"]["when"][:10], "arch": "llama-8b",
            "ranks": cfg["ranks"]}
    figs, missing = {}, []
    rows = {(r["variant"], r["seq"]): r for r in doc["results"]}
    if cfg["lengths"]:
        ok = [r["seq"] for r in doc["results"] if r["variant"] == "lemo" and "error" not in r]
        name = f"sp_max_context_tokens_8b_{cfg['ranks']}gpu"
        if ok:
            figs[name] = {"value": max(ok), "target": ">= 2000000" if cfg["ranks"] == 4 else ">= 4000000",
                          "tried": [(r["seq"], r.get("error", "ok")[:80]) for r in doc["results"]], **base}
        else:
            missing.append(f"{name}: no length ran")
        return figs, missing
    dense, lemo = rows.get(("dense", cfg["seq"]), {}), rows.get(("lemo", cfg["seq"]), {})
    if cfg["ranks"] == 4 and "median_step_s" in dense and "median_step_s" in lemo:
        if cfg["seq"] == 131072:
            figs["sp_step_ratio_vs_dense_sp_4gpu_128k"] = {
                "value": lemo["median_step_s"] / dense["median_step_s"], "target": "<= 0.8",
                "median_step_s": {"dense": dense["median_step_s"], "lemo": lemo["median_step_s"]},
                "peak_allocated_gb": {"dense": dense["peak_allocated_gb"], "lemo": lemo["peak_allocated_gb"]},
                "seq": cfg["seq"], **base}
        figs["sp_comm_bytes_ratio_4gpu"] = {
            "value": lemo["exchanged_bytes"] / dense["exchanged_bytes"], "target": "~ keep ratio (0.4)",
            "exchanged_bytes": {"dense": dense["exchanged_bytes"], "lemo": lemo["exchanged_bytes"]},
            "seq": cfg["seq"], **base}
    else:
        missing.append("sp_step_ratio_vs_dense_sp_4gpu_128k / sp_comm_bytes_ratio_4gpu: need dense and lemo "
                       "both measured on 4 ranks")
    return figs, missing


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="llama-8b")
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--seq", type=int, default=131072, help="tokens of the whole sequence (all ranks)")
    ap.add_argument("--lengths", default=None, help="comma-separated lengths to climb (longest-context search)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--timeout", type=int, default=560, help="seconds per variant and length")
    ap.add_argument("--tiny", action="store_true", help="tiny Llama on the CPU, gloo: every code path")
    ap.add_argument("--out", default=None)
    ap.add_argument("--headline", default=None)
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else [args.seq]
    results = []
    doc = {"benchmark": "sequence_parallel", "command": "python " + " ".join(sys.argv), "env": environment(),
           "config": {"arch": "tiny-llama" if args.tiny else args.arch, "ranks": args.ranks, "seq": args.seq,
                      "lengths": args.lengths, "steps": args.steps, "warmup": args.warmup, "tiny": args.tiny},
           "results": results}
    for variant in args.variants.split(","):
        for seq in lengths:
            if seq % args.ranks:
                raise SystemExit(f"length {seq} does not divide by {args.ranks} ranks")
            r = run_variant(args, variant, seq)
            results.append(r)
            print(json.dumps({k: r.get(k) for k in ("variant", "seq", "median_step_s", "peak_allocated_gb",
                                                    "exchanged_bytes", "sparse_layers", "error")}), flush=True)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(doc, f, indent=1)
            if "error" in r:
                break  # a longer sequence will not fit either
    figs, missing = figures(doc, args.out and os.path.join("benchmarks/results", os.path.basename(args.out)))
    publish_figures(doc, figs, missing, args.out, args.headline, args.tiny)


if __name__ == "__main__":
    main()
