"""Calibration at long context on the GPU, SmolLM2-135M on real text (issue 6): how long `lemo calibrate`
takes, how well its predictors recall the oracle on held-out text, and what the predictor costs in a
training step.

1. Calibration, timed end to end (`lemo_compile.calibrate.run`: capture of every layer's oracle on
   --calib chunks of KJV, low-rank predictors initialized from the weights and trained, file written;
   the capture cache is deleted first so nothing is reused): `calibration_minutes_smollm2_16k`.
2. Held-out recall (--eval chunks of the Python docs, captured separately): per layer, the rule's kept
   blocks recovered by the trained file, the training-free low-rank start and the full-rank `pooled`
   predictor, and the attention mass kept queries put on kept keys; averaged over the sparse layers of
   the default schedule.
3. Predictor cost: the in-graph chain of one sparse layer (scores from the layer's normalized input +
   the keep set), compiled by Inductor as in the lemo graph, timed alone (`triton.testing.do_bench`,
   median) for the calibrated file and for `pooled`, times the number of sparse layers, over the median
   step of a LoRA fine-tuning step (r=8 q/k/v/o, AdamW, fp32, the same length) compiled by lemo with
   the calibrated file, timed in the same process with the device synchronized:
   `predictor_time_fraction_16k`.

SmolLM2 is trained for 8K tokens: --rope-factor 2 (linear RoPE scaling) at 16K, as benchmarks/fidelity.py.

GPU (the model and the texts reach the machine by benchmarks/smollm2_transfer.sh):
    python benchmarks/calibration_bench.py --seq 16384 --rope-factor 2 --out $OUT/calibration_16k.json --headline $OUT/headline.json
CPU check of every code path (numbers meaningless):
    python benchmarks/calibration_bench.py --seq 512 --calib 2 --eval 1 --steps 5 --step-reps 1 --out /tmp/cal.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import environment, merge_headline  # noqa: E402
from benchmarks.predictor_recall import DATA, chunks_of, smollm2  # noqa: E402
from lemo_compile import LemoConfig, calibrate, traced  # noqa: E402


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench_ms(fn, reps: int) -> float:
    """Median milliseconds of fn(): triton.testing.do_bench on CUDA, a synchronized loop elsewhere."""
    if torch.cuda.is_available():
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    times = []
    for _ in range(max(3, reps)):
        t = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


def predictor_chain(model, cfg: LemoConfig, layer: int, path: str | None):
    """The scores + keep-set nodes lemo inserts for one sparse layer (passes/sparsify.py), as a function
    of the layer's normalized input x (b, n, d) and the token validity."""
    attn = calibrate.decoder_layers(model)[layer].self_attn
    keep = cfg.keep_fraction(layer, len(calibrate.decoder_layers(model)))
    heads = model.config.num_attention_heads
    kv_heads = model.config.num_key_value_heads
    wq, wk = calibrate._base_weight(attn.q_proj), calibrate._base_weight(attn.k_proj)

    def chain(x, valid):
        if path:
            scores = torch.ops.lemo.calibrated_block_scores(x, valid, path, layer, cfg.block_size)
        else:
            scores = traced.pooled_block_scores(x, valid, wq, None, wk, None, heads, kv_heads, cfg.block_size)
        return traced.keep_set(scores, valid, cfg.block_size, keep.numerator, keep.denominator, tuple(cfg.forced_blocks))
    return chain


def step_time(model, cfg: LemoConfig, x: torch.Tensor, reps: int, warmup: int = 2) -> tuple[float, float]:
    """(median step seconds, first step seconds) of forward + backward + AdamW, lemo-compiled."""
    import lemo_compile

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=lemo_compile.backend(cfg))
    model.train()
    times = []
    for _ in range(1 + warmup + reps):
        sync()
        t = time.perf_counter()
        out = compiled(input_ids=x, labels=x)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times[1 + warmup:]), times[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=16384)
    ap.add_argument("--calib", type=int, default=8, help="calibration chunks (KJV)")
    ap.add_argument("--eval", type=int, default=2, help="held-out chunks (Python docs)")
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--keep", type=float, default=0.4)
    ap.add_argument("--rule", default="mass", choices=calibrate.RULES)
    ap.add_argument("--rank", type=int, default=None, help="rank per head (default: calibrate.default_rank)")
    ap.add_argument("--steps", type=int, default=200, help="predictor training steps")
    ap.add_argument("--step-reps", type=int, default=5, help="timed fine-tuning steps (median)")
    ap.add_argument("--rope-factor", type=float, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    ap.add_argument("--headline", default=None)
    args = ap.parse_args()

    model, encode = smollm2(args.rope_factor)
    model.to(args.device)
    dev = torch.device(args.device)
    num_layers = len(calibrate.decoder_layers(model))
    cfg = LemoConfig(keep_ratio=args.keep, block_size=args.block, inner="inductor" if dev.type == "cuda" else "eager")
    sparse = [i for i in range(num_layers) if cfg.keep_fraction(i, num_layers) is not None]
    calib = chunks_of(os.path.join(DATA, "kjv.txt"), encode, args.seq, args.calib, 0)
    held = chunks_of(os.path.join(DATA, "python311-docs.txt"), encode, args.seq, args.eval, 0)
    out_dir = os.path.dirname(os.path.abspath(args.out)) if args.out else "/tmp"
    path = os.path.join(out_dir, f"smollm2_{args.seq // 1024}k.safetensors")
    for stale in (path, path + ".capture.pt"):
        if os.path.exists(stale):
            os.remove(stale)

    # 1. calibration, end to end
    sync()
    t0 = time.perf_counter()
    report = calibrate.run(model, calib, path, block=args.block, keep=args.keep, rule=args.rule, rank=args.rank,
                           steps=args.steps)
    sync()
    calib_s = time.perf_counter() - t0
    os.remove(path + ".capture.pt")  # the capture cache: gigabytes at 16K, not a result
    rank = report["rank"]
    print(f"calibration: {calib_s:.1f} s for {args.calib} x {args.seq} tokens (rank {rank}, {args.steps} steps)", flush=True)

    # 2. held-out recall
    t0 = time.perf_counter()
    caps = calibrate.capture(model, held, args.block)
    eval_s = time.perf_counter() - t0
    trained = calibrate.LowRankPredictor.from_file(path)
    preds = {"trained": trained, "training-free": calibrate.LowRankPredictor.from_model(model, rank),
             "pooled": calibrate.LowRankPredictor.from_model(model, calibrate.decoder_layers(model)[0].self_attn.head_dim)}
    per_layer = {}
    with torch.no_grad():
        for name, p in preds.items():
            per_layer[name] = [calibrate.evaluate(p.scores(c.layer, c.block_means), c, args.keep, args.rule) for c in caps]
        per_layer["oracle itself"] = [calibrate.evaluate(calibrate.oracle_scores(c, args.rule), c, args.keep, args.rule)
                                      for c in caps]
    avg = {name: {k: statistics.mean(rows[i][k] for i in sparse) for k in ("recall", "mass_kept")}
           for name, rows in per_layer.items()}
    print(f"\nheld-out Python docs, {args.seq} tokens, rule {args.rule}, keep {args.keep}, layers {sparse[0]}-{sparse[-1]}")
    print("layer  " + "  ".join(f"{n:>14}" for n in per_layer) + "   (recall / mass kept)")
    for i in sparse:
        print(f"{i:>5}  " + "  ".join(f"{per_layer[n][i]['recall']:6.3f}/{per_layer[n][i]['mass_kept']:.3f}"
                                      for n in per_layer))
    print("mean   " + "  ".join(f"{avg[n]['recall']:6.3f}/{avg[n]['mass_kept']:.3f}" for n in per_layer), flush=True)

    # 3. predictor cost against a fine-tuning step
    from peft import LoraConfig, get_peft_model

    x_in = torch.randn(1, args.seq, model.config.hidden_size, device=dev, dtype=next(model.parameters()).dtype)
    valid = torch.ones(1, args.seq, dtype=torch.bool, device=dev)
    chain_ms = {}
    for name, p in (("calibrated", path), ("pooled", None)):
        fns = [torch.compile(predictor_chain(model, cfg, i, p), backend="inductor" if dev.type == "cuda" else "eager")
               for i in sparse]
        chain_ms[name] = [bench_ms(lambda f=f: f(x_in, valid), args.step_reps) for f in fns]
        print(f"predictor chain ({name}): {statistics.median(chain_ms[name]):.3f} ms per layer (median), "
              f"{sum(chain_ms[name]):.2f} ms over {len(sparse)} layers", flush=True)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    ids = held[0].to(dev)
    step_s, first_s = step_time(model, cfg.replace(predictor=path), ids, args.step_reps)
    fraction = {name: sum(ms) / 1e3 / step_s for name, ms in chain_ms.items()}
    print(f"fine-tuning step (lemo, calibrated predictor): {step_s * 1e3:.1f} ms (first, compiling: {first_s:.1f} s); "
          f"predictor fraction: calibrated {fraction['calibrated']:.4f}, pooled {fraction['pooled']:.4f}", flush=True)

    command = "python " + " ".join(sys.argv)
    doc = {"benchmark": "calibration", "command": command, "env": environment(),
           "config": {**vars(args), "rank": rank, "model": "SmolLM2-135M-Instruct Q4_1 GGUF (fp32)",
                      "calibration": "kjv.txt", "held_out": "python311-docs.txt", "sparse_layers": sparse},
           "calibration_s": calib_s, "held_out_capture_s": eval_s, "params_per_layer": report["params_per_layer"],
           "params_over_hidden_sq": report["params_over_hidden_sq"], "recall_avg_sparse": avg, "per_layer": per_layer,
           "predictor_chain_ms": chain_ms, "step_s": step_s, "first_step_s": first_s, "predictor_time_fraction": fraction}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=2)
    if args.headline:
        if dev.type != "cuda":
            raise SystemExit("--headline needs the GPU run (the figures are defined on one H200)")
        src = "benchmarks/results/" + os.path.basename(args.out) if args.out else None
        fig = dict(source=src, command=command, when=doc["env"]["when"][:10],
                   note=f"SmolLM2-135M, {args.calib} x {args.seq} tokens of KJV, rule {args.rule!r}, keep {args.keep}, "
                        f"rank {rank}, {args.steps} training steps")
        k = f"_{args.seq // 1024}k"
        figs = {f"calibration_minutes_smollm2{k}": dict(value=calib_s / 60, target="< 10", **fig),
                f"predictor_time_fraction{k}": dict(value=fraction["calibrated"], target="<= 0.02",
                                                    pooled=fraction["pooled"], **fig)}
        if args.seq == 16384:  # the recall figures, at the length the project aims at
            figs["predictor_recall_avg"] = dict(value=avg["trained"]["recall"], target=">= 0.97", **fig)
            figs["predictor_recall_training_free_avg"] = dict(value=avg["training-free"]["recall"],
                                                              pooled=avg["pooled"]["recall"], **fig)
        merge_headline(args.headline, figs)

if __name__ == "__main__":
    main()
