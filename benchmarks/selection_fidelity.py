"""Forward-loss cost of each block-selection rule, SmolLM2-135M on real text, no fine-tuning (issue 6/7).

Which oracle should predictors learn? This measures the forward loss the pretrained model gets when the
keep set of every sparse layer is chosen by each rule, computed from that layer's actual input
(`lemo_compile.reference`, eager fp32): the oracle rules of `lemo_compile.calibrate` ("sum" = the
paper's, "mean", "mass"), the training-free `pooled` predictor, a calibrated predictor file
(`file:PATH`), and `random`; for attn_mode "tokens" (the paper's semantics) and "keys"; keep 0.4, the
default layer schedule (first half and the last layer dense). Gap = (loss - dense loss) / dense loss,
pooled over chunks. The fine-tuned loss (the objective that finally decides) is the fidelity
benchmark's job; this is its forward-only starting point.

    python benchmarks/selection_fidelity.py --seq 2048 --chunks 2 --out benchmarks/results/selection_fidelity_cpu_2k.json

With --headline and a `file:` method beside its rule's oracle (e.g. --methods oracle:mass,file:P.safetensors),
`predictor_vs_oracle_loss_gap_pct` = (loss with the file's selection - loss with the oracle's) / the
oracle's, on held-out text (--headline-corpus, default the Python docs: `lemo calibrate --data kjv.txt`
files are made on KJV), attn_mode "tokens" (in the default "backward" mode the forward is exact
whatever the selection, so the gap there is 0 by construction).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import environment, merge_headline  # noqa: E402
from benchmarks.predictor_recall import DATA, chunks_of, smollm2  # noqa: E402
from lemo_compile import LemoConfig, calibrate  # noqa: E402
from lemo_compile.kernels import oracle  # noqa: E402
from lemo_compile.predictors import block_mean, pooled_qk_scores, random_scores  # noqa: E402
from lemo_compile.reference import reference_forward  # noqa: E402
from lemo_compile.selection import num_blocks  # noqa: E402


def make_scorer(model, method: str, block: int, seed: int):
    layers = calibrate.decoder_layers(model)
    rotary = model.model.rotary_emb
    if method.startswith("file:"):  # a calibrated predictor file (lemo calibrate)
        pred = calibrate.LowRankPredictor.from_file(method[5:])

    def scorer(i, x, tv):
        attn = layers[i].self_attn
        if method.startswith("file:"):
            return pred.scores(i, block_mean(x, tv, block))
        if method == "random":
            return random_scores(i, seed, x.shape[0], num_blocks(x.shape[1], block), x.device)
        if method == "pooled":
            hd = attn.head_dim
            return pooled_qk_scores(x, tv, attn.q_proj.weight, None, attn.k_proj.weight, None,
                                    attn.q_proj.weight.shape[0] // hd, attn.k_proj.weight.shape[0] // hd, block)
        pos = torch.arange(x.shape[1], device=x.device)[None].expand(x.shape[0], -1)
        q, k = calibrate._attention_qk(attn, x, rotary(x, pos))
        cap = calibrate.LayerCapture(i, None, oracle.block_max_scores(q, k, block),
                                     oracle.block_attention_mass(q, k, block, attn.scaling), x.shape[1])
        return calibrate.oracle_scores(cap, method.split(":")[1])

    return scorer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--chunks", type=int, default=2, help="chunks per corpus")
    ap.add_argument("--keep", type=float, default=0.4)
    ap.add_argument("--modes", default="tokens,keys")
    ap.add_argument("--methods", default="oracle:sum,oracle:mean,oracle:mass,pooled,random")
    ap.add_argument("--out", default=None)
    ap.add_argument("--headline", default=None)
    ap.add_argument("--headline-corpus", default="python-docs", choices=("kjv", "python-docs"),
                    help="text of predictor_vs_oracle_loss_gap_pct: the one the file was not calibrated on")
    args = ap.parse_args()
    files = [m for m in args.methods.split(",") if m.startswith("file:")]
    if args.headline and files:  # check before the long run what the figure will need
        rule = calibrate.read_metadata(files[0][5:])["rule"]
        if f"oracle:{rule}" not in args.methods.split(",") or "tokens" not in args.modes.split(","):
            ap.error(f"--headline needs oracle:{rule} (the file's rule) in --methods and tokens in --modes")
    model, encode = smollm2()
    corpora = {"kjv": chunks_of(os.path.join(DATA, "kjv.txt"), encode, args.seq, args.chunks, 7),
               "python-docs": chunks_of(os.path.join(DATA, "python311-docs.txt"), encode, args.seq, args.chunks, 7)}
    t0 = time.perf_counter()
    rows = []
    with torch.no_grad():
        dense = {c: [model(input_ids=ids, labels=ids).loss.item() for ids in chunks] for c, chunks in corpora.items()}
        for mode in args.modes.split(","):
            cfg = LemoConfig(keep_ratio=args.keep, attn_mode=mode, mlp_mode="backward")
            for method in args.methods.split(","):
                for corpus, chunks in corpora.items():
                    scorer = make_scorer(model, method, cfg.block_size, 0)
                    losses = [reference_forward(model, cfg, scorer=scorer,
                                                input_ids=ids, labels=ids).output.loss.item() for ids in chunks]
                    d = sum(dense[corpus]) / len(chunks)
                    gap = (sum(losses) / len(chunks) - d) / d
                    rows.append({"mode": mode, "method": method, "corpus": corpus, "losses": losses,
                                 "dense": dense[corpus], "gap": gap})
                    print(f"{mode:<7} {method:<12} {corpus:<12} gap {100 * gap:+7.1f}%", flush=True)
    doc = {"benchmark": "selection_fidelity", "command": "python " + " ".join(sys.argv), "env": environment(),
           "config": {**vars(args), "model": "SmolLM2-135M-Instruct Q4_1 GGUF (fp32)", "mlp_mode": "backward",
                      "schedule": "default (first half and last layer dense)"},
           "seconds": time.perf_counter() - t0, "dense": dense, "results": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=2)
    if args.headline and files:
        loss = {r["method"]: sum(r["losses"]) / len(r["losses"]) for r in rows
                if r["mode"] == "tokens" and r["corpus"] == args.headline_corpus}
        gap = 100 * (loss[files[0]] - loss[f"oracle:{rule}"]) / loss[f"oracle:{rule}"]
        src = "benchmarks/results/" + os.path.basename(args.out) if args.out else None
        merge_headline(args.headline, {"predictor_vs_oracle_loss_gap_pct": dict(
            value=gap, source=src, command=doc["command"], when=doc["env"]["when"][:10],
            note=f"forward loss, calibrated predictor vs oracle {rule!r} selection, attn_mode tokens, "
                 f"{args.headline_corpus} (the file's calibration text must be the other one), "
                 f"{args.seq} tokens, CPU; 0 by construction in the default backward mode")})
        print(f"predictor_vs_oracle_loss_gap_pct = {gap:+.2f}")


if __name__ == "__main__":
    main()
