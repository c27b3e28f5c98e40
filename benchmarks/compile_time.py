"""Compile time of a lemo training step (issue 28): cold, warm, and the recompiles of a loop whose length varies.

Each run is a fresh process (the only honest way to time a cold start):
    cold     an empty compile cache (TORCHINDUCTOR_CACHE_DIR in a new temporary folder)
    warm     a second process on the cache the cold run filled (Inductor's FX graph cache and AOT
             autograd's cache; lemo's Dynamo-level passes still run)
    varying  one process, 8 steps over lengths 1K..64K (tiny: 64..640 tokens x 8), counting Dynamo graphs
    regional as cold (its own empty cache), with LemoConfig(regional=True): layers of one kind share one
             compiled body (passes.regions); its median step against cold's is regional_step_ratio_8b_8k
compile_s = first step - median of the later steps at the first length (the steps themselves: forward,
backward, AdamW on the LoRA parameters). Default config (logits="drop"), LoRA r=8 q/k/v/o, HF
checkpointing (regional compilation shares checkpointed layers only).

Figures (GPU, llama-8b, 8K): compile_seconds_8b_cold (<= 30), compile_seconds_8b_warm (<= 10),
recompiles_varying_length_loop (graphs compiled after the first, <= 1), compile_seconds_8b_cold_regional
and regional_step_ratio_8b_8k (<= 1.02). Peak allocated memory per mode is recorded (GPU).

    python3 benchmarks/compile_time.py --arch llama-8b --seq 8192 --out $OUT/compile_time_8b.json \\
        --headline $OUT/headline.json                      # GPU, ~10 min (cold + warm + varying)
    python benchmarks/compile_time.py --tiny --out /tmp/compile_time_tiny.json   # CPU, ~3 min
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import LORA_PRESETS, build_model, environment, publish_figures  # noqa: E402
from benchmarks.peak_cut_bench import _sync  # noqa: E402

TARGETS = {"compile_seconds_8b_cold": "<= 30", "compile_seconds_8b_warm": "<= 10",
           "recompiles_varying_length_loop": "<= 1", "compile_seconds_8b_cold_regional": "<= 30",
           "regional_step_ratio_8b_8k": "<= 1.02"}


def _model(args, dev: str):
    import torch

    if args.tiny:
        from lemo_compile.testing.models import tiny_model
        model = tiny_model("llama", lora=True).train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.get_base_model().disable_input_require_grads()  # as on the GPU: one graph, no hook break
        return model
    r, targets = LORA_PRESETS["r8-qkvo"]
    model = build_model(args.arch, max(args.seq, 65536), r, targets, device=dev)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.get_base_model().disable_input_require_grads()
    torch.manual_seed(0)
    return model


class _CacheLog:
    """Why Inductor's FX graph cache or AOT autograd's cache refused or failed on a graph: the reasons
    their loggers give (at INFO; they never reach a counter), collected while the worker runs."""

    LOGGERS = ("torch._inductor.codecache", "torch._functorch._aot_autograd.autograd_cache")
    KEYS = ("Bypassing", "unable to", "Failed to pickle")

    def __init__(self):
        import logging

        self.reasons: list[str] = []
        outer = self

        class _Handler(logging.Handler):
            def emit(self, record):
                msg = record.getMessage()
                if any(k in msg for k in outer.KEYS):
                    if record.exc_info and record.exc_info[1] is not None:
                        msg += f": {type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
                    if msg[:500] not in outer.reasons:
                        outer.reasons.append(msg[:500])

        self.handler = _Handler(logging.INFO)
        for name in self.LOGGERS:
            logger = logging.getLogger(name)
            logger.addHandler(self.handler)
            if not logger.isEnabledFor(logging.INFO):
                logger.setLevel(logging.INFO)


def _compile_phases(top: int = 30) -> dict:
    """Seconds per timed compile phase of this process (Dynamo's dynamo_timed regions: tracing, AOT
    autograd, partitioning, Inductor lowering, code generation, waiting for kernel compiles), summed
    over calls, the `top` largest. Nested: a phase's time includes the phases inside it."""
    from torch._dynamo.utils import compilation_time_metrics

    sums = {name: round(sum(times), 2) for name, times in compilation_time_metrics.items() if times}
    return dict(sorted(sums.items(), key=lambda kv: -kv[1])[:top])


def worker(args) -> dict:
    import torch
    from torch._dynamo.utils import counters

    import lemo_compile

    cache_log = _CacheLog()

    dev = "cpu" if args.tiny else "cuda"
    if args.tiny:
        torch.set_num_threads(1)
    model = _model(args, dev)
    cfg = lemo_compile.LemoConfig(logits="drop", regional=args.worker == "regional",
                                  **({"inner": "inductor", "dense_layers": (0,)} if args.tiny else {}))
    step_model = torch.compile(model, backend=lemo_compile.backend(cfg))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    vocab = model.config.vocab_size
    lengths = ([args.seq] * (args.steps + 1) if args.worker != "varying"
               else [1024 * k for k in (1, 2, 3, 5, 8, 13, 21, 64)])
    if args.tiny and args.worker == "varying":
        lengths = [64 * k for k in (3, 4, 5, 6, 7, 8, 9, 10)]  # >= 3 blocks: 1-2 blocks specialize
    times = []
    for n in lengths:
        ids = torch.randint(0, vocab, (1, n), device=dev)
        _sync(dev)
        t0 = time.perf_counter()
        loss = step_model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(dev)
        times.append(time.perf_counter() - t0)
        print("STEP " + json.dumps({"length": n, "seconds": times[-1], "graphs": int(counters["stats"].get("unique_graphs", 0)),
                                    "lemo_records": len(lemo_compile.records()),
                                    # a timed-out worker keeps these lines: the reason must be in them
                                    "recompile_reason": _last_recompile_reason(lemo_compile.records())}),
              file=sys.stderr, flush=True)
    recs = lemo_compile.records()
    res = {"mode": args.worker, "lengths": lengths, "step_times_s": times, "first_step_s": times[0],
           "aot_autograd": dict(counters["aot_autograd"]),
           "fxgraph": {k: v for k, v in counters["inductor"].items() if k.startswith("fxgraph")},
           "cache_reasons": cache_log.reasons,
           "graphs": int(counters["stats"].get("unique_graphs", 0)),
           "lemo_records": len(recs), "recompile_reasons": [r.recompile_reason for r in recs if r.recompile_reason],
           "metadata_skipped": [r.metadata_skipped for r in recs if getattr(r, "metadata_skipped", None)],
           "attention_paths": [getattr(r, "attention_path", None) for r in recs],
           "sparse_layers": sum(len(r.sparsify.layers) for r in recs if r.sparsify is not None),
           "shared_layers": sum(r.regions.layers_shared for r in recs if getattr(r, "regions", None) is not None),
           "peak_allocated_gb": torch.cuda.max_memory_allocated() / 1e9 if dev == "cuda" else None,
           "compile_phases_s": _compile_phases()}
    if args.worker != "varying":
        res["median_step_s"] = statistics.median(times[1:])
        res["compile_s"] = times[0] - res["median_step_s"]
    return res


def _last_recompile_reason(recs) -> str | None:
    return next((r.recompile_reason for r in reversed(recs) if r.recompile_reason), None)


def _run(mode: str, args, cache: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", mode, "--arch", args.arch, "--seq", str(args.seq),
           "--steps", str(args.steps)] + (["--tiny"] if args.tiny else [])
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True")
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
        out, err, why = p.stdout, p.stderr, f"exit {p.returncode}"
    except subprocess.TimeoutExpired as e:  # keep what the steps that finished printed
        out, err, why = _text(e.stdout), _text(e.stderr), f"timed out after {args.timeout} s"
    for line in reversed(out.splitlines()):
        if line.startswith("RESULT "):
            return {**json.loads(line[7:]), "process_s": time.perf_counter() - t0}
    steps = [json.loads(line[5:]) for line in err.splitlines() if line.startswith("STEP ")]
    return {"mode": mode, "error": why, "steps_done": steps, "process_s": time.perf_counter() - t0,
            "log_tail": (out + err)[-3000:]}


def _text(b) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def figures(doc: dict, src: str | None) -> tuple[dict, list[str]]:
    if doc["config"]["tiny"]:
        return {}, ["compile figures: only from GPU runs"]
    rows = {r["mode"]: r for r in doc["results"]}
    figs, missing = {}, []
    base = {"source": src, "command": doc["command"], "when": doc["env"]["when"][:10], "arch": doc["config"]["arch"],
            "seq": doc["config"]["seq"]}
    # the recompile count of the varying loop does not depend on the model's size: any GPU arch (at 8B its
    # two compiles, static then dynamic, ran past 520 s)
    r = rows.get("varying", {})
    if "graphs" in r and "error" not in r:
        figs["recompiles_varying_length_loop"] = {"value": r["graphs"] - 1, "target": TARGETS["recompiles_varying_length_loop"],
                                                  "lengths": r["lengths"], "reasons": r["recompile_reasons"],
                                                  "step_times_s": r["step_times_s"], **base}
    else:
        missing.append(f"recompiles_varying_length_loop: {r.get('error', 'not run')}")
    if doc["config"]["arch"] != "llama-8b" or doc["config"]["seq"] != 8192:
        return figs, missing + ["compile seconds and the regional ratio: only from llama-8b at 8192 tokens"]
    for mode, name in (("cold", "compile_seconds_8b_cold"), ("warm", "compile_seconds_8b_warm"),
                       ("regional", "compile_seconds_8b_cold_regional")):
        r = rows.get(mode, {})
        if r.get("compile_s") is None:
            missing.append(f"{name}: {r.get('error', 'not run')}")
            continue
        figs[name] = {"value": r["compile_s"], "target": TARGETS[name], "first_step_s": r["first_step_s"],
                      "median_step_s": r["median_step_s"], "aot_autograd": r["aot_autograd"],
                      "fxgraph": r.get("fxgraph"), "cache_reasons": r.get("cache_reasons"),
                      "peak_allocated_gb": r.get("peak_allocated_gb"), **base}
    cold, reg = rows.get("cold", {}), rows.get("regional", {})
    if cold.get("median_step_s") and reg.get("median_step_s"):
        figs["regional_step_ratio_8b_8k"] = {"value": reg["median_step_s"] / cold["median_step_s"],
                                             "target": TARGETS["regional_step_ratio_8b_8k"],
                                             "median_step_s": {"whole": cold["median_step_s"], "regional": reg["median_step_s"]},
                                             "peak_allocated_gb": {"whole": cold.get("peak_allocated_gb"),
                                                                   "regional": reg.get("peak_allocated_gb")},
                                             "shared_layers": reg.get("shared_layers"), **base}
    else:
        missing.append("regional_step_ratio_8b_8k: cold and regional not both measured")
    return figs, missing


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="llama-8b")
    ap.add_argument("--seq", type=int, default=None, help="length of the cold/warm runs (default 8192; tiny 256)")
    ap.add_argument("--steps", type=int, default=4, help="steps after the first (cold/warm)")
    ap.add_argument("--modes", default="cold,warm,varying")
    ap.add_argument("--timeout", type=int, default=580)
    ap.add_argument("--tiny", action="store_true", help="tiny Llama on CPU (Inductor): every code path")
    ap.add_argument("--out", default=None)
    ap.add_argument("--headline", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.seq = args.seq or (256 if args.tiny else 8192)
    modes = args.modes.split(",")
    if "warm" in modes and ("cold" not in modes or modes.index("cold") > modes.index("warm")):
        # the cache is this invocation's own temporary directory: without a cold run before it, "warm"
        # would compile from nothing and report a cold time as the warm one
        ap.error("--modes warm needs cold before it in the same invocation (e.g. --modes cold,warm)")
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    results = []
    doc = {"benchmark": "compile_time", "command": "python " + " ".join(sys.argv), "env": environment(),
           "config": {"arch": args.arch, "seq": args.seq, "steps": args.steps, "tiny": args.tiny}, "results": results}
    with tempfile.TemporaryDirectory() as cache:
        for mode in modes:
            results.append(_run(mode, args, cache if mode in ("cold", "warm") else tempfile.mkdtemp()))
            r = results[-1]
            print(f"{mode}: " + json.dumps({k: r.get(k) for k in ("first_step_s", "compile_s", "graphs", "aot_autograd",
                                                                 "error", "steps_done")}), flush=True)
            if args.out:  # what finished so far survives a kill of the whole run
                with open(args.out, "w") as f:
                    json.dump(doc, f, indent=1)
    figs, missing = figures(doc, args.out and os.path.join("benchmarks/results", os.path.basename(args.out)))
    publish_figures(doc, figs, missing, args.out, args.headline, args.tiny)


if __name__ == "__main__":
    main()
