"""Training-free predictor variants: recall against the oracle rules (SmolLM2-135M, CPU; issue 6).

An exploration kept for the record: which block features a training-free predictor needs. Held-out
Python-docs chunks (2 x 2048 tokens), sparse layers 15-28, keep 0.4, block 64. Variants:
  pooled  block-mean pre-RoPE q and k (lemo's `pooled` predictor)
  max     block-mean pre-RoPE q, every token's pre-RoPE k, max over the key block's tokens
  lse     the same with a soft max (logsumexp)
  rmax    post-RoPE: block mean of rotated queries, max over rotated keys
  rmean   post-RoPE, mean over rotated keys
The token-level key variants hold an (h, nb, n) score matrix: affordable here, not at 128K without a
streaming kernel (kernels/oracle.py's max kernel with block-mean queries would do).

    python benchmarks/predictor_variants.py --out benchmarks/results/predictor_variants_cpu_2k.json
"""
import argparse
import json
import sys, os, torch, statistics
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ap = argparse.ArgumentParser()
ap.add_argument('--out', default=None)
args = ap.parse_args()
results = {}
from benchmarks.predictor_recall import smollm2, chunks_of, DATA
from lemo_compile import calibrate, predictors
from lemo_compile.kernels import oracle
model, encode = smollm2()
layers = calibrate.decoder_layers(model)
B = 64
chunks = chunks_of(os.path.join(DATA, "python311-docs.txt"), encode, 2048, 2, 0)
store = {}
def hook(i):
    def pre(mod, args, kwargs):
        if i < 15 or i > 28: return
        hs = kwargs["hidden_states"]
        q, k = calibrate._attention_qk(mod, hs, kwargs["position_embeddings"])
        cap = calibrate.LayerCapture(i, predictors.block_mean(hs.float(), None, B), oracle.block_max_scores(q, k, B),
                                     oracle.block_attention_mass(q, k, B, mod.scaling), hs.shape[1])
        store.setdefault(i, []).append((hs[0].detach(), cap))
    return pre
hs_ = [l.self_attn.register_forward_pre_hook(hook(i), with_kwargs=True) for i, l in enumerate(layers)]
with torch.no_grad():
    for ids in chunks: model(input_ids=ids)
for h in hs_: h.remove()

def scores_variant(x, attn, kind):
    hd = attn.head_dim; wq, wk = attn.q_proj.weight, attn.k_proj.weight
    hq, hkv = wq.shape[0]//hd, wk.shape[0]//hd
    n = x.shape[0]; nb = (n + B - 1)//B
    xb = predictors.block_mean(x[None], None, B)[0]
    qb = (xb @ wq.t()).view(nb, hq, hd).transpose(0, 1)             # (h, nb, hd)
    kt = (x @ wk.t()).view(n, hkv, hd).transpose(0, 1).repeat_interleave(hq//hkv, 0)  # (h, n, hd)
    s = torch.relu(qb @ kt.transpose(-1, -2))                       # (h, nb_q, n)
    pad = nb*B - n
    s = torch.nn.functional.pad(s, (0, pad)).view(hq, nb, nb, B)
    if kind == "max": s = s.amax(-1)
    elif kind == "lse": s = torch.logsumexp(s * hd**-0.5 * 4, -1)
    s = s.mean(0)
    causal = torch.ones(nb, nb, dtype=torch.bool).tril()
    return (s * causal).sum(0)

for rule in ("sum", "mass"):
    for kind in ("pooled", "max", "lse"):
        rec = []
        for i, items in store.items():
            attn = layers[i].self_attn
            for x, cap in items:
                if kind == "pooled":
                    sc = predictors.pooled_qk_scores(x[None], None, attn.q_proj.weight, None, attn.k_proj.weight, None, 9, 3, B)
                else:
                    with torch.no_grad(): sc = scores_variant(x, attn, kind)[None]
                rec.append(calibrate.evaluate(sc, cap, 0.4, rule)["recall"])
        results[f"{rule}/{kind}"] = statistics.mean(rec)
        print(rule, kind, round(statistics.mean(rec), 3))

rot = model.model.rotary_emb
def rope_variant(x, attn, kind):
    n = x.shape[0]; nb = (n + B - 1)//B
    pos = torch.arange(n)[None]
    q, k = calibrate._attention_qk(attn, x[None], rot(x[None], pos))
    q, k = q[0], k[0]
    hq, hkv = q.shape[0], k.shape[0]
    k = k.repeat_interleave(hq//hkv, 0)
    pad = nb*B - n
    qb = torch.nn.functional.pad(q, (0, 0, 0, pad)).view(hq, nb, B, -1).mean(2)
    s = torch.relu(qb @ k.transpose(-1, -2))
    s = torch.nn.functional.pad(s, (0, pad)).view(hq, nb, nb, B)
    s = s.amax(-1) if kind == "rmax" else s.mean(-1)
    s = s.mean(0)
    causal = torch.ones(nb, nb, dtype=torch.bool).tril()
    return (s * causal).sum(0)

for rule in ("sum", "mass"):
    for kind in ("rmax", "rmean"):
        rec = []
        for i, items in store.items():
            attn = layers[i].self_attn
            for x, cap in items:
                with torch.no_grad(): sc = rope_variant(x, attn, kind)[None]
                rec.append(calibrate.evaluate(sc, cap, 0.4, rule)["recall"])
        results[f"{rule}/{kind}"] = statistics.mean(rec)
        print(rule, kind, round(statistics.mean(rec), 3))

if args.out:
    from benchmarks.common import environment
    with open(args.out, "w") as f:
        json.dump({"benchmark": "predictor_variants", "command": "python " + " ".join(sys.argv), "env": environment(),
                   "config": {"model": "SmolLM2-135M-Instruct Q4_1 GGUF (fp32)", "held_out": "python311-docs.txt 2 x 2048",
                              "layers": "15-28", "keep": 0.4, "block": B}, "recall": results}, f, indent=2)
