"""CPU measurement: bytes saved for backward per layer and block, dense vs each lemo mode combination.

Tiny Llama (hidden 64, 4 layers, LoRA r=4 on q/k/v/o), 4096 tokens, batch 1, fp32, layers 1-3 sparse at
keep 0.4 (pooled predictor). Per variant: the measured total (saved_tensors_hooks, distinct storages)
and the per-block attribution from the AOT partition (lemo_compile.memory).

    python benchmarks/saved_activations.py --out benchmarks/results/saved_activations_cpu_4k.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import lemo_compile  # noqa: E402
from lemo_compile import LemoConfig, memory  # noqa: E402
from lemo_compile.testing.models import random_batch, tiny_model  # noqa: E402


def measure(model, batch, cfg):
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=lemo_compile.backend(cfg))
    out, measured = memory.saved_tensor_bytes(lambda: compiled(**batch))
    out.loss.backward()
    model.zero_grad(set_to_none=True)
    rec = [r for r in lemo_compile.records() if r.saved][-1]
    return {"measured_bytes": measured, "attributed_bytes": sum(s.nbytes for s in rec.saved),
            "per_layer": memory.saved_by_block(rec.saved), "loss": float(out.loss)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--keep", type=float, default=0.4)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    model = tiny_model("llama", lora=True)
    batch = random_batch(256, 1, args.seq, seed=0)
    rows = {"dense": measure(model, batch, LemoConfig(inner="eager", enabled=False))}
    for attn, mlp in itertools.product(["tokens", "keys", "backward"], ["backward", "tokens", "dense"]):
        cfg = LemoConfig(inner="eager", keep_ratio=args.keep, dense_layers=(0,), attn_mode=attn, mlp_mode=mlp)
        rows[f"{attn}/{mlp}"] = measure(model, batch, cfg)
    dense = rows["dense"]["per_layer"]
    sparse = ["layers.1", "layers.2", "layers.3"]
    print(f"tiny Llama, {args.seq} tokens, keep {args.keep}, sparse layers 1-3; ratios are lemo / dense "
          "over the sparse layers")
    print(f"{'attn/mlp':<18} {'total MiB':>9} {'vs dense':>8} {'attn ratio':>10} {'mlp ratio':>9}")
    summary = {}
    for name, r in rows.items():
        pl = r["per_layer"]
        a = sum(pl[l]["attn"] for l in sparse) / sum(dense[l]["attn"] for l in sparse)
        m = sum(pl[l]["mlp"] for l in sparse) / sum(dense[l]["mlp"] for l in sparse)
        t = r["measured_bytes"] / rows["dense"]["measured_bytes"]
        summary[name] = {"total_ratio": t, "attn_ratio": a, "mlp_ratio": m}
        print(f"{name:<18} {r['measured_bytes'] / 2**20:9.2f} {t:8.3f} {a:10.3f} {m:9.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"benchmark": "saved_activations", "command": "python " + " ".join(sys.argv),
                       "config": vars(args), "torch": torch.__version__, "rows": rows, "summary": summary}, f, indent=2)


if __name__ == "__main__":
    main()
