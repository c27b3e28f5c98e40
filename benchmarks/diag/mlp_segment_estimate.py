"""Static estimate (CPU, no GPU run) of what LemoConfig.segment_mlp does to the peak of a checkpointed
Llama-3-8B-shaped training step, per token.

A 4-layer model with Llama-3-8B's layer dimensions (hidden 4096, intermediate 14336, 32 heads, 8 KV
heads), a 512-token vocabulary (so the LM head does not matter), LoRA (--lora, a benchmarks.common
preset: r8-qkvo by default, r16-all puts adapters on the MLP projections too), HF non-reentrant
checkpointing, fp32 on the CPU, lemo's default config with logits="drop" and an eager inner compiler;
`lemo_compile.explain` runs one step at each length and reports the static liveness estimate of the
compiled forward and backward graphs (passes.memory; 1.9% from the measured CUDA peak at 8B/32K).
Compared: segment_mlp off and on, at two lengths; the per-token slope of the peak between them is what
decides the longest context (everything else is constant). Halve the bytes for bf16.

    python benchmarks/diag/mlp_segment_estimate.py --out benchmarks/results/mlp_segment_estimate_cpu.json
    python benchmarks/diag/mlp_segment_estimate.py --lora r16-all --out benchmarks/results/mlp_segment_estimate_r16_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqs", default="512,1024")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--lora", default="r8-qkvo", help="a LORA_PRESETS name of benchmarks/common.py")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    import lemo_compile
    from lemo_compile import LemoConfig
    from benchmarks.common import LORA_PRESETS, environment

    seqs = [int(s) for s in args.seqs.split(",")]
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=args.layers, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=512, max_position_embeddings=max(seqs) * 2,
                      attn_implementation="sdpa", use_cache=False)
    if args.lora not in LORA_PRESETS:
        ap.error(f"--lora {args.lora!r}: one of {sorted(LORA_PRESETS)}")
    r, targets = LORA_PRESETS[args.lora]
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets)))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    rows = []
    for seg in (False, True):
        for n in seqs:
            torch._dynamo.reset()
            ids = torch.randint(0, 512, (1, n), generator=torch.Generator().manual_seed(n))
            t0 = time.perf_counter()
            ex = lemo_compile.explain(model, input_ids=ids, labels=ids,
                                      config=LemoConfig(inner="eager", logits="drop", segment_mlp=seg))
            model.zero_grad(set_to_none=True)
            ests = [r.memory for r in ex.records if r.memory is not None]
            est = max(ests, key=lambda e: e.peak_hint)
            mlps = sum(len(rec.mlp_segment.mlps) for rec in ex.records if rec.mlp_segment)
            lora_mlps = sum(1 for rec in ex.records if rec.mlp_segment for d in rec.mlp_segment.mlps if d.get("adapters"))
            sparse = sum(len(rec.sparsify.layers) for rec in ex.records if rec.sparsify)
            rows.append({"segment_mlp": seg, "seq": n, "peak_bytes": int(est.peak_hint), "mlps_segmented": mlps, "lora_mlps": lora_mlps,
                         "sparse_layers": sparse, "wall_s": round(time.perf_counter() - t0, 1)})
            print(json.dumps(rows[-1]), flush=True)
    slope = {}
    for seg in (False, True):
        a, b = [r for r in rows if r["segment_mlp"] == seg][:2]
        slope[str(seg)] = (b["peak_bytes"] - a["peak_bytes"]) / (b["seq"] - a["seq"])
    doc = {"benchmark": "mlp_segment_estimate", "command": "python " + " ".join(sys.argv), "env": environment(),
           "config": {"layers": args.layers, "dims": "Llama-3-8B layer (4096 / 14336 / 32 heads / 8 kv)",
                      "vocab": 512, "dtype": "float32", "lora": f"{args.lora}: r={r} on {', '.join(targets)}", "checkpointing": "HF non-reentrant",
                      "lemo": "default, logits=drop, inner=eager", "what": "static estimate (passes.memory), no GPU"},
           "rows": rows, "peak_bytes_per_token": slope,
           "per_token_ratio_on_over_off": slope["True"] / slope["False"] if slope["False"] else None}
    print(json.dumps({k: doc[k] for k in ("peak_bytes_per_token", "per_token_ratio_on_over_off")}), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=2)


if __name__ == "__main__":
    main()
