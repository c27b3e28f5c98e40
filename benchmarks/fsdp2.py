"""FSDP2 with lemo: `fully_shard` on every decoder layer and the root, layers compiled one by one.

FSDP2 runs its hooks around each sharded module, so the compiled graphs are single decoder layers;
`lemo_compile.integrations.compile_layers` gives each layer the config of its position. The root
(embeddings, final norm, LM head and loss) runs eager in every variant.

Variants, each in fresh processes (one per GPU), one after another in one invocation:
  dense       every layer compiled by Inductor alone (the baseline)
  lemo_keep1  lemo with keep_ratio=1.0: every sparse layer rewritten but keeping every block, so the
              loss must follow `dense` step for step (parity)
  lemo        lemo with the default config (keep 0.4, first half and last layer dense)

Every rank trains on its own chunks of byte-level text (the Python standard library's sources, bytes
as token ids), the same chunks in every variant; LoRA r=8 on q/k/v/o, AdamW, bf16 on the GPU.
Per variant: the loss of every step (mean over ranks), the median step time after `--warmup` steps,
and per-GPU peak allocated / reserved memory over the timed steps.

GPU (2 H200s; figures fsdp2_peak_ratio_2gpu and fsdp2_step_ratio_2gpu, lemo / dense):
  python benchmarks/fsdp2.py --arch llama-1b --seq 16384 --steps 20 --nproc 2 \
      --out benchmarks/results/fsdp2_1b_16k.json --headline benchmarks/results/headline.json
CPU (gloo, tiny model, every code path, no real numbers):
  python benchmarks/fsdp2.py --tiny --out /tmp/fsdp2_tiny.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (LORA_PRESETS, build_model, environment, plot_losses, publish_figures,  # noqa: E402
                               run_variant_subprocess)

VARIANTS = ("dense", "lemo_keep1", "lemo")


def lemo_config(variant: str, tiny: bool):
    from lemo_compile import LemoConfig

    # attn_mode "tokens", as measured (fsdp2_1b_16k.json predates the "backward" default)
    cfg = LemoConfig(inner="eager" if tiny else "inductor", attn_mode="tokens")
    return cfg.replace(keep_ratio=1.0) if variant == "lemo_keep1" else cfg


def text_chunks(seq: int, count: int) -> list[list[int]]:
    """`count` chunks of `seq + 1` byte tokens of the standard library's sources."""
    from lemo_compile.demo import stdlib_tokens

    tokens = stdlib_tokens(lambda text: list(text.encode("utf-8")), count * (seq + 1))
    return [tokens[i * (seq + 1):(i + 1) * (seq + 1)] for i in range(count)]


def rank_main(rank: int, args, result_path: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch._dynamo.backends.registry import lookup_backend
    from torch.distributed.fsdp import fully_shard

    from lemo_compile.integrations import compile_layers
    from lemo_compile.reference import decoder_layers

    cuda = not args.tiny
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=args.nproc)
    mesh = init_device_mesh("cuda" if cuda else "cpu", (args.nproc,))
    r, targets = LORA_PRESETS[args.lora]
    model = build_model(args.arch, args.seq, r, targets, dtype="float32" if args.tiny else "bfloat16",
                        device=f"cuda:{rank}" if cuda else "cpu")
    layers = decoder_layers(model)
    if args.worker == "dense":
        # one backend callable for every layer: Dynamo then reuses one graph (a new callable per layer
        # would recompile each layer and, past recompile_limit, leave the rest uncompiled)
        backend = lookup_backend("aot_eager" if args.tiny else "inductor")
        for layer in layers:
            layer.compile(backend=backend)
    else:
        compile_layers(model, lemo_config(args.worker, args.tiny))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    chunks = text_chunks(args.seq, args.steps * args.nproc)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    losses, times = [], []
    for step in range(args.steps):
        if step == args.warmup + 1 and cuda:
            torch.cuda.reset_peak_memory_stats()
        ids = torch.tensor([chunks[step * args.nproc + rank]], device=f"cuda:{rank}" if cuda else "cpu")
        sync()
        t0 = time.perf_counter()
        out = model(input_ids=ids[:, :-1], labels=ids[:, 1:].clone())
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)
        loss = out.loss.detach().float().clone()
        dist.all_reduce(loss)
        losses.append(loss.item() / args.nproc)
    mem = torch.tensor([torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()] if cuda else [0, 0],
                       dtype=torch.float64, device=f"cuda:{rank}" if cuda else "cpu")
    per_rank = [torch.zeros_like(mem) for _ in range(args.nproc)]
    dist.all_gather(per_rank, mem)
    step_t = torch.tensor(times, dtype=torch.float64, device=mem.device)
    dist.all_reduce(step_t, op=dist.ReduceOp.MAX)  # a step ends when the slowest rank ends
    if rank == 0:
        import lemo_compile

        recs = [rec for rec in lemo_compile.records() if rec.detect and rec.detect.layers]
        res = {"variant": args.worker, "losses": losses, "step_times_s": step_t.tolist(),
               "median_step_s": statistics.median(step_t.tolist()[args.warmup + 1:]),
               "first_step_s": step_t[0].item(),
               "peak_alloc_gb": [m[0].item() / 1e9 for m in per_rank],
               "peak_reserved_gb": [m[1].item() / 1e9 for m in per_rank],
               "dynamo_graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"],
               "lemo_graphs": [{"layer": rec.config.layer_index, **dict(rec.sparsify.counters)} for rec in recs]}
        with open(result_path, "w") as f:
            json.dump(res, f)
    dist.destroy_process_group()


def worker(args) -> dict:
    import torch.multiprocessing as mp

    with socket.socket() as s:  # a free port for this variant's process group
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "result.json")
        mp.spawn(rank_main, args=(args, path), nprocs=args.nproc)
        with open(path) as f:
            return json.load(f)


def summarize(args, results: list[dict]) -> tuple[dict, list[str], list[str]]:
    """Headline figures, parity lines and what kept figures from being written."""
    by = {r["variant"]: r for r in results if "error" not in r}
    figs, missing, lines = {}, [], []
    for r in results:
        if "error" in r:
            lines.append(f"{r['variant']:>10}: {r['error']}")
            continue
        lines.append(f"{r['variant']:>10}: median step {r['median_step_s']:.3f} s, first step {r['first_step_s']:.1f} s, "
                     f"peak allocated per GPU {max(r['peak_alloc_gb']):.2f} GB, "
                     f"loss {r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}")
    if "dense" in by and "lemo_keep1" in by:
        gap = max(abs(a - b) for a, b in zip(by["dense"]["losses"], by["lemo_keep1"]["losses"]))
        lines.append(f"parity (lemo keep 1.0 vs dense): largest loss difference over {args.steps} steps {gap:.2e}")
    if "dense" not in by or "lemo" not in by:
        missing.append("fsdp2_*_ratio_2gpu: needs the dense and lemo variants")
    elif args.tiny or args.nproc != 2 or args.arch != "llama-1b" or args.seq != 16384:
        missing.append("fsdp2_*_ratio_2gpu: defined for llama-1b, 16K, 2 GPUs")
    else:
        d, m = by["dense"], by["lemo"]
        common = {"source": args.out_rel, "command": args.command, "when": time.strftime("%Y-%m-%d"),
                  "versus": "FSDP2 dense, per-layer Inductor"}
        figs["fsdp2_peak_ratio_2gpu"] = {"value": max(m["peak_alloc_gb"]) / max(d["peak_alloc_gb"]), **common}
        figs["fsdp2_step_ratio_2gpu"] = {"value": m["median_step_s"] / d["median_step_s"], **common}
    return figs, missing, lines


def plot(results: list[dict], path: str, title: str) -> bool:
    return plot_losses({r["variant"]: r["losses"] for r in results if "error" not in r}, path, title,
                       "training loss (mean over ranks)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="llama-1b")
    ap.add_argument("--seq", type=int, default=16384)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps after the first (compiling) one")
    ap.add_argument("--nproc", type=int, default=2, help="processes: one per GPU")
    ap.add_argument("--lora", default="r8-qkvo", choices=sorted(LORA_PRESETS))
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--tiny", action="store_true", help="CPU, gloo, tiny-llama: every code path, no real numbers")
    ap.add_argument("--timeout", type=int, default=500, help="seconds per variant")
    ap.add_argument("--out", default=None)
    ap.add_argument("--plot", default=None, help="PNG of the loss curves (default: next to --out)")
    ap.add_argument("--headline", default=None)
    ap.add_argument("--worker", default=None)
    args = ap.parse_args()
    if args.tiny:
        args.arch, args.seq = "tiny-llama", min(args.seq, 256)
        args.steps = min(args.steps, 4)
        args.warmup = min(args.warmup, 1)
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    if args.steps < args.warmup + 2:
        ap.error("--steps must exceed --warmup by at least 2 (compile step + a timed step)")
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        ap.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    args.command = "python benchmarks/fsdp2.py " + " ".join(sys.argv[1:])
    args.out_rel = os.path.join("benchmarks", "results", os.path.basename(args.out)) if args.out else None
    extra = sys.argv[1:]  # the worker parses the same options (and ignores --variants, --out, --headline)
    results = []
    for v in variants:
        print(f"variant {v} ...", flush=True)
        results.append(run_variant_subprocess(os.path.abspath(__file__), v, extra, args.timeout))
        if "error" in results[-1]:
            print(results[-1].get("log_tail", ""), flush=True)
    figs, missing, lines = summarize(args, results)
    print("\n".join(lines), flush=True)
    doc = {"command": args.command, "environment": environment(), "arch": args.arch, "seq": args.seq,
           "nproc": args.nproc, "lora": args.lora, "steps": args.steps, "warmup": args.warmup, "lr": args.lr,
           "results": results, "summary": lines}
    if args.out:
        png = args.plot or os.path.splitext(args.out)[0] + ".png"
        if plot(results, png, f"FSDP2, {args.nproc} ranks, {args.arch}, {args.seq} tokens per rank"):
            doc["plot"] = os.path.basename(png)
    publish_figures(doc, figs, missing, args.out, args.headline, args.tiny)


if __name__ == "__main__":
    main()
