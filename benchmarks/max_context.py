"""Longest context (batch 1) for which one LoRA training step fits on the GPU, per variant, measured by probing;
and, for lemo, what the static memory estimate predicted before any long run.

A probe = one training step (forward + backward + AdamW on the LoRA parameters; random weights and tokens,
labels = input ids, bf16) at one length, in a fresh subprocess (an out-of-memory error poisons the
allocator). It succeeds when the step completes; it fails on out of memory, on any other error, or when it
runs past the per-probe timeout (recorded as such: a length bounded by time, not memory). Search per
variant: start at --start (16384), multiply by --growth (2) until a probe fails, then bisect between the
longest success and the shortest failure until they are --resolution (2048) tokens apart; lengths are
multiples of 64. The result is the longest success. Variants run round-robin, one probe at a time, the order
reversed every round, so a limited budget advances all of them:

    dense_ckpt            HF eager (SDPA) + non-reentrant gradient checkpointing
    lemo_ckpt             lemo, default config with logits="drop" and attn_mode="tokens", + checkpointing
                          (Inductor inner)
    dense_ckpt_liger      dense_ckpt + Liger fused linear cross entropy only, before the model is built
                          (apply_liger_kernel_to_llama(rope=False, rms_norm=False, swiglu=False,
                          cross_entropy=False, fused_linear_cross_entropy=True)), eager
    lemo_ckpt_loss_only   lemo with every decoder layer dense (only the segmented loss, logits="drop"),
                          + checkpointing: lemo's own "dense + checkpointing + chunked loss"
    lemo_ckpt_mlpseg      lemo_ckpt with LemoConfig(segment_mlp=True): MLPs in row segments (opt-in)
    lemo_ckpt_fwd_exact   lemo_ckpt in the default modes (attn_mode and mlp_mode "backward": exact forward)
    lemo_ckpt_long        lemo_ckpt_mlpseg with only layers 0, 1 and the last dense (29 of 32 sparse at 8B):
                          less saved input and less attention per token; its fidelity cost is measured
                          on SmolLM2 (BENCHMARKS.md "Longest context"), not at 8B (opt-in)

Model: benchmarks.common.build_model(--arch llama-8b, seq, r=8, q/k/v/o). Checkpointed models drop the
embedding requires_grad_ hook transformers adds (only reentrant checkpointing needs it; it breaks the
compiled graph), as benchmarks/peak_cut_bench.py and benchmarks/finetune.py do.

Prediction (lemo variants, one extra subprocess each, run before their first probe): the same variant is
compiled once at --predict-len (4096) tokens with a dynamic sequence length (torch._dynamo.mark_dynamic on
the input ids, which are also the labels), one step is run, and the estimate with the largest peak is taken
(max(r.memory for r in lemo_compile.records() if r.memory, key=peak_hint)). Then
    predicted_max_tokens = est.max_length(total - resident_outside, seq_symbol)
with total = torch.cuda.get_device_properties(0).total_memory and resident_outside = memory allocated
before a step (after one step at --predict-len: parameters, AdamW state, the input ids; gradients are
None between steps) minus the estimate's own `inputs_bytes` (at --predict-len). The choice: the estimate
already counts its graph inputs, which are the parameters (16.1 GB of the 16.2 GB allocated at 8B) and
the ids; subtracting all allocated memory would count the parameters twice. So resident_outside is what
the graph does not see: essentially the AdamW state of the LoRA parameters. Also recorded as
alternatives: the budget with everything allocated subtracted (parameters twice) and the budget without
the memory outside PyTorch's allocator (CUDA context: total - free - reserved). Caveat: under a dynamic
length lemo's passes.causal leaves HF's n x n attention mask in place (it only rewrites static lengths),
so the dynamic estimate carries that quadratic term while the static probes (with the causal rewrite) do
not: the prediction is then pessimistic; `peak_formula` in the JSON shows the terms. Every lemo probe also
records the static estimate of its own length against its measured peak (estimate_error); that peak is
max_memory_allocated over the first (compiling) step, so it also holds what compiling allocates on the GPU.

--predict-static L1,L2 replaces the dynamic compile: the variant is compiled and stepped at two short
static lengths (as every probe is compiled, so passes.causal removes HF's mask there too), the largest
estimated peak of each is taken, and peak(n) = peak(L1) + slope * (n - L1) is inverted at the same
budget. Linear terms only: right when the static graphs have no quadratic term (flash attention, no
mask), which the probes' own `sdpa_made_causal` shows.

Figures (--headline PATH; a figure only once the variants it needs have finished their search):
    max_context_tokens_8b                 lemo's result                           (goal 1,000,000)
    max_context_ratio_vs_ckpt_8b          lemo / dense_ckpt                        (target >= 4)
    max_context_ratio_vs_ckpt_chunked_8b  lemo / max(dense_ckpt_liger, lemo_ckpt_loss_only)  (>= 2; of
                                          those finished, the others named in baselines_not_measured)
    max_context_prediction_error          |predicted - measured| / measured, lemo_ckpt  (<= 0.15)
    max_context_prediction_error_loss_only   the same for lemo_ckpt_loss_only
where "lemo" is the longest of the lemo + checkpointing variants that finished their search (lemo_ckpt and
any opt-in one searched; the figure names it and lists each one's result under lemo_variants).
(other --arch: the suffix becomes the arch's, e.g. _1b, _qwen2_7b.)

GPU commands (1x H200, no network; carry=[".whl"]). A call may run 600 s at most: --budget 540 stops
starting probes that would not finish (they are listed under "not_probed"), --timeout 520 bounds one probe,
--resume continues the search from an earlier JSON (put the returned JSON back at benchmarks/results/
between calls; `--resume` of a missing file starts afresh):

    python3 -m pip install --no-deps --no-build-isolation -e . -q
    python3 -m pip install --no-deps --no-index .whl/liger_kernel-*.whl -q
    python3 benchmarks/max_context.py --variants dense_ckpt,dense_ckpt_liger \
        --resume benchmarks/results/max_context_8b.json --out $OUT/max_context_8b.json \
        --headline $OUT/headline.json --budget 540 --timeout 520
    python3 benchmarks/max_context.py --variants lemo_ckpt,lemo_ckpt_loss_only \
        --starts lemo_ckpt=131072,lemo_ckpt_loss_only=65536 \
        --resume benchmarks/results/max_context_8b.json --out $OUT/max_context_8b.json \
        --headline $OUT/headline.json --budget 540 --timeout 520

Two GPUs: run one search per GPU at the same time (CUDA_VISIBLE_DEVICES=0 / =1, each its own --out),
then combine them without probing: `--resume a.json,b.json --merge-only --out ... --headline ...` (with
the same --resolution and --max-len as the searches; a variant capped by --max-len is reported as
bounded by it, a lower bound).

Repeat each until it prints "search complete for every variant" (the two commands share one JSON; the
headline figures come out of whichever call completes the last variant they need). Expected cost on an H200
(torch 2.11): an eager probe 40-60 s plus its step (8B with checkpointing: ~6 s at 32K, ~1 min at 128K,
~3-4 min at 256K: attention is quadratic); a compiled (lemo) probe 150-200 s more for the compile; a
prediction 4-6 min (the compile, then evaluating the symbolic estimate: ~1 s per evaluation at 8B, ~100
evaluations; --predict-extras-s bounds the optional part). dense_ckpt needs ~7 probes (16K..64K, then
bisection), the others ~8-12 each. With the default resolution (2048) the whole benchmark is roughly 2 hours
of device time, 15-20 calls; --resolution 8192 saves 2 probes per variant, --starts near the expected
result saves the doubling. Lengths whose single step takes longer than --timeout (8B: beyond roughly
300-400K tokens) end as "timeout": the result is then bounded by time and says so (bounded_by).

Where lemo may fail first at long lengths: passes.causal evaluates HF's n x n mask once while compiling, on
the GPU (n^2 bytes and more: 69 GB at 256K), to prove it causal; a failed probe's traceback_tail shows
whether the compile (that evaluation) or the step ran out of memory.

On CPU (every code path; tiny Llama: hidden 64, 4 layers, vocab 512; lemo with inner="eager"; Liger only
with its unpacked wheel on PYTHONPATH and TRITON_INTERPRET=1, else a recorded setup error; a probe
"fails" when seq > --tiny-capacity, 2048, by raising torch.OutOfMemoryError inside the step; the prediction
then uses a fake device memory = the estimate at --tiny-capacity plus resident_outside, so it should come
out at ~2048). About 10 minutes on 2 cores:

    python benchmarks/max_context.py --tiny --out /tmp/max_context_tiny.json --headline /tmp/headline_tiny.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import ARCHS, environment, publish_figures, run_variant_subprocess  # noqa: E402
from benchmarks.finetune import (failure_record, lemo_records_summary, make_step, prepare_worker,  # noqa: E402
                                 step_guess_s)
from benchmarks.peak_cut_bench import _failure, _lemo_report, _sync  # noqa: E402

GB = 1e9
LORA = "r8-qkvo"  # benchmarks.common.LORA_PRESETS: r=8, alpha 16, q/k/v/o

VARIANTS: dict[str, dict] = {  # same spec format as benchmarks/finetune.py
    "dense_ckpt": dict(ckpt=True),
    # attn_mode "tokens": the default until the fidelity table moved it to "backward"; the committed
    # searches (311,296 tokens) were measured with it
    "lemo_ckpt": dict(ckpt=True, compile="lemo", lemo=dict(logits="drop", attn_mode="tokens")),
    "dense_ckpt_liger": dict(ckpt=True, liger=True),
    "lemo_ckpt_loss_only": dict(ckpt=True, compile="lemo", lemo=dict(logits="drop", dense_layers="all")),
    # MLP segments of 128 MiB (256 rows at 8B with LoRA: up to ~0.9 GB less peak than the 1 GiB default, slower): the
    # budget the committed searches ran with, before mlp_segment_bytes had its own default
    "lemo_ckpt_mlpseg": dict(ckpt=True, compile="lemo",
                             lemo=dict(logits="drop", attn_mode="tokens", segment_mlp=True, mlp_segment_bytes=1 << 27)),
    "lemo_ckpt_fwd_exact": dict(ckpt=True, compile="lemo", lemo=dict(logits="drop")),
    # the default modes with activation offload to host memory (LemoConfig.offload; opt-in)
    "lemo_ckpt_fwd_exact_offload": dict(ckpt=True, compile="lemo", lemo=dict(logits="drop", offload=True)),
    # the longest-context schedule: every layer sparse but 0, 1 and the last, MLPs segmented (opt-in)
    "lemo_ckpt_long": dict(ckpt=True, compile="lemo",
                           lemo=dict(logits="drop", attn_mode="tokens", segment_mlp=True, dense_layers="edges",
                                     mlp_segment_bytes=1 << 27)),
}
LEMO = tuple(v for v, s in VARIANTS.items() if s.get("compile") == "lemo")
OPT_IN = ("lemo_ckpt_mlpseg", "lemo_ckpt_fwd_exact", "lemo_ckpt_long", "lemo_ckpt_fwd_exact_offload")  # only when named
DEFAULT_CONFIG = ("lemo_ckpt_fwd_exact", "lemo_ckpt_fwd_exact_offload")  # max_context_tokens_<arch>_default

TARGETS = {
    "max_context_tokens": ">= 1000000 (goal)",
    "max_context_tokens_default": ">= 1500000 (goal)",
    "max_context_ratio_vs_ckpt": ">= 4",
    "max_context_ratio_vs_ckpt_chunked": ">= 2",
    "max_context_prediction_error": "<= 0.15",
}
CURVE = (4096, 16384, 32768, 65536, 131072, 262144, 524288, 1048576)  # lengths the prediction evaluates at


# --------------------------------------------------------------------------------------------------
# worker
# --------------------------------------------------------------------------------------------------


def _tensor_bytes(*tensors) -> int:
    """Bytes of distinct storages (CPU stand-in for memory_allocated in --tiny)."""
    seen, total = set(), 0
    for t in tensors:
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


def _resident_tensors(model, opt, ids) -> list:
    out = list(model.parameters()) + list(model.buffers()) + [ids]
    for st in opt.state.values():
        out += [v for v in st.values() if hasattr(v, "untyped_storage")]
    return out


def _eval(expr, hints: dict) -> int:
    import sympy
    if isinstance(expr, sympy.Expr):
        return int(expr.subs({s: hints[s.name] for s in expr.free_symbols if s.name in hints}))
    return int(expr)


def _max_len(est, budget: int, seq_syms: list[str]) -> int:
    """est.max_length for one sequence symbol; with several (ids and labels specialised apart), the same
    binary search with all of them set to the length."""
    if len(seq_syms) == 1:
        return est.max_length(budget, seq_syms[0])

    def peak(n):
        return est.at(**{s: n for s in seq_syms})
    if peak(1) > budget:
        return 0
    lo, hi = 1, 2
    while peak(hi) <= budget:
        lo, hi = hi, hi * 2
        if hi > 2 ** 40:
            raise ValueError("the estimate does not grow with the length")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if peak(mid) <= budget else (lo, mid)
    return lo


def worker(args) -> dict:
    import torch
    torch.manual_seed(0)
    dev = "cpu" if args.tiny else "cuda"
    if args.tiny:
        torch.set_num_threads(1)  # tiny ops: threads only contend
    variant, predict = args.worker, args.mode == "predict"
    res: dict = {"variant": variant, "mode": args.mode, "seq": args.seq, "arch": args.arch, "device": dev}
    spec = VARIANTS[variant]
    phase = "setup"
    try:
        built = prepare_worker(args, spec, LORA, res)
        if built is None:
            return res
        model, step_model, patch_ctx, ids = built
        static_lens = [int(n) for n in args.predict_static.split(",")] if predict and args.predict_static else []
        if predict and not static_lens:
            torch._dynamo.mark_dynamic(ids, 1)  # also the labels: the same tensor
        step = make_step(model, step_model, ids)
        if args.tiny and not predict and args.seq > args.tiny_capacity:
            real_step = step

            def step():  # the tiny stand-in for a device that is too small
                raise torch.OutOfMemoryError(f"--tiny: {args.seq} tokens > --tiny-capacity {args.tiny_capacity} "
                                             "(simulated out of memory)")
            step.optimizer = real_step.optimizer
        gc.collect()
        if dev == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            res["allocated_before_gb"] = torch.cuda.memory_allocated() / GB
        phase = "step"
        t0 = time.perf_counter()
        loss = step()
        _sync(dev)
        res["step_s"] = time.perf_counter() - t0  # includes the compile for compiled variants
        res["loss"] = float(loss)
        if dev == "cuda":
            res["peak_allocated_gb"] = torch.cuda.max_memory_allocated() / GB
            res["peak_reserved_gb"] = torch.cuda.max_memory_reserved() / GB
    except Exception as e:
        return failure_record(res, e, phase, spec, dev)
    res["ok"] = True
    if spec.get("compile") == "lemo":
        res.update(lemo_records_summary())
        if not predict:
            peak = res.get("peak_allocated_gb")
            res.update(_lemo_report(None if peak is None else int(peak * GB)))
    if predict:
        phase = "prediction"
        try:
            if static_lens:
                res.update(static_prediction(args, model, step_model, step, ids, static_lens, dev))
            else:
                res.update(prediction(args, model, step.optimizer, ids, dev))
            if "error" in res:  # the step ran, the prediction did not come out
                res.pop("ok", None)
                res["phase"] = phase
        except Exception as e:
            res.update({**_failure(e), "phase": phase})
            res.pop("ok", None)
    if patch_ctx is not None:
        patch_ctx.__exit__(None, None, None)
    return res


def _device_memory(model, opt, ids, dev: str) -> tuple[int, int | None, int]:
    """(allocated now, the device's total memory (None on --tiny), memory outside torch's allocator)."""
    import torch
    gc.collect()
    if dev == "cuda":
        torch.cuda.synchronize()
        free, _ = torch.cuda.mem_get_info()
        total = torch.cuda.get_device_properties(0).total_memory
        return torch.cuda.memory_allocated(), total, total - free - torch.cuda.memory_reserved()
    return _tensor_bytes(*_resident_tensors(model, opt, ids)), None, 0


def _largest_estimate():
    import lemo_compile
    ests = [r.memory for r in lemo_compile.records() if r.memory is not None]
    return (max(ests, key=lambda e: e.peak_hint) if ests else None), len(ests), len(lemo_compile.records())


def static_prediction(args, model, step_model, step, ids, lens: list[int], dev: str) -> dict:
    """--predict-static L1,L2: the longest context from the static estimates of two short lengths.

    The step at L1 has run (compiled for that length, as every probe is); the model is compiled again
    for L2 and stepped. Each compile's estimate (the graph with the largest peak) is a number; the two
    give peak(n) = peak(L1) + slope * (n - L1), exact for the terms linear in n (saved activations, the
    segmented loss, flash attention's buffers) and blind to anything quadratic (which the causal rewrite
    removes from static graphs). Budget as for the dynamic prediction: total memory minus what is
    resident outside the graph."""
    import torch
    from lemo_compile.backend import clear_records

    if len(lens) != 2 or lens[0] >= lens[1]:
        return {"error": f"--predict-static needs two increasing lengths, got {lens}"}
    est1, n_est, n_graphs = _largest_estimate()
    if est1 is None:
        return {"error": "no memory estimate was recorded at the first length"}
    seq_syms = [str(k) for k, v in est1.hints.items() if v == lens[0]]
    if seq_syms:  # other symbols (e.g. a kept-row count) are evaluated at their hints by peak_hint
        return {"error": f"the estimate at {lens[0]} is symbolic in the length ({seq_syms}): not a static compile"}
    allocated, total, outside_torch = _device_memory(model, step.optimizer, ids, dev)
    inputs = int(est1.inputs_bytes)
    peak1 = int(est1.peak_hint)
    clear_records()
    gen = torch.Generator(device=ids.device).manual_seed(1)
    ids2 = torch.randint(0, model.config.vocab_size, (1, lens[1]), device=ids.device, generator=gen)
    step2 = make_step(model, step_model, ids2)
    step2()
    _sync(dev)
    est2, _, _ = _largest_estimate()
    if est2 is None:
        return {"error": f"no memory estimate was recorded at {lens[1]}"}
    peak2 = int(est2.peak_hint)
    slope = (peak2 - peak1) / (lens[1] - lens[0])
    resident_outside = max(0, allocated - inputs)
    out = {"method": f"static estimates at {lens[0]} and {lens[1]}, linear in the length",
           "estimated_peak_gb_at": {str(lens[0]): peak1 / GB, str(lens[1]): peak2 / GB},
           "slope_bytes_per_token": slope, "estimated_graphs": n_est, "graphs": n_graphs,
           "allocated_before_step_gb": allocated / GB, "estimate_inputs_gb": inputs / GB,
           "resident_outside_gb": resident_outside / GB, "outside_torch_allocator_gb": outside_torch / GB}
    if slope <= 0:
        return {**out, "error": "the estimate does not grow with the length"}
    if total is None:  # --tiny: a fake device exactly as large as the fitted peak at the fake capacity
        total = int(peak1 + slope * (args.tiny_capacity - lens[0])) + resident_outside
        out["tiny_fake_total"] = True
    budget = total - resident_outside
    out.update(total_memory_gb=total / GB, budget_gb=budget / GB,
               predicted_max_tokens=int(lens[0] + (budget - peak1) // slope))
    out["alternative_predictions"] = {
        "budget_total_minus_all_allocated": int(lens[0] + (total - allocated - peak1) // slope),
        "budget_excluding_memory_outside_allocator": int(lens[0] + (budget - outside_torch - peak1) // slope)}
    return out


def prediction(args, model, opt, ids, dev: str) -> dict:
    """The static estimate's longest context (see the module docstring for the budget)."""
    import lemo_compile
    allocated, total, outside_torch = _device_memory(model, opt, ids, dev)
    ests = [r.memory for r in lemo_compile.records() if r.memory is not None]
    out: dict = {"estimated_graphs": len(ests), "graphs": len(lemo_compile.records())}
    if not ests:
        return {**out, "error": "no memory estimate was recorded"}
    est = max(ests, key=lambda e: e.peak_hint)
    syms = list(est.symbols)
    seq_syms = [s for s in syms if est.hints.get(s) == args.seq]
    out.update(symbols=syms, hints={k: int(v) for k, v in est.hints.items()}, seq_symbols=seq_syms,
               peak_graph=est.peak_graph, peak_node=est.peak_node, peak_formula=str(est.peak_bytes)[:3000],
               estimated_peak_gb_at_predict_len=est.peak_hint / GB)
    if not seq_syms:
        return {**out, "error": f"the estimate has no symbol with hint {args.seq} (symbols {syms}): the length "
                                "was specialised"}
    inputs = _eval(est.inputs_bytes, est.hints)
    resident_outside = max(0, allocated - inputs)
    if total is None:  # --tiny: a fake device exactly as large as the estimate at the fake capacity
        total = est.at(**{s: args.tiny_capacity for s in seq_syms}) + resident_outside
        out["tiny_fake_total"] = True
    budget = total - resident_outside
    out.update(allocated_before_step_gb=allocated / GB, estimate_inputs_gb=inputs / GB,
               params_gb=sum(p.numel() * p.element_size() for p in model.parameters()) / GB,
               resident_outside_gb=resident_outside / GB, total_memory_gb=total / GB,
               outside_torch_allocator_gb=outside_torch / GB, budget_gb=budget / GB)
    t0 = time.perf_counter()
    pred = out["predicted_max_tokens"] = _max_len(est, budget, seq_syms)
    out["max_length_s"] = time.perf_counter() - t0
    # Extras (alternative budgets, the curve) evaluate the formulas ~40 more times: about as long as the
    # max_length call took (~1 s an evaluation at 8B: floor divisions are substituted each time).
    if out["max_length_s"] > args.predict_extras_s:
        out["extras_skipped"] = f"max_length took {out['max_length_s']:.0f} s > --predict-extras-s"
        return out
    peak_at = _peak_fn(est, seq_syms)
    alts = {}
    for name, b in (("budget_total_minus_all_allocated", total - allocated),
                    ("budget_excluding_memory_outside_allocator", budget - outside_torch)):
        try:
            alts[name] = _longest_near(peak_at, b, pred)
        except Exception as e:
            alts[name] = f"{type(e).__name__}: {e}"
    out["alternative_predictions"] = alts
    out["estimate_curve_gb"] = {str(n): (peak_at(n) + resident_outside) / GB
                                for n in sorted(set(CURVE) | ({pred} if pred else set()))}
    out["prediction_s"] = time.perf_counter() - t0
    return out


def _peak_fn(est, seq_syms: list[str]):
    """n -> the estimate's peak at length n: the estimator's own fast evaluator (built once; what
    MemoryEstimate.max_length uses) when the length is one symbol, else MemoryEstimate.at."""
    if len(seq_syms) == 1:
        try:
            import sympy
            mod = sys.modules[type(est).__module__]
            name = seq_syms[0]
            return mod._max_evaluator(est.candidates, sympy.Symbol(name, integer=True, positive=True),
                                      est._subs({}, drop=name))
        except Exception:  # private helpers moved: the slow public path
            pass
    return lambda n: est.at(**{s: n for s in seq_syms})


def _longest_near(peak_at, budget: int, guess: int) -> int:
    """Largest n with peak_at(n) <= budget, searched from `guess` (a nearby answer): gallop, then bisect."""
    if peak_at(1) > budget:
        return 0
    lo = max(1, guess)
    step = 256
    if peak_at(lo) <= budget:
        hi = lo + step
        while peak_at(hi) <= budget:
            lo, step = hi, step * 2
            hi = lo + step
            if hi > 2 ** 40:
                raise ValueError("the estimate does not grow with the length")
    else:
        hi = lo
        lo = max(1, hi - step)
        while peak_at(lo) > budget:
            hi, step = lo, step * 2
            lo = max(1, hi - step)
    while hi - lo > 1:  # peak_at(lo) <= budget < peak_at(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if peak_at(mid) <= budget else (lo, mid)
    return lo


# --------------------------------------------------------------------------------------------------
# driver: search, budget, JSON, table, figures
# --------------------------------------------------------------------------------------------------


def status(r: dict) -> str:
    if r.get("ok"):
        return "ok"
    if r.get("oom"):
        return "oom"
    if "skipped" in r:
        return "skipped"
    if str(r.get("error", "")).startswith("timeout"):
        return "timeout"
    return "error"


def _final(r: dict, full_timeout: int) -> bool:
    """A probe a rerun would not change: success, out of memory, another error, or a timeout under the full
    per-probe timeout (one cut short by the budget is probed again)."""
    s = status(r)
    if s == "timeout":
        return r.get("timeout_s", 0) >= full_timeout
    return s != "skipped"


def _round64(n: float) -> int:
    return max(64, int(n) // 64 * 64)


def search_state(probes: list[dict], start: int, resolution: int, growth: float, max_len: int,
                 full_timeout: int) -> dict:
    """Where the search of one variant stands: longest success, shortest failure above it, next length."""
    final: dict[int, dict] = {}
    for r in probes:  # the latest final probe of each length
        if r.get("mode", "probe") == "probe" and _final(r, full_timeout):
            final[r["seq"]] = r
    ok = sorted(s for s, r in final.items() if status(r) == "ok")
    bad = sorted(s for s, r in final.items() if status(r) != "ok")
    lo = ok[-1] if ok else 0
    above = [s for s in bad if s > lo]
    hi = above[0] if above else None
    st = {"max_tokens": lo, "first_failure": hi, "probes": len(final), "done": False, "next": None,
          "non_monotonic": [s for s in bad if s < lo]}
    if hi is not None:
        st["first_failure_status"] = status(final[hi])
    if lo:
        best = final[lo]
        for k in ("peak_allocated_gb", "peak_reserved_gb", "estimated_peak_gb", "estimate_error", "step_s",
                  "host_offloaded_gb"):
            if best.get(k) is not None:
                st[f"{k}_at_max"] = best[k]
    broken = [s for s, r in final.items() if status(r) == "error" and (r.get("phase") == "setup" or "unavailable" in r)]
    # an error other than out of memory or a timeout with no success below it: the variant does not run
    # here (a compile error is no capacity limit), so shorter lengths would fail the same way
    failed = [s for s in bad if lo == 0 and status(final[s]) == "error"]
    if broken:  # the variant cannot run here at all (e.g. Liger not installed): no point in other lengths
        st.update(done=True, bounded_by="setup error", setup_error=str(final[broken[0]].get("error"))[:300])
    elif failed:
        st.update(done=True, bounded_by="error", setup_error=str(final[failed[0]].get("error"))[:300])
    elif hi is None:
        if lo == 0:
            st["next"] = _round64(start)
        elif lo >= max_len:
            st.update(done=True, bounded_by="max_len")
        else:
            st["next"] = min(max(_round64(lo * growth), lo + 64), _round64(max_len))
    elif hi - lo <= resolution:
        st.update(done=True, bounded_by=st["first_failure_status"])
    else:
        mid = _round64((lo + hi) / 2)
        st["next"] = mid if lo < mid < hi else lo + 64
    return st


def need_s(variant: str, arch: str, mode: str, seq: int, probes: list[dict], tiny: bool) -> float:
    """Seconds a probe needs: process start, build, compile (lemo: 150-200 s at 8B), then the step, scaled
    from the variant's longest successful probe when there is one, else from a rough H200 step model."""
    if tiny:
        return 30.0
    compiled = VARIANTS[variant].get("compile") is not None
    base = 40.0 + ((100.0 if arch == "llama-1b" else 180.0) if compiled else 0.0)
    if mode == "predict":  # + the estimate itself: max_length and the extras, about a minute each at 8B
        return base + 140.0
    done = [r for r in probes if r.get("mode", "probe") == "probe" and status(r) == "ok" and r.get("wall_s")]
    guess = step_guess_s(arch, seq, ckpt=True)
    if done:
        ref = max(done, key=lambda r: r["seq"])
        ref_step = max(ref["wall_s"] - base, 1.0)
        return base + ref_step * guess / step_guess_s(arch, ref["seq"], ckpt=True)
    return base + guess


def _f(v, fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def table(doc: dict) -> str:
    lines = ["| variant | max tokens (batch 1) | search | first failure | predicted (error) | peak GB at max | "
             "est. peak GB at max (error) | probes (tokens: outcome) |",
             "|---|---|---|---|---|---|---|---|"]
    for v in doc["config"]["variants"]:
        st = doc["search"].get(v, {})
        pr = doc["predictions"].get(v)
        pred = "–"
        if pr and pr.get("predicted_max_tokens") is not None:
            err = st.get("prediction_error")
            pred = f"{pr['predicted_max_tokens']}" + (f" ({err:.1%})" if err is not None else "")
        elif pr:
            pred = f"{status(pr)}: " + str(pr.get("error", ""))[:60].replace("|", "/")
        if st.get("done"):
            how = f"complete (±{doc['config']['resolution']}), bounded by {st.get('bounded_by')}"
            if st.get("setup_error"):
                how += ": " + st["setup_error"].splitlines()[0][:80].replace("|", "/")
        else:
            how = "incomplete" + (f", next {st['next']}" if st.get("next") else "")
        est = st.get("estimated_peak_gb_at_max")
        probes = sorted((r for r in doc["probes"] if r["variant"] == v), key=lambda r: r["seq"])
        plist = ", ".join(f"{r['seq']}: {status(r)}" + ("" if _final(r, doc["config"]["timeout_s"]) else " (cut short)")
                          for r in probes)
        ff = st.get("first_failure")
        lines.append("| {} | {} | {} | {} | {} | {} | {} | {} |".format(
            v, st.get("max_tokens", "–"), how, "–" if ff is None else f"{ff} ({st.get('first_failure_status')})",
            pred, _f(st.get("peak_allocated_gb_at_max"), ".1f"),
            "–" if est is None else f"{est:.1f} ({_f(st.get('estimate_error_at_max'), '.1%')})", plist or "–"))
    return "\n".join(lines)


def figures(doc: dict, src: str | None) -> tuple[dict, list[str]]:
    arch = doc["config"]["arch"]
    sfx = "8b" if arch in ("llama-8b", "tiny-llama") else arch.replace("llama-", "").replace("-", "_")
    when = doc["env"]["when"][:10]
    search, preds = doc["search"], doc["predictions"]
    figs, missing = {}, []

    def done(v):
        if search.get(v, {}).get("done"):
            return True
        missing.append(f"{v}: search {'incomplete' if v in search else 'not run'}")
        return False

    def fig(name, target_key, value, **extra):
        figs[name] = {"value": value, "target": TARGETS[target_key], "source": src, "command": doc["command"],
                      "when": when, "arch": arch, "resolution": doc["config"]["resolution"], **extra}
        if len(doc.get("commands", ())) > 1:
            figs[name]["commands"] = doc["commands"]

    def info(v):
        st = search[v]
        return {"tokens": st["max_tokens"], "bounded_by": st.get("bounded_by"),
                "first_failure": st.get("first_failure"), "step_s_at_max": st.get("step_s_at_max"),
                "host_offloaded_gb_at_max": st.get("host_offloaded_gb_at_max")}

    def capped(v):  # a search stopped at --max-len with every probe fitting: its length is a lower bound
        if search[v].get("bounded_by") != "max_len":
            return {}
        return {"note": f"lower bound: {v} fit at every length probed up to --max-len "
                        f"{doc['config']['max_len']}; no longer length was probed"}

    # lemo's figure: the longest context of the lemo + checkpointing variants that finished their search
    # (lemo_ckpt always needed; an opt-in schedule counts once searched), each one's result kept beside it
    ran = [v for v in LEMO if v != "lemo_ckpt_loss_only" and search.get(v, {}).get("done")]
    if done("lemo_ckpt"):
        best_lemo = max(ran, key=lambda v: search[v]["max_tokens"] or 0)
        lemo = search[best_lemo]["max_tokens"]
        each = {"variant": best_lemo, "lemo_variants": {v: info(v) for v in ran}}
        fig(f"max_context_tokens_{sfx}", "max_context_tokens", lemo, **each, **info(best_lemo),
            **capped(best_lemo))
        if done("dense_ckpt") and search["dense_ckpt"]["max_tokens"]:
            fig(f"max_context_ratio_vs_ckpt_{sfx}", "max_context_ratio_vs_ckpt",
                lemo / search["dense_ckpt"]["max_tokens"], **each, lemo=info(best_lemo),
                dense_ckpt=info("dense_ckpt"), **capped(best_lemo))
        # against the better of the chunked-loss baselines that finished; one not run is named, as the
        # ratio then holds against the measured one only
        chunked = [v for v in ("dense_ckpt_liger", "lemo_ckpt_loss_only") if search.get(v, {}).get("done")]
        best = max(chunked, key=lambda v: search[v]["max_tokens"]) if chunked else None
        if best and search[best]["max_tokens"]:
            extra = {v: info(v) for v in chunked}
            absent = [v for v in ("dense_ckpt_liger", "lemo_ckpt_loss_only") if v not in chunked]
            if absent:
                extra["baselines_not_measured"] = absent
            fig(f"max_context_ratio_vs_ckpt_chunked_{sfx}", "max_context_ratio_vs_ckpt_chunked",
                lemo / search[best]["max_tokens"], baseline=best, **each, lemo=info(best_lemo), **extra,
                **capped(best_lemo))
        else:
            missing.append("max_context_ratio_vs_ckpt_chunked: no chunked-loss baseline finished its search")
    # the default configuration's figure (forward-exact modes, with or without offload): whichever searched
    default = [v for v in DEFAULT_CONFIG if search.get(v, {}).get("done") and search[v]["max_tokens"]]
    if default:
        best = max(default, key=lambda v: search[v]["max_tokens"] or 0)
        fig(f"max_context_tokens_{sfx}_default", "max_context_tokens_default", search[best]["max_tokens"],
            variant=best, offload=best.endswith("_offload"), **info(best), **capped(best),
            searched={v: info(v) for v in default})
    else:
        missing.append(f"max_context_tokens_{sfx}_default: neither of {', '.join(DEFAULT_CONFIG)} finished its "
                       f"search with a successful step")
    for v, name in (("lemo_ckpt", "max_context_prediction_error"),
                    ("lemo_ckpt_loss_only", "max_context_prediction_error_loss_only")):
        name = name.replace("max_context_prediction_error", "max_context_prediction_error" +
                            ("" if sfx == "8b" else f"_{sfx}"))
        err = search.get(v, {}).get("prediction_error")
        if err is None:
            missing.append(f"{name}: {v} " + ("prediction missing" if v in search and search[v].get("done")
                                              else "search incomplete or prediction missing"))
            continue
        pr = preds[v]
        fig(name, "max_context_prediction_error", err, variant=v, predicted_max_tokens=pr["predicted_max_tokens"],
            measured_max_tokens=search[v]["max_tokens"], bounded_by=search[v].get("bounded_by"),
            predict_len=pr.get("seq"), resident_outside_gb=pr.get("resident_outside_gb"),
            budget_gb=pr.get("budget_gb"), alternative_predictions=pr.get("alternative_predictions"),
            method=pr.get("method", "dynamic-length compile at predict_len"),
            measure="|predicted - measured| / measured; predicted = static estimate (see method) inverted at "
                    "total memory - resident outside the graph")
    return figs, sorted(set(missing))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default=None, help="benchmarks.common.ARCHS name (llama-8b; tiny: tiny-llama)")
    ap.add_argument("--variants", default=None, help=f"comma-separated subset of {','.join(VARIANTS)}")
    ap.add_argument("--start", type=int, default=None, help="first length (16384; tiny: 256)")
    ap.add_argument("--starts", default="", help="per-variant first lengths, e.g. lemo_ckpt=131072,dense_ckpt=32768")
    ap.add_argument("--growth", type=float, default=2.0, help="factor between lengths before the first failure")
    ap.add_argument("--resolution", type=int, default=None, help="stop bisecting at this gap (2048; tiny: 128)")
    ap.add_argument("--max-len", type=int, default=None, help="never probe beyond this (4194304; tiny: 8192)")
    ap.add_argument("--predict-len", type=int, default=None, help="length of the dynamic compile for the "
                                                                  "prediction (4096; tiny: 256)")
    ap.add_argument("--no-predict", action="store_true", help="skip the lemo predictions")
    ap.add_argument("--predict-static", default=None, metavar="L1,L2",
                    help="predict from the static estimates of two short lengths (two compiles, linear fit) "
                         "instead of one dynamic-length compile")
    ap.add_argument("--predict-extras-s", type=float, default=120.0,
                    help="skip the alternative predictions and the curve when max_length took longer than this")
    ap.add_argument("--inner", default=None, help="lemo's inner compiler (inductor; tiny: eager)")
    ap.add_argument("--segment-bytes", type=int, default=None,
                    help="override LemoConfig.segment_bytes and mlp_segment_bytes (default: the config's; tiny: 64 KiB)")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes on CPU with a fake capacity")
    ap.add_argument("--tiny-capacity", type=int, default=2048, help="--tiny: a step fails above this length")
    ap.add_argument("--timeout", type=int, default=520, help="seconds per probe")
    ap.add_argument("--budget", type=float, default=None, help="wall seconds for the whole invocation: a probe "
                                                               "is not started unless its estimated time is left")
    ap.add_argument("--shared-cache", default=None,
                    help="Inductor/Triton cache directory shared by the probes of a variant (one sub-folder per "
                         "variant; default: a folder under the system temp dir, kept between calls)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--resume", default=None, help="earlier JSON(s) of this benchmark, comma-separated (e.g. "
                    "searches run at the same time on different GPUs): continue from their probes together")
    ap.add_argument("--merge-only", action="store_true", help="start no probe: only combine --resume files, "
                    "then write the table and figures")
    ap.add_argument("--headline", default=None, help="merge the figures into this headline.json")
    ap.add_argument("--worker", default=None)
    ap.add_argument("--mode", default="probe", choices=("probe", "predict"))
    ap.add_argument("--seq", type=int, default=None)
    args = ap.parse_args()
    tiny = args.tiny
    args.arch = args.arch or ("tiny-llama" if tiny else "llama-8b")
    args.inner = args.inner or ("eager" if tiny else "inductor")
    if args.segment_bytes is None and tiny:
        args.segment_bytes = 1 << 16
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    if args.arch not in ARCHS or tiny != args.arch.startswith("tiny"):
        ap.error(f"--arch {args.arch}: one of {', '.join(ARCHS)} (tiny-* exactly with --tiny)")
    start = args.start or (256 if tiny else 16384)
    resolution = max(64, args.resolution or (128 if tiny else 2048))
    max_len = args.max_len or (8192 if tiny else 1 << 22)
    predict_len = args.predict_len or (256 if tiny else 4096)
    variants = (args.variants.split(",") if args.variants
                else [v for v in VARIANTS if v not in OPT_IN])
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variants {bad}; known: {', '.join(VARIANTS)}")
    starts = {}
    for item in filter(None, args.starts.split(",")):
        v, _, n = item.partition("=")
        if v not in VARIANTS or not n.isdigit():
            ap.error(f"--starts: expected variant=length, got {item!r}")
        starts[v] = int(n)

    t_start = time.perf_counter()
    command = "python " + " ".join(sys.argv)
    probes, predictions, prior_commands, prior_envs = [], {}, [], []
    for path in filter(None, (args.resume or "").split(",")):  # several: searches run apart, one per GPU
        if not os.path.exists(path):
            print(f"{path} does not exist: nothing to resume from it", flush=True)
            continue
        with open(path) as f:
            old = json.load(f)
        if old.get("benchmark") != "max_context" or old["config"]["arch"] != args.arch:
            ap.error(f"{path} is not a max_context result for {args.arch}")
        probes += [r for r in old.get("probes", []) if status(r) != "skipped"]
        predictions.update(old.get("predictions", {}))
        for c, e in zip(old.get("commands", [old.get("command")]), old.get("envs", [old.get("env")])):
            if c not in prior_commands:  # commands and envs stay aligned
                prior_commands.append(c)
                prior_envs.append(e)
        print(f"{len(old.get('probes', []))} earlier probe(s), {len(old.get('predictions', {}))} prediction(s) "
              f"from {path}", flush=True)
    unique: dict[str, dict] = {}  # files resumed from one another repeat their shared probes: keep each once
    for r in probes:
        unique.setdefault(json.dumps(r, sort_keys=True), r)
    probes = list(unique.values())
    if args.merge_only and not args.resume:
        ap.error("--merge-only needs --resume")
    env = environment()
    known = sorted(set(variants) | {r["variant"] for r in probes} | set(predictions), key=list(VARIANTS).index)
    doc = {"benchmark": "max_context", "command": command, "commands": prior_commands + [command], "env": env,
           "envs": prior_envs + [env],
           "config": {"arch": args.arch, "tiny": tiny, "lora": "r=8 alpha=16 q/k/v/o", "dtype": "bfloat16",
                      "batch": 1, "variants": known, "run_variants": variants,
                      "variant_specs": {v: VARIANTS[v] for v in known}, "start": start, "starts": starts,
                      "growth": args.growth, "resolution": resolution, "max_len": max_len,
                      "predict_len": predict_len, "predict_static": args.predict_static, "inner": args.inner, "segment_bytes": args.segment_bytes,
                      "timeout_s": args.timeout, "budget_s": args.budget,
                      "optimizer": "AdamW lr 1e-4 on LoRA params", "gradient_checkpointing": "HF, non-reentrant",
                      "step": "one step (forward + backward + AdamW) per probe, fresh subprocess",
                      "alloc_conf": "expandable_segments:True",
                      **({"tiny_capacity": args.tiny_capacity} if tiny else {})},
           "probes": probes, "predictions": predictions, "search": {}, "not_probed": []}

    def state(v):
        st = search_state([r for r in probes if r["variant"] == v], starts.get(v, start), resolution,
                          args.growth, max_len, args.timeout)
        pr = predictions.get(v)
        if pr and pr.get("predicted_max_tokens") is not None and st["done"] and st["max_tokens"]:
            st["predicted_max_tokens"] = pr["predicted_max_tokens"]
            st["prediction_error"] = abs(pr["predicted_max_tokens"] - st["max_tokens"]) / st["max_tokens"]
        return st

    def write():
        doc["search"] = {v: state(v) for v in known}
        doc["table"] = table(doc)
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)) or ".", exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(doc, f, indent=2)

    def next_action(v):
        if v in LEMO and not args.no_predict:
            pr = predictions.get(v)
            if pr is None or (status(pr) in ("timeout", "skipped") and not _final(pr, args.timeout)):
                return "predict", predict_len
        st = state(v)
        return (None, None) if st["done"] or st["next"] is None else ("probe", st["next"])

    cache_root = args.shared_cache or os.path.join(
        os.environ.get("TMPDIR", "/tmp"), f"lemo_max_context_cache_{args.arch}")
    script = os.path.abspath(__file__)
    blocked: set[str] = set()
    rnd = 0
    write()
    while not args.merge_only:
        progressed = False
        for v in (variants if rnd % 2 == 0 else list(reversed(variants))):
            if v in blocked:
                continue
            mode, seq = next_action(v)
            if mode is None:
                continue
            elapsed = time.perf_counter() - t_start
            left = None if args.budget is None else args.budget - elapsed
            need = min(need_s(v, args.arch, mode, seq, [r for r in probes if r["variant"] == v], tiny), args.timeout)
            if left is not None and left - 10 < need:  # 10 s margin: the driver's own work
                doc["not_probed"].append({"variant": v, "mode": mode, "seq": seq, "run": len(prior_commands),
                                          "reason": f"budget: {left:.0f} s of {args.budget:.0f} s left, needs "
                                                    f"about {need:.0f} s + 10 s margin"})
                blocked.add(v)
                print(f"[{elapsed:6.0f} s] {v} {mode} {seq}: not started ({doc['not_probed'][-1]['reason']})",
                      flush=True)
                continue
            t_timeout = int(args.timeout if left is None else min(args.timeout, left - 10))
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(cache_root, v)
            os.environ["TRITON_CACHE_DIR"] = os.path.join(cache_root, v, "triton")
            if mode == "predict" and args.predict_static:
                extra_predict = ["--predict-static", args.predict_static]
                seq = int(args.predict_static.split(",")[0])
            else:
                extra_predict = []
            extra = extra_predict + ["--arch", args.arch, "--mode", mode, "--seq", str(seq), "--inner", args.inner,
                     "--tiny-capacity", str(args.tiny_capacity), "--predict-extras-s", str(args.predict_extras_s)]
            if args.segment_bytes is not None:
                extra += ["--segment-bytes", str(args.segment_bytes)]
            if tiny:
                extra.append("--tiny")
            t0 = time.perf_counter()
            r = run_variant_subprocess(script, v, extra, t_timeout)
            r.update(variant=v, mode=mode, seq=seq, timeout_s=t_timeout, wall_s=time.perf_counter() - t0,
                     run=len(prior_commands))
            if "error" in r and not r.get("oom") and "out of memory" in (r.get("log_tail") or "").lower():
                r["oom"] = True
            if mode == "predict":
                predictions[v] = r
            else:
                probes.append(r)
            progressed = True
            write()
            keys = ("variant", "mode", "seq", "peak_allocated_gb", "step_s", "predicted_max_tokens", "oom", "error",
                    "unavailable", "wall_s")
            print(f"[{time.perf_counter() - t_start:6.0f} s] {status(r):>7} "
                  + json.dumps({k: (r[k][:200] if isinstance(r.get(k), str) else r[k]) for k in keys if k in r}),
                  flush=True)
        if not progressed:
            break
        rnd += 1
    write()
    print("\n" + doc["table"], flush=True)
    src = "benchmarks/results/" + os.path.basename(args.out) if args.out else None
    figs, missing = figures(doc, src)
    publish_figures(doc, figs, missing, args.out, args.headline, tiny)
    pending = [v for v in known if not doc["search"][v]["done"]]
    print("search complete for every variant" if not pending else
          f"search incomplete for {', '.join(pending)}: repeat the command with --resume {args.out or '<out>'}",
          flush=True)


if __name__ == "__main__":
    main()
