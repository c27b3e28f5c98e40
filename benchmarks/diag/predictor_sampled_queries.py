"""How much of the oracle's `mass` rule can exact attention from a sample of query rows recover?
(SmolLM2-135M on CPU; issue 6.)

The `mass` rule keeps the key blocks that receive the most causal attention probability, summed over
every query and averaged over heads. This diagnostic asks what recall a predictor could reach if it
computed that mass *exactly* (the layer's own post-RoPE q and k, the real softmax over all keys) from
only S query rows per 64-token block, scaled by 64 / S: an upper bound for any predictor that looks
at S rows per block. Rows are spread evenly through each block ("even") or are its last S ("last").
Held-out Python-docs chunks (2 x 2048 tokens), sparse layers 15-28, keep 0.4; recall as
`lemo_compile.calibrate.evaluate` (forced block 0 excluded), with the attention mass kept queries put
on kept keys beside it.

    python benchmarks/diag/predictor_sampled_queries.py --out benchmarks/results/predictor_sampled_queries_cpu_2k.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

BLOCK = 64
SPARSE = range(15, 29)


def capture(model, chunks):
    """Per sparse layer: (q, k, scale, LayerCapture) for every chunk, from a forward pre-hook."""
    from kernels import oracle
    from lemo_compile import calibrate, predictors

    store: dict[int, list] = {}

    def hook(i):
        def pre(mod, args, kwargs):
            hs = kwargs["hidden_states"]
            q, k = calibrate._attention_qk(mod, hs, kwargs["position_embeddings"])
            cap = calibrate.LayerCapture(i, predictors.block_mean(hs.float(), None, BLOCK),
                                         oracle.block_max_scores(q, k, BLOCK),
                                         oracle.block_attention_mass(q, k, BLOCK, mod.scaling), hs.shape[1])
            store.setdefault(i, []).append((q[0].float(), k[0].float(), mod.scaling, cap))
        return pre

    layers = calibrate.decoder_layers(model)
    handles = [layers[i].self_attn.register_forward_pre_hook(hook(i), with_kwargs=True) for i in SPARSE]
    try:
        with torch.no_grad():
            for ids in chunks:
                model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return store


def sampled_mass(q: torch.Tensor, k: torch.Tensor, scale: float, rows_per_block: int, where: str) -> torch.Tensor:
    """(1, nb) key-block scores: causal softmax mass from `rows_per_block` query rows of each block,
    head-averaged, scaled to a full block."""
    h, n, _ = q.shape
    k = k.repeat_interleave(h // k.shape[0], 0)
    nb = -(-n // BLOCK)
    step = BLOCK // rows_per_block
    off = (torch.arange(rows_per_block) * step + step - 1) if where == "even" else torch.arange(BLOCK - rows_per_block, BLOCK)
    rows = (torch.arange(nb)[:, None] * BLOCK + off[None]).flatten().clamp(max=n - 1)
    s = (q[:, rows] @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(torch.arange(n)[None, None, :] > rows[None, :, None], float("-inf"))
    p = torch.nn.functional.pad(s.softmax(-1).mean(0), (0, nb * BLOCK - n)).view(len(rows), nb, BLOCK).sum(-1)
    return (p.sum(0) * BLOCK / rows_per_block)[None]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="1,2,4,8,16,32,64")
    ap.add_argument("--keep", type=float, default=0.4)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from benchmarks.predictor_recall import DATA, chunks_of, smollm2
    from lemo_compile import calibrate

    torch.manual_seed(0)
    model, encode = smollm2()
    store = capture(model, chunks_of(os.path.join(DATA, "python311-docs.txt"), encode, 2048, 2, 0))
    results = []
    for where in ("even", "last"):
        for r in (int(x) for x in args.rows.split(",")):
            ev = [calibrate.evaluate(sampled_mass(q, k, scale, r, where), cap, args.keep, "mass")
                  for items in store.values() for q, k, scale, cap in items]
            rec = [e["recall"] for e in ev]
            res = {"where": where, "rows_per_block": r, "recall_avg": statistics.mean(rec), "recall_min": min(rec),
                   "mass_kept_avg": statistics.mean(e["mass_kept"] for e in ev)}
            results.append(res)
            print(f"{where:5s} {r:3d} rows/block  recall {res['recall_avg']:.4f} (min {res['recall_min']:.3f})  "
                  f"mass kept {res['mass_kept_avg']:.4f}", flush=True)
    if args.out:
        from benchmarks.common import environment
        with open(args.out, "w") as f:
            json.dump({"benchmark": "predictor_sampled_queries", "command": "python " + " ".join(sys.argv),
                       "env": environment(), "config": {"model": "SmolLM2-135M-Instruct Q4_1 GGUF (fp32)",
                                                        "held_out": "python311-docs.txt 2 x 2048",
                                                        "layers": "15-28", "keep": args.keep, "block": BLOCK,
                                                        "rule": "mass"},
                       "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
